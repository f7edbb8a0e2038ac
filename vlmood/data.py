"""Image decoding, image sources (folders, globs, CSV manifests, lists, datasets) and label mapping.

Folder and glob scans follow symlinked folders, count each real file once, list only regular files (a named
pipe, socket or device named like an image is skipped with a warning: reading it could block forever; a dangling
symlink is kept, so loading it reports the file by name), and skip hidden entries below the root: any file or
folder whose name starts with ``.`` (``.ipynb_checkpoints``, ``.DS_Store``, macOS ``._*`` AppleDouble files).

- A folder scan visits each real folder once (a symlink loop neither hangs nor duplicates), through the path
  that reaches it first in sorted order, and keeps every real file found there; its first-level folder is its
  label (a file reachable under two class folders is counted once, with a warning).
- A glob lists every real file that some path matching the pattern reaches, as ``glob.glob`` does, once each
  (the first matching path in sorted order): a folder is searched again through another path only when that
  path can match other parts of the pattern, so a symlink loop ends, and a folder reached through a symlink
  whose own path does not match is still found through a path that does.

A path that exists is always taken literally, even when its name contains glob characters (``[``, ``*``, ``?``).
"""
from __future__ import annotations

import contextlib
import csv
import difflib
import glob as _glob
import hashlib
import io
import math
import os
import re
import stat
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ._io import printable, read_text
from .errors import ImageLoadError, InvalidInputError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
)
MAX_PIXELS = 89_478_485
"""Images with more pixels are refused (Pillow's decompression-bomb limit, about 9459x9459)."""
MAX_ASPECT = 100.0
"""Images whose longer side exceeds this many times the shorter side are refused: resizing the shorter side to the
model's input (224 px) would otherwise blow a 100000x1 strip up to gigabytes. At 100:1 the resized image stays
under 100 x 224^2 = 5 Mpx, and CLIP's centre crop of it already sees only 1% of the image."""
PATH_COLUMNS = ("path", "filepath", "file_path", "filename", "file_name", "file", "image", "image_path")
"""Manifest header names (case-insensitive) taken as the image-path column, first match wins."""
LABEL_COLUMNS = ("label", "labels", "class_name", "classname", "class", "category", "category_name", "target")
"""Manifest header names (case-insensitive) taken as the label column, first match wins."""
_HASH_CHUNK = 1 << 20
_PARALLEL_HASH_BYTES = 128 << 10
"""Files at least this large are hashed in a thread pool by ``PathSource.identities`` (hashing releases the GIL);
smaller ones in the calling thread, where a pool costs more than it saves (measured: 10,000 files of 5 KB take
0.2 s one by one, 0.5-1.4 s through 8 threads; 1 MB files hash 3x faster through the pool)."""
_WNID = re.compile(r"n\d{8}")
_DIGITS = re.compile(r"[0-9]+")


# ---------------------------------------------------------------------------------------------- decoding
def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: high bit depths are rescaled, transparency composited on white.

    Integer modes ``I;16*`` and ``I`` are read as 16-bit values 0..65535 (what 16-bit PNG, PGM/PPM and TIFF decode
    to; Pillow also scales PGM files with any maxval above 255 to that range) and divided by 257, whatever the
    image's own maximum, so a dark 16-bit image stays dark. A mode-``I`` image with values outside 0..65535
    (a true 32-bit TIFF) has no standard display range and raises ``ValueError``. Float images (``F``) are taken
    as 0..1 when their maximum is at most 1, else as 0..255; NaN pixels become 0.
    """
    mode = im.mode
    if mode == "I" or mode.startswith("I;16"):
        arr = np.asarray(im, dtype=np.float64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(
                f"{mode} pixel values span {arr.min():.0f}..{arr.max():.0f}, outside the 16-bit range 0..65535 "
                "(no standard display range); convert the image to 8 or 16 bits"
            )
        return Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
    return im


def load_image(source: Any, max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Decode an image as 8-bit RGB with EXIF orientation applied.

    ``source``: a path or a PIL image. Grayscale, palette, RGBA (composited on white), CMYK and 16-bit
    images are converted correctly (see ``_to_rgb`` for the integer and float modes). Raises
    :class:`ImageLoadError` naming the file when it is missing, a folder, a named pipe, socket or device (never
    read: it could block forever), empty, not an image, truncated, larger
    than ``max_pixels`` (decompression-bomb guard) or longer than ``max_aspect`` times its width (or the reverse:
    resizing such a strip to the model's input would take gigabytes).
    """
    if isinstance(source, Image.Image):
        _check_size(source.size, "in-memory image", max_pixels, max_aspect)
        try:
            return _to_rgb(ImageOps.exif_transpose(source))
        except (OSError, ValueError) as e:
            raise ImageLoadError(f"cannot convert in-memory image ({source.mode} {source.size}): {e}") from e
    if not isinstance(source, (str, bytes, os.PathLike)):
        raise ImageLoadError(f"cannot load an image from a {type(source).__name__}: give a file path or a PIL image")
    text = os.fsdecode(source)
    if not text.strip():
        raise ImageLoadError("empty image path")
    path = Path(text)
    name = printable(str(path))
    if path.is_dir():
        raise ImageLoadError(f"image path is a folder, not an image file: {name}")
    if not path.exists():
        raise ImageLoadError(f"image file not found: {name}")
    try:
        with _open_regular(path) as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ImageLoadError(f"image file is empty (0 bytes): {name}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(f)
            _check_size(im.size, name, max_pixels, max_aspect)
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"image {name} refused: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"not an image (or an unsupported format): {name}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"cannot decode image {name}: {printable(str(e))}") from e


