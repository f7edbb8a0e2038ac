"""Small I/O helpers shared by every module that reads user text files or prints user paths."""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from .errors import InvalidInputError

_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The text of a UTF-8 file, with a leading byte-order mark removed (``utf-8-sig``).

    ``what`` names the kind of file in messages (``"class list"``, ``"manifest"``...). A missing, unreadable or
    non-UTF-8 file (Latin-1, UTF-16, binary) raises :class:`~vlmood.errors.InvalidInputError` with one line naming
    the file, the first offending byte and how to convert it.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError:
        raise InvalidInputError(f"{what} {printable(str(p))} is a folder, not a file") from None
    except OSError as e:
        raise InvalidInputError(f"cannot read {what} {printable(str(p))}: {e.strerror or e}") from None
    if data.startswith(_UTF16_BOMS):
        raise InvalidInputError(f"{what} {printable(str(p))} is UTF-16 text; save it as UTF-8 "
                                "(e.g. iconv -f UTF-16 -t UTF-8)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InvalidInputError(
            f"{what} {printable(str(p))} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); "
            "save it as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8 FILE)") from None


def printable(text: str) -> str:
    """``text`` safe to print or encode as UTF-8: undecodable bytes of file names (lone surrogates from
    ``os.fsdecode``) become ``\\xNN`` escapes instead of raising ``UnicodeEncodeError``; other lone surrogates
    (``"\\ud800"`` from JSON, or a Windows file name) become ``\\uXXXX`` escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate outside U+DC80..U+DCFF: not an escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a unique temporary file and an atomic rename.

    On any failure (a full disk, a read-only folder, an interrupt) the temporary file is removed and the
    exception re-raised; ``path`` is then unchanged.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (and string ``metadata``) as a safetensors file, atomically: a temporary file in the same
    folder, then a rename; on any failure (a full disk, an interrupt) the temporary file is removed and ``path`` is
    unchanged. The file gets the usual permissions (``0666`` less the umask): ``safetensors``' own ``save_file``
    creates owner-only (``0600``) files. Raises ``OSError`` (and ``safetensors``' errors for bad tensors). Values may
    be torch tensors or, all of them, numpy arrays (written without torch; the file is the same).
    """
    import numpy as np

    path = Path(path)
    if all(isinstance(v, np.ndarray) for v in tensors.values()):  # no tensors at all: the same file either way
        from safetensors.numpy import save as save_numpy

        # np.require keeps a 0-d array 0-d (ascontiguousarray would make it [1])
        atomic_write_bytes(path, save_numpy({k: np.require(v, requirements="C") for k, v in tensors.items()},
                                            metadata=metadata))
        return path
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))
    return path
