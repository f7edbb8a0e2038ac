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
- a Hugging Face folder (``hf:/path/to/model``): its real path; every file in it but hidden ones is checked as a
  checkpoint is (symbolic links followed and their targets recorded), and so are the folder's own times (a file
  added or removed);
- a pretrained tag (``open_clip:ARCH/TAG``, weights in the Hugging Face hub cache): the architecture, the tag and
  the hub cache's real path (``HF_HUB_CACHE`` / ``HF_HOME``); the record keeps the hub repository and the file names
  open_clip tries for the tag, in its order (the ``.safetensors`` alternative first). Valid only while the first of
  those files the local cache holds (``huggingface_hub.try_to_load_from_cache``: the snapshot that ``refs/main``
  names) is the recorded path, in the recorded snapshot, and its blob passes the checkpoint checks above. A warm run
  does not ask the hub whether the tag's repository has a newer revision: it answers for the revision in the local
  cache, as a load with ``HF_HUB_OFFLINE=1`` would; the next load that downloads a new revision moves ``refs/main``,
  and the record no longer matches. Tags that open_clip downloads from a URL rather than the hub, or that name a
  ``file``, are not recorded;
- random initialisation (``open_clip:ARCH/none[:seed=N]``): the spec;
- all: the versions of vlmood, open_clip, torch, torchvision, timm and transformers (the model built from a file or
  a seed, and its preprocessing, depend on them) and a hash of vlmood's own architecture configs.

``open_clip:hf-hub:``, ``open_clip:local-dir:`` and ``hf:`` hub ids are not recorded: they always load. An
architecture registered at run time with ``open_clip.add_model_config`` (or a tag added to open_clip's pretrained
table) is not tracked: do not defer loads of such a model. Records are tiny; ``vlmood cache info`` lists them and
``vlmood cache clear`` removes them.
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


def _hub_cache() -> str | None:
    """The real path of the Hugging Face hub cache open_clip downloads into (None without huggingface_hub)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub comes with open_clip
        return None
    return os.path.realpath(os.path.expanduser(str(constants.HF_HUB_CACHE)))


def weights_identity(spec: "EncoderSpec") -> dict[str, Any] | None:
    """The identity a record is keyed by: ``{"kind": "file", "path", "arch"}`` (an open_clip checkpoint),
    ``{"kind": "dir", "path"}`` (an ``hf:`` local folder), ``{"kind": "hub", "arch", "tag", "cache"}`` (a pretrained
    tag and the hub cache it is read from) or ``{"kind": "random", "spec"}``; None for weights that are never
    recorded (hub models)."""
    if spec.backend == "hf":
        folder = Path(spec.name).expanduser()
        return {"kind": "dir", "path": os.path.realpath(folder)} if folder.is_dir() else None
    if spec.backend != "open_clip" or ":" in spec.name:  # hf-hub:, local-dir: ... load weights of their own
        return None
    if spec.checkpoint is not None:
        return {"kind": "file", "path": os.path.realpath(spec.checkpoint), "arch": spec.name}
    if spec.random_init:
        return {"kind": "random", "spec": str(spec)}
    if spec.pretrained is not None:  # recorded only if open_clip reads this tag from the hub (see hub_source)
        cache = _hub_cache()
        return None if cache is None else {"kind": "hub", "arch": spec.name, "tag": spec.pretrained, "cache": cache}
    return None


def hub_source(spec: "EncoderSpec") -> dict[str, Any] | None:
    """Where open_clip reads a pretrained tag's weights: ``{"repo": ORG/NAME, "files": [names in the order open_clip
    tries them]}``, or None when it does not read them from the hub (a URL download, a ``file`` entry, an unknown
    tag, no huggingface_hub). Imports open_clip: called only when the model is being loaded anyway."""
    try:
        from .open_clip_backend import _open_clip

        _open_clip()  # vlmood's own architectures registered
        from open_clip import pretrained as oc_pretrained

        cfg = oc_pretrained.get_pretrained_cfg(spec.name, spec.pretrained)
        if not cfg or "file" in cfg or not cfg.get("hf_hub") or not oc_pretrained.has_hf_hub():
            return None
        repo, name = os.path.split(cfg["hf_hub"])  # "org/model/file.bin", or "org/model/" for the default name
        name = name or oc_pretrained.HF_WEIGHTS_NAME
        # open_clip's download_pretrained_from_hf: the .safetensors alternative first, when safetensors is present
        alternatives = list(oc_pretrained._get_safe_alternatives(name)) if oc_pretrained._has_safetensors else []
    except Exception:  # an open_clip whose pretrained table works otherwise: this tag is simply not recorded
        return None
    return {"repo": repo, "files": [*alternatives, name]}


def _valid_hub(hub: Any) -> bool:
    return isinstance(hub, dict) and isinstance(hub.get("repo"), str) and isinstance(hub.get("files"), list) \
        and bool(hub["files"]) and all(isinstance(f, str) for f in hub["files"])


def _hub_guard(cache: str, hub: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint checks of the first of ``hub["files"]`` that the local hub cache holds (in the snapshot its
    ``refs/main`` names, as an offline ``hf_hub_download`` resolves it), with its snapshot path; None if none."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    for name in hub["files"]:
        try:
            path = try_to_load_from_cache(hub["repo"], name, cache_dir=cache)
        except Exception:  # a malformed repository id or cache entry: not recorded, loads normally
            return None
        if isinstance(path, str):  # else None (not cached) or a "known not to exist" marker: the next name
            one = _one_file(Path(path))
            return None if one is None else {"repo": hub["repo"], "file": name, "path": path,
                                             "target": os.path.realpath(path), **one}
    return None


def _record_dir(identity: dict[str, Any], root: Path | None = None) -> Path:
    from .._paths import cache_root

    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return (root if root is not None else cache_root()) / "encoders" / key


def _one_file(path: Path) -> dict[str, Any] | None:
    state = _file_state(path)
    sample = None if state is None else _sample(path, state["size"])
    return None if sample is None else {**state, "sample": sample}


def file_guard(spec: "EncoderSpec", hub: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The state a record is validated against, read now: a checkpoint's stat fields and head/tail hash; for an
    ``hf:`` folder, the folder's own stat fields (a file added or removed changes them) and, for every file in it
    but hidden ones (symbolic links followed, their targets named), the same as for a checkpoint; for a pretrained
    tag, the same for the hub cache's file of it (``hub``: :func:`hub_source`'s answer, found now when None). None
    when the spec names none of these or something cannot be read."""
    ident = weights_identity(spec)
    if ident is None or ident["kind"] == "random":
        return None
    if ident["kind"] == "hub":
        hub = hub if hub is not None else hub_source(spec)
        return None if hub is None else _hub_guard(ident["cache"], hub)
    root = Path(ident["path"])
    if ident["kind"] == "file":
        return _one_file(root)
    files: list[dict[str, Any]] = []
    stack = [root]
    try:
        while stack:
            folder = stack.pop()
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
            for e in entries:
                if e.name.startswith("."):
                    continue  # e.g. .cache/ that huggingface_hub keeps in a local_dir: never read by from_pretrained
                if e.is_dir():
                    stack.append(Path(e.path))
                    continue
                one = _one_file(Path(e.path))
                if one is None:
                    return None
                files.append({"name": os.path.relpath(e.path, root), "target": os.path.realpath(e.path), **one})
    except OSError:
        return None
    state = _file_state(root)
    return None if state is None else {"dir": state, "files": files}


