"""Scoring on a Ray cluster with Ray Data: :func:`score_with_ray` (the optional extra ``ray``:
``pip install "vlmood[ray]"``).

The pipeline::

    rows (id, path | bytes | source index)  --Ray tasks-->  decode + preprocess (vlmood.data.load_image, the
    encoder's preprocess)  --actor pool-->  encode + score with every detector  -->  Parquet / pandas

- The driver builds the encoder once, fits every detector there (class text embeddings, NegLabel's negatives:
  computed once, or read from the shared text cache) and ships each one to the actors as a detector file
  (:meth:`Detector.save <vlmood.detectors.base.Detector.save>`); an actor loads the encoder and those files once
  (:func:`vlmood.load_detector` uses their stored embeddings: no text is encoded on the workers).
- An unreadable image is one row with its ``error``; the run goes on.
- A worker that dies mid-run is restarted by Ray and its batch retried (``max_restarts``, ``max_task_retries``):
  Ray Data discards the outputs of a failed attempt, so no row is lost or duplicated.
- Out of GPU memory on a batch: the batch is halved (down to one image) and retried, with a warning.
- A cluster that does not answer gives one :class:`~vlmood.errors.ServiceError` line.

Output columns: ``row`` (the image's index in the source), ``id`` (its path, or ``NAME[i]``), ``class`` (the first
detector's predicted ID class), ``score_<name>`` per detector (higher = more in-distribution), ``is_ood_<name>`` for
each detector that has a threshold (calibrated or loaded from a detector file), ``error`` (null when scored) and,
with ``features=True``, ``features`` (the L2-normalised global image features, float32).
"""
from __future__ import annotations

import contextlib
import glob as _glob
import json
import math
import os
import re
import shutil
import socket
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ._io import atomic_write_bytes, printable
from .errors import ImageLoadError, InvalidInputError, ServiceError, VlmoodError

if TYPE_CHECKING:
    import pandas as pd

    from .detectors.base import Detector
    from .encoders.base import Encoder

_RESERVED = ("row", "id", "class", "error", "features")
_MAX_BLOCKS = 10_000
"""Input rows are cut into at most this many blocks (each decoded by one Ray task)."""
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CONNECT_TIMEOUT = 5.0
"""Seconds to wait for a cluster address to accept a TCP connection before calling it unreachable."""


