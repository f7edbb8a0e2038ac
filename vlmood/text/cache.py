"""Content-addressed disk cache of embeddings (text prompts here; image features reuse it with ``kind="features"``).

Layout under ``root`` (``$VLMOOD_CACHE`` or the platform cache dir)::

    <kind>/<namespace>/meta.json             {"namespace": ..., "dtype": ..., "encoder": {"fingerprint", "spec",
                                             "precision"}}: which encoder the namespace holds (older caches
                                             have the namespace only; its first ``|`` field is the fingerprint)
    <kind>/<namespace>/index.json            shard name -> row count and checksum
    <kind>/<namespace>/<shard>.safetensors   tensors ``keys`` (uint8 [k, 32], sha256 of each key) and ``emb`` [k, D]

``<namespace>`` is the first 24 hex digits of the sha256 of the namespace string and the storage dtype. A namespace
string is ``fingerprint|precision|text-v1`` for prompts (:func:`vlmood.text.embed.cache_namespace`) and
``fingerprint|precision|preprocessing|global-or-local|feat-v1`` for image features
(:func:`vlmood.features.feature_namespace`); the fingerprint (``backend:arch:weights-hash``) names the exact weights.
Other caches under the same root: ``lvlm/`` (replies of vision-language models, :mod:`vlmood.lvlm.cache`) and
``tuning-views/<key>/`` (augmented view features of prompt learning, :mod:`vlmood.tuning.views`).
:func:`cache_info` lists them all and :func:`clear_cache` removes them (``vlmood cache info|clear``).

A namespace is one encoder (and, for images, one preprocessing); a key is the sha256 of an exact string
(the prompt, or an image's identity). Every shard is written to a
temporary file and renamed into place, so readers never see a partial shard, and concurrent writers
each add their own shards (the index is updated under a file lock). Shards are self-describing (their
metadata carries their checksum and row count): a missing, truncated or malformed ``index.json`` is rebuilt
from them on the next write. Each shard carries a checksum of its tensors: a truncated or corrupted
shard is detected, reported with a warning, removed, and its prompts are recomputed. A shard that cannot be read
(permissions, an I/O error, too many open files, no memory) is not known to be corrupted: it is skipped and kept,
with one warning, and the hits of the other shards are still served.

The cache never stops a computation: a read-only folder or a full disk gives one :class:`CacheWarning` per
cache root and process, and the results are returned without being stored. A failed write removes its
temporary file, and temporary files left by killed processes are swept after :data:`STALE_TMP_SECONDS`.
Only finite embeddings are stored or served.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .._io import atomic_write_bytes, printable
from .._lazy import is_tensor, torch
from .._paths import cache_root

_DTYPES = ("float32", "float16")  # names of both numpy and torch dtypes
STALE_TMP_SECONDS = 3600.0
"""A temporary ``.*.tmp`` file in a cache folder older than this (seconds) was left by a killed or failed writer
and is removed; younger ones may belong to a concurrent writer and are left alone."""
_warned: set[tuple[str, str, str]] = set()  # (cache root, kind, "read"/"write"/"shard") already warned about


class CacheWarning(UserWarning):
    """The embedding cache could not be read or written; results are computed without it."""


def prompt_key(text: str) -> bytes:
    """The 32-byte cache key of a prompt: sha256 of its exact UTF-8 bytes.

    Lone surrogates (file names with undecodable bytes, as ``os.fsdecode`` returns them) are encoded with
    ``surrogatepass``, so every Python string has a key; valid text keys are unchanged.
    """
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged shard raises: a format error of safetensors, a bad checksum (ValueError), a missing
    tensor or metadata field (KeyError, TypeError). I/O errors and MemoryError are not among them."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - older safetensors
        return ValueError, KeyError, TypeError
    return SafetensorError, ValueError, KeyError, TypeError


_CORRUPT = _corrupt_errors()


def _raw_bytes(x: Any) -> bytes:
    """The bytes of a tensor or numpy array, in C order (the same for the same values and dtype either way)."""
    if is_tensor(x):
        return x.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b""
    return np.ascontiguousarray(x).tobytes()


def _checksum(keys: Any, emb: Any) -> str:
    h = hashlib.sha256()
    h.update(_raw_bytes(keys))
    h.update(_raw_bytes(emb))
    return h.hexdigest()


def sweep_stale_temp_files(folder: Path, max_age: float = STALE_TMP_SECONDS) -> int:
    """Remove the temporary files (``.*.tmp``) older than ``max_age`` seconds in ``folder``; returns how many."""
    now = time.time()
    removed = 0
    with contextlib.suppress(OSError):
        for p in folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime >= max_age:
                    p.unlink()
                    removed += 1
    return removed


def _valid_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("checksum"), str) and len(entry["checksum"]) == 64
            and isinstance(entry.get("count"), int) and not isinstance(entry["count"], bool) and entry["count"] >= 0)


def _shard_entry(shard: Path) -> dict | None:
    """A shard's index entry read from its own metadata, or None when its header is unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(shard), framework="pt") as f:
            meta = f.metadata() or {}
        entry = {"count": int(meta["count"]), "checksum": meta["checksum"]}
    except Exception:  # unreadable or not a shard: get() reports and removes it when it is needed
        return None
    return entry if _valid_entry(entry) else None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX ``flock``); elsewhere a no-op, the index being re-derivable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class EmbeddingCache:
    """Disk cache of L2-normalised text embeddings, keyed by (encoder namespace, exact prompt).

    Args:
        root: cache root; default ``$VLMOOD_CACHE`` or the platform user cache dir.
        dtype: storage dtype, ``"float32"`` (exact) or ``"float16"`` (half the disk, ~1e-3 error).
        kind: top-level folder separating what is stored (``"text"``, ``"features"``).
    """

    def __init__(self, root: str | os.PathLike | None = None, dtype: str = "float32", kind: str = "text"):
        if dtype not in _DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.root = Path(root) if root is not None else cache_root()
        self.dtype = dtype
        self.kind = kind
        self._verified: dict[Path, tuple[int, int]] = {}  # shard -> (size, mtime_ns) verified in this process
        self._swept: set[Path] = set()  # folders whose stale temporary files were removed in this process

    def __repr__(self) -> str:
        return f"EmbeddingCache(root={str(self.root)!r}, dtype={self.dtype!r}, kind={self.kind!r})"

    def folder(self, namespace: str) -> Path:
        # the storage dtype is part of the folder: an exact float32 cache never serves float16-rounded values
        return self.root / self.kind / hashlib.sha256(f"{namespace}|{self.dtype}".encode()).hexdigest()[:24]

    def _sweep_once(self, folder: Path) -> None:
        if folder not in self._swept:
            self._swept.add(folder)
            sweep_stale_temp_files(folder)

    def _warn_once(self, what: str, error: BaseException, shard: Path | None = None) -> None:
        """One :class:`CacheWarning` per cache root, kind, operation and process (not one per batch or call).

        ``what``: ``"read"`` or ``"write"``; with ``shard``, that one shard could not be read (it is skipped)."""
        key = (str(self.root), self.kind, "shard" if shard is not None else what)
        if key in _warned:
            return
        _warned.add(key)
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        if shard is not None:
            warnings.warn(f"cannot read {self.kind} cache shard {printable(str(shard))} ({type(error).__name__}: "
                          f"{reason}); skipping it (not removed): its entries are recomputed (check the file's "
                          "permissions and the disk; further unreadable shards are skipped without a warning)",
                          CacheWarning, stacklevel=5)
            return
        fix = ("set VLMOOD_CACHE to a writable folder, free disk space, or pass cache=False" if what == "write"
               else "check the folder's permissions, or pass cache=False")
        warnings.warn(f"cannot {what} the {self.kind} cache in {printable(str(self.root))} ({reason}); continuing "
                      f"without it: results are computed{' but not saved' if what == 'write' else ''} ({fix})",
                      CacheWarning, stacklevel=4)

    # ------------------------------------------------------------------ reading
    def get(self, namespace: str, texts: Sequence[str]) -> dict[int, torch.Tensor]:
        """Cached embeddings of ``texts``: ``{position in texts: float32 [D] tensor}`` for every hit.

        An unreadable cache folder gives one :class:`CacheWarning` and no hits (everything is recomputed).
        """
        return {i: torch.from_numpy(v) for i, v in self.get_arrays(namespace, texts).items()}

    def get_arrays(self, namespace: str, texts: Sequence[str]) -> dict[int, np.ndarray]:
        """:meth:`get` as float32 numpy arrays ``[D]`` (reads the shards without torch)."""
        folder = self.folder(namespace)
        try:
            if not folder.is_dir() or not texts:
                return {}
            self._sweep_once(folder)
            want: dict[bytes, list[int]] = {}
            for i, t in enumerate(texts):
                want.setdefault(prompt_key(t), []).append(i)
            found: dict[int, np.ndarray] = {}
            index = self._read_index(folder) or {}
            for shard in sorted(folder.glob("*.safetensors")):
                if not want:
                    break
                loaded = self._load_hits(shard, index.get(shard.name), want)
                if loaded is None:
                    continue
                rows, emb = loaded
                for k, r in rows.items():
                    vec = emb[r].astype(np.float32)
                    if not np.isfinite(vec).all():  # never serve NaN/Inf (written by an older version)
                        continue
                    for i in want.pop(k):
                        found[i] = vec
            return found
        except OSError as e:
            self._warn_once("read", e)
            return {}

    def _load_hits(self, shard: Path, entry: dict | None, want: dict[bytes, Any]):
        """``({key: row}, emb)`` for the wanted keys this shard holds, or None; ``emb`` is the shard's numpy array
        (float32, or float16 in a float16 cache). The embeddings of a shard are read (and its checksum verified,
        once per process) only when it holds a wanted key."""
        from safetensors import safe_open

        try:
            st = shard.stat()
            with safe_open(str(shard), framework="numpy") as f:
                meta = f.metadata() or {}
                keys = f.get_tensor("keys")
                rows = {}
                for r, k in enumerate(keys):
                    kb = k.tobytes()
                    if kb in want:
                        rows[kb] = r
                if not rows:
                    return None
                emb = f.get_tensor("emb")
            stamp = (st.st_size, st.st_mtime_ns)
            if self._verified.get(shard) != stamp:
                expected = meta.get("checksum")
                if not expected or _checksum(keys, emb) != expected:
                    raise ValueError("checksum mismatch")
                if entry is not None and entry.get("checksum") != expected:
                    raise ValueError("checksum differs from the index")
                self._verified[shard] = stamp
            return rows, emb
        except FileNotFoundError:
            return None  # removed by a concurrent process
        except (OSError, MemoryError) as e:  # unreadable (permissions, EIO, EMFILE, no memory), not corrupted
            self._warn_once("read", e, shard)
            return None
        except _CORRUPT as e:  # a bad checksum or format: the shard is removed, its entries recomputed
            warnings.warn(
                f"{self.kind} cache shard {printable(str(shard))} is corrupted ({type(e).__name__}: {e}); "
                "removing it, its entries will be recomputed",
                stacklevel=4,
            )
            with contextlib.suppress(OSError):
                shard.unlink()
            return None
        except Exception as e:  # anything else: not known to be corrupted, so kept
            self._warn_once("read", e, shard)
            return None

    @staticmethod
    def _read_index(folder: Path) -> dict[str, dict] | None:
        """The well-formed entries of ``index.json``; ``{}`` when it is missing and None when it is malformed
        (not JSON, not ``{"shards": {name: {"count": int, "checksum": str}}}``). Malformed entries are left out:
        the shards are self-describing and :meth:`put` rebuilds the index from them."""
        try:
            raw = json.loads((folder / "index.json").read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None
        shards = raw.get("shards") if isinstance(raw, dict) else None
        if not isinstance(shards, dict):
            return None
        return {n: e for n, e in shards.items() if isinstance(n, str) and _valid_entry(e)}

    # ------------------------------------------------------------------ writing
    def put(self, namespace: str, texts: Sequence[str], embeddings: torch.Tensor,
            encoder: dict[str, Any] | None = None) -> Path | None:
        """Store ``embeddings`` (``[len(texts), D]``) as one new shard; returns its path.

        ``encoder``: ``{"fingerprint", "spec", "precision"}`` recorded in the namespace's ``meta.json`` when it is
        created (see :func:`encoder_record`), so that :func:`cache_info` can say which model the folder belongs to.

        Returns None when there is nothing to store or the folder cannot be written (read-only, full disk:
        one :class:`CacheWarning`, no temporary file left). Raises ValueError for non-finite rows, which
        must never be served as embeddings.
        """
        if len(texts) == 0:
            return None
        if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
            raise ValueError(f"{len(texts)} texts but embeddings of shape {tuple(embeddings.shape)}")
        emb = embeddings.detach().to("cpu", getattr(torch, self.dtype)).contiguous()
        finite = torch.isfinite(emb).all(dim=1)
        if not bool(finite.all()):
            bad = [texts[i] for i in torch.nonzero(~finite).flatten().tolist()]
            raise ValueError(f"refusing to cache {len(bad)} non-finite (NaN/Inf) embedding row(s), "
                             f"e.g. {printable(bad[0])!r}")
        try:
            return self._write_shard(self.folder(namespace), namespace, texts, emb, encoder)
        except OSError as e:
            self._warn_once("write", e)
            return None

    def _write_shard(self, folder: Path, namespace: str, texts: Sequence[str], emb: torch.Tensor,
                     encoder: dict[str, Any] | None = None) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        self._sweep_once(folder)
        meta = folder / "meta.json"
        if not meta.exists():
            record: dict[str, Any] = {"namespace": namespace, "dtype": self.dtype}
            if encoder is not None:
                record["encoder"] = dict(encoder)
            atomic_write_bytes(meta, json.dumps(record, indent=1).encode())
        keys = torch.from_numpy(np.frombuffer(b"".join(prompt_key(t) for t in texts), dtype=np.uint8).reshape(-1, 32).copy())
        checksum = _checksum(keys, emb)
        from safetensors.torch import save

        data = save({"keys": keys, "emb": emb}, metadata={"checksum": checksum, "count": str(len(texts))})
        name = f"{uuid.uuid4().hex}.safetensors"
        shard = folder / name
        atomic_write_bytes(shard, data)
        st = shard.stat()
        self._verified[shard] = (st.st_size, st.st_mtime_ns)
        with _file_lock(folder / "index.lock"):
            old = self._read_index(folder) or {}
            index: dict[str, dict] = {}
            for p in sorted(folder.glob("*.safetensors")):  # listed shards, plus any the index lost
                entry = old.get(p.name) or _shard_entry(p)
                if entry is not None:
                    index[p.name] = entry
            index[name] = {"count": len(texts), "checksum": checksum}
            atomic_write_bytes(folder / "index.json", json.dumps({"shards": index}, indent=1).encode())
        return shard

    def clear(self, namespace: str | None = None) -> None:
        """Delete one namespace (or everything of this cache's kind)."""
        import shutil

        target = self.folder(namespace) if namespace is not None else self.root / self.kind
        shutil.rmtree(target, ignore_errors=True)


def encoder_record(encoder: Any) -> dict[str, str]:
    """What a namespace's ``meta.json`` records about its encoder: ``{"fingerprint", "spec", "precision"}``."""
    return {"fingerprint": str(encoder.fingerprint), "spec": str(encoder.spec), "precision": str(encoder.precision)}


# ---------------------------------------------------------------------- administration (vlmood cache info|clear)
_HEX = frozenset("0123456789abcdef")
_EMBEDDING_KINDS = ("text", "features")  # EmbeddingCache kinds: <kind>/<24 hex>/
UNKNOWN = "unknown"
"""The fingerprint reported for a cache folder that does not record its encoder (no or unreadable ``meta.json``,
LVLM replies, prompt-learning views): such folders are removed only by a full clear or by age."""


def _is_hex(name: str, n: int) -> bool:
    return len(name) == n and set(name) <= _HEX


def _scan(folder: Path) -> tuple[int, float | None, list[Path]]:
    """``(bytes, newest mtime, visible shard/entry files)`` of the regular files under ``folder``, never following
    a symbolic link (a link is neither counted nor entered). Temporary and hidden files count in bytes and mtime
    (a concurrent writer's new temporary file keeps the folder young) but are never entries."""
    size, newest, files = 0, None, []
    stack = [folder]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_symlink():
                    continue
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    size += st.st_size
                    newest = st.st_mtime if newest is None else max(newest, st.st_mtime)
                    if not e.name.startswith("."):
                        files.append(Path(e.path))
            except OSError:  # removed meanwhile by a concurrent process
                continue
    return size, newest, files


def _read_meta(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / "meta.json").read_bytes())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _embedding_row(kind: str, folder: Path) -> dict[str, Any]:
    meta = _read_meta(folder)
    ns = meta.get("namespace") if isinstance(meta.get("namespace"), str) else None
    enc = meta.get("encoder") if isinstance(meta.get("encoder"), dict) else {}
    # split from the right: a fingerprint may hold "|" itself (CLIPN's no side: "clipn-no:<hash>|<base encoder>")
    # image features: "fingerprint|precision|preprocessing|global/local/patches|feat-v1[|reduced|key]"; text:
    # "fingerprint|precision|text-v1", split from the right (CLIPN's no-side fingerprint holds a "|" itself)
    fields = (ns.split("|") if kind == "features" else ns.rsplit("|", 2)) if ns else []
    fingerprint = enc.get("fingerprint") or (fields[0] if fields and fields[0] else UNKNOWN)
    precision = enc.get("precision") or (fields[1] if len(fields) > 1 else None)
    size, newest, files = _scan(folder)
    index = EmbeddingCache._read_index(folder) or {}
    entries = 0
    for p in files:
        if p.parent == folder and p.suffix == ".safetensors":
            entry = index.get(p.name) or _shard_entry(p)
            entries += entry["count"] if entry is not None else 0
    detail = (", ".join([*fields[3:4], *fields[5:], fields[2]]) if kind == "features" and len(fields) >= 5
              else None)  # global/local/patches (and a reduced key) first
    return {"kind": kind, "path": str(folder), "fingerprint": str(fingerprint), "spec": enc.get("spec"),
            "precision": precision, "detail": detail, "entries": entries, "bytes": size, "modified": newest}


