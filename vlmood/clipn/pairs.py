"""Image-caption pairs for CLIPN training: Hugging Face datasets, CSV/TSV manifests, webdataset-style tar shards.

A :class:`PairSource` holds ``P`` pairs over ``I <= P`` images: ``captions[k]`` describes image
``image_index[k]`` of ``images`` (an :class:`~vlmood.data.ImageSource`), so one image may carry several captions
(COCO has five) while its features are computed once. Only images that some kept pair uses are listed.

Captions are stripped. A pair whose caption is missing, None, NaN or blank is dropped and counted under
``"empty caption"``, one that is not text (a number...) under ``"caption not text"``; every reason of a drop is
counted in ``skipped`` and warned in one line per source; an error only when no pair is left. A dataset cell
holding a list of captions gives one pair per caption. Captions longer than the text context are kept (the
trainer truncates and counts). The exact same (image, caption) pair listed twice in a manifest is refused (it
would weigh double); repeats inside tar shards or datasets are not searched for (it would need every image hashed).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import posixpath
import re
import tarfile
import threading
import uuid
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .._io import printable, read_text
from ..data import (PATH_COLUMNS, MAX_PIXELS, HFSource, ImageSource, MemorySource, PathSource, ImageItem,
                    _check_size, _glob_files, _open_bytes, _open_regular, as_source, load_image)
from ..errors import ImageLoadError, InvalidInputError

TAR_IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp"})
"""Member extensions (after the first dot of the basename, any case) read as a sample's image in tar shards."""
_BRACE = re.compile(r"\{([^{}]*)\}")
_MAX_EXPANSION = 1_000_000


@dataclass(eq=False, repr=False)
class PairSource:
    """``P`` image-caption pairs: ``captions[k]`` (stripped, non-empty) describes ``images[image_index[k]]``.

    ``image_index``: int64 ``[P]`` (default ``arange(P)``, one image per pair); ``skipped``: reason -> number of
    pairs (or tar members) dropped while reading.
    """

    images: ImageSource
    captions: list[str]
    name: str
    skipped: dict[str, int] = field(default_factory=dict)
    image_index: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.image_index is None:
            if n != len(self.captions):
                raise InvalidInputError(f"pair source {printable(self.name)!r} has {n} images but "
                                        f"{len(self.captions)} captions; give image_index")
            self.image_index = np.arange(n, dtype=np.int64)
        idx = np.asarray(self.image_index)
        if idx.shape != (len(self.captions),) or (idx.size and (idx.dtype.kind not in "iu" or idx.min() < 0
                                                                 or idx.max() >= n)):
            raise InvalidInputError(f"pair source {printable(self.name)!r}: image_index must hold {len(self.captions)} "
                                    f"integers in 0..{n - 1}")
        self.image_index = idx.astype(np.int64)
        bad = next((k for k, c in enumerate(self.captions) if not isinstance(c, str) or not c.strip()), None)
        if bad is not None:
            raise InvalidInputError(f"pair source {printable(self.name)!r} caption {bad} is empty or not text: "
                                    f"{self.captions[bad]!r}")

    def __len__(self) -> int:
        return len(self.captions)

    def __repr__(self) -> str:
        return f"<PairSource {printable(self.name)!r}: {len(self)} pairs over {len(self.images)} images>"

    def load(self, k: int) -> Image.Image:
        """The RGB image of pair ``k`` (raises :class:`ImageLoadError` naming it)."""
        return self.images.load(int(self.image_index[k]))

    def subset(self, indices: Sequence[int] | np.ndarray) -> PairSource:
        """The pairs at ``indices`` (ints in ``0..P-1``, or a boolean mask ``[P]``), in that order, over the same
        ``images`` (use ``np.unique(image_index)`` for the images they need); ``skipped`` is kept."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise InvalidInputError(f"subset mask has shape {idx.shape}, expected ({len(self)},)")
            idx = np.flatnonzero(idx)
        if idx.size and (idx.ndim != 1 or idx.dtype.kind not in "iu" or idx.min() < 0 or idx.max() >= len(self)):
            raise InvalidInputError(f"subset indices of {printable(self.name)!r} must be integers in "
                                    f"0..{len(self) - 1}")
        idx = idx.astype(np.int64).reshape(-1)
        return PairSource(self.images, [self.captions[k] for k in idx], self.name, dict(self.skipped),
                          self.image_index[idx])

    @classmethod
    def from_memory(cls, images: Sequence[Image.Image], captions: Sequence[Any], name: str = "pairs") -> PairSource:
        """Pairs of in-memory PIL images and their captions (a caption may be a list of captions)."""
        images, captions = list(images), list(captions)
        if len(images) != len(captions):
            raise InvalidInputError(f"pair source {name!r} has {len(images)} images but {len(captions)} captions")
        if not all(isinstance(im, Image.Image) for im in images):
            raise InvalidInputError(f"pair source {name!r}: images must be PIL images")
        skipped: Counter = Counter()
        caps, rows = _clean(captions, skipped)
        used, index = _compact(rows, skipped, name)
        return _done(cls(MemorySource([images[u] for u in used], name=name), caps, name, dict(skipped), index))


def _clean(cells: Sequence[Any], skipped: Counter) -> tuple[list[str], list[int]]:
    """Stripped captions and the row each came from; drops counted in ``skipped``."""
    caps, rows = [], []
    for r, cell in enumerate(cells):
        many = isinstance(cell, (list, tuple))
        if many and not cell:
            skipped["empty caption"] += 1
        for c in (cell if many else [cell]):
            if isinstance(c, str) and c.strip():
                caps.append(c.strip())
                rows.append(r)
            elif c is None or isinstance(c, str) or (isinstance(c, (float, np.floating)) and math.isnan(c)):
                skipped["empty caption"] += 1
            else:
                skipped["caption not text"] += 1
    return caps, rows


def _compact(rows: list[int], skipped: Counter, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The rows used (sorted) and each pair's position among them; refuses a source left without pairs."""
    if not rows:
        why = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "it is empty"
        raise InvalidInputError(f"pair source {printable(name)!r} has no usable image-caption pairs "
                                f"({why})")
    used = np.unique(np.asarray(rows, dtype=np.int64))
    return used, np.searchsorted(used, np.asarray(rows, dtype=np.int64))