# ---------------------------------------------------------------------------------------------- entry point
def score_with_ray(
    source: Any,
    encoder_spec: "str | Encoder",
    detectors: Any,
    *,
    classes: Any = None,
    templates: Any = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    address: str | None = None,
    num_workers: int = 2,
    num_gpus_per_worker: float = 0,
    num_cpus_per_worker: float = 1,
    batch_size: int = 64,
    out: str | os.PathLike | None = None,
    features: bool = False,
    device: str | None = None,
    precision: str | None = None,
    image_column: str | None = None,
    max_restarts: int = 3,
    max_task_retries: int = 3,
    progress: bool | None = None,
    _crash_once: str | os.PathLike | None = None,
) -> "pd.DataFrame | Path | str":
    """Score every image of ``source`` with ``detectors`` on Ray Data; one output row per image.

    Args:
        source: a folder, glob, image file, CSV/TSV manifest or list of paths (see :func:`vlmood.data.list_images`);
            a Parquet file (``*.parquet``), a glob of them (``data/*.parquet``) or a list of them, whose
            ``image_column`` holds encoded image bytes, image paths (relative ones from the file's folder) or
            ``{"bytes", "path"}`` structs; ``"hf:NAME[:split]"`` or a ``datasets.Dataset``; a list of PIL images; or
            a :class:`vlmood.data.ImageSource`. On a multi-node cluster every worker must see the files (shared
            storage).
        encoder_spec: a model spec (``open_clip:ViT-B-16/openai``, ``toyworld``, ...) or an
            :class:`~vlmood.encoders.Encoder` already built on the driver (the workers load its spec).
        detectors: a method name (``"mcm"``), a detector file (``.vlmood``), a fitted or unfitted
            :class:`~vlmood.detectors.base.Detector`, a list of these, or a dict ``{column name: one of these}``.
        classes, templates: the ID classes and templates of detectors given by method name.
        params: hyper-parameters of detectors given by method name, ``{"neglabel": {"ratio": 0.5}}``.
        address: the Ray cluster: ``"auto"`` (the one started on this machine with ``ray start``),
            ``"HOST:6379"``, ``"ray://HOST:10001"`` (Ray Client); None: the one this process is connected to,
            ``$RAY_ADDRESS`` (set by ``ray job submit``), else a local Ray started for this call and stopped after.
        num_workers: scoring actors (each loads the encoder once).
        num_gpus_per_worker, num_cpus_per_worker: what each actor reserves (fractions share a device).
        batch_size: images per forward pass (and per decoding task).
        out: None returns a ``pandas.DataFrame``; ``*.parquet`` writes one file (rows in source order, written
            atomically, collected on the driver); any other path is a folder the workers write Parquet files into
            (rows in any order; sort by ``row``), created from nothing or an empty folder; a URI (``s3://...``) is
            handed to Ray as it is.
        features: also output the global image features (a ``features`` list column).
        device, precision: of the actors (default: ``cuda`` with bf16/fp16 when they reserve a GPU, else ``cpu``
            and fp32). The text side is computed on the driver: on its GPU when it has one, else on its CPU in
            fp32.
        image_column: the image column of Parquet files and datasets (default ``image``, else the first of
            :data:`vlmood.data.PATH_COLUMNS` or ``bytes``).
        max_restarts, max_task_retries: Ray actor fault tolerance (a dead actor is restarted up to
            ``max_restarts`` times and its batch retried up to ``max_task_retries`` times; ``-1``: without limit).
        progress: Ray Data's progress bars (None: Ray's default).
        _crash_once: test hook: a marker file; the first actor to reach its second batch while it is absent creates
            it and kills its own process (a worker lost mid-run).

    Returns:
        the DataFrame (``out=None``) or the path written.

    Raises:
        InvalidInputError: bad arguments, an empty or unreadable source, a detector that cannot be shipped.
        ServiceError: the cluster at ``address`` does not answer, or the Ray run failed for good (workers kept
            dying past ``max_restarts``).
    """
    try:
        import ray
    except ImportError:
        raise InvalidInputError('the Ray engine needs Ray Data: pip install "vlmood[ray]" (or "ray[data]>=2.9")') \
            from None
    _check_args(num_workers, num_gpus_per_worker, num_cpus_per_worker, batch_size, device, max_restarts,
                max_task_retries)
    target = _check_out(out)
    if address not in (None, "auto"):
        _check_reachable(str(address))  # before any model loads: a wrong address fails in seconds
    plan = _plan_source(source, image_column)
    encoder, spec = _driver_encoder(encoder_spec, device, precision, num_gpus_per_worker)
    named = _build_detectors(detectors, encoder, classes, templates, params)
    files = _detector_files(named)
    actor_device = device if device is not None else ("cuda" if num_gpus_per_worker > 0 else "cpu")
    shape = _preprocess_shape(encoder)

    started = _connect(address, num_workers * num_cpus_per_worker)
    ctx = ray.data.DataContext.get_current()
    bars = ctx.enable_progress_bars
    try:
        _warn_resources(ray, num_workers, num_cpus_per_worker, num_gpus_per_worker)
        if progress is not None:
            ctx.enable_progress_bars = bool(progress)
        ds = _dataset(ray, plan, batch_size, encoder.preprocess, shape)
        with warnings.catch_warnings():  # Ray >= 2.5x deprecates actor options as keywords, and has no other way
            warnings.filterwarnings("ignore", message=r".*ray_remote_args. is deprecated")
            ds = ds.map_batches(
                _Scorer, batch_size=batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=num_workers),
                num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker,
                max_restarts=max_restarts, max_task_retries=max_task_retries,
                fn_constructor_kwargs=dict(spec=spec, fingerprint=encoder.fingerprint, detectors=files,
                                           device=actor_device, precision=precision, features=bool(features),
                                           batch_size=batch_size,
                                           crash_once=None if _crash_once is None else os.fspath(_crash_once)))
        meta = _metadata(encoder, spec, named)
        with _ray_errors(ray):
            return _collect(ray, ds, target, meta)
    finally:
        ctx.enable_progress_bars = bars
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------- arguments
def _check_args(num_workers: Any, gpus: Any, cpus: Any, batch_size: Any, device: Any, max_restarts: Any,
                max_task_retries: Any) -> None:
    def integer(v: Any, lo: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not integer(num_workers, 1):
        raise InvalidInputError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    if not integer(batch_size, 1):
        raise InvalidInputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not number(gpus) or gpus < 0:
        raise InvalidInputError(f"num_gpus_per_worker must be a number >= 0, got {gpus!r}")
    if not number(cpus) or cpus <= 0:
        raise InvalidInputError(f"num_cpus_per_worker must be a number > 0, got {cpus!r}")
    for name, v in (("max_restarts", max_restarts), ("max_task_retries", max_task_retries)):
        if not integer(v, -1):
            raise InvalidInputError(f"{name} must be an integer >= -1 (-1: no limit), got {v!r}")
    if device is not None and str(device).startswith("cuda") and gpus == 0:
        raise InvalidInputError(f"device {device!r} needs num_gpus_per_worker > 0: Ray hides the GPUs from workers "
                                "that reserve none")


def _check_out(out: Any) -> tuple[str, Any]:
    """``("frame", None)``, ``("file", Path)``, ``("folder", Path)`` or ``("uri", str)``, checked before any work."""
    if out is None:
        return "frame", None
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out).strip():
        raise InvalidInputError(f"out must be None, a .parquet file, a folder or a URI, got {out!r}")
    text = os.fspath(out)
    if "://" in text:
        return "uri", text
    path = Path(text).expanduser()
    up = path.parent
    while not up.exists() and up != up.parent:
        up = up.parent
    if not up.is_dir() or not os.access(up, os.W_OK):
        raise InvalidInputError(f"cannot write {printable(str(path))}: {printable(str(up))} is not a writable folder")
    if path.suffix.lower() == ".parquet":
        if path.is_dir():
            raise InvalidInputError(f"out {printable(str(path))} is a folder; give a .parquet file name, or a folder "
                                    "name without the .parquet suffix")
        return "file", path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        what = "is a file" if not path.is_dir() else "is a folder that is not empty"
        raise InvalidInputError(f"out {printable(str(path))} {what}: give a new or empty folder for the Parquet "
                                "files, or a .parquet file name")
    return "folder", path