def _open_bytes(data: bytes, name: str) -> Image.Image:
    """Open encoded image bytes lazily (``load_image`` then checks the size and decodes), naming ``name``."""
    if not data:
        raise ImageLoadError(f"image {name} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"image {name} refused: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"not an image (or an unsupported format): {name}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"cannot decode image {name}: {printable(str(e))}") from e


def _check_size(size: tuple[int, int], name: str, max_pixels: int, max_aspect: float = MAX_ASPECT) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageLoadError(f"image {name} has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageLoadError(
            f"image {name} refused: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
            "(possible decompression bomb; raise max_pixels if the image is genuine)"
        )
    if max(w, h) > max_aspect * min(w, h):
        raise ImageLoadError(
            f"image {name} refused: {w}x{h} has an aspect ratio of {max(w, h) / min(w, h):,.0f}:1, above the limit "
            f"of {max_aspect:g}:1 (resizing its shorter side to the model's input would take "
            f"{224 * 224 * max(w, h) // min(w, h):,} pixels; raise max_aspect if the image is genuine)"
        )


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open a regular file for binary reading. Never blocks: a named pipe, socket, device or folder raises
    :class:`ImageLoadError` naming it (reading a FIFO would wait forever for a writer); other failures raise
    ``OSError``."""
    def refuse(mode: int) -> None:
        if not stat.S_ISREG(mode):
            raise ImageLoadError(f"not an image file ({_kind(mode)}): {printable(os.fsdecode(path))}")

    refuse(os.stat(path).st_mode)  # a socket cannot even be opened
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        refuse(os.fstat(fd).st_mode)  # replaced since the stat
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_digest(path: str | os.PathLike) -> str | None:
    """sha256 of a regular file's bytes (hex), read in 1 MiB chunks; None when it cannot be read or is not a
    regular file (a named pipe, socket or device is never read: :func:`load_image` reports it by name)."""
    h = hashlib.sha256()
    try:
        with _open_regular(path) as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    except (OSError, ImageLoadError):
        return None
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- labels
def _norm_label(name: str) -> str:
    """Case-, underscore- and whitespace-insensitive form of a class name (``Afghan_hound`` -> ``afghan hound``)."""
    return " ".join(name.replace("_", " ").split()).casefold()


def _is_missing(label: Any) -> bool:
    return label is None or (isinstance(label, (float, np.floating)) and math.isnan(label))


def _as_index(label: Any) -> int | None:
    """The class index a label denotes (int, integral float, ASCII digit string), or None."""
    if isinstance(label, (bool, np.bool_)):
        return None
    if isinstance(label, (int, np.integer)):
        return int(label)
    if isinstance(label, (float, np.floating)) and math.isfinite(label) and float(label).is_integer():
        return int(label)
    if isinstance(label, str) and _DIGITS.fullmatch(label.strip()):
        return int(label)
    return None


def map_labels(labels: Sequence[Any], classes: Sequence[str], source: str = "ID set") -> np.ndarray:
    """Map raw labels (class names, indices, or ImageFolder folder names) to class indices ``[N]`` (int64).

    - Names match exactly, else ignoring case, ``_`` for space and repeated spaces (``Rose``, ``afghan_hound``
      match ``rose``, ``Afghan Hound``). When two classes are equal under that rule, only an exact name matches.
    - Integers (and digit strings that are not class names) are class indices.
    - Folders named by WordNet id (every label like ``n01440764``), one per class, are mapped in sorted order
      (torchvision's ImageFolder convention) with a warning: the class list must be in WordNet-id order.

    Anything else raises :class:`InvalidInputError`: missing labels (None, NaN), unknown names (listed with the
    closest class names), ambiguous names, and indices outside the class list.
    """
    labels = list(labels)
    classes = [str(c) for c in classes]
    n_missing = sum(_is_missing(lb) for lb in labels)
    if n_missing:
        raise InvalidInputError(f"{source} has {n_missing} of {len(labels)} images without a label (None or NaN); "
                                "label every image, or none")
    if not labels:
        return np.zeros(0, dtype=np.int64)
    odd = [lb for lb in labels if not isinstance(lb, str) and _as_index(lb) is None]
    if odd:
        raise InvalidInputError(f"{source} has labels that are neither class names nor class indices, e.g. "
                                f"{odd[0]!r} ({type(odd[0]).__name__})")
    exact: dict[str, list[int]] = {}
    loose: dict[str, list[int]] = {}
    for i, c in enumerate(classes):
        exact.setdefault(c, []).append(i)
        loose.setdefault(_norm_label(c), []).append(i)
    as_idx = [_as_index(lb) for lb in labels]
    if all(v is not None and not (isinstance(lb, str) and lb in exact) for v, lb in zip(as_idx, labels)):
        bad = sorted({v for v in as_idx if not 0 <= v < len(classes)})  # type: ignore[operator]
        if bad:
            raise InvalidInputError(f"{source} has label indices outside the {len(classes)} classes: {bad[:5]}")
        return np.array(as_idx, dtype=np.int64)

    distinct = sorted({str(lb) for lb in labels})
    mapping: dict[str, int] = {}
    unknown: list[str] = []
    ambiguous: list[str] = []
    for lb in distinct:
        hits = exact.get(lb) or loose.get(_norm_label(lb))
        if not hits:
            unknown.append(lb)
        elif len(hits) > 1:
            ambiguous.append(f"{lb!r} (matches {', '.join(repr(classes[h]) for h in hits)})")
        else:
            mapping[lb] = hits[0]
    if ambiguous:
        raise InvalidInputError(f"{source} has labels matching several classes when case and '_' are ignored: "
                                f"{'; '.join(ambiguous[:5])}; name them exactly as one class")
    if unknown and not mapping and all(_WNID.fullmatch(lb) for lb in distinct):
        if len(distinct) != len(classes):
            raise InvalidInputError(
                f"{source} has {len(distinct)} WordNet-id folders but {len(classes)} classes: such folders are "
                "mapped to the classes in sorted order only when there is exactly one folder per class")
        warnings.warn(f"{source}: mapping {len(distinct)} WordNet-id folders to the {len(classes)} classes by sorted "
                      "order (ImageFolder convention); the class list must be in WordNet-id order", stacklevel=2)
        order = {lb: i for i, lb in enumerate(distinct)}
        return np.array([order[str(lb)] for lb in labels], dtype=np.int64)
    if unknown:
        names = {_norm_label(c): c for c in reversed(classes)}
        shown = []
        for u in unknown[:5]:
            close = difflib.get_close_matches(_norm_label(u), list(names), n=2, cutoff=0.6)
            hint = f" (closest: {', '.join(repr(names[c]) for c in close)})" if close else ""
            shown.append(f"{u!r}{hint}")
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise InvalidInputError(f"{source} has labels outside the class list: {', '.join(shown)}{more}")
    return np.array([mapping[str(lb)] for lb in labels], dtype=np.int64)


# ---------------------------------------------------------------------------------------------- scanning
@dataclass(frozen=True)
class ImageItem:
    """One entry of an image source: a path (or in-memory image) and an optional label string."""

    path: str
    label: str | None = None


def _folder_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _file_entry(path: str) -> tuple[bool, tuple[int, int] | None]:
    """Whether a non-folder entry is listed, and its ``(st_dev, st_ino)``: regular files are; a dangling symlink
    is too, without a key (loading it reports the file by name); a named pipe, socket or device is not."""
    try:
        st = os.stat(path)
    except OSError:
        return True, None
    return stat.S_ISREG(st.st_mode), (st.st_dev, st.st_ino)


def _walk(root: str):
    """Files below folder ``root`` as sorted ``(relative parts, path, (st_dev, st_ino) or None)``; the number of
    hidden entries skipped; the relative parts of the special files left out (named pipes, sockets, devices); and
    the pairs ``(relative parts seen again, first relative parts)`` of folders reached twice.

    Symlinked folders are followed, each real folder once, through the first path that reaches it (loop-safe):
    every regular file of every reachable folder is listed, a hard-linked or symlinked file possibly under
    several paths (see :func:`_dedupe`). Names starting with ``.`` are skipped; an unreadable folder raises
    :class:`InvalidInputError`.
    """
    def fail(e: OSError) -> None:
        raise InvalidInputError(f"cannot read folder {printable(str(e.filename))}: {e.strerror or e}")

    visited: dict[tuple[int, int], tuple[str, ...]] = {}
    root_key = _folder_key(root)
    if root_key is not None:
        visited[root_key] = ()
    files, special, again, hidden = [], [], [], 0
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail, followlinks=True):
        rel = Path(os.path.relpath(dirpath, root)).parts if dirpath != root else ()
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                hidden += 1
                continue
            key = _folder_key(os.path.join(dirpath, d))
            if key is not None and key in visited:
                again.append((rel + (d,), visited[key]))
                continue
            if key is not None:
                visited[key] = rel + (d,)
            keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            if f.startswith("."):
                hidden += 1
                continue
            path = os.path.join(root, *rel, f)
            listed, key = _file_entry(path)
            if listed:
                files.append((rel + (f,), path, key))
            else:
                special.append(rel + (f,))
    files.sort(key=lambda t: t[0])
    return files, hidden, special, again


def _dedupe(files: list) -> tuple[list, list]:
    """Keep the first (in sorted order) of the paths to each real file; also return ``(dropped, kept)`` relative
    parts of the duplicates whose first-level folder (class) differs from the kept copy's."""
    seen: dict[tuple[int, int], tuple[str, ...]] = {}
    out, conflicts = [], []
    for rel, path, key in files:
        if key is not None:
            if key in seen:
                if seen[key][:1] != rel[:1]:
                    conflicts.append((rel, seen[key]))
                continue
            seen[key] = rel
        out.append((rel, path, key))
    return out, conflicts


def _warn_conflicts(root: str, pairs: list[tuple[tuple[str, ...], tuple[str, ...]]]) -> None:
    pairs = [(a, b) for a, b in pairs if len(a) >= 1 and len(b) >= 1 and a[:1] != b[:1]]
    if pairs:
        a, b = pairs[0]
        warnings.warn(
            f"folder {printable(root)}: {len(pairs)} file(s)/folder(s) are reachable under two class folders "
            f"(symlinks or hard links); each is counted once, e.g. {printable('/'.join(a))!r} is the same as "
            f"{printable('/'.join(b))!r} and counted only as the latter", stacklevel=4)


def _warn_special(where: str, special: list[tuple[str, ...]]) -> None:
    if special:
        warnings.warn(
            f"{where}: skipped {len(special)} entr{'y' if len(special) == 1 else 'ies'} named like image files that "
            f"are not regular files (named pipes, sockets or devices; reading one could block forever), e.g. "
            f"{printable('/'.join(special[0]))!r}", stacklevel=4)


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _scan_folder(p: Path) -> list[ImageItem]:
    files, hidden, special, again = _walk(str(p))
    _warn_special(f"folder {printable(str(p))}", [rel for rel in special if _is_image_name(rel[-1])])
    imgs, conflicts = _dedupe([f for f in files if _is_image_name(f[0][-1])])
    if not imgs:
        note = f" ({hidden} hidden entries, names starting with '.', are skipped)" if hidden else ""
        raise InvalidInputError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under folder "
                                f"{printable(str(p))}{note}")
    labelled = all(len(rel) >= 2 for rel, _, _ in imgs)  # ImageFolder layout: root/<class>/.../image
    if labelled:
        _warn_conflicts(str(p), conflicts + [(a, b) for a, b in again if b])
    return [ImageItem(path, rel[0] if labelled else None) for rel, path, _ in imgs]


def _glob_walk(root: str, pats: Sequence[str]) -> tuple[list, list]:
    """Files below folder ``root`` whose relative parts match the glob components ``pats`` (``**``: any number of
    components), as sorted ``(relative parts, path, (st_dev, st_ino) or None)``, and the relative parts of the
    matching special files left out (named pipes, sockets, devices).

    A depth-first search in sorted order that enters a folder only when its path can still match, tracking the
    pattern positions its path has reached. A real folder is searched again (through another symlink) only for
    positions not yet searched there: that search could find other files, a repeated one could not. So symlink
    loops end, each (real folder, position) is searched once, and a folder first reached through a path that does
    not match is still searched through one that does. Hidden names are skipped; unreadable folders too, as in
    ``glob``.
    """
    n = len(pats)

    def closure(states: set[int]) -> frozenset[int]:
        out, todo = set(states), list(states)
        while todo:
            k = todo.pop()
            if k < n and pats[k] == "**" and k + 1 not in out:  # "**" also matches no component
                out.add(k + 1)
                todo.append(k + 1)
        return frozenset(out)

    def step(states: frozenset[int], name: str) -> frozenset[int]:
        return closure({k if pats[k] == "**" else k + 1 for k in states
                        if k < n and (pats[k] == "**" or fnmatchcase(name, pats[k]))})

    searched: dict[tuple[int, int], set[int]] = {}
    files, special = [], []
    stack = [(root or ".", (), closure({0}))]
    while stack:
        folder, rel, states = stack.pop()
        key = _folder_key(folder)
        if key is None:
            continue
        states = states - searched.setdefault(key, set())
        if not states:
            continue
        searched[key] |= states
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subfolders = []
        for e in entries:
            if e.name.startswith("."):
                continue
            nxt = step(states, e.name)
            if not nxt:
                continue
            path = os.path.join(root, *rel, e.name) if root else os.path.join(*rel, e.name)
            if e.is_dir():  # follows symlinks
                if min(nxt) < n:  # something below it can still match
                    subfolders.append((path, rel + (e.name,), nxt))
            elif n in nxt:
                listed, fkey = _file_entry(path)
                if listed:
                    files.append((rel + (e.name,), path, fkey))
                else:
                    special.append(rel + (e.name,))
        stack.extend(reversed(subfolders))
    files.sort(key=lambda t: t[0])
    return files, special


def _glob_files(pattern: str) -> list[str]:
    """Files matching a glob pattern (``**`` recursive), each real file once, symlink-loop safe, hidden skipped.

    Leading components without glob characters, or that exist literally, form the folder searched."""
    parts = Path(pattern).parts
    k, root = 0, ""
    while k < len(parts) and (not _glob.has_magic(parts[k]) or os.path.lexists(os.path.join(root, parts[k]))):
        root = os.path.join(root, parts[k])
        k += 1
    rest = parts[k:]
    if not rest or not os.path.isdir(root or "."):
        return []
    files, special = _glob_walk(root, rest)
    _warn_special(f"glob pattern {printable(pattern)!r}", special)
    files, _ = _dedupe(files)
    return [path for _, path, _ in files]


def list_images(spec: str | os.PathLike | Sequence[str]) -> list[ImageItem]:
    """Resolve an image source to items, sorted for folders and globs.

    ``spec``: a folder (searched recursively for image files, following symlinked folders, skipping hidden names;
    when every image lies in a subfolder, the first-level subfolder name is its label, as in torchvision's
    ImageFolder), an existing file, a CSV/TSV manifest (see :func:`read_manifest`), a glob pattern
    (``"imgs/**/*.jpg"``; only when no file or folder has that literal name), or a list of paths.
    An empty path is refused (it would scan the current folder).
    """
    if not isinstance(spec, (str, bytes, os.PathLike)):
        items = []
        for k, x in enumerate(spec):
            if not isinstance(x, (str, bytes, os.PathLike)):
                raise InvalidInputError(f"image list entry {k + 1} is a {type(x).__name__}, not a path")
            items.append(ImageItem(os.fsdecode(x)))
        return items
    s = os.fsdecode(spec)
    if not s.strip():
        raise InvalidInputError("empty image source path (it would scan the current folder); give a folder, "
                                "file, manifest or glob")
    p = Path(s).expanduser()
    if p.is_dir():
        return _scan_folder(p)
    if p.is_file():
        return read_manifest(p) if p.suffix.lower() in (".csv", ".tsv", ".txt") else [ImageItem(str(p))]
    if p.exists():
        raise InvalidInputError(f"image source {printable(s)!r} is {_kind(p.stat().st_mode)}, not an image file, "
                                "folder or manifest")
    if _glob.has_magic(s):
        matches = _glob_files(os.path.expanduser(s))
        if not matches:
            raise InvalidInputError(f"glob pattern {printable(s)!r} matches no files")
        return [ImageItem(m) for m in matches]
    raise InvalidInputError(f"image source not found: {printable(s)!r} is not a folder, a glob, a manifest or a file")


def read_manifest(path: str | os.PathLike) -> list[ImageItem]:
    """Read a CSV/TSV/TXT manifest: one image per row, relative paths taken from the manifest's folder.

    With a header (any column named as in :data:`PATH_COLUMNS`, case-insensitive), the label column is the first
    header named as in :data:`LABEL_COLUMNS` (``label``, ``class_name``, ``class``, ``category``...); other
    columns are ignored, with a warning naming them when no label column was found. Without a header, rows are
    ``path[,label]``. Blank rows are skipped; a row naming a folder, a missing file, a repeated file or no path
    raises :class:`InvalidInputError` naming it. The text must be UTF-8 (a BOM is removed).
    """
    path = Path(path)
    name = printable(str(path))
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(read_text(path, "manifest"), newline=""), delimiter=delim)
    rows = []
    try:
        for r in reader:
            if r and any(c.strip() for c in r):
                rows.append((reader.line_num, r))
    except csv.Error as e:
        raise InvalidInputError(f"manifest {name} line {reader.line_num} is not valid CSV: {e}") from None
    if not rows:
        raise InvalidInputError(f"manifest {name} is empty")
    header = [c.strip().lower() for c in rows[0][1]]
    pcol = next((c for c in PATH_COLUMNS if c in header), None)
    lcol = next((c for c in LABEL_COLUMNS if c in header), None)
    if pcol is not None:
        pi, li = header.index(pcol), (header.index(lcol) if lcol is not None else None)
        rows = rows[1:]
        ignored = [c for k, c in enumerate(header) if k != pi and c]
        if lcol is None and ignored:
            warnings.warn(f"manifest {name} has no label column (one of {', '.join(LABEL_COLUMNS)}); "
                          f"column(s) ignored: {', '.join(repr(c) for c in ignored)}", stacklevel=2)
    elif lcol is not None and not (path.parent / rows[0][1][0].strip()).is_file():
        raise InvalidInputError(f"manifest {name} has a header ({', '.join(header)}) but no path column; name it "
                                f"one of: {', '.join(PATH_COLUMNS)}")
    else:
        pi, li = 0, 1
        if any(len(r) > 2 and any(c.strip() for c in r[2:]) for _, r in rows):
            warnings.warn(f"manifest {name} has no header and rows with more than 2 columns: read as path,label; "
                          "later columns ignored", stacklevel=2)
    items, missing, first = [], [], {}
    for line, r in rows:
        if pi >= len(r) or not r[pi].strip():
            raise InvalidInputError(f"manifest {name} line {line} has no path: {printable(delim.join(r))!r}")
        full = Path(r[pi].strip()).expanduser()
        full = full if full.is_absolute() else path.parent / full
        if full.is_dir():
            raise InvalidInputError(f"manifest {name} line {line} lists a folder, not an image file: "
                                    f"{printable(str(full))} (list its images, or pass the folder itself)")
        if not full.exists():
            missing.append(printable(str(full)))
        key = os.path.normpath(os.path.abspath(full))
        if key in first:
            raise InvalidInputError(f"manifest {name} lists {printable(str(full))} twice (lines {first[key]} and "
                                    f"{line}); each image must appear once")
        first[key] = line
        label = r[li].strip() if li is not None and li < len(r) and r[li].strip() else None
        items.append(ImageItem(str(full), label))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InvalidInputError(f"manifest {name} lists {len(missing)} missing file(s): {', '.join(missing[:5])}{more}")
    if not items:
        raise InvalidInputError(f"manifest {name} lists no images")
    return items



