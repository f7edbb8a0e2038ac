"""Content-addressed disk cache of embeddings (text prompts here; image features reuse it with ``kind="features"``).

Layout under ``root`` (``$VLMOOD_CACHE`` or the platform cache dir)::

    <kind>/<namespace>/meta.json             which encoder (fingerprint + precision) the namespace holds
    <kind>/<namespace>/index.json            shard name -> row count and checksum
    <kind>/<namespace>/<shard>.safetensors   tensors ``keys`` (uint8 [k, 32], sha256 of each key) and ``emb`` [k, D]

A namespace is one encoder (and, for images, one preprocessing); a key is the sha256 of an exact string
(the prompt, or an image's identity). Every shard is written to a
temporary file and renamed into place, so readers never see a partial shard, and concurrent writers
each add their own shards (the index is updated under a file lock and re-derived from the folder when
a shard is missing from it). Each shard carries a checksum of its tensors: a truncated or corrupted
shard is detected, reported with a warning, removed, and its prompts are recomputed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .._paths import cache_root

_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def prompt_key(text: str) -> bytes:
    """The 32-byte cache key of a prompt: sha256 of its exact UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def _checksum(keys: torch.Tensor, emb: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(keys.contiguous().numpy().tobytes())
    h.update(emb.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a unique temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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

    def __repr__(self) -> str:
        return f"EmbeddingCache(root={str(self.root)!r}, dtype={self.dtype!r}, kind={self.kind!r})"

    def folder(self, namespace: str) -> Path:
        # the storage dtype is part of the folder: an exact float32 cache never serves float16-rounded values
        return self.root / self.kind / hashlib.sha256(f"{namespace}|{self.dtype}".encode()).hexdigest()[:24]

    # ------------------------------------------------------------------ reading
    def get(self, namespace: str, texts: Sequence[str]) -> dict[int, torch.Tensor]:
        """Cached embeddings of ``texts``: ``{position in texts: float32 [D] tensor}`` for every hit."""
        folder = self.folder(namespace)
        if not folder.is_dir() or not texts:
            return {}
        want: dict[bytes, list[int]] = {}
        for i, t in enumerate(texts):
            want.setdefault(prompt_key(t), []).append(i)
        found: dict[int, torch.Tensor] = {}
        index = self._read_index(folder)
        for shard in sorted(folder.glob("*.safetensors")):
            if not want:
                break
            loaded = self._load_hits(shard, index.get(shard.name), want)
            if loaded is None:
                continue
            rows, emb = loaded
            for k, r in rows.items():
                vec = emb[r].float()
                for i in want.pop(k):
                    found[i] = vec
        return found

    def _load_hits(self, shard: Path, entry: dict | None, want: dict[bytes, Any]):
        """``({key: row}, emb)`` for the wanted keys this shard holds, or None. The embeddings of a shard are
        read (and its checksum verified, once per process) only when it holds a wanted key."""
        from safetensors import safe_open

        try:
            st = shard.stat()
            with safe_open(str(shard), framework="pt") as f:
                meta = f.metadata() or {}
                keys = f.get_tensor("keys")
                rows = {}
                for r, k in enumerate(keys.numpy()):
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
        except Exception as e:
            warnings.warn(
                f"{self.kind} cache shard {shard} is corrupted ({type(e).__name__}: {e}); "
                "removing it, its entries will be recomputed",
                stacklevel=4,
            )
            with contextlib.suppress(OSError):
                shard.unlink()
            return None

    @staticmethod
    def _read_index(folder: Path) -> dict[str, dict]:
        try:
            return json.loads((folder / "index.json").read_text()).get("shards", {})
        except (OSError, ValueError, AttributeError):
            return {}  # missing or unreadable: shards are self-describing, the index is re-derived on write

    # ------------------------------------------------------------------ writing
    def put(self, namespace: str, texts: Sequence[str], embeddings: torch.Tensor) -> Path | None:
        """Store ``embeddings`` (``[len(texts), D]``) as one new shard; returns its path."""
        if len(texts) == 0:
            return None
        if embeddings.shape[0] != len(texts):
            raise ValueError(f"{len(texts)} texts but {embeddings.shape[0]} embeddings")
        folder = self.folder(namespace)
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "meta.json"
        if not meta.exists():
            atomic_write_bytes(meta, json.dumps({"namespace": namespace}, indent=1).encode())
        keys = torch.from_numpy(np.frombuffer(b"".join(prompt_key(t) for t in texts), dtype=np.uint8).reshape(-1, 32).copy())
        emb = embeddings.detach().to("cpu", _DTYPES[self.dtype]).contiguous()
        checksum = _checksum(keys, emb)
        from safetensors.torch import save

        data = save({"keys": keys, "emb": emb}, metadata={"checksum": checksum, "count": str(len(texts))})
        name = f"{uuid.uuid4().hex}.safetensors"
        shard = folder / name
        atomic_write_bytes(shard, data)
        with _file_lock(folder / "index.lock"):
            index = self._read_index(folder)
            index = {n: e for n, e in index.items() if (folder / n).exists()}
            index[name] = {"count": len(texts), "checksum": checksum}
            atomic_write_bytes(folder / "index.json", json.dumps({"shards": index}, indent=1).encode())
        self._verified[shard] = (shard.stat().st_size, shard.stat().st_mtime_ns)
        return shard

    def clear(self, namespace: str | None = None) -> None:
        """Delete one namespace (or everything of this cache's kind)."""
        import shutil

        target = self.folder(namespace) if namespace is not None else self.root / self.kind
        shutil.rmtree(target, ignore_errors=True)