# ---------------------------------------------------------------------------------------------- sources
class _Plan:
    """What the Ray dataset is built from: ``kind`` is ``"paths"`` (``ids``, ``paths``), ``"source"`` (an
    :class:`~vlmood.data.ImageSource` shipped once to the decoding tasks) or ``"parquet"`` (row groups)."""

    def __init__(self, kind: str, n: int, **kw: Any):
        self.kind, self.n = kind, n
        self.__dict__.update(kw)


def _is_parquet(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike)) and os.fspath(x).lower().endswith(".parquet")


def _plan_source(source: Any, image_column: str | None) -> _Plan:
    from .data import ImageSource, PathSource, as_source

    if _is_parquet(source) or (isinstance(source, (list, tuple)) and source and all(map(_is_parquet, source))):
        return _plan_parquet(source, image_column)
    if (isinstance(source, str) and source.startswith("hf:")) or type(source).__name__ in ("Dataset", "DatasetDict"):
        src = as_source(source, image_column=image_column or "image", label_column=None)
    elif isinstance(source, ImageSource):
        src = source
    else:
        src = as_source(source)
    if len(src) == 0:
        raise InvalidInputError(f"image source {printable(src.name)!r} is empty")
    if isinstance(src, PathSource):
        return _Plan("paths", len(src), ids=[printable(i) for i in src.ids], paths=list(src.paths))
    return _Plan("source", len(src), ids=[printable(i) for i in src.ids], source=src)


def _parquet_files(source: Any) -> list[str]:
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files: list[str] = []
    for x in items:
        p = os.path.expanduser(os.fspath(x))
        if os.path.isfile(p):
            files.append(p)
        elif _glob.has_magic(p):
            found = sorted(f for f in _glob.glob(p) if os.path.isfile(f))
            if not found:
                raise InvalidInputError(f"glob pattern {printable(p)!r} matches no Parquet files")
            files += found
        else:
            raise InvalidInputError(f"Parquet file not found: {printable(p)}")
    return files