# ---------------------------------------------------------------------------------------------- sources
class ImageSource:
    """An indexable set of images, each with a unique id, an optional label, and a cache identity.

    Build one with :func:`as_source`. ``load(i)`` decodes image ``i`` as RGB (raising
    :class:`ImageLoadError` naming it); ``identity(i)`` is the string that keys its cached features.
    Ids may hold undecodable bytes of file names (lone surrogates): print them with ``vlmood._io.printable``.
    """

    name: str = "images"

    def __len__(self) -> int:
        return len(self.ids)

    ids: list[str]
    labels: list[Any] | None

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def identity(self, i: int) -> str:
        raise NotImplementedError

    def identities(self) -> list[str]:
        """``identity(i)`` of every image, in order (sources may compute them in parallel)."""
        return [self.identity(i) for i in range(len(self))]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {printable(self.name)!r}: {len(self)} images" \
               f"{', labelled' if self.labels else ''}>"


def _labels_or_none(labels: list[Any]) -> list[Any] | None:
    return labels if any(not _is_missing(lb) for lb in labels) else None


class PathSource(ImageSource):
    """Images on disk; identity = sha256 of the file's bytes.

    The key depends on the content alone: a file replaced by another (even of the same size with its mtime
    restored, as ``cp -p``, ``rsync -t`` and ``tar x`` do) is re-encoded, and identical files at two paths
    share one cache entry (their features are identical). An unreadable file gets a fresh key that never hits.
    Paths must be non-empty and unique.
    """

    def __init__(self, items: Sequence[ImageItem], name: str = "images"):
        self.paths = [it.path for it in items]
        first: dict[str, int] = {}
        for k, p in enumerate(self.paths):
            if not p.strip():
                raise InvalidInputError(f"image source {printable(name)!r} entry {k + 1} is an empty path")
            key = os.path.normpath(os.path.abspath(p))
            if key in first:
                raise InvalidInputError(f"image source {printable(name)!r} lists {printable(p)!r} twice (entries "
                                        f"{first[key] + 1} and {k + 1}); each image must appear once")
            first[key] = k
        self.ids = list(self.paths)
        self.labels = _labels_or_none([it.label for it in items])
        self.name = name

    def load(self, i: int) -> Image.Image:
        return load_image(self.paths[i])

    def identity(self, i: int) -> str:
        digest = file_digest(self.paths[i])
        return f"sha256:{digest}" if digest else f"unreadable:{uuid.uuid4().hex}"

    def identities(self) -> list[str]:
        """Files of at least :data:`_PARALLEL_HASH_BYTES` are hashed in a thread pool, the others here."""
        large = []
        for i, p in enumerate(self.paths):
            with contextlib.suppress(OSError):
                if os.stat(p).st_size >= _PARALLEL_HASH_BYTES:
                    large.append(i)
        if len(large) < 2:
            return super().identities()
        keys: list[str | None] = [None] * len(self)
        with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:  # hashing releases the GIL
            futures = {i: pool.submit(self.identity, i) for i in large}
            for i in range(len(self)):
                if i not in futures:
                    keys[i] = self.identity(i)
            for i, fut in futures.items():
                keys[i] = fut.result()
        return keys  # type: ignore[return-value]