def _done(pairs: PairSource) -> PairSource:
    if pairs.skipped:
        reasons = ", ".join(f"{k}: {v}" for k, v in pairs.skipped.items())
        warnings.warn(f"{printable(pairs.name)}: read {len(pairs)} pairs; skipped {sum(pairs.skipped.values())} "
                      f"({reasons})", stacklevel=3)
    return pairs


# ---------------------------------------------------------------------------------------------- manifests
def _read_manifest(path: Path, caption_column: str, image_column: str | None, name: str) -> PairSource:
    """A CSV/TSV manifest with a header: an image column and ``caption_column`` (names case-insensitive)."""
    shown = printable(str(path))
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(read_text(path, "manifest"), newline=""), delimiter=delim)
    try:
        rows = [(reader.line_num, r) for r in reader if r and any(c.strip() for c in r)]
    except csv.Error as e:
        raise InvalidInputError(f"manifest {shown} line {reader.line_num} is not valid CSV: {e}") from None
    if not rows:
        raise InvalidInputError(f"manifest {shown} is empty")
    header = [c.strip().lower() for c in rows[0][1]]
    columns = ", ".join(repr(c) for c in rows[0][1])
    # a column named by the user must exist (never another one in its place); otherwise the usual path columns
    wanted = (image_column.lower(),) if image_column else ("image", *PATH_COLUMNS)
    icol = next((c for c in wanted if c in header), None)
    if icol is None:
        which = repr(image_column) if image_column else f"(one of {', '.join(dict.fromkeys(wanted))})"
        raise InvalidInputError(f"manifest {shown} has no image column {which}; columns: {columns}")
    if caption_column.lower() not in header:
        raise InvalidInputError(f"manifest {shown} has no caption column {caption_column!r}; columns: {columns} "
                                "(choose one with caption_column=)")
    for col in (icol, caption_column.lower()):
        if header.count(col) > 1:
            raise InvalidInputError(f"manifest {shown} has {header.count(col)} columns named {col!r}; "
                                    f"columns: {columns}")
    ii, ci = header.index(icol), header.index(caption_column.lower())
    skipped: Counter = Counter()
    paths: dict[str, int] = {}  # normalised path -> image row
    items, cells, rows_of, lines, seen = [], [], [], [], {}
    for line, r in rows[1:]:
        if ii >= len(r) or not r[ii].strip():
            raise InvalidInputError(f"manifest {shown} line {line} has no image path: {printable(delim.join(r))!r}")
        full = Path(r[ii].strip()).expanduser()
        full = full if full.is_absolute() else path.parent / full
        if full.is_dir() or not full.exists():
            what = "lists a folder, not an image file" if full.is_dir() else "lists a missing file"
            raise InvalidInputError(f"manifest {shown} line {line} {what}: {printable(str(full))}")
        key = os.path.normpath(os.path.abspath(full))
        if key not in paths:
            paths[key] = len(items)
            items.append(ImageItem(str(full)))
        cells.append(r[ci] if ci < len(r) else None)
        rows_of.append(paths[key])
        lines.append(line)
    caps, picked = _clean(cells, skipped)
    for cap, k in zip(caps, picked):
        first = seen.setdefault((rows_of[k], cap), lines[k])
        if first != lines[k]:
            raise InvalidInputError(f"manifest {shown} lists the same image and caption twice (lines {first} and "
                                    f"{lines[k]}: {printable(items[rows_of[k]].path)}); each pair must appear once")
    used, index = _compact([rows_of[k] for k in picked], skipped, name)
    images = PathSource([items[u] for u in used], name=name)
    return _done(PairSource(images, caps, name, dict(skipped), index))