def _plan_parquet(source: Any, image_column: str | None) -> _Plan:
    """Row groups of every file (only the footers are read here), the image column checked in each file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .data import PATH_COLUMNS

    groups, n = [], 0
    for f in _parquet_files(source):
        name = printable(f)
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # not Parquet, truncated, unreadable
            raise InvalidInputError(f"cannot read Parquet file {name}: {type(e).__name__}: {e}") from None
        names = pf.schema_arrow.names
        column = image_column or next((c for c in ("image", "bytes", *PATH_COLUMNS) if c in names), None)
        if column is None or column not in names:
            want = repr(image_column) if image_column else "image column (image, bytes, path, ...)"
            raise InvalidInputError(f"Parquet file {name} has no {want}; columns: {', '.join(names)} (name the "
                                    "column with image_column=)")
        t = pf.schema_arrow.field(column).type
        struct = pa.types.is_struct(t) and bool({"bytes", "path"} & {t.field(i).name for i in range(t.num_fields)})
        if not (struct or pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t)
                or pa.types.is_large_string(t)):
            raise InvalidInputError(f"Parquet file {name} column {column!r} holds {t}: expected encoded image bytes, "
                                    'image paths or {"bytes", "path"} structs')
        in_file = 0
        for g in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(g).num_rows
            if rows:
                groups.append({"file": f, "group": g, "offset": n, "in_file": in_file, "column": column})
            n += rows
            in_file += rows
    if n == 0:
        raise InvalidInputError(f"the Parquet source {printable(str(source))} holds no rows")
    return _Plan("parquet", n, groups=groups)


def _read_parquet(batch: dict[str, np.ndarray], batch_size: int):
    """Ray task: the rows of row groups as ``row``, ``id``, ``data`` (encoded bytes) and ``path`` (file-system
    bytes of a path, relative ones taken from the Parquet file's folder), ``batch_size`` rows at a time."""
    import pyarrow.parquet as pq

    for f, g, offset, in_file, column in zip(batch["file"], batch["group"], batch["offset"], batch["in_file"],
                                             batch["column"]):
        f = str(f)
        cells = pq.ParquetFile(f).read_row_group(int(g), columns=[str(column)]).column(0).to_pylist()
        folder = os.path.dirname(os.path.abspath(f))
        for start in range(0, len(cells), batch_size):
            chunk = cells[start : start + batch_size]
            ids, data, paths = [], [], []
            for k, cell in enumerate(chunk, start):
                raw = cell.get("bytes") if isinstance(cell, dict) else cell if isinstance(cell, bytes) else None
                path = cell.get("path") if isinstance(cell, dict) else cell if isinstance(cell, str) else None
                if raw or not path:
                    ids.append(f"{printable(f)}[{int(in_file) + k}]")
                    data.append(raw or b"")
                    paths.append(b"")
                else:
                    full = os.path.join(folder, os.path.expanduser(path))
                    ids.append(printable(full))
                    data.append(b"")
                    paths.append(os.fsencode(full))
            yield {"row": np.arange(int(offset) + start, int(offset) + start + len(chunk), dtype=np.int64),
                   "id": np.array(ids, dtype=object), "data": np.array(data, dtype=object),
                   "path": np.array(paths, dtype=object)}


# ---------------------------------------------------------------------------------------------- decoding
def _preprocess_shape(encoder: "Encoder") -> tuple[int, ...]:
    """The shape of one preprocessed image (constant: CLIP preprocessing resizes and crops to a fixed size)."""
    from PIL import Image

    return tuple(encoder.preprocess(Image.new("RGB", (97, 89), (128, 128, 128))).shape)


def _decode(batch: dict[str, np.ndarray], preprocess: Any, shape: tuple[int, ...], source: Any = None
            ) -> dict[str, np.ndarray]:
    """Ray task: decode and preprocess a batch; an image that fails gets zeros and its ``error`` message."""
    from .data import _open_bytes, load_image

    if source is not None and not hasattr(source, "load"):  # an ObjectRef Ray did not resolve
        import ray

        source = ray.get(source)
    n = len(batch["row"])
    pixels = np.zeros((n, *shape), dtype=np.float32)
    errors = [""] * n
    ids = batch["id"]
    for k in range(n):
        name = str(ids[k])
        try:
            if "data" in batch and len(batch["data"][k]):
                im = load_image(_open_bytes(bytes(batch["data"][k]), name))
            elif "path" in batch:
                path = bytes(batch["path"][k])
                if not path:
                    raise ImageLoadError(f"image {name} is empty (no bytes and no path)")
                im = load_image(os.fsdecode(path))
            else:
                im = source.load(int(batch["row"][k]))
        except ImageLoadError as e:
            errors[k] = printable(str(e))
            continue
        except Exception as e:  # a dataset cell that cannot be read
            errors[k] = printable(f"cannot read image {name}: {type(e).__name__}: {e}")
            continue
        try:
            t = preprocess(im)
            if tuple(t.shape) != shape:
                raise ValueError(f"preprocessing gave shape {tuple(t.shape)}, expected {shape}")
            pixels[k] = t.numpy()
        except Exception as e:  # a transform failing on a strange image: reported like a decode error
            errors[k] = printable(f"cannot preprocess image {name}: {type(e).__name__}: {e}")
    return {"row": np.asarray(batch["row"], dtype=np.int64), "id": np.asarray(ids, dtype=object),
            "pixels": pixels, "error": np.array(errors, dtype=object)}


def _dataset(ray: Any, plan: _Plan, batch_size: int, preprocess: Any, shape: tuple[int, ...]) -> Any:
    """The Ray dataset of decoded, preprocessed images (lazy): rows cut into blocks, decoded by Ray tasks."""
    import pyarrow as pa

    kw: dict[str, Any] = {"preprocess": preprocess, "shape": shape}
    if plan.kind == "parquet":
        table = pa.Table.from_pylist(plan.groups)
        ds = ray.data.from_arrow([table.slice(i, 1) for i in range(table.num_rows)])
        ds = ds.map_batches(_read_parquet, batch_size=1, batch_format="numpy", fn_kwargs={"batch_size": batch_size})
    else:
        cols = {"row": pa.array(np.arange(plan.n, dtype=np.int64)), "id": pa.array(plan.ids, pa.string())}
        if plan.kind == "paths":
            cols["path"] = pa.array([os.fsencode(p) for p in plan.paths], pa.binary())
        else:
            kw["source"] = ray.put(plan.source)
        table = pa.table(cols)
        per_block = max(batch_size, math.ceil(plan.n / _MAX_BLOCKS))
        ds = ray.data.from_arrow([table.slice(i, per_block) for i in range(0, plan.n, per_block)])
    return ds.map_batches(_decode, batch_size=batch_size, batch_format="numpy", fn_kwargs=kw)


# ---------------------------------------------------------------------------------------------- the driver's side
def _driver_encoder(encoder_spec: Any, device: Any, precision: str | None, gpus: float) -> tuple["Encoder", str]:
    """The encoder the driver fits the detectors with, and the spec the workers load (one that loads anywhere)."""
    import torch

    from .encoders.registry import portable_spec
    from .detectors.persist import _usable_precision
    from .encoders import load_encoder
    from .encoders.base import PRECISIONS

    if precision is not None and precision not in PRECISIONS:
        raise InvalidInputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if hasattr(encoder_spec, "fingerprint") and hasattr(encoder_spec, "spec"):
        encoder = encoder_spec
    elif isinstance(encoder_spec, (str, os.PathLike)):
        actor = str(device) if device is not None else ("cuda" if gpus > 0 else "cpu")
        here = "cuda" if actor.startswith("cuda") and torch.cuda.is_available() else "cpu"
        encoder = load_encoder(os.fspath(encoder_spec), device=here, precision=_usable_precision(precision, here))
    else:
        raise InvalidInputError(f"encoder_spec must be a model spec or an Encoder, got {type(encoder_spec).__name__}")
    return encoder, portable_spec(encoder)


def _build_detectors(detectors: Any, encoder: "Encoder", classes: Any, templates: Any,
                     params: Mapping[str, Mapping[str, Any]] | None) -> list[tuple[str, "Detector"]]:
    """``[(column name, fitted detector)]``: method names built here, files loaded here, objects checked."""
    from .detectors import canonical_method, make_detector
    from .detectors.base import Detector
    from .detectors.persist import load_detector

    if isinstance(detectors, Mapping):
        items = [(str(k), v) for k, v in detectors.items()]
    elif isinstance(detectors, (str, os.PathLike, Detector)):
        items = [(None, detectors)]
    else:
        try:
            items = [(None, d) for d in detectors]
        except TypeError:
            raise InvalidInputError(f"detectors must be a method name, a detector file, a Detector, a list of these "
                                    f"or a dict of them, got {type(detectors).__name__}") from None
    if not items:
        raise InvalidInputError("no detectors given")
    params = dict(params or {})
    unknown = [k for k in params if not _known(k)]
    if unknown:
        raise InvalidInputError(f"params names unknown method(s): {', '.join(map(repr, unknown))}")
    params = {canonical_method(k): dict(v) for k, v in params.items()}
    out: list[tuple[str, Detector]] = []
    for name, d in items:
        if isinstance(d, Detector):
            det = d
        elif isinstance(d, (str, os.PathLike)) and os.path.exists(os.path.expanduser(os.fspath(d))):
            det = load_detector(os.path.expanduser(os.fspath(d)), encoder)
        elif isinstance(d, str):
            method = canonical_method(d)
            kw = dict(params.get(method, {}))
            if templates is not None:
                kw.setdefault("templates", templates)
            det = make_detector(method, encoder, classes, **kw)
        else:
            raise InvalidInputError(f"a detector must be a method name, a detector file or a Detector, got "
                                    f"{type(d).__name__}")
        if not hasattr(det, "encoder") or not hasattr(det.encoder, "fingerprint"):
            raise InvalidInputError(f"{type(det).__name__} is not a CLIP-based detector: score it in one process "
                                    "(Detector.score)")
        if det.encoder.fingerprint != encoder.fingerprint:
            raise InvalidInputError(f"the {det.name} detector was built on {det.encoder.spec}, not on the model the "
                                    f"workers load ({encoder.spec}); build it on that model or pass its encoder")
        if det.needs_local:
            encoder.require_local()
        out.append((name or det.name, det.fit()))
    names = [n for n, _ in out]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidInputError(f"two detectors are named {', '.join(map(repr, repeated))}: give a dict "
                                "{column name: detector} to name them apart")
    bad = [n for n in names if n in _RESERVED or not n.strip()]
    if bad:
        raise InvalidInputError(f"detector name {bad[0]!r} is reserved or empty; choose another column name")
    return out


def _known(method: str) -> bool:
    from .detectors import canonical_method

    try:
        canonical_method(method)
    except InvalidInputError:
        return False
    return True


def _detector_files(named: list[tuple[str, "Detector"]]) -> list[tuple[str, bytes]]:
    """Each detector as the bytes of its detector file (settings, stored text embeddings, threshold)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="vlmood-ray-") as tmp:
        for k, (name, det) in enumerate(named):
            path = det.save(Path(tmp) / f"{k}.vlmood")
            out.append((name, path.read_bytes()))
    return out


def _metadata(encoder: "Encoder", spec: str, named: list[tuple[str, "Detector"]]) -> dict[str, Any]:
    import vlmood

    return {"vlmood": vlmood.__version__, "encoder": {"spec": spec, "fingerprint": encoder.fingerprint},
            "detectors": {n: {"method": d.name, "params": d.get_params(), "threshold": d.threshold_}
                          for n, d in named},
            "classes": list(named[0][1].classes)}


# ---------------------------------------------------------------------------------------------- the cluster
def _check_reachable(address: str) -> None:
    """A TCP connection to ``HOST:PORT`` / ``ray://HOST:PORT``, else one :class:`ServiceError` line."""
    text = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = text.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInputError(f"Ray address {address!r} must be 'auto', 'HOST:PORT' or 'ray://HOST:PORT'")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT):
            pass
    except OSError as e:
        why = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e) or type(e).__name__)
        raise ServiceError(f"the Ray cluster at {address} is not reachable ({why}); start it with `ray start --head` "
                           "or check the address (the head's port is 6379, Ray Client's ray://HOST:10001)") from None


