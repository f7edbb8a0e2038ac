"""Frozen image features of augmented training views, computed once and stored on disk.

The image tower never changes while prompts train, so instead of running it every step (as the reference does)
each sampled training image is augmented into ``V`` fixed views, seeded, and each view is encoded once: global
features ``[N, V, D]`` (float32) and, for LoCoOp, local features ``[N, V, P, D]`` (float16, half the disk) in
numpy memory maps. Memory stays bounded (the OS pages the maps in), and an interrupted extraction resumes: a view
counts as done only once its features are flushed. At epoch ``e`` each image uses one of its views, drawn from a
generator seeded with ``(seed, 2, e)`` (see :mod:`vlmood.tuning.trainer`).

Space: the store's size is computed first (:func:`store_bytes`); a new store checks the free space of its folder
and reserves its files with ``posix_fallocate`` (where the OS has it), so a full disk is a one-line
:class:`ViewStorageError` before any feature is written, never a ``SIGBUS`` while writing into a sparse map. When the
folder cannot be used, a store of at most :data:`MEMORY_LIMIT` bytes (and half the available memory) stays in memory
with a warning; a larger one raises :class:`ViewStorageError` saying how many bytes are needed, where, and how to
need fewer (fewer views or shots) or put them elsewhere (``VLMOOD_CACHE``).

Augmentation, as CoOp's configs (``INPUT.TRANSFORMS: random_resized_crop, random_flip, normalize``, bicubic) with
Dassl's defaults (``RRCROP_SCALE = (0.08, 1.0)``, torchvision's aspect-ratio range ``(3/4, 4/3)``, flip with
probability 0.5): a random resized crop to the encoder's input resolution, a horizontal flip, then the encoder's
own normalisation (mean/std read from its ``preprocess``). The crop follows torchvision's
``RandomResizedCrop.get_params`` (10 tries, then a central crop), drawn from a numpy generator seeded with
``(seed, 3, image index, view)`` so every view is reproducible. (The tag 3 keeps this stream apart from the trainer's
sampling ``(seed, 1)`` and epoch ``(seed, 2, e)`` streams: numpy's ``SeedSequence`` ignores trailing zeros, so
untagged ``(seed, k, 0)`` would equal ``(seed, k)``.)

Disk use per image and view: ``4 * D`` bytes global, ``2 * P * D`` local (ViT-B/16: 2 KB and 196 KB).
"""
from __future__ import annotations

import hashlib
import errno
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .._io import printable
from .._paths import cache_root
from .._progress import progress as _progress
from ..errors import ImageLoadError, InvalidInputError, VlmoodError

DEFAULT_VIEWS = 8
"""Augmented views per training image (each epoch uses one of them)."""
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
FLIP_P = 0.5
VIEW_STREAM = 3
"""Tag of the views' random streams: ``default_rng([seed, VIEW_STREAM, image, view])``."""
MEMORY_LIMIT = 2 * 2**30
"""The largest view store (bytes) kept in memory when its folder cannot be used (also at most half the available
memory)."""
_VERSION = "views-v2"


class ViewStorageError(VlmoodError, OSError):
    """The view features fit neither on disk where they go nor in memory; the message says how to need less."""


def view_rng(seed: int, image: int, view: int) -> np.random.Generator:
    """The generator of view ``view`` of image ``image`` (its random resized crop and flip)."""
    return np.random.default_rng([seed, VIEW_STREAM, image, view])


def store_bytes(n: int, views: int, dim: int, patches: int | None) -> int:
    """Bytes of a view store: global float32 ``[n, V, D]``, local float16 ``[n, V, P, D]``, done flags ``[n, V]``."""
    return n * views * (4 * dim + 1 + (2 * patches * dim if patches else 0))


def _gb(b: float) -> str:
    return f"{b / 1e9:.3g} GB" if b >= 1e8 else f"{b / 1e6:.3g} MB"


