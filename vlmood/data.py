"""Image decoding and image sources (folders, globs, CSV manifests)."""
from __future__ import annotations

import csv
import glob as _glob
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError, InvalidInputError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
)
MAX_PIXELS = 89_478_485
"""Images with more pixels are refused (Pillow's decompression-bomb limit, about 9459x9459)."""


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: high bit depths are rescaled, transparency composited on white."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        # 16-bit data (PNG/TIFF) spans 0..65535; Pillow opens it as I;16 or I (32-bit)
        arr = arr / 257.0 if (mode.startswith("I;16") or arr.max(initial=0) > 255) else arr
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
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


def load_image(source: Any, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image as 8-bit RGB with EXIF orientation applied.

    ``source``: a path or a PIL image. Grayscale, palette, RGBA (composited on white), CMYK and 16-bit
    images are converted correctly. Raises :class:`ImageLoadError` naming the file when it is missing,
    empty, not an image, truncated, or larger than ``max_pixels`` (decompression-bomb guard).
    """
    if isinstance(source, Image.Image):
        _check_size(source.size, "in-memory image", max_pixels)
        return _to_rgb(ImageOps.exif_transpose(source))
    path = Path(os.fspath(source))
    if not path.is_file():
        raise ImageLoadError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"image file is empty (0 bytes): {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        _check_size(im.size, str(path), max_pixels)
        im.load()
        im = ImageOps.exif_transpose(im)
        return _to_rgb(im)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"image {path} refused: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"not an image (or an unsupported format): {path}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"cannot decode image {path}: {e}") from e


def _check_size(size: tuple[int, int], name: str, max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageLoadError(
            f"image {name} refused: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
            "(possible decompression bomb; raise max_pixels if the image is genuine)"
        )


@dataclass(frozen=True)
class ImageItem:
    """One entry of an image source: a path (or in-memory image) and an optional label string."""

    path: str
    label: str | None = None


def list_images(spec: str | os.PathLike | Sequence[str]) -> list[ImageItem]:
    """Resolve an image source to items, sorted for folders and globs.

    ``spec``: a folder (searched recursively for image files; when every image lies in a subfolder, the
    first-level subfolder name is its label, as in torchvision's ImageFolder), a glob pattern (``"imgs/**/*.jpg"``),
    a CSV/TSV manifest with a ``path`` column and optional ``label`` column (relative paths are taken
    from the manifest's folder; a header-less file is read as ``path[,label]``), or a list of paths.
    """
    if not isinstance(spec, (str, os.PathLike)):
        return [ImageItem(str(p)) for p in spec]
    s = os.fspath(spec)
    p = Path(s).expanduser()
    if p.is_dir():
        files = [f for f in sorted(p.rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]
        if not files:
            raise InvalidInputError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under folder {p}")
        rel = [f.relative_to(p).parts for f in files]
        labelled = all(len(r) >= 2 for r in rel)  # ImageFolder layout: root/<class>/.../image
        return [ImageItem(str(f), r[0] if labelled else None) for f, r in zip(files, rel)]
    if p.is_file() and p.suffix.lower() in (".csv", ".tsv", ".txt"):
        return _read_manifest(p)
    if any(c in s for c in "*?["):
        matches = sorted(m for m in _glob.glob(os.path.expanduser(s), recursive=True) if Path(m).is_file())
        if not matches:
            raise InvalidInputError(f"glob pattern {s!r} matches no files")
        return [ImageItem(m) for m in matches]
    if p.is_file():
        return [ImageItem(str(p))]
    raise InvalidInputError(f"image source not found: {s!r} is not a folder, a glob, a manifest or a file")


def _read_manifest(path: Path) -> list[ImageItem]:
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f, delimiter=delim) if r and any(c.strip() for c in r)]
    if not rows:
        raise InvalidInputError(f"manifest {path} is empty")
    header = [c.strip().lower() for c in rows[0]]
    if "path" in header:
        pi, li = header.index("path"), (header.index("label") if "label" in header else None)
        rows = rows[1:]
    else:
        pi, li = 0, (1 if len(rows[0]) > 1 else None)
    items, missing = [], []
    for n, r in enumerate(rows, start=2 if "path" in header else 1):
        if pi >= len(r) or not r[pi].strip():
            raise InvalidInputError(f"manifest {path} line {n} has no path: {delim.join(r)!r}")
        full = Path(r[pi].strip()).expanduser()
        full = full if full.is_absolute() else path.parent / full
        if not full.exists():
            missing.append(str(full))
        label = r[li].strip() if li is not None and li < len(r) and r[li].strip() else None
        items.append(ImageItem(str(full), label))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InvalidInputError(f"manifest {path} lists {len(missing)} missing file(s): {', '.join(missing[:5])}{more}")
    if not items:
        raise InvalidInputError(f"manifest {path} lists no images")
    return items


# ---------------------------------------------------------------------------------------------- sources
class ImageSource:
    """An indexable set of images, each with a stable id, an optional label, and a cache identity.

    Build one with :func:`open_source`. ``load(i)`` decodes image ``i`` as RGB (raising
    :class:`ImageLoadError` naming it); ``identity(i)`` is the string that keys its cached features.
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

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {len(self)} images{', labelled' if self.labels else ''}>"


class PathSource(ImageSource):
    """Images on disk; identity = absolute path + size + modification time (a changed file is re-encoded)."""

    def __init__(self, items: Sequence[ImageItem], name: str = "images"):
        self.paths = [it.path for it in items]
        self.ids = list(self.paths)
        labels = [it.label for it in items]
        self.labels = labels if any(lb is not None for lb in labels) else None
        self.name = name

    def load(self, i: int) -> Image.Image:
        return load_image(self.paths[i])

    def identity(self, i: int) -> str:
        p = os.path.abspath(self.paths[i])
        try:
            st = os.stat(p)
        except OSError:
            return f"path:{p}|missing"
        return f"path:{p}|{st.st_size}|{st.st_mtime_ns}"


class MemorySource(ImageSource):
    """In-memory PIL images; identity = sha256 of mode, size and pixel bytes."""

    def __init__(self, images: Sequence[Image.Image], labels: Sequence[Any] | None = None, name: str = "images"):
        self.images = list(images)
        self.ids = [f"{name}[{i}]" for i in range(len(self.images))]
        self.labels = list(labels) if labels is not None else None
        self.name = name

    def load(self, i: int) -> Image.Image:
        return load_image(self.images[i])

    def identity(self, i: int) -> str:
        import hashlib

        im = self.images[i]
        h = hashlib.sha256(f"{im.mode}|{im.size}".encode())
        h.update(im.tobytes())
        return f"sha256:{h.hexdigest()}"


class HFSource(ImageSource):
    """A Hugging Face ``datasets.Dataset``; identity = the dataset's fingerprint + row index."""

    def __init__(self, ds: Any, image_column: str = "image", label_column: str | None = "label", name: str = "hf"):
        if image_column not in ds.column_names:
            raise InvalidInputError(f"dataset {name!r} has no image column {image_column!r}; columns: {ds.column_names}")
        self.ds = ds
        self.image_column = image_column
        self.name = name
        self.ids = [f"{name}[{i}]" for i in range(len(ds))]
        self.labels = None
        if label_column and label_column in ds.column_names:
            feat = ds.features[label_column]
            raw = ds[label_column]
            names = getattr(feat, "names", None)
            self.labels = [names[v] if names is not None and v is not None and v >= 0 else v for v in raw]

    def load(self, i: int) -> Image.Image:
        try:
            im = self.ds[i][self.image_column]
        except Exception as e:
            raise ImageLoadError(f"cannot decode image {self.ids[i]}: {e}") from e
        if isinstance(im, dict):  # Image feature with decode=False
            import io

            im = Image.open(io.BytesIO(im["bytes"])) if im.get("bytes") else im.get("path")
        if im is None:
            raise ImageLoadError(f"image {self.ids[i]} is empty")
        return load_image(im)

    def identity(self, i: int) -> str:
        return f"hf:{getattr(self.ds, '_fingerprint', self.name)}:{i}"


def _open_hf(spec: str, split: str | None, image_column: str, label_column: str | None) -> HFSource:
    """``hf:NAME[:split]``: a dataset saved with ``save_to_disk``, a local data folder, or a cached hub dataset."""
    import datasets

    name, _, sp = spec[3:].partition(":")
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
        raise InvalidInputError(f"cannot open dataset {spec!r}: {type(e).__name__}: {e}") from e
    return as_source(ds, split=split, image_column=image_column, label_column=label_column, name=spec)


def as_source(
    source: Any,
    split: str | None = None,
    image_column: str = "image",
    label_column: str | None = "label",
    name: str | None = None,
) -> ImageSource:
    """Turn any supported image source into an :class:`ImageSource`.

    ``source``: an ``ImageSource``; a folder (ImageFolder subfolders give labels), glob or CSV/TSV manifest
    (``path[,label]``); ``"hf:NAME[:split]"`` (``save_to_disk`` folder, image folder, or cached hub dataset);
    a list of paths or PIL images; a ``datasets.Dataset`` or ``DatasetDict`` (choose ``split``; with one
    split it is taken). ``image_column`` / ``label_column`` name the dataset columns.
    """
    if isinstance(source, ImageSource):
        return source
    if isinstance(source, str) and source.startswith("hf:"):
        return _open_hf(source, split, image_column, label_column)
    if isinstance(source, (str, os.PathLike)):
        return PathSource(list_images(source), name=name or os.fspath(source))
    cls = type(source).__name__
    if cls == "DatasetDict":
        splits = list(source.keys())
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in source:
            raise InvalidInputError(f"dataset {name or ''} has splits {splits}; choose one with split= (or NAME:split)")
        return HFSource(source[split], image_column, label_column, name=f"{name or 'hf'}:{split}")
    if cls in ("Dataset", "IterableDataset") and hasattr(source, "column_names"):
        return HFSource(source, image_column, label_column, name=name or "hf")
    items = list(source)
    if not items:
        raise InvalidInputError(f"image source {name or ''} is empty")
    if all(isinstance(x, Image.Image) for x in items):
        return MemorySource(items, name=name or "images")
    if all(isinstance(x, (str, os.PathLike)) for x in items):
        return PathSource([ImageItem(os.fspath(x)) for x in items], name=name or "images")
    raise InvalidInputError("a list source must hold only paths or only PIL images")
