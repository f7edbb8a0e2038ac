"""Fingerprint records: what a warm run needs to know about an encoder, without building it.

Every cache key names the encoder by its fingerprint (``backend:arch:hash of the weights``). Computing it means
building the model, reading the weights and hashing them (seconds for a ViT-B/16), before anything is looked up. A
*record*, written the first time an encoder is loaded with ``load_encoder(..., defer=True)``, keeps the fingerprint
together with the few properties that scoring cached features needs (logit scale per precision, embedding width,
whether patch features are available, the preprocessing key, exact text trimming). The next deferred load of the same
weights returns a :class:`DeferredEncoder` built from the record; the model is built only when something needs it
(an image or prompt missing from the caches), and its fingerprint is then checked against the record.

What a record is keyed and validated by (``cache_root()/encoders/<24 hex>/record.json``):

- a checkpoint file (``open_clip:ARCH@FILE``, and registered names such as ``toyworld`` that resolve to one): the
  file's real path (symbolic links resolved) and architecture; valid only while the file's device, inode, size,
  modification and change times (nanoseconds) are those recorded and the BLAKE2 hash of its first and last MiB
  matches. The change time cannot be set back by ``touch``/``utime``, and a replaced file has a new inode. A file
  modified within :data:`RACY_SECONDS` of being recorded (or during the load) is not recorded at all, so that a
  rewrite within one timestamp tick of a coarse file system cannot share the recorded stamps (git's "racy clean"
  rule);
- random initialisation (``open_clip:ARCH/none[:seed=N]``): the spec;
- both: the versions of vlmood, open_clip, torch, torchvision, timm and transformers (the model built from a file or
  a seed, and its preprocessing, depend on them) and a hash of vlmood's own architecture configs.

Pretrained tags (weights in the Hugging Face hub cache), ``open_clip:hf-hub:``, ``open_clip:local-dir:`` and ``hf:``
models are not recorded: they always load. An architecture registered at run time with
``open_clip.add_model_config`` is not tracked: do not defer loads of such a model. Records are tiny;
``vlmood cache info`` lists them and ``vlmood cache clear`` removes them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import atomic_write_bytes

if TYPE_CHECKING:
    from .base import Encoder, EncoderSpec

RECORD_VERSION = 1
RACY_SECONDS = 3.0
"""A checkpoint modified less than this many seconds before it is recorded is not recorded (see the module doc)."""
SAMPLE_BYTES = 1 << 20
_CARD_FIELDS = ("embed_dim", "supports_local", "preprocess_key", "exact_text_trimming", "image_batch_size",
                "text_batch_size", "word_level_tokenizer", "attributes", "class")


def _versions() -> dict[str, str]:
    from importlib import metadata

    from .. import __version__

    out = {"vlmood": __version__, "vlmood_configs": _configs_hash()}
    # torchvision: the preprocessing transforms; timm, transformers: towers open_clip builds with them
    for dist in ("open_clip_torch", "torch", "torchvision", "timm", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def _configs_hash() -> str:
    """A hash of vlmood's own architecture configs (``vlmood/encoders/configs/*.json``), which may change within a
    version in a source checkout."""
    h = hashlib.blake2b(digest_size=8)
    folder = Path(__file__).resolve().parent / "configs"
    for p in sorted(folder.glob("*.json")):
        h.update(p.name.encode())
        with contextlib.suppress(OSError):
            h.update(p.read_bytes())
    return h.hexdigest()


def _file_state(path: Path) -> dict[str, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def _sample(path: Path, size: int) -> str | None:
    """BLAKE2b of the file's first and last :data:`SAMPLE_BYTES` (and its size), or None when unreadable."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(size).encode())
    try:
        with open(path, "rb") as f:
            h.update(f.read(SAMPLE_BYTES))
            if size > SAMPLE_BYTES:
                f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
                h.update(f.read(SAMPLE_BYTES))
    except OSError:
        return None
    return h.hexdigest()


def weights_identity(spec: "EncoderSpec") -> dict[str, Any] | None:
    """The identity a record is keyed by: ``{"kind": "file", "path", "arch"}`` or ``{"kind": "random", "spec"}``;
    None for weights that are never recorded (pretrained tags, hub models, ``hf:``)."""
    if spec.backend != "open_clip" or ":" in spec.name:  # hf-hub:, local-dir: ... load weights of their own
        return None
    if spec.checkpoint is not None:
        return {"kind": "file", "path": os.path.realpath(spec.checkpoint), "arch": spec.name}
    if spec.random_init:
        return {"kind": "random", "spec": str(spec)}
    return None