def _views_row(folder: Path) -> dict[str, Any]:
    meta = _read_meta(folder)
    shapes = meta.get("shapes") if isinstance(meta.get("shapes"), dict) else {}
    g = shapes.get("global")
    ok = isinstance(g, list) and len(g) >= 2 and all(isinstance(x, int) for x in g[:2])
    entries = g[0] * g[1] if ok else 0
    size, newest, _ = _scan(folder)
    return {"kind": "tuning-views", "path": str(folder), "fingerprint": UNKNOWN, "spec": None, "precision": None,
            "detail": "image views of prompt learning", "entries": entries, "bytes": size, "modified": newest}


def _record_row(folder: Path) -> dict[str, Any]:
    """A fingerprint record (:mod:`vlmood.encoders.record`): ``encoders/<24 hex>/record.json``."""
    try:
        rec = json.loads((folder / "record.json").read_bytes())
    except (OSError, ValueError):
        rec = {}
    rec = rec if isinstance(rec, dict) else {}
    ident = rec.get("identity") if isinstance(rec.get("identity"), dict) else {}
    size, newest, files = _scan(folder)
    what = ident.get("path") if ident.get("kind") in ("file", "dir") else ident.get("spec")
    return {"kind": "encoder-record", "path": str(folder), "fingerprint": str(rec.get("fingerprint") or UNKNOWN),
            "spec": rec.get("spec") if isinstance(rec.get("spec"), str) else None, "precision": None,
            "detail": f"fingerprint record of {what}" if isinstance(what, str) else "fingerprint record",
            "entries": sum(1 for p in files if p.name == "record.json"), "bytes": size, "modified": newest}


