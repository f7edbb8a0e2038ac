"""One file format for every detector: :meth:`Detector.save <vlmood.detectors.base.Detector.save>`,
:func:`load_detector` (also ``vlmood.load_detector``) and :func:`read_detector_meta`.

A detector file is one safetensors file (suffix ``.vlmood`` recommended). Its header metadata holds
``format = "vlmood.detector"``, ``version = "1"`` and ``meta``, a JSON object::

    {"format": "vlmood.detector", "version": 1, "vlmood": "0.1.0", "created": "2025-01-31T12:00:00Z",
     "method": "neglabel",                       # registry name (vlmood.DETECTORS) or "lvlm"
     "params": {...},                            # the hyper-parameters of __init__ (Detector.get_params())
     "classes": [...], "templates": [...],       # templates: [] with learned prompts and for "lvlm"
     "neg_templates": {"noun": [...], ...},      # NegLabel/CSP, else null
     "negatives": [{"label": ..., "pos": ...}],  # NegLabel/CSP, else null
     "encoder": {"spec": ..., "fingerprint": ..., "precision": ...},   # null for "lvlm"
     "threshold": float | null, "tpr": float | null,                    # calibrate(): threshold_ and tpr_
     "prompts": {...} | null,                    # learned prompts' metadata, as LearnedPrompts.save writes it
     "clipn": {...} | null,                      # CLIPN's no-side metadata, as CLIPNModel.save writes it
     "lvlm": {...} | null}                       # LVLM client config ("client": "openai" | "transformers" |
                                                 # "custom", base URL, model, ...); never an API key

Tensors (float32): ``text`` ``[C, D]``, the ID class embeddings computed on the recorded encoder; ``negatives``
``[M, D]`` (NegLabel/CSP, one row per recorded negative); ``text_no`` ``[C, D]`` and ``clipn.<name>`` (CLIPN: the
no side's class embeddings and the trained no side itself, under :meth:`CLIPNModel.state_dict_no
<vlmood.clipn.CLIPNModel.state_dict_no>`'s names); ``prompts.ctx`` (learned prompts' context).

Loading with the recorded encoder (same fingerprint) uses the stored embeddings as they are: no text is encoded.
With another encoder the file warns once and the text side is recomputed from the recorded classes, templates,
prompts and negatives (stored embeddings belong to the recorded model). NegLabel JSON files of earlier versions
(format ``vlmood.neglabel``) still load; they record no encoder spec, so they need an encoder.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._io import printable
from .._lazy import as_array, torch
from ..errors import InvalidInputError

if TYPE_CHECKING:
    from ..encoders.base import Encoder

FORMAT, VERSION = "vlmood.detector", 1
SUFFIX = ".vlmood"
_FIELDS = ("format", "version", "vlmood", "created", "method", "params", "classes", "templates", "neg_templates",
           "negatives", "encoder", "threshold", "tpr", "prompts", "clipn", "lvlm")
_OTHER_FORMATS = {"vlmood.clipn": "a CLIPN no side: use it with CLIPN(encoder, classes, no=FILE)",
                  "vlmood.learned_prompts": "learned prompts: use them with make_detector(..., prompts=FILE)"}
_ARRAYS_USED_UNLESS = ("templates", "prompts", "neg_templates")
"""Overrides (``NegLabel.load(..., **overrides)``) that change the text side: the stored embeddings are then
recomputed."""


def _real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _param_problem(key: str, v: Any) -> str | None:
    """Why ``v`` is not a valid recorded hyper-parameter ``key``, or None."""
    from .neglabel import PARAMS, _DEFAULTS, _param_problem as neglabel_problem

    if key in PARAMS:
        return neglabel_problem(key, v)
    from .clipn import SCORES

    rules = {
        "logit_scale": (lambda: v is None or (_real(v) and v > 0), "be null or a positive finite number"),
        "lam": (lambda: _real(v), "be a finite number"),
        "score": (lambda: v in SCORES, f"be one of {', '.join(SCORES)}"),
        "pool": (lambda: v in _DEFAULTS, f"be one of {', '.join(_DEFAULTS)}"),
        "lexicon": (lambda: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
                    "be a name or a list of file names"),
        "prompt": (lambda: v in ("baseline", "reguide"), "be 'baseline' or 'reguide'"),
        "invalid": (lambda: v in ("exclude", "ood", "retry"), "be 'exclude', 'ood' or 'retry'"),
        "retries": (lambda: _int(v, 0), "be an integer >= 0"),
        "n_suggest": (lambda: _int(v, 1), "be an integer >= 1"),
        "chunk_size": (lambda: _int(v, 1), "be an integer >= 1"),
        "class_batch": (lambda: v is None or _int(v, 1), "be null or an integer >= 1"),
        "retry_temperature": (lambda: v is None or (_real(v) and v >= 0), "be null or a finite number >= 0"),
        "generation": (lambda: isinstance(v, dict), "be an object of generation parameters"),
    }
    check, want = rules.get(key, (lambda: True, ""))
    ok = check()
    return None if ok else f"{key} must {want}, got {v!r}"


def _method_class(method: str) -> type:
    if method == "lvlm":
        from ..lvlm.detector import LVLMDetector

        return LVLMDetector
    from . import DETECTORS

    return DETECTORS[method]


# ---------------------------------------------------------------------------------------------- writing
def save_detector(det: Any, path: str | os.PathLike) -> Path:
    """Write ``det`` (fitted first) as a detector file at ``path``; see the module docstring. Returns the path.

    A detector of a class not in the registry (a user's subclass), non-JSON hyper-parameters, a NaN threshold or
    an unwritable path raise a one-line :class:`InvalidInputError`; a failed write leaves no temporary file.
    """
    import vlmood

    from .._io import save_safetensors
    from .base import check_threshold

    path = Path(os.path.expanduser(os.fspath(path)))
    name = printable(str(path))
    method = getattr(det, "name", None)
    try:
        known = _method_class(method) is type(det)
    except (KeyError, TypeError):
        known = False
    if not known:
        raise InvalidInputError(f"cannot save {type(det).__name__} to {name}: only the registered detectors "
                                "(vlmood.DETECTORS) and vlmood.lvlm.LVLMDetector have a detector file format")
    threshold = det.threshold_
    if threshold is not None:
        try:
            threshold = check_threshold(threshold)
        except InvalidInputError as e:
            raise InvalidInputError(f"cannot save {name}: threshold_: {e}") from None
    if det.tpr_ is not None and not (_real(det.tpr_) and 0 < det.tpr_ <= 1):
        raise InvalidInputError(f"cannot save {name}: tpr_ must be in (0, 1] or None, got {det.tpr_!r}")
    meta: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "vlmood": vlmood.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "method": method, "params": det.get_params(), "classes": list(det.classes), "templates": [],
        "neg_templates": None, "negatives": None, "encoder": None, "threshold": threshold,
        "tpr": None if det.tpr_ is None else float(det.tpr_), "prompts": None, "clipn": None, "lvlm": None}
    arrays: dict[str, Any] = {}
    if method == "lvlm":
        from ..lvlm.detector import client_config

        meta["lvlm"] = client_config(det.client)
    else:
        _describe(det, meta, arrays)
    try:
        text = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"cannot save {name}: the detector's settings are not JSON ({e})") from None
    from safetensors import SafetensorError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # float32 numpy arrays (the bytes torch would write): a detector of cached text is saved without torch
        save_safetensors({k: np.array(as_array(v, np.float32)) for k, v in arrays.items()}, path,
                         metadata={"format": FORMAT, "version": str(VERSION), "meta": text})
    except (OSError, SafetensorError) as e:
        why = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InvalidInputError(f"cannot write detector file {name}: {why}") from None
    return path


def _describe(det: Any, meta: dict[str, Any], arrays: dict[str, Any]) -> None:
    """The encoder record, text side and method-specific fields of a CLIP-based detector."""
    from ..encoders.registry import portable_spec
    from .clipn import CLIPN
    from .neglabel import NegLabel

    det.fit()
    enc = det.encoder
    meta["encoder"] = {"spec": portable_spec(enc), "fingerprint": enc.fingerprint, "precision": enc.precision}
    meta["templates"] = list(det.templates)
    arrays["text"] = det._text_array()
    if det.prompts is not None:
        p = det.prompts
        meta["prompts"] = {**p.meta, "classes": p.classes, "n_ctx": p.n_ctx, "csc": p.csc, "position": p.position}
        arrays["prompts.ctx"] = p.ctx
    if isinstance(det, NegLabel):
        meta["neg_templates"] = det.saved_neg_templates()
        meta["negatives"] = [{"label": w, "pos": p} for w, p in det.negatives_]
        arrays["negatives"] = det.negative_features
    if isinstance(det, CLIPN):
        model = det.model
        meta["clipn"] = {"encoder": {"spec": portable_spec(model.encoder), "fingerprint": model.encoder.fingerprint},
                         "n_prompts": model.no.n_prompts, **{k: v for k, v in model.meta.items() if k != "encoder"}}
        arrays["text_no"] = det.text_features_no
        arrays.update({f"clipn.{k}": v for k, v in model.state_dict_no().items()})


# ---------------------------------------------------------------------------------------------- reading
def is_detector_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file (by its first bytes: a header length that fits the file, then
    ``{``), as detector files are; a NegLabel JSON file of earlier versions is not."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(9)
        size = p.stat().st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def _is_json_text(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    return head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] in (b"{", b"[")


def read_detector_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The validated metadata of a detector file (see the module docstring), without building any model or
    reading any tensor data (only the header).

    A NegLabel JSON file of earlier versions gives the same fields with ``"format": "vlmood.neglabel"``, its
    ``"version"`` (0 when it had none), ``"encoder": {"spec": None, "fingerprint": ..., "precision": None}`` (no
    spec was recorded: give an encoder), and ``"prompts"`` the recorded ``{"file", "sha256"}`` or None.

    Anything wrong raises one :class:`InvalidInputError` line naming the file (and the field): a missing file, a
    file that is neither, another vlmood format, a newer format version ("upgrade vlmood"), an unknown method, a
    missing, unknown or invalid field, a NaN threshold, or arrays whose shapes do not match the classes or
    negatives.
    """
    return _read(path)[0]


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    p = Path(os.path.expanduser(os.fspath(path)))
    name = printable(str(p))
    if not p.exists():
        raise InvalidInputError(f"detector file not found: {name}")
    if p.is_dir():
        raise InvalidInputError(f"detector file {name} is a folder, not a file")
    if not is_detector_file(p):
        if _is_json_text(p):
            return _legacy_meta(p), name
        raise InvalidInputError(f"{name} is not a vlmood detector file (not a safetensors file); write one with "
                                "det.save(FILE.vlmood)")
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="numpy") as f:  # the header only: no torch needed
            header = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise InvalidInputError(f"{name} is not a readable safetensors file: {type(e).__name__}: "
                                f"{(str(e).splitlines() or [''])[0]}") from None
    fmt = header.get("format")
    if fmt != FORMAT:
        what = _OTHER_FORMATS.get(fmt, f"format {fmt!r}" if fmt else "no format recorded")
        raise InvalidInputError(f"{name} is not a vlmood detector file ({what})")
    version = header.get("version", "")
    if not (version.isascii() and version.isdigit() and int(version) >= 1):
        raise InvalidInputError(f"{name}: invalid field 'version': expected a positive integer, got {version!r}")
    if int(version) > VERSION:
        raise InvalidInputError(f"{name} has detector format version {version}; this vlmood reads versions up to "
                                f"{VERSION}: upgrade vlmood")
    try:
        meta = json.loads(header.get("meta", ""))  # NaN parses; the field checks below name it
    except ValueError as e:
        raise InvalidInputError(f"{name}: invalid field 'meta': not JSON ({e})") from None
    _check(meta, shapes, dtypes, name)
    return meta, name