def _memory_limit() -> int:
    """:data:`MEMORY_LIMIT`, or half the available memory when that is less (where the OS tells it)."""
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return MEMORY_LIMIT
    return int(min(MEMORY_LIMIT, avail // 2)) if avail > 0 else MEMORY_LIMIT


def _reserve(path: Path) -> None:
    """Allocate every block of ``path`` now (``posix_fallocate``), so writing into its memory map cannot hit a full
    disk later (a ``SIGBUS``, not an exception). Raises OSError (ENOSPC, EDQUOT...); a file system without the call
    keeps the sparse file (the free-space check before still holds)."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Geometry:
    """Input resolution and normalisation of an encoder's preprocessing."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def geometry(encoder: Any) -> Geometry:
    """Read the input size (centre crop, else resize) and the normalisation from ``encoder.preprocess``."""
    steps = getattr(encoder.preprocess, "transforms", [encoder.preprocess])
    size = mean = std = None
    for t in steps:
        name = type(t).__name__
        if name == "Normalize":
            mean, std = tuple(float(x) for x in t.mean), tuple(float(x) for x in t.std)
        elif name == "CenterCrop" or (name == "Resize" and size is None):
            s = t.size
            size = int(s if isinstance(s, int) else s[0])
    if size is None:
        s = getattr(getattr(encoder.model, "visual", None), "image_size", None)
        size = int(s if isinstance(s, int) else s[0]) if s is not None else None
    if size is None or mean is None or std is None:
        raise InvalidInputError(f"cannot read the input size and normalisation from the preprocessing of "
                                f"{encoder.spec}; prompt learning needs an open_clip encoder")
    return Geometry(size, mean, std)  # type: ignore[arg-type]


def crop_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` of a random resized crop (torchvision's ``RandomResizedCrop.get_params``)."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def augment(image: Image.Image, rng: np.random.Generator, geo: Geometry) -> torch.Tensor:
    """One augmented view ``[3, S, S]``: random resized crop (bicubic), horizontal flip, normalisation."""
    left, top, w, h = crop_box(rng, *image.size)
    out = image.resize((geo.size, geo.size), Image.BICUBIC, box=(left, top, left + w, top + h))
    if rng.uniform() < FLIP_P:
        out = ImageOps.mirror(out)
    x = torch.from_numpy(np.asarray(out, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(geo.mean).view(3, 1, 1)
    std = torch.tensor(geo.std).view(3, 1, 1)
    return (x - mean) / std


class ViewStore:
    """View features of ``n`` images: ``global_`` ``[n, V, D]`` float32, ``local`` ``[n, V, P, D]`` float16 (or
    None), ``done`` ``[n, V]`` uint8 flags; memory maps in ``folder``, or plain arrays when ``folder`` is None."""

    def __init__(self, folder: Path | None, n: int, views: int, dim: int, patches: int | None, key: str):
        self.folder, self.n, self.views, self.dim, self.patches = folder, n, views, dim, patches
        shapes = {"global": ((n, views, dim), np.float32), "done": ((n, views), np.uint8)}
        if patches is not None:
            shapes["local"] = ((n, views, patches, dim), np.float16)
        if folder is None:
            arrays = {name: np.zeros(shape, dtype) for name, (shape, dtype) in shapes.items()}
        else:
            arrays = self._open(folder, shapes, key)
        self.global_, self.done, self.local = arrays["global"], arrays["done"], arrays.get("local")

    @staticmethod
    def _open(folder: Path, shapes: dict[str, Any], key: str) -> dict[str, np.ndarray]:
        """Open the maps of a store with the same key and shapes, else create them (deleting only our files).

        A new store first needs its size free in ``folder``, then its files are reserved block by block
        (:func:`_reserve`); either failing raises OSError (ENOSPC) and leaves no file behind."""
        meta = {"version": _VERSION, "key": key, "shapes": {k: list(v[0]) for k, v in shapes.items()}}
        meta_path = folder / "meta.json"
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else None
        except (OSError, ValueError):
            old = None
        fresh = old != meta or not all((folder / f"{k}.npy").is_file() for k in shapes)
        if not fresh:
            return {k: np.lib.format.open_memmap(folder / f"{k}.npy", mode="r+") for k in shapes}
        folder.mkdir(parents=True, exist_ok=True)
        names = ("meta.json", "global.npy", "local.npy", "done.npy")
        for f in names:
            (folder / f).unlink(missing_ok=True)
        need = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in shapes.values())
        free = shutil.disk_usage(folder).free
        if free < need + 2**20:
            raise OSError(errno.ENOSPC, f"{_gb(need)} needed, {_gb(free)} free", str(folder))
        arrays: dict[str, np.ndarray] = {}
        try:
            for k, (shape, dtype) in shapes.items():
                arrays[k] = np.lib.format.open_memmap(folder / f"{k}.npy", mode="w+", dtype=dtype, shape=shape)
                _reserve(folder / f"{k}.npy")
            arrays["done"][:] = 0
            arrays["done"].flush()
            meta_path.write_text(json.dumps(meta), encoding="utf-8")
        except OSError:
            arrays.clear()  # drop the maps, then the files: a half-made store must not stay (nor hold the space)
            for f in names:
                (folder / f).unlink(missing_ok=True)
            raise
        return arrays

    def _flush(self, a: np.ndarray) -> None:
        if isinstance(a, np.memmap):
            a.flush()

    def write(self, rows: Sequence[tuple[int, int]], g: torch.Tensor, loc: torch.Tensor | None) -> None:
        """Store features of ``(image, view)`` pairs, flush them, then mark the pairs done."""
        k = np.array([r[0] for r in rows])
        v = np.array([r[1] for r in rows])
        self.global_[k, v] = g.numpy()
        if self.local is not None and loc is not None:
            self.local[k, v] = loc.numpy().astype(np.float16)
            self._flush(self.local)
        self._flush(self.global_)
        self.done[k, v] = 1
        self._flush(self.done)

    def batch(self, images: np.ndarray, views: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features of ``images[i]``'s view ``views[i]``: ``[B, D]`` and ``[B, P, D]`` (float32)."""
        g = torch.from_numpy(np.ascontiguousarray(self.global_[images, views]))
        loc = None
        if self.local is not None:
            loc = torch.from_numpy(np.ascontiguousarray(self.local[images, views]).astype(np.float32))
        return g, loc


def store_key(encoder: Any, identities: Sequence[str], views: int, seed: int, local: bool) -> str:
    """A hash of everything the view features depend on."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": _VERSION, "encoder": encoder.fingerprint, "precision": encoder.cache_precision,
                         "preprocess": encoder.preprocess_key, "views": views, "seed": seed, "local": local,
                         "scale": CROP_SCALE, "ratio": CROP_RATIO, "flip": FLIP_P}).encode())
    for ident in identities:
        h.update(ident.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:32]


def extract_views(encoder: Any, source: Any, indices: Sequence[int], identities: Sequence[str], views: int,
                  seed: int, local: bool, folder: str | os.PathLike | None = None,
                  progress: bool | None = None) -> ViewStore:
    """Encode ``views`` augmented views of each image ``source.load(indices[k])``, once; resume a partial store.

    ``folder``: where the memory maps live (default ``$VLMOOD_CACHE/tuning-views/<key>``, the key hashing the
    encoder, the images, ``views``, ``seed`` and ``local``). Raises :class:`ImageLoadError` naming an image that
    cannot be decoded or whose features are not finite.
    """
    key = store_key(encoder, identities, views, seed, local)
    root = Path(folder) if folder is not None else cache_root() / "tuning-views" / key
    geo = geometry(encoder)
    probe = torch.zeros(1, 3, geo.size, geo.size)
    out = encoder.encode_images(probe, local=True) if local else encoder.encode_images(probe)
    patches = int(out[1].shape[1]) if local else None
    dim = int((out[0] if local else out).shape[-1])
    need = store_bytes(len(indices), views, dim, patches)
    try:
        store = ViewStore(root, len(indices), views, dim, patches, key)
    except OSError as e:
        why = e.strerror or str(e)
        limit = _memory_limit()
        if need > limit:
            raise ViewStorageError(
                f"the view features of {len(indices)} images x {views} views need {_gb(need)} ({need} bytes) but "
                f"cannot be stored in {printable(str(root))} ({why}), and that is more than the {_gb(limit)} kept "
                "in memory; use fewer views or shots (views=/shots=, --views/--shots), or set VLMOOD_CACHE to a "
                "folder on a disk with more free space") from e
        warnings.warn(f"cannot store view features in {printable(str(root))} ({why}); keeping them in memory "
                      f"({_gb(need)}; an interrupted extraction will start over)", stacklevel=3)
        store = ViewStore(None, len(indices), views, dim, patches, key)
    # Fixed batches of (image, view) pairs, image-major: a batch with any view missing is recomputed whole, so the
    # features (and the training that uses them) do not depend on where an earlier extraction was interrupted.
    bs = encoder.image_batch_size
    pairs = [(k, v) for k in range(len(indices)) for v in range(views)]
    batches = [pairs[i : i + bs] for i in range(0, len(pairs), bs)]
    todo = [b for b in batches if not all(store.done[k, v] for k, v in b)]
    loaded: tuple[int, Image.Image] | None = None
    n_todo = sum(len(b) for b in todo)
    start = (f"encoding {n_todo:,} augmented views ({len(indices)} images x {views}) with {encoder.spec}"
             + ("" if store.folder is None else " — stored for later runs"))
    with _progress(n_todo, "encoding views", "views", progress, start=start) as bar:
        for batch in todo:
            tensors = []
            for k, v in batch:
                if loaded is None or loaded[0] != k:
                    loaded = (k, source.load(indices[k]))
                tensors.append(augment(loaded[1], view_rng(seed, k, v), geo))
            res = encoder.encode_images(torch.stack(tensors), local=local)
            g, loc = res if local else (res, None)
            bad = ~torch.isfinite(g).all(dim=-1)
            if loc is not None:
                bad |= ~torch.isfinite(loc).all(dim=-1).all(dim=-1)
            if bool(bad.any()):
                k = batch[int(bad.nonzero()[0, 0])][0]
                raise ImageLoadError(f"image {printable(source.ids[indices[k]])} gives non-finite features on "
                                     f"{encoder.describe()}")
            store.write(batch, g, loc)
            bar.update(len(batch))
    return store