def _connect(address: str | None, cpus_needed: float) -> bool:
    """Connect to (or start) Ray; True when this call did it (and must shut it down)."""
    import ray

    if ray.is_initialized():
        if address not in (None, "auto"):
            raise InvalidInputError(f"this process is already connected to Ray: drop address={address!r} to use that "
                                    "connection, or call ray.shutdown() first")
        return False
    kwargs: dict[str, Any] = {}
    if address is None and not os.environ.get("RAY_ADDRESS"):  # a local instance: the actors, and room to decode
        kwargs = {"num_cpus": max(os.cpu_count() or 1, math.ceil(cpus_needed) + 1), "include_dashboard": False}
    try:
        ray.init(address=address, **kwargs)
    except Exception as e:  # ConnectionError, RuntimeError, TimeoutError... from Ray
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise ServiceError(f"could not connect to {where}: {first}") from None
    return True


def _warn_resources(ray: Any, workers: int, cpus: float, gpus: float) -> None:
    have = ray.cluster_resources()
    need = {"CPU": workers * cpus + 1, "GPU": workers * gpus}
    short = [f"{need[k]:g} {k} (the cluster has {have.get(k, 0):g})" for k in need if need[k] > have.get(k, 0)]
    if short:
        warnings.warn(f"the scoring actors and one decoding task need {' and '.join(short)}: the run waits for more "
                      "nodes (an autoscaler) and otherwise never starts; lower num_workers or the per-worker "
                      "resources", stacklevel=3)


