"""Disk cache of LVLM replies, so a repeated or interrupted run never pays for the same request twice.

Layout under ``root`` (default ``$VLMOOD_CACHE/lvlm``)::

    <key[:2]>/<key>.json     {"key": <key>, "text": <the model's reply>}

A key is the sha256 of (client model id, the full prompt as JSON, the image's content hash, the generation
parameters): any change to one of them is another entry. API keys are never part of a key or an entry. Each entry
is written to a temporary file and renamed into place, so a reader never sees half an entry and a failed write
leaves no temporary file. Only successful replies are stored (clients never ``put`` an error). A corrupt entry
(truncated, not JSON, another key's content) is a miss with one :class:`~vlmood.text.cache.CacheWarning`; an
unwritable or unreadable cache folder gives one warning per folder and process and the run goes on without it.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

from .._io import printable
from .._paths import cache_root
from ..errors import InvalidInputError

_warned: set[tuple[str, str]] = set()  # (root or entry path, "read"/"write"/"corrupt") already warned about


def _warn(where: str, kind: str, message: str) -> None:
    from ..text.cache import CacheWarning

    if (where, kind) not in _warned:
        _warned.add((where, kind))
        warnings.warn(message, CacheWarning, stacklevel=3)


def image_hash(image: Any) -> str:
    """The content hash of an image as sent to a model: ``"none"`` without image; ``"sha256:<hex>"`` of the bytes
    for encoded bytes or a file path (the same content by either route has the same hash); for a PIL image the
    sha256 of its mode, size, palette, EXIF orientation and pixels (as :class:`vlmood.data.MemorySource` keys it).

    Raises :class:`~vlmood.errors.InvalidInputError` for another type, and ``OSError`` for an unreadable file."""
    if image is None:
        return "none"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "sha256:" + hashlib.sha256(bytes(image)).hexdigest()
    if isinstance(image, (str, os.PathLike)):
        h = hashlib.sha256()
        with open(image, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return "sha256:" + h.hexdigest()
    from PIL import Image

    if isinstance(image, Image.Image):
        from ..data import _pixels_key

        return _pixels_key(image)
    raise InvalidInputError(f"an LVLM image must be a PIL image, a file path or encoded bytes, not "
                            f"{type(image).__name__}")


class ResponseCache:
    """Replies on disk keyed by :meth:`key`; ``root`` defaults to ``$VLMOOD_CACHE/lvlm``."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else cache_root() / "lvlm"

    def __repr__(self) -> str:
        return f"ResponseCache({printable(str(self.root))!r})"

    @staticmethod
    def key(model_id: str, prompt: Any, image_hash: str, params: Mapping[str, Any]) -> str:
        """sha256 (hex) of the model id, the prompt (a string or chat messages, as canonical JSON), the image hash
        and the generation parameters. Raises :class:`~vlmood.errors.InvalidInputError` when the prompt or the
        parameters cannot be written as JSON."""
        try:
            blob = json.dumps({"model": model_id, "prompt": prompt, "image": image_hash, "params": dict(params)},
                              sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"an LVLM prompt and its parameters must be JSON data: {e}") from None
        return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()

    def path(self, key: str) -> Path:
        """The file of entry ``key``."""
        if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            raise InvalidInputError(f"not a response cache key (64 hex digits): {key!r}")
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        """The stored reply for ``key``, or None (absent, unreadable or corrupt: the request is made again)."""
        p = self.path(key)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            _warn(str(self.root), "read", f"cannot read the LVLM response cache {printable(str(self.root))}: "
                                          f"{e.strerror or e}; asking the model again")
            return None
        try:
            entry = json.loads(data.decode("utf-8", "surrogatepass"))
            if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("text"), str):
                raise ValueError("not an entry for this key")
        except (ValueError, UnicodeDecodeError) as e:
            _warn(str(p), "corrupt", f"corrupt LVLM response cache entry {printable(str(p))} ({e}); "
                                     "asking the model again")
            return None
        return entry["text"]

    def get_entry(self, key: str) -> tuple[str, bool] | None:
        """``(text, truncated)`` stored for ``key``, or None (see :meth:`get`)."""
        text = self.get(key)
        if text is None:
            return None
        try:
            entry = json.loads(self.path(key).read_bytes().decode("utf-8", "surrogatepass"))
        except (OSError, ValueError, UnicodeDecodeError):
            return text, False
        return text, bool(entry.get("truncated", False)) if isinstance(entry, dict) else False

    def put(self, key: str, text: str, truncated: bool = False) -> bool:
        """Store ``text`` (a successful reply) under ``key`` atomically; False (with one warning per cache folder)
        when it cannot be written: the run goes on without caching."""
        if not isinstance(text, str):
            raise TypeError(f"only reply texts are cached, not {type(text).__name__}")
        from ..text.cache import atomic_write_bytes

        p = self.path(key)
        entry = {"key": key, "text": text, **({"truncated": True} if truncated else {})}
        data = json.dumps(entry, ensure_ascii=False).encode("utf-8", "surrogatepass")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(p, data)
        except OSError as e:
            _warn(str(self.root), "write", f"cannot write the LVLM response cache {printable(str(self.root))}: "
                                           f"{e.strerror or e}; replies are not cached")
            return False
        return True

    def __len__(self) -> int:
        """Number of stored entries."""
        return sum(1 for _ in self.root.glob("??/*.json")) if self.root.is_dir() else 0