class MemorySource(ImageSource):
    """In-memory PIL images; identity = sha256 of mode, size, palette, transparency, EXIF orientation and pixels."""

    def __init__(self, images: Sequence[Image.Image], labels: Sequence[Any] | None = None, name: str = "images"):
        self.images = list(images)
        if labels is not None and len(labels) != len(self.images):
            raise InvalidInputError(f"image source {name!r} has {len(self.images)} images but {len(labels)} labels")
        self.ids = [f"{name}[{i}]" for i in range(len(self.images))]
        self.labels = _labels_or_none(list(labels)) if labels is not None else None
        self.name = name

    def load(self, i: int) -> Image.Image:
        return load_image(self.images[i])

    def identity(self, i: int) -> str:
        return _pixels_key(self.images[i])


def _pixels_key(im: Image.Image) -> str:
    """Content key of an in-memory image: sha256 of mode, size, palette, transparency, EXIF orientation, pixels."""
    orientation = im.getexif().get(0x0112)  # applied by load_image, so part of the content
    h = hashlib.sha256(repr((im.mode, im.size, im.info.get("transparency"), orientation)).encode())
    if im.mode in ("P", "PA"):
        h.update(bytes(im.getpalette(im.palette.mode if im.palette else "RGB") or b""))
    h.update(im.tobytes())
    return f"pixels-sha256:{h.hexdigest()}"