# ---------------------------------------------------------------------------------------------- tar shards
class TarImages(ImageSource):
    """Images stored as members of uncompressed tar files, read by offset; identity = sha256 of the image bytes
    (the same key as :class:`~vlmood.data.PathSource` gives a file with those bytes).

    Each process opens its own shard handles (checked by pid: DataLoader workers forked or spawned after use
    never share a file offset), at most ``MAX_OPEN`` at once; reads are serialised by a lock (thread-safe). A
    shard whose size or modification time changed since it was listed is refused (the offsets would be wrong).
    """

    MAX_OPEN = 64

    def __init__(self, entries: list[tuple[str, int, int, str]], stamps: dict[str, tuple[int, int]], name: str):
        self.entries, self.stamps, self.name = entries, stamps, name  # entries: (shard, offset, size, member)
        self.ids = [f"{shard}:{member}" for shard, _, _, member in entries]
        self.labels = None
        self._reset()

    def _reset(self) -> None:
        self._pid, self._lock, self._files = os.getpid(), threading.Lock(), OrderedDict()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_pid", "_lock", "_files")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def close(self) -> None:
        """Close the shard files this process opened."""
        if getattr(self, "_pid", None) == os.getpid():
            while self._files:
                self._files.popitem()[1].close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def read(self, i: int) -> bytes:
        """The encoded bytes of image ``i``."""
        shard, offset, size, _ = self.entries[i]
        name = printable(self.ids[i])
        if self._pid != os.getpid():
            self._reset()  # a forked worker: never use the parent's handles (shared offsets)
        with self._lock:
            f = self._files.get(shard)
            if f is None:
                try:
                    f = _open_regular(shard)
                except OSError as e:
                    raise ImageLoadError(f"cannot read image {name}: tar shard unreadable: {e.strerror or e}") from e
                st = os.fstat(f.fileno())
                if (st.st_size, st.st_mtime_ns) != self.stamps[shard]:
                    f.close()
                    raise ImageLoadError(f"cannot read image {name}: tar shard {printable(shard)} changed since it "
                                         "was listed; read the shards again")
                self._files[shard] = f
                while len(self._files) > self.MAX_OPEN:
                    self._files.popitem(last=False)[1].close()
            self._files.move_to_end(shard)
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise ImageLoadError(f"image {name} is truncated ({len(data)} of {size} bytes)")
        return data

    def load(self, i: int) -> Image.Image:
        name = printable(self.ids[i])
        im = _open_bytes(self.read(i), name)
        _check_size(im.size, name, MAX_PIXELS)
        try:
            im.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageLoadError(f"cannot decode image {name}: {printable(str(e))}") from e
        return load_image(im)

    def identity(self, i: int) -> str:
        try:
            return f"sha256:{hashlib.sha256(self.read(i)).hexdigest()}"
        except ImageLoadError:
            return f"unreadable:{uuid.uuid4().hex}"