@contextlib.contextmanager
def _ray_errors(ray: Any):
    """A vlmood error raised in a worker comes out as itself; a run that Ray gave up on as one ServiceError."""
    try:
        yield
    except VlmoodError:
        raise
    except Exception as e:
        cause: Any = e
        for _ in range(10):
            if isinstance(cause, VlmoodError):
                raise cause from None
            cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
            if cause is None:
                break
        if isinstance(e, ray.exceptions.RayError):
            from . import errors

            # an actor that died in __init__ keeps only the text of its traceback: "vlmood.errors.NAME: message"
            raised = re.findall(r"^vlmood\.errors\.(\w+): (.+)$", _ANSI.sub("", str(e)), flags=re.M)
            cls = getattr(errors, raised[-1][0], None) if raised else None
            if isinstance(cls, type) and issubclass(cls, VlmoodError):
                raise cls(raised[-1][1]) from None
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ServiceError(f"the Ray run failed: {type(e).__name__}: {first}") from e
        raise


# ---------------------------------------------------------------------------------------------- the workers
def _oom_error() -> type:
    import torch

    return getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def encode_in_chunks(encoder: "Encoder", pixels: Any, local: bool, chunk: int) -> tuple[Any, Any, int]:
    """``encoder.encode_images`` over ``pixels`` ``[N, 3, H, W]`` in chunks of ``chunk`` images; out of GPU memory
    halves the chunk (down to one image, then the error stands) and retries it, with a warning. Returns the global
    features, the local ones (or None) and the chunk size that worked, for the next batch."""
    import torch

    oom = _oom_error()
    g_parts, l_parts, i = [], [], 0
    while i < len(pixels):
        part = pixels[i : i + chunk]
        try:
            with warnings.catch_warnings():  # non-finite rows are reported as image errors by the caller
                warnings.filterwarnings("ignore", message=r".*gave non-finite features", category=UserWarning)
                out = encoder.encode_images(part, local=local, batch_size=len(part))
        except oom:
            if len(part) == 1:
                raise
            chunk = len(part) // 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            warnings.warn(f"out of GPU memory on a batch of {len(part)} images: retrying in batches of {chunk}",
                          stacklevel=2)
            continue
        g, loc = out if local else (out, None)
        g_parts.append(g)
        if loc is not None:
            l_parts.append(loc)
        i += len(part)
    return torch.cat(g_parts), (torch.cat(l_parts) if local else None), chunk