class HFSource(ImageSource):
    """A Hugging Face ``datasets.Dataset``. Identity: the content of each image cell, whatever the column type:
    sha256 of the encoded bytes (a binary cell, or an ``Image`` / ``{"bytes", "path"}`` cell holding bytes), of
    the file a path names (a string cell, or such a cell holding only a path: an image file overwritten in place
    is re-encoded, as with :class:`PathSource`), or of the pixels of a PIL image cell; plus the ``Image``
    feature's ``mode``. Only other cells (arrays...) fall back to the dataset's fingerprint and the row.

    ``ClassLabel`` values become class names; ``-1`` (the datasets convention for "no label") becomes None."""

    def __init__(self, ds: Any, image_column: str = "image", label_column: str | None = "label", name: str = "hf"):
        if image_column not in ds.column_names:
            raise InvalidInputError(f"dataset {name!r} has no image column {image_column!r}; columns: {ds.column_names}")
        self.ds = ds
        self.image_column = image_column
        self.name = name
        self.ids = [f"{name}[{i}]" for i in range(len(ds))]
        self.labels = None
        self._raw: Any = None
        if label_column and label_column in ds.column_names:
            names = getattr(ds.features[label_column], "names", None)
            raw = list(ds[label_column])
            if names is not None:
                bad = sorted({v for v in raw if v is not None and not -1 <= v < len(names)})
                if bad:
                    raise InvalidInputError(f"dataset {name!r} column {label_column!r} has values {bad[:5]} outside "
                                            f"its {len(names)} class names")
                raw = [names[v] if v is not None and v >= 0 else None for v in raw]
            self.labels = _labels_or_none(raw)

    def load(self, i: int) -> Image.Image:
        try:
            im = self.ds[i][self.image_column]
        except Exception as e:
            raise ImageLoadError(f"cannot decode image {self.ids[i]}: {e}") from e
        if isinstance(im, dict):  # Image feature with decode=False, or a {"bytes", "path"} struct
            im = im.get("bytes") or im.get("path")
        if isinstance(im, (bytes, bytearray, memoryview)):  # encoded bytes, never a file name
            im = _open_bytes(bytes(im), self.ids[i])
        if im is None:
            raise ImageLoadError(f"image {self.ids[i]} is empty")
        return load_image(im)

    def _feature(self) -> Any:
        feats = getattr(self.ds, "features", None) or {}
        return feats.get(self.image_column) if hasattr(feats, "get") else None

    def _cells(self) -> Any:
        """The dataset with its ``Image`` column left encoded (``{"bytes", "path"}``); other columns as stored."""
        if self._raw is None:
            feat = self._feature()
            if type(feat).__name__ == "Image" and getattr(feat, "decode", False) and hasattr(self.ds, "cast_column"):
                self._raw = self.ds.cast_column(self.image_column, type(feat)(mode=feat.mode, decode=False))
            else:
                self._raw = self.ds
        return self._raw

    def _key(self, cell: Any, i: int) -> str:
        if isinstance(cell, Image.Image):
            return _pixels_key(cell)
        if isinstance(cell, dict):
            data, path = cell.get("bytes"), cell.get("path")
        elif isinstance(cell, (bytes, bytearray, memoryview)):
            data, path = bytes(cell), None
        elif isinstance(cell, (str, os.PathLike)):
            data, path = None, cell
        elif cell is None:
            data, path = None, None
        else:  # arrays and the like: the fingerprint changes with the table's content
            return printable(f"hf:{getattr(self.ds, '_fingerprint', self.name)}:{i}")
        digest = hashlib.sha256(data).hexdigest() if data else file_digest(path) if path else None
        if digest is None:
            return f"unreadable:{uuid.uuid4().hex}"
        mode = getattr(self._feature(), "mode", None)
        return f"sha256:{digest}" + (f"|mode={mode}" if mode else "")

    def identity(self, i: int) -> str:
        return self._key(self._cells()[i][self.image_column], i)

    def identities(self) -> list[str]:
        raw = self._cells()
        if not hasattr(raw, "iter"):
            return super().identities()
        cols = raw.select_columns([self.image_column]) if hasattr(raw, "select_columns") else raw
        keys: list[str] = []
        for batch in cols.iter(batch_size=256):
            for cell in batch[self.image_column]:
                keys.append(self._key(cell, len(keys)))
        return keys