def _record_dir(identity: dict[str, Any], root: Path | None = None) -> Path:
    from .._paths import cache_root

    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return (root if root is not None else cache_root()) / "encoders" / key


def file_guard(spec: "EncoderSpec") -> dict[str, Any] | None:
    """The state a checkpoint's record is validated against (stat fields and the head/tail hash), read now; None
    when the spec names no file or the file cannot be read."""
    ident = weights_identity(spec)
    if ident is None or ident["kind"] != "file":
        return None
    path = Path(ident["path"])
    state = _file_state(path)
    if state is None:
        return None
    sample = _sample(path, state["size"])
    return None if sample is None else {**state, "sample": sample}


def _read(spec: "EncoderSpec", ident: dict[str, Any]) -> dict[str, Any] | None:
    """The stored record of ``ident`` when it is well formed, made by these versions and (files) still matches the
    file; else None."""
    try:
        rec = json.loads((_record_dir(ident) / "record.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict) or rec.get("version") != RECORD_VERSION or rec.get("identity") != ident \
            or rec.get("versions") != _versions() or not isinstance(rec.get("fingerprint"), str):
        return None
    card = rec.get("card")
    if not isinstance(card, dict) or any(k not in card for k in _CARD_FIELDS) \
            or not isinstance(card.get("logit_scale"), dict):
        return None
    if ident["kind"] == "file" and file_guard(spec) != rec.get("guard"):
        return None
    return rec


def lookup(spec: "EncoderSpec", precision: str) -> dict[str, Any] | None:
    """The record of ``spec``'s weights when it is still valid and knows ``precision``'s logit scale, else None."""
    ident = weights_identity(spec)
    rec = None if ident is None else _read(spec, ident)
    return rec if rec is not None and isinstance(rec["card"]["logit_scale"].get(precision), float) else None


def remember(spec: "EncoderSpec", encoder: "Encoder", guard_before: dict[str, Any] | None) -> None:
    """Record ``encoder`` (just loaded from ``spec``) for later deferred loads. ``guard_before``: the file's
    :func:`file_guard` taken before the weights were read; the record is written only when the file is unchanged
    since and older than :data:`RACY_SECONDS`. Best effort: a cache that cannot be written records nothing."""
    ident = weights_identity(spec)
    if ident is None:
        return
    guard = None
    if ident["kind"] == "file":
        guard = file_guard(spec)
        newest = max(guard["mtime_ns"], guard["ctime_ns"]) if guard else 0
        if guard is None or guard != guard_before or time.time_ns() - newest < RACY_SECONDS * 1e9:
            return
    folder = _record_dir(ident)
    old = _read(spec, ident)
    scales = dict(old["card"]["logit_scale"]) if old and old["fingerprint"] == encoder.fingerprint else {}
    scales[encoder.precision] = float(encoder.logit_scale)
    card = {"embed_dim": int(encoder.embed_dim), "supports_local": bool(encoder.supports_local),
            "preprocess_key": str(encoder.preprocess_key), "exact_text_trimming": bool(encoder.exact_text_trimming),
            "image_batch_size": int(encoder.image_batch_size), "text_batch_size": int(encoder.text_batch_size),
            "word_level_tokenizer": bool(encoder.word_level_tokenizer), "logit_scale": scales,
            "class": type(encoder).__name__, "attributes": sorted(n for n in dir(encoder) if not n.startswith("__"))}
    rec = {"version": RECORD_VERSION, "identity": ident, "spec": str(spec), "fingerprint": encoder.fingerprint,
           "versions": _versions(), "guard": guard, "card": card, "created": time.time()}
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "record.json", (json.dumps(rec, indent=1) + "\n").encode())


def forget(spec: "EncoderSpec") -> None:
    """Remove ``spec``'s record (a deferred encoder found the weights changed)."""
    ident = weights_identity(spec)
    if ident is not None:
        with contextlib.suppress(OSError):
            (_record_dir(ident) / "record.json").unlink()