class _Scorer:
    """A Ray actor: loads the encoder and the shipped detector files once, then encodes and scores batches."""

    def __init__(self, spec: str, fingerprint: str, detectors: list[tuple[str, bytes]], device: str | None,
                 precision: str | None, features: bool, batch_size: int, crash_once: str | None = None):
        from .detectors.persist import load_detector
        from .encoders import load_encoder

        self.encoder = load_encoder(spec, device=device, precision=precision)
        if self.encoder.fingerprint != fingerprint:
            raise InvalidInputError(f"the workers' {spec} has other weights than the driver's (fingerprint "
                                    f"{self.encoder.fingerprint}, driver {fingerprint}): every node must hold the "
                                    "same checkpoint")
        self.detectors = []
        with tempfile.TemporaryDirectory(prefix="vlmood-ray-") as tmp:
            for k, (name, data) in enumerate(detectors):
                path = Path(tmp) / f"{k}.vlmood"
                path.write_bytes(data)
                self.detectors.append((name, load_detector(path, self.encoder, cache=False)))
        self.local = any(d.needs_local for _, d in self.detectors)
        self.features, self.chunk = features, batch_size
        self.crash_once, self.calls = crash_once, 0

    def _maybe_crash(self) -> None:
        """Test hook: the first actor to reach its second batch while the marker file is absent creates it and
        dies (a worker lost mid-run)."""
        if self.crash_once is None or self.calls < 2:
            return
        try:
            os.close(os.open(self.crash_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa
        import torch

        self.calls += 1
        self._maybe_crash()
        n = len(batch["row"])
        errors: list[str | None] = [str(e) if e else None for e in batch["error"]]  # "": decoded
        ok = [k for k in range(n) if errors[k] is None]
        d = self.encoder.embed_dim
        scores = {name: np.full(n, np.nan) for name, _ in self.detectors}
        classes: list[str | None] = [None] * n
        feats = np.zeros((n, d), dtype=np.float32)
        if ok:
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            g, loc, self.chunk = encode_in_chunks(self.encoder, pixels, self.local, self.chunk)
            finite = torch.isfinite(g).all(dim=1)
            if loc is not None:
                finite &= torch.isfinite(loc).flatten(1).all(dim=1)
            keep = [j for j, f in enumerate(finite.tolist()) if f]
            for j, f in enumerate(finite.tolist()):
                if not f:
                    errors[ok[j]] = (f"non-finite features (NaN/Inf) for image {batch['id'][ok[j]]}: the encoder "
                                     "overflowed (fp16? use fp32 precision) or its weights are broken")
            rows = [ok[j] for j in keep]
            if rows:
                g, loc = g[keep], (loc[keep] if loc is not None else None)
                for name, det in self.detectors:
                    scores[name][rows] = det.score_features(g, loc if det.needs_local else None)
                first = self.detectors[0][1]
                for r, c in zip(rows, first.classify_features(g).tolist()):
                    classes[r] = first.classes[c]
                feats[rows] = g.numpy()
        valid = np.array([e is None for e in errors], dtype=bool)
        cols: dict[str, Any] = {"row": pa.array(np.asarray(batch["row"], dtype=np.int64)),
                                "id": pa.array([str(i) for i in batch["id"]], pa.string()),
                                "class": pa.array(classes, pa.string())}
        for name, det in self.detectors:
            cols[f"score_{name}"] = pa.array(scores[name].astype(np.float64), mask=~valid)
            if det.threshold_ is not None:
                cols[f"is_ood_{name}"] = pa.array(~(scores[name] >= det.threshold_), mask=~valid)
        cols["error"] = pa.array(errors, pa.string())
        if self.features:
            try:
                cols["features"] = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), d,
                                                                     mask=pa.array(~valid))
            except TypeError:  # pyarrow < 15: no mask
                cols["features"] = pa.array([f.tolist() if v else None for f, v in zip(feats, valid)],
                                            pa.list_(pa.float32(), d))
        return pa.table(cols)