def _open_hf(spec: str, split: str | None, image_column: str, label_column: str | None) -> HFSource:
    """``hf:NAME[:split]``: a dataset saved with ``save_to_disk``, a local data folder, or a cached hub dataset."""
    name, _, sp = spec[3:].partition(":")
    if not name.strip():
        raise InvalidInputError(f"empty dataset name in {spec!r}; use hf:NAME[:split]")
    import datasets

    split = sp or split
    path = Path(name).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            ds: Any = datasets.load_from_disk(str(path))
        elif path.is_dir():
            ds = datasets.load_dataset("imagefolder", data_dir=str(path))
        else:
            ds = datasets.load_dataset(name)
    except Exception as e:
        raise InvalidInputError(f"cannot open dataset {printable(spec)!r}: {type(e).__name__}: {e}") from e
    return as_source(ds, split=split, image_column=image_column, label_column=label_column, name=spec)


def as_source(
    source: Any,
    split: str | None = None,
    image_column: str = "image",
    label_column: str | None = "label",
    name: str | None = None,
) -> ImageSource:
    """Turn any supported image source into an :class:`ImageSource`.

    ``source``: an ``ImageSource``; a folder (ImageFolder subfolders give labels), file, glob or CSV/TSV manifest
    (see :func:`list_images`); ``"hf:NAME[:split]"`` (``save_to_disk`` folder, image folder, or cached hub
    dataset); one PIL image; a list of paths or PIL images; a ``datasets.Dataset`` or ``DatasetDict`` (choose
    ``split``; with one split it is taken). ``image_column`` / ``label_column`` name the dataset columns.
    """
    if isinstance(source, ImageSource):
        return source
    if isinstance(source, Image.Image):
        return MemorySource([source], name=name or "image")
    if isinstance(source, str) and source.startswith("hf:"):
        return _open_hf(source, split, image_column, label_column)
    if isinstance(source, (str, bytes, os.PathLike)):
        return PathSource(list_images(source), name=name or printable(os.fsdecode(source)))
    cls = type(source).__name__
    if cls == "DatasetDict":
        splits = list(source.keys())
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in source:
            raise InvalidInputError(f"dataset {name or ''} has splits {splits}; choose one with split= (or NAME:split)")
        return HFSource(source[split], image_column, label_column, name=f"{name or 'hf'}:{split}")
    if cls == "IterableDataset":
        raise InvalidInputError("streaming datasets (IterableDataset) are not supported: load the dataset without "
                                "streaming=True")
    if cls == "Dataset" and hasattr(source, "column_names"):
        return HFSource(source, image_column, label_column, name=name or "hf")
    try:
        items = list(source)
    except TypeError:
        raise InvalidInputError(f"unsupported image source: a {cls} (give a folder, file, glob, manifest, "
                                "hf:NAME, PIL image, list of paths or images, or a datasets.Dataset)") from None
    if not items:
        raise InvalidInputError(f"image source {name or ''} is empty")
    if all(isinstance(x, Image.Image) for x in items):
        return MemorySource(items, name=name or "images")
    if all(isinstance(x, (str, bytes, os.PathLike)) for x in items):
        return PathSource(list_images(items), name=name or "images")
    raise InvalidInputError("a list source must hold only paths or only PIL images")