def _legacy_meta(p: Path) -> dict[str, Any]:
    """The fields of a NegLabel JSON file of earlier versions, in this format's names (see read_detector_meta)."""
    from .neglabel import PARAMS, read_legacy

    data, (target, classes, kw, negatives, saved_prompts) = read_legacy(p)
    fp = data.get("encoder")
    return {"format": data.get("format", "vlmood.neglabel"), "version": data.get("version", 0), "vlmood": None,
            "created": None, "method": target.name,
            "params": {**{k: kw[k] for k in PARAMS}, "pool": kw["pool"], "lexicon": kw["lexicon"]},
            "classes": classes, "templates": kw["templates"], "neg_templates": kw["neg_templates"],
            "negatives": [{"label": w, "pos": pos} for w, pos in negatives],
            "encoder": {"spec": None, "fingerprint": fp if isinstance(fp, str) else None, "precision": None},
            "threshold": None, "tpr": None, "prompts": saved_prompts, "clipn": None, "lvlm": None}


def _check(meta: Any, shapes: dict[str, tuple], dtypes: dict[str, str], name: str) -> None:
    """Validate a detector file's metadata and array shapes; one-line errors naming ``name`` and the field."""
    from ..text.prompts import load_classes, load_templates

    def bad(field: str, problem: str) -> InvalidInputError:
        return InvalidInputError(f"{name}: invalid field {field!r}: {problem}")

    if not isinstance(meta, dict):
        raise bad("meta", f"expected a JSON object, got {type(meta).__name__}")
    missing = [f for f in _FIELDS if f not in meta]
    unknown = sorted(set(meta) - set(_FIELDS))
    if missing or unknown:
        raise InvalidInputError(f"{name}: " + "; ".join(
            ([f"missing field(s) {', '.join(missing)}"] if missing else [])
            + ([f"unknown field(s) {', '.join(map(repr, unknown))}"] if unknown else [])))
    if meta["format"] != FORMAT or meta["version"] != VERSION:
        raise bad("format", f"the metadata says {meta['format']!r} version {meta['version']!r}, the header "
                            f"{FORMAT!r} version {VERSION}")
    method = meta["method"]
    if method != "lvlm":
        from . import DETECTORS, canonical_method

        if not isinstance(method, str) or method not in DETECTORS:
            try:
                canonical_method(str(method))
                problem = f"{method!r} is not a registry name"
            except InvalidInputError as e:
                problem = str(e)
            raise bad("method", problem)
    cls = _method_class(method)
    lvlm, learned = method == "lvlm", meta["prompts"] is not None
    from .neglabel import NegLabel

    neg = issubclass(cls, NegLabel)
    for field in ("vlmood", "created"):
        if not isinstance(meta[field], str):
            raise bad(field, f"expected a string, got {meta[field]!r}")
    classes = meta["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise bad("classes", "expected a list of strings")
    try:
        load_classes(classes)
    except InvalidInputError as e:
        raise bad("classes", str(e)) from None
    templates = meta["templates"]
    if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
        raise bad("templates", "expected a list of strings")
    if lvlm or learned:
        if templates:
            raise bad("templates", "must be [] " + ("for an LVLM detector" if lvlm else "with learned prompts"))
    else:
        try:
            load_templates(templates)
        except InvalidInputError as e:
            raise bad("templates", str(e)) from None
    from .neglabel import check_negatives, check_param_set

    params = meta["params"]
    check_param_set(params, cls.param_names, _param_problem, bad)
    if meta["threshold"] is not None and not _real(meta["threshold"]):
        raise bad("threshold", f"expected a finite number or null, got {meta['threshold']!r}")
    tpr = meta["tpr"]
    if tpr is not None and not (_real(tpr) and 0 < tpr <= 1):
        raise bad("tpr", f"expected a number in (0, 1] or null, got {tpr!r}")
    if neg:
        check_negatives(meta["neg_templates"], meta["negatives"], params["ngroups"], name)
    else:
        for field in ("neg_templates", "negatives"):
            if meta[field] is not None:
                raise bad(field, f"must be null for method {method!r}")
    from .clipn import CLIPN

    clipn = issubclass(cls, CLIPN)
    if (meta["clipn"] is not None) != clipn or (clipn and not isinstance(meta["clipn"], dict)):
        raise bad("clipn", "expected the no side's metadata" if clipn else f"must be null for method {method!r}")
    if learned and (lvlm or clipn or not isinstance(meta["prompts"], dict)):
        raise bad("prompts", f"must be null for method {method!r}" if lvlm or clipn
                  else "expected the learned prompts' metadata")
    if lvlm:
        if meta["encoder"] is not None:
            raise bad("encoder", "must be null for an LVLM detector")
        from ..lvlm.detector import check_client_config

        problem = check_client_config(meta["lvlm"])
        if problem:
            raise bad("lvlm", problem)
        if shapes:
            raise InvalidInputError(f"{name}: an LVLM detector file holds no arrays, found {', '.join(sorted(shapes))}")
        return
    if meta["lvlm"] is not None:
        raise bad("lvlm", f"must be null for method {method!r}")
    enc = meta["encoder"]
    if not isinstance(enc, dict) or set(enc) != {"spec", "fingerprint", "precision"} or \
            not all(isinstance(enc[k], str) and enc[k] for k in ("spec", "fingerprint")) or \
            not isinstance(enc["precision"], (str, type(None))):
        raise bad("encoder", 'expected {"spec": ..., "fingerprint": ..., "precision": ...}')
    _check_arrays(meta, shapes, dtypes, name, neg, clipn)


def _check_arrays(meta: dict[str, Any], shapes: dict[str, tuple], dtypes: dict[str, str], name: str, neg: bool,
                  clipn: bool) -> None:
    want = {"text": len(meta["classes"])}
    if neg:
        want["negatives"] = len(meta["negatives"])
    if clipn:
        want["text_no"] = len(meta["classes"])
    extra = {"prompts.ctx"} if meta["prompts"] is not None else set()
    if clipn:
        extra |= {k for k in shapes if k.startswith("clipn.")}
        if "clipn.prompt_no" not in shapes:
            raise InvalidInputError(f"{name}: missing array 'clipn.prompt_no' (the CLIPN no side)")
    missing = sorted((set(want) | extra) - set(shapes))
    unknown = sorted(set(shapes) - set(want) - extra)
    if missing or unknown:
        raise InvalidInputError(f"{name}: " + "; ".join(
            ([f"missing array(s) {', '.join(map(repr, missing))}"] if missing else [])
            + ([f"unknown array(s) {', '.join(map(repr, unknown))}"] if unknown else [])))
    width = None
    for key, rows in want.items():
        shape = shapes[key]
        if len(shape) != 2 or shape[0] != rows or shape[1] < 1 or (width is not None and shape[1] != width):
            what = "classes" if key != "negatives" else "negatives"
            raise InvalidInputError(f"{name}: array {key!r} has shape {list(shape)}, expected [{rows}, "
                                    f"{width or 'D'}] ({rows} {what})")
        width = shape[1]
    bad_dtype = sorted(k for k, d in dtypes.items() if d not in ("F32", "F16", "BF16", "F64"))
    if bad_dtype:
        raise InvalidInputError(f"{name}: array(s) {', '.join(map(repr, bad_dtype))} are not floating point")


# ---------------------------------------------------------------------------------------------- loading
def load_detector(path: str | os.PathLike, encoder: "Encoder | None" = None, *, device: Any = None,
                  precision: str | None = None, cache: Any = True, client: Any = None, _want: type | None = None,
                  _overrides: dict[str, Any] | None = None) -> Any:
    """A detector from a file written by ``Detector.save`` (or a NegLabel JSON file of earlier versions), with its
    ``threshold_`` and ``tpr_``.

    Args:
        path: the detector file.
        encoder: the encoder to score with; None loads the recorded spec with :func:`vlmood.load_encoder` on
            ``device`` with ``precision`` (their defaults: CUDA when available, its reduced precision; fp32 on CPU).
            An encoder with another fingerprint than the recorded one warns (naming both) and the text side is
            recomputed from the recorded classes, templates, learned prompts and negatives; with the recorded
            fingerprint the stored embeddings are used as they are (no text is encoded).
        cache: the text-embedding cache for any recomputation (and, for an LVLM detector, whether the rebuilt
            client uses its response cache).
        client: LVLM detectors: the client to use instead of rebuilding it from the recorded configuration
            (needed for a detector saved over a custom client). The API key of a rebuilt OpenAI-compatible client
            comes from the environment (``$VLMOOD_LVLM_API_KEY`` or ``$OPENAI_API_KEY``), never from the file.
    """
    meta, name = _read(path)
    p = Path(os.path.expanduser(os.fspath(path)))
    cls = _method_class(meta["method"])
    if _want is not None and not issubclass(cls, _want):
        how = f"vlmood.{cls.__name__}.load" if meta["method"] in ("neglabel", "csp") else "vlmood.load_detector"
        raise InvalidInputError(f"{name} holds a saved {cls.__name__} detector, not {_want.__name__}; load it with "
                                f"{how}")
    if meta["format"] != FORMAT:  # a NegLabel JSON file of an earlier version
        if encoder is None:
            raise InvalidInputError(f"{name} is a NegLabel file of an earlier vlmood version, which records no "
                                    "encoder spec: pass the encoder (load_detector(path, encoder); --model)")
        from .neglabel import NegLabel

        return NegLabel.load(p, encoder, **{"cache": cache, **(_overrides or {})})
    if meta["method"] == "lvlm":
        from ..lvlm.detector import LVLMDetector, build_client

        if encoder is not None:
            if client is not None or not hasattr(encoder, "generate_many"):
                raise InvalidInputError(f"{name} is an LVLM detector: it takes no encoder (pass client= to use "
                                        "another LVLM client)")
            client = encoder  # load_detector(path, client)

        params = dict(meta["params"])
        generation = params.pop("generation")
        if set(generation) & set(params):
            raise InvalidInputError(f"{name}: invalid field 'params.generation': it repeats "
                                    f"{', '.join(sorted(set(generation) & set(params)))}")
        det = _build(lambda: LVLMDetector(build_client(meta["lvlm"], client, device, cache, name), meta["classes"],
                                          **params, **generation), name)
    else:
        rec = meta["encoder"]
        if encoder is None or isinstance(encoder, (str, os.PathLike)):
            from ..encoders import load_encoder

            # the recorded precision by default: the threshold was calibrated on scores of that precision
            encoder = load_encoder(rec["spec"] if encoder is None else os.fspath(encoder), device=device,
                                   precision=precision or _usable_precision(rec["precision"], device))
        elif not hasattr(encoder, "fingerprint"):
            raise InvalidInputError(f"encoder must be an Encoder, a model spec or None, got {type(encoder).__name__}")
        same = encoder.fingerprint == rec["fingerprint"]
        if not same:
            dropped = "" if meta["threshold"] is None else (
                f"; its threshold ({meta['threshold']:.6g}) was calibrated on that model's scores and is dropped: "
                "calibrate again on this one")
            warnings.warn(f"{name} was saved with {rec['spec']} (fingerprint {rec['fingerprint']}) but is loaded "
                          f"with {encoder.spec} (fingerprint {encoder.fingerprint}): its text side is recomputed"
                          f"{dropped}", stacklevel=2)
            meta = {**meta, "threshold": None, "tpr": None}
        elif meta["threshold"] is not None and rec["precision"] and encoder.precision != rec["precision"]:
            warnings.warn(f"{name} was calibrated at {rec['precision']} and is scored at {encoder.precision}: scores "
                          "shift slightly, so the kept ID fraction may differ a little from its TPR", stacklevel=2)
        arrays = _load_arrays(p)
        overrides = dict(_overrides or {})
        use_arrays = same and not set(overrides) & set(_ARRAYS_USED_UNLESS)
        det = _build_clip(cls, meta, arrays, encoder, cache, name, overrides, use_arrays)
    det.threshold_, det.tpr_ = meta["threshold"], meta["tpr"]
    return det


def _load_arrays(p: Path) -> dict[str, np.ndarray]:
    """The file's arrays as float32 numpy arrays, read without torch (torch only widens bfloat16 ones, which numpy
    cannot hold; vlmood writes float32)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(p), framework="numpy") as f:
        bf16 = [k for k in f.keys() if str(f.get_slice(k).get_dtype()) == "BF16"]
    arrays = load_file(str(p)) if not bf16 else {}
    if bf16:
        from safetensors.torch import load_file as load_torch

        arrays = {k: v.float().numpy() for k, v in load_torch(str(p)).items()}
    return {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}


def _usable_precision(precision: str | None, device: Any) -> str | None:
    """The recorded precision to load with: fp32 anywhere; bf16/fp16 on CUDA only (on a CPU they are emulated and
    slow: None, the CPU's fp32, and load_detector warns that the scores shift slightly)."""
    if precision in (None, "fp32"):
        return precision
    want = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return precision if want.startswith("cuda") else None


def _build(make: Any, name: str) -> Any:
    """``make()``, with a setting it refuses reported as the file's."""
    try:
        return make()
    except InvalidInputError as e:
        raise InvalidInputError(f"{name}: {e}") from None


def _build_clip(cls: type, meta: dict[str, Any], arrays: dict[str, np.ndarray], encoder: "Encoder", cache: Any,
                name: str, overrides: dict[str, Any], use_arrays: bool) -> Any:
    from .clipn import CLIPN
    from .neglabel import NegLabel

    kw: dict[str, Any] = {**meta["params"], "cache": overrides.pop("cache", cache)}
    if meta["prompts"] is not None:
        kw["prompts"] = _prompts(meta["prompts"], torch.from_numpy(arrays["prompts.ctx"]), name)
    else:
        kw["templates"] = meta["templates"]
    if issubclass(cls, NegLabel):
        kw["neg_templates"] = meta["neg_templates"]
        if overrides.get("prompts") is not None:
            kw.pop("templates", None)
    if issubclass(cls, CLIPN):
        kw["no"] = _no_side(meta["clipn"], arrays, encoder, name)
    kw.update(overrides)
    with warnings.catch_warnings():  # the file already warned once about another encoder
        warnings.filterwarnings("ignore", message="learned prompts were trained with")
        det = _build(lambda: cls(encoder, meta["classes"], **kw), name)
    if issubclass(cls, NegLabel):
        det.negatives_ = [(n["label"], n["pos"]) for n in meta["negatives"]]
        if len(det.negatives_) < det.ngroups:
            raise InvalidInputError(f"{name} holds {len(det.negatives_)} negatives, fewer than "
                                    f"ngroups={det.ngroups}")
    if use_arrays:
        width = arrays["text"].shape[1]
        if width != encoder.embed_dim:
            raise InvalidInputError(f"{name}: array 'text' has width {width} but {encoder.spec} embeds in "
                                    f"{encoder.embed_dim} dimensions")
        det._text = np.ascontiguousarray(arrays["text"], dtype=np.float32)
        if issubclass(cls, NegLabel):
            det._neg = torch.from_numpy(np.ascontiguousarray(arrays["negatives"], dtype=np.float32))
        if issubclass(cls, CLIPN):
            det._text_no = torch.from_numpy(np.ascontiguousarray(arrays["text_no"], dtype=np.float32))
    return det


def _prompts(meta: dict[str, Any], ctx: torch.Tensor, name: str) -> Any:
    """Learned prompts from the recorded metadata and context (the checks of ``LearnedPrompts.load``)."""
    from ..tuning.prompts import LearnedPrompts

    m = dict(meta)
    classes, position = m.pop("classes", None), m.pop("position", "end")
    n_ctx, csc = m.pop("n_ctx", None), m.pop("csc", None)
    if ctx.dim() not in (2, 3) or ctx.shape[-2] != n_ctx or bool(csc) != (ctx.dim() == 3):
        raise InvalidInputError(f"{name}: array 'prompts.ctx' of shape {list(ctx.shape)} does not match field "
                                f"'prompts' (n_ctx={n_ctx}, csc={csc})")
    if not isinstance(classes, list):
        raise InvalidInputError(f"{name}: invalid field 'prompts': no class list")
    try:
        return LearnedPrompts(classes, ctx, position, m)
    except InvalidInputError as e:
        raise InvalidInputError(f"{name}: invalid field 'prompts': {e}") from None


def _no_side(meta: dict[str, Any], arrays: dict[str, np.ndarray], encoder: "Encoder", name: str) -> Any:
    """CLIPN's no side from the stored tensors, on ``encoder`` (CLIPNModel's own loader checks every key/shape)."""
    from ..clipn.model import CLIPNModel
    from ..errors import CheckpointMismatchError

    sd = {k[len("clipn."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("clipn.")}
    try:
        return CLIPNModel._from_no_state(encoder, sd, name, {k: v for k, v in meta.items() if k != "encoder"})
    except CheckpointMismatchError as e:
        raise InvalidInputError(f"{name}: the stored CLIPN no side does not fit {encoder.spec}: {e}") from None


__all__ = ["FORMAT", "SUFFIX", "VERSION", "is_detector_file", "load_detector", "read_detector_meta", "save_detector"]