# ---------------------------------------------------------------------------------------------- output
def _collect(ray: Any, ds: Any, target: tuple[str, Any], meta: dict[str, Any]) -> Any:
    import pyarrow as pa

    kind, where = target
    if kind in ("folder", "uri"):
        return _write_folder(ds, kind, where)
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    table = pa.concat_tables(tables).sort_by("row")
    table = table.replace_schema_metadata({"vlmood": json.dumps(meta, default=str)})
    if kind == "frame":
        return table.to_pandas()
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(where, buf.getvalue().to_pybytes())
    except OSError as e:
        raise InvalidInputError(f"cannot write {printable(str(where))}: {e.strerror or e}") from None
    return where


def _write_folder(ds: Any, kind: str, where: Any) -> Any:
    """The workers write the Parquet files: into a new sibling folder renamed to ``where`` when complete (removed
    on failure); a URI is handed to Ray as it is."""
    if kind == "uri":
        ds.write_parquet(where)
        return where
    tmp = where.with_name(f".{where.name}.{uuid.uuid4().hex}.tmp")
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        ds.write_parquet(str(tmp))
        if where.is_dir():
            where.rmdir()  # empty (checked before the run)
        os.replace(tmp, where)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return where


__all__ = ["encode_in_chunks", "score_with_ray"]