def _newest_ns(guard: dict[str, Any]) -> int:
    """The latest modification or change time (ns) in a :func:`file_guard`."""
    states = [guard["dir"], *guard["files"]] if "files" in guard else [guard]
    return max(max(s["mtime_ns"], s["ctime_ns"]) for s in states)


def _read(spec: "EncoderSpec", ident: dict[str, Any], guard: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The stored record of ``ident`` when it is well formed, made by these versions and (files) still matches the
    file; else None. ``guard``: the :func:`file_guard` just taken, if the caller has it (not read twice)."""
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
    hub = rec.get("hub")
    if ident["kind"] == "hub" and not _valid_hub(hub):
        return None
    if ident["kind"] != "random" and (guard or file_guard(spec, hub)) != rec.get("guard"):
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
    guard = hub = None
    if ident["kind"] == "hub":
        hub = hub_source(spec)
        if hub is None:
            return  # a tag open_clip does not read from the hub
    if ident["kind"] != "random":
        guard = file_guard(spec, hub)
        if guard is None or guard != guard_before or time.time_ns() - _newest_ns(guard) < RACY_SECONDS * 1e9:
            return
    folder = _record_dir(ident)
    old = _read(spec, ident, guard)
    scales = dict(old["card"]["logit_scale"]) if old and old["fingerprint"] == encoder.fingerprint else {}
    scales[encoder.precision] = float(encoder.logit_scale)
    card = {"embed_dim": int(encoder.embed_dim), "supports_local": bool(encoder.supports_local),
            "preprocess_key": str(encoder.preprocess_key), "exact_text_trimming": bool(encoder.exact_text_trimming),
            "image_batch_size": int(encoder.image_batch_size), "text_batch_size": int(encoder.text_batch_size),
            "word_level_tokenizer": bool(encoder.word_level_tokenizer), "logit_scale": scales,
            "class": type(encoder).__name__, "attributes": sorted(n for n in dir(encoder) if not n.startswith("__"))}
    rec = {"version": RECORD_VERSION, "identity": ident, "spec": str(spec), "fingerprint": encoder.fingerprint,
           "versions": _versions(), "guard": guard, "card": card, "created": time.time(),
           **({"hub": hub} if hub is not None else {})}
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "record.json", (json.dumps(rec, indent=1) + "\n").encode())


def forget(spec: "EncoderSpec") -> None:
    """Remove ``spec``'s record (a deferred encoder found the weights changed)."""
    ident = weights_identity(spec)
    if ident is not None:
        with contextlib.suppress(OSError):
            (_record_dir(ident) / "record.json").unlink()