def _expand_braces(s: str, start: int = 0) -> list[str]:
    """Brace expansion as in bash / webdataset: ``a{00..02}`` -> a00 a01 a02, ``{x,y}`` -> x y."""
    m = _BRACE.search(s, start)
    if not m:
        return [s]
    body, rng = m.group(1), re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
    if rng:
        a, b = rng.groups()
        width = max(len(a), len(b)) if (len(a) > 1 and a[0] == "0") or (len(b) > 1 and b[0] == "0") else 0
        if abs(int(b) - int(a)) >= _MAX_EXPANSION:
            raise InvalidInputError(f"brace pattern {printable(s)!r} expands to more than {_MAX_EXPANSION:,} names")
        step = 1 if int(b) >= int(a) else -1
        options = [str(k).zfill(width) for k in range(int(a), int(b) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        return _expand_braces(s, m.end())
    return [x for o in options for x in _expand_braces(s[:m.start()] + o + s[m.end():], m.start() + len(o))]


def _shard_paths(spec: Any) -> list[str]:
    """Shard files of a path, glob, brace pattern or list of them; each real file once, else one line."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[str] = []
    for s in (os.path.expanduser(os.fsdecode(x)) for x in specs):
        for p in ([s] if os.path.lexists(s) else _expand_braces(s)):
            found = [p] if os.path.lexists(p) else _glob_files(p) if any(c in p for c in "*?[") else []
            if not found:
                raise InvalidInputError(f"tar shard not found: {printable(p)}")
            out += found
    first: dict[str, str] = {}
    for p in out:
        key = os.path.realpath(p)
        if key in first:
            raise InvalidInputError(f"tar shard {printable(p)} is listed twice (also as {printable(first[key])}); "
                                    "each shard must appear once")
        first[key] = p
    return out


def _scan_shard(path: str, skipped: Counter) -> tuple[list[tuple[str, int, int, str]], list[Any], tuple[int, int]]:
    """Image entries ``(shard, offset, size, member)`` and captions of one shard's samples, and its stamp."""
    shown = printable(path)
    try:
        f = _open_regular(path)
    except (OSError, ImageLoadError) as e:
        raise InvalidInputError(f"cannot read tar shard {shown}: {getattr(e, 'strerror', None) or e}") from None
    with f:
        st = os.fstat(f.fileno())
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        repeated: set[str] = set()
        entries, caps = [], []
        try:
            with tarfile.open(fileobj=f, mode="r:") as tf:
                for m in tf:
                    base = posixpath.basename(m.name.rstrip("/"))
                    if m.isdir():
                        continue
                    if base.startswith("."):
                        skipped["hidden member"] += 1
                        continue
                    if not m.isfile() or m.issparse():
                        skipped["link or special member"] += 1
                        continue
                    stem, _, ext = base.partition(".")
                    key = posixpath.join(posixpath.dirname(m.name), stem)
                    group = groups.setdefault(key, {})
                    if ext.lower() in group:
                        repeated.add(key)
                    group[ext.lower()] = m
                for key, group in groups.items():
                    images = [group[e] for e in group if e in TAR_IMAGE_EXTENSIONS]
                    reason = ("repeated member name" if key in repeated else "without an image" if not images
                              else "several images" if len(images) > 1 else None)
                    cap, reason = (None, reason) if reason else _tar_caption(tf, group)
                    if reason:
                        skipped[reason] += 1
                        continue
                    entries.append((path, images[0].offset_data, images[0].size, images[0].name))
                    caps.append(cap)
        except (tarfile.TarError, EOFError) as e:
            raise InvalidInputError(f"tar shard {shown} is not a readable uncompressed tar file ({e}); compressed "
                                    "shards cannot be read by offset: decompress them") from None
    return entries, caps, (st.st_size, st.st_mtime_ns)


def _tar_caption(tf: tarfile.TarFile, group: dict[str, tarfile.TarInfo]) -> tuple[Any, str | None]:
    """A sample's caption (its .txt, else the "caption" of its .json) and the reason it has none."""
    if "txt" not in group and "json" not in group:
        return None, "without a caption"
    try:
        text = tf.extractfile(group["txt" if "txt" in group else "json"]).read().decode("utf-8-sig")  # type: ignore
        meta = text if "txt" in group else json.loads(text)
    except (UnicodeDecodeError, ValueError):
        return None, "unreadable caption"
    if isinstance(meta, str):
        return meta, None
    return (meta["caption"], None) if isinstance(meta, dict) and "caption" in meta else (None, "without a caption")


def _read_tars(spec: Any, name: str) -> PairSource:
    skipped: Counter = Counter()
    entries, cells, stamps = [], [], {}
    for path in _shard_paths(spec):
        e, c, stamps[path] = _scan_shard(path, skipped)
        entries += e
        cells += c
    caps, rows = _clean(cells, skipped)
    used, index = _compact(rows, skipped, name)
    return _done(PairSource(TarImages([entries[u] for u in used], stamps, name), caps, name, dict(skipped), index))


# ---------------------------------------------------------------------------------------------- entry point
def _read_hf(source: Any, caption_column: str, image_column: str | None, split: str | None,
             name: str | None) -> PairSource:
    image_column = image_column or "image"
    src = as_source(source, split=split, image_column=image_column, label_column=None, name=name)
    assert isinstance(src, HFSource)
    ds, name = src.ds, name or src.name
    if caption_column not in ds.column_names:
        raise InvalidInputError(f"dataset {printable(name)!r} has no caption column {caption_column!r}; columns: "
                                f"{ds.column_names}")
    skipped: Counter = Counter()
    caps, rows = _clean(list(ds[caption_column]), skipped)
    used, index = _compact(rows, skipped, name)
    if len(used) < len(ds):
        src = HFSource(ds.select(used), image_column, None, name=name)
    return _done(PairSource(src, caps, name, dict(skipped), index))


def as_pairs(source: Any, caption_column: str = "caption", image_column: str | None = None, split: str | None = None,
             name: str | None = None) -> PairSource:
    """Read image-caption pairs from any supported source.

    ``source``: a :class:`PairSource` (returned as is); a ``datasets.Dataset`` / ``DatasetDict`` (choose
    ``split``) or ``"hf:NAME[:split]"`` with ``image_column`` (default ``image``) and ``caption_column``; a
    ``.csv`` / ``.tsv`` manifest whose header names the image column ``image_column`` (when given, that column
    must exist; by default the first of ``image``, ``path``, ``file``...) and
    ``caption_column`` (relative paths from the manifest's folder); or webdataset-style uncompressed ``.tar``
    shards (a path, glob, brace pattern ``shards-{00000..00003}.tar`` or list): members group by key (the member
    path up to the first dot of its basename), each sample needs one image (.jpg/.jpeg/.png/.webp/.bmp) and a
    caption (.txt, else the "caption" of a .json); others are skipped and counted, as are hidden members and links.
    For in-memory images use :meth:`PairSource.from_memory`.
    """
    if isinstance(source, PairSource):
        return source
    cls = type(source).__name__
    if cls in ("Dataset", "DatasetDict", "IterableDataset") or (isinstance(source, str) and source.startswith("hf:")):
        return _read_hf(source, caption_column, image_column, split, name)
    if isinstance(source, (str, bytes, os.PathLike)):
        s = os.fsdecode(source)
        if not s.strip():
            raise InvalidInputError("empty pair source path")
        if s.lower().endswith((".csv", ".tsv")):
            return _read_manifest(Path(s).expanduser(), caption_column, image_column, name or printable(s))
        if s.lower().endswith(".tar"):
            return _read_tars(s, name or printable(s))
    elif isinstance(source, (list, tuple)) and source and all(
            isinstance(x, (str, bytes, os.PathLike)) and os.fsdecode(x).lower().endswith(".tar") for x in source):
        return _read_tars(source, name or f"{len(source)} tar shards")
    raise InvalidInputError(f"unsupported pair source {printable(str(source))[:200]!r}: give a .csv/.tsv manifest, "
                            ".tar shards (path, glob, {a..b} pattern or list), hf:NAME, a datasets.Dataset, or "
                            "PairSource.from_memory(images, captions)")