def _lvlm_row(folder: Path) -> dict[str, Any]:
    size, newest, files = _scan(folder)
    entries = sum(1 for p in files if p.suffix == ".json" and _is_hex(p.stem, 64) and p.parent.parent == folder)
    return {"kind": "lvlm", "path": str(folder), "fingerprint": UNKNOWN, "spec": None, "precision": None,
            "detail": "vision-language model replies", "entries": entries, "bytes": size, "modified": newest}


def _subdirs(folder: Path) -> list[Path]:
    """The real (not symbolic-link) sub-folders of ``folder``, sorted; none when it is absent or a link."""
    if folder.is_symlink() or not folder.is_dir():
        return []
    try:
        with os.scandir(folder) as it:
            return sorted(Path(e.path) for e in it if not e.is_symlink() and e.is_dir(follow_symlinks=False))
    except OSError:
        return []


def cache_info(root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One row per cache folder under ``root`` (default :func:`vlmood._paths.cache_root`).

    Rows (dicts): ``kind`` (``"text"``, ``"features"``, ``"tuning-views"``, ``"encoder-record"``, ``"lvlm"``), ``path``, ``fingerprint``
    of the encoder (:data:`UNKNOWN` when not recorded), ``spec`` (None when not recorded: caches written before
    vlmood recorded it), ``precision``, ``detail`` (features: preprocessing and global/local), ``entries``
    (embedding rows, view rows or replies), ``bytes`` (regular files, temporary ones included) and ``modified``
    (newest file's mtime, seconds since the epoch; None when empty). Only vlmood's own folders are listed (anything
    else under ``root`` is left alone), and symbolic links are never followed.
    """
    base = Path(root).expanduser() if root is not None else cache_root()
    rows = []
    for kind in _EMBEDDING_KINDS:
        rows += [_embedding_row(kind, d) for d in _subdirs(base / kind) if _is_hex(d.name, 24)]
    rows += [_views_row(d) for d in _subdirs(base / "tuning-views") if _is_hex(d.name, 32)]
    rows += [_record_row(d) for d in _subdirs(base / "encoders") if _is_hex(d.name, 24)]
    lvlm = base / "lvlm"
    if lvlm.is_dir() and not lvlm.is_symlink():
        rows.append(_lvlm_row(lvlm))
    return rows


def _match_encoder(rows: list[dict[str, Any]], encoder: str) -> str:
    """The one recorded fingerprint that ``encoder`` names (whole, a prefix, or a prefix of its weights hash)."""
    from ..errors import InvalidInputError

    known = sorted({r["fingerprint"] for r in rows if r["fingerprint"] != UNKNOWN})
    q = encoder.strip()
    if q in known:
        return q
    # the weights hash of the fingerprint's own model (CLIPN's no side "clipn-no:<hash>|<base>" also ends with its
    # base model's hash, which must not make a base-model prefix ambiguous)
    hits = [fp for fp in known if q and (fp.startswith(q) or fp.split("|", 1)[0].rsplit(":", 1)[-1].startswith(q))]
    if len(hits) == 1:
        return hits[0]
    listed = ", ".join(known) if known else "none"
    if not hits:
        raise InvalidInputError(f"no cached encoder matches {printable(q)!r}; cached encoders: {listed}")
    raise InvalidInputError(f"{printable(q)!r} matches {len(hits)} cached encoders ({', '.join(hits)}); give more "
                            "of the fingerprint")


def _remove(row: dict[str, Any]) -> str | None:
    """Remove a row's folder (under its index lock, if it has one, so a writer updating the index finishes first);
    the error message, or None. A writer adding a shard meanwhile gets one CacheWarning and goes on uncached."""
    import shutil

    folder = Path(row["path"])
    errors: list[str] = []

    def onerror(_func: Any, path: str, exc: Any) -> None:
        e = exc[1] if isinstance(exc, tuple) else exc
        if not isinstance(e, FileNotFoundError):
            errors.append(f"{printable(path)}: {getattr(e, 'strerror', None) or e}")

    lock = folder / "index.lock"
    how = {"onexc": onerror} if sys.version_info >= (3, 12) else {"onerror": onerror}
    try:
        with _file_lock(lock) if lock.is_file() else contextlib.nullcontext():
            shutil.rmtree(folder, **how)
    except OSError as e:
        errors.append(f"{printable(str(folder))}: {e.strerror or e}")
    return "; ".join(errors) or None


def _remove_replies(row: dict[str, Any], cutoff: float | None) -> tuple[dict[str, Any], str | None]:
    """Remove the LVLM reply files (``lvlm/<2 hex>/<64 hex>.json``) written before ``cutoff`` (all: None), then the
    sub-folders left empty (and ``lvlm/`` when empty); never other files. Returns (what was removed, as a row; errors)."""
    folder = Path(row["path"])
    gone = {"kind": "lvlm", "path": str(folder), "fingerprint": UNKNOWN, "spec": None, "precision": None,
            "detail": row["detail"], "entries": 0, "bytes": 0, "modified": None}
    errors = []
    for sub in _subdirs(folder):
        if not _is_hex(sub.name, 2):
            continue
        for f in sorted(sub.iterdir()):
            try:
                st = f.lstat()
                if not (f.suffix == ".json" and _is_hex(f.stem, 64) and stat.S_ISREG(st.st_mode)) or \
                        (cutoff is not None and st.st_mtime >= cutoff):
                    continue
                f.unlink()
            except FileNotFoundError:
                continue
            except OSError as e:
                errors.append(f"{printable(str(f))}: {e.strerror or e}")
                continue
            gone["entries"] += 1
            gone["bytes"] += st.st_size
        with contextlib.suppress(OSError):
            sub.rmdir()  # only when empty
    with contextlib.suppress(OSError):
        folder.rmdir()  # only when empty
    return gone, "; ".join(errors) or None


def _modified(row: dict[str, Any]) -> float:
    """A row's newest file mtime, else (an empty folder) the folder's own."""
    if row["modified"] is not None:
        return float(row["modified"])
    try:
        return Path(row["path"]).lstat().st_mtime
    except OSError:
        return time.time()


def clear_cache(encoder: str | None = None, older_than_days: float | None = None,
                root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Remove whole cache folders (rows of :func:`cache_info`) and return what was removed.

    Args:
        encoder: a recorded fingerprint, a unique prefix of one, or a unique prefix of its weights hash (the part
            after the last ``:``): only that encoder's folders. An unknown or ambiguous value is a one-line
            :class:`~vlmood.errors.InvalidInputError` listing the cached encoders. Folders that do not record
            their encoder never match.
        older_than_days: only folders whose newest file is older than this many days (>= 0).
        root: the cache root (default :func:`vlmood._paths.cache_root`).

    Both filters: folders matching both. Neither: everything :func:`cache_info` lists (other files under ``root``
    are left alone). Returns ``{"removed": [rows], "entries": int, "bytes": int, "errors": [str]}`` (a folder that
    could not be removed, e.g. read-only, is in ``errors``, not in ``removed``).
    """
    from ..errors import InvalidInputError

    if older_than_days is not None:
        if isinstance(older_than_days, bool) or not isinstance(older_than_days, (int, float)) \
                or not older_than_days >= 0:
            raise InvalidInputError(f"older_than_days must be a number of days >= 0, got {older_than_days!r}")
    rows = cache_info(root)
    chosen = rows
    if encoder is not None:
        fp = _match_encoder(rows, encoder)
        chosen = [r for r in chosen if r["fingerprint"] == fp]
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400.0
    if cutoff is not None:  # the replies folder is aged reply by reply (_remove_replies)
        chosen = [r for r in chosen if r["kind"] == "lvlm" or _modified(r) < cutoff]
    removed, errors = [], []
    for r in chosen:
        if r["kind"] == "lvlm":
            r, err = _remove_replies(r, cutoff)
        else:
            err = _remove(r)
        if err:
            errors.append(err)
        elif r["entries"] or r["kind"] != "lvlm":
            removed.append(r)
    return {"removed": removed, "entries": sum(r["entries"] for r in removed),
            "bytes": sum(r["bytes"] for r in removed), "errors": errors}
