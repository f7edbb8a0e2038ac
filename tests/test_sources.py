"""Label mapping, CSV manifests and list / in-memory / dataset sources (issue 11)."""
import math
import warnings

import numpy as np
import pytest
from PIL import Image

from vlmood.data import MemorySource, as_source, list_images, map_labels
from vlmood.errors import ImageLoadError, InvalidInputError


# ------------------------------------------------------------------ map_labels
def test_folder_names_match_ignoring_case_and_underscores():
    # unsorted classes: the old sorted-order fallback mapped Rose -> tulip, Tulip -> rose without a word
    assert map_labels(["Rose", "Tulip"], ["tulip", "rose"]).tolist() == [1, 0]
    assert map_labels(["Rose", "Tulip", "rose"], ["tulip", "rose"]).tolist() == [1, 0, 1]
    assert map_labels(["great_White_shark", "  tench "], ["tench", "great white shark"]).tolist() == [1, 0]
    from vlmood.text import load_classes

    imagenet = load_classes("imagenet1k")
    hound = imagenet.index("Afghan Hound")
    assert map_labels(["Afghan hound", "afghan_hound"], imagenet).tolist() == [hound, hound]


def test_case_collisions_need_an_exact_name():
    classes = ["Rose", "rose", "tulip"]
    assert map_labels(["rose", "Rose", "TULIP"], classes).tolist() == [1, 0, 2]
    with pytest.raises(InvalidInputError, match=r"several classes .*'ROSE' \(matches 'Rose', 'rose'\)"):
        map_labels(["ROSE"], classes)


def test_unknown_names_never_fall_back_to_sorted_order():
    classes = ["tench", "goldfish", "great white shark"]
    # three unknown names for three classes: formerly mapped silently in sorted order
    with pytest.raises(InvalidInputError, match=r"outside the class list: 'gold-fish' \(closest: 'goldfish'\)"):
        map_labels(["gold-fish", "tenches", "white shark"], classes)
    with pytest.raises(InvalidInputError, match="outside the class list: 'shark'"):
        map_labels(["tench", "shark"], classes)


def test_wordnet_id_folders_map_in_sorted_order_with_a_warning():
    classes = ["tench", "goldfish", "great white shark"]
    with pytest.warns(UserWarning, match="3 WordNet-id folders .* by sorted order"):
        assert map_labels(["n01443537", "n01440764", "n01484850"], classes).tolist() == [1, 0, 2]
    with pytest.raises(InvalidInputError, match="2 WordNet-id folders but 3 classes"):
        map_labels(["n01443537", "n01440764"], classes)
    with pytest.raises(InvalidInputError, match="outside the class list"):  # not all WordNet ids: no fallback
        map_labels(["n01443537", "n01440764", "fish"], classes)


def test_missing_and_odd_labels_refused():
    classes = ["a", "b", "c"]
    with pytest.raises(InvalidInputError, match="1 of 3 images without a label"):
        map_labels(["a", None, "b"], classes)
    with pytest.raises(InvalidInputError, match="1 of 2 images without a label"):
        map_labels([0, float("nan")], classes)  # NaN never becomes a class
    with pytest.raises(InvalidInputError, match="neither class names nor class indices.*True"):
        map_labels([True, 0], classes)
    with pytest.raises(InvalidInputError, match="neither class names nor class indices.*1.5"):
        map_labels([1.5], classes)
    assert map_labels([2.0, np.int64(1), "0"], classes).tolist() == [2, 1, 0]
    with pytest.raises(InvalidInputError, match="outside the class list: '²'"):  # a digit, but not an index
        map_labels(["²"], classes)
    with pytest.raises(InvalidInputError, match=r"outside the 3 classes: \[-1, 7\]"):
        map_labels([0, 7, -1], classes)


# ------------------------------------------------------------------ manifests
def _imgs(tmp_path, *names):
    for n in names:
        Image.new("RGB", (8, 8)).save(tmp_path / n)


@pytest.mark.parametrize("column", ["class_name", "Class", "CATEGORY", "labels", "label"])
def test_manifest_label_column_names(tmp_path, column):
    _imgs(tmp_path, "1.png", "2.png")
    (tmp_path / "m.csv").write_text(f"Path,{column}\n1.png,cat\n2.png,dog\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [i.label for i in list_images(tmp_path / "m.csv")] == ["cat", "dog"]


def test_manifest_without_label_column_warns(tmp_path):
    _imgs(tmp_path, "1.png")
    (tmp_path / "m.csv").write_text("path,species,split\n1.png,cat,val\n")
    with pytest.warns(UserWarning, match="no label column .*ignored: 'species', 'split'"):
        assert [i.label for i in list_images(tmp_path / "m.csv")] == [None]
    (tmp_path / "h.csv").write_text("kind,filename_x\ncat,1.png\n")  # not a recognised header: headerless
    with pytest.raises(InvalidInputError, match="missing file"):
        list_images(tmp_path / "h.csv")
    (tmp_path / "np.csv").write_text("class_name,where\ncat,1.png\n")
    with pytest.raises(InvalidInputError, match="has a header .* but no path column"):
        list_images(tmp_path / "np.csv")


def test_manifest_encoding_blank_rows_folders_and_repeats(tmp_path):
    _imgs(tmp_path, "1.png", "2.png")
    (tmp_path / "bom.csv").write_bytes("\ufeffpath,label\n1.png,cat\n".encode("utf-8"))
    assert [i.label for i in list_images(tmp_path / "bom.csv")] == ["cat"]
    (tmp_path / "latin.csv").write_bytes("path,label\n1.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(InvalidInputError, match=r"latin.csv is not UTF-8 text \(byte 0xe9 on line 2\)"):
        list_images(tmp_path / "latin.csv")
    (tmp_path / "sub").mkdir()
    (tmp_path / "blank.csv").write_text("path,label\n\n1.png,cat\n,\n\nsub,dog\n")
    with pytest.raises(InvalidInputError, match=r"blank.csv line 6 lists a folder, not an image file: .*sub"):
        list_images(tmp_path / "blank.csv")
    (tmp_path / "rep.csv").write_text("path\n1.png\n2.png\n./1.png\n")
    with pytest.raises(InvalidInputError, match=r"rep.csv lists .*1.png twice \(lines 2 and 4\)"):
        list_images(tmp_path / "rep.csv")
    (tmp_path / "ok.csv").write_text("\n1.png,cat\n\n2.png\n")
    assert [i.label for i in list_images(tmp_path / "ok.csv")] == ["cat", None]


# ------------------------------------------------------------------ list, in-memory and dataset sources
def test_list_and_memory_sources(tmp_path):
    _imgs(tmp_path, "1.png", "2.png")
    with pytest.raises(InvalidInputError, match=r"lists .*1.png' twice \(entries 1 and 3\)"):
        as_source([tmp_path / "1.png", tmp_path / "2.png", str(tmp_path / "." / "1.png")])
    with pytest.raises(InvalidInputError, match="entry 2 is a NoneType"):
        list_images([tmp_path / "1.png", None])
    one = as_source(Image.new("RGB", (8, 8)))
    assert len(one) == 1 and one.load(0).size == (8, 8)
    with pytest.raises(InvalidInputError, match="unsupported image source: a int"):
        as_source(42)
    ims = [Image.new("RGB", (8, 8))] * 2
    with pytest.raises(InvalidInputError, match="2 images but 3 labels"):
        MemorySource(ims, labels=["a", "b", "c"])
    assert MemorySource(ims, labels=[None, float("nan")]).labels is None  # no label at all: unlabelled
    nan = MemorySource(ims, labels=["a", float("nan")])
    assert math.isnan(nan.labels[1])
    with pytest.raises(InvalidInputError, match="1 of 2 images without a label"):
        map_labels(nan.labels, ["a", "b"])


def test_dataset_class_labels():
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    ims = [Image.new("RGB", (8, 8))] * 3
    src = as_source(datasets.Dataset.from_dict({"image": ims, "label": [1, -1, 0]}, features=feats))
    assert src.labels == ["dog", None, "cat"]  # -1 is the datasets convention for "no label"
    assert as_source(datasets.Dataset.from_dict({"image": ims[:1], "label": [-1]}, features=feats)).labels is None

    class Stale:  # a dataset whose label column disagrees with its ClassLabel names (e.g. edited by hand)
        column_names = ["image", "label"]
        features = {"label": datasets.ClassLabel(names=["cat", "dog"])}

        def __len__(self):
            return 2

        def __getitem__(self, key):
            return [0, 5]

    from vlmood.data import HFSource

    with pytest.raises(InvalidInputError, match=r"column 'label' has values \[5\] outside its 2 class names"):
        HFSource(Stale(), name="stale")


def test_memory_identity_covers_palette_and_orientation():
    p1 = Image.new("P", (4, 4))
    p1.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p2 = p1.copy()
    p2.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # same indices, another palette: another image
    rotated = Image.new("RGB", (6, 4), (9, 9, 9))
    rotated.getexif()[0x0112] = 6  # load_image turns it 90 degrees
    src = MemorySource([p1, p2, Image.new("RGB", (6, 4), (9, 9, 9)), rotated, p1.copy()])
    keys = [src.identity(i) for i in range(5)]
    assert keys[0] != keys[1] and keys[2] != keys[3] and keys[0] == keys[4]


def test_dataset_identity_is_content(tmp_path):
    datasets = pytest.importorskip("datasets")
    Image.new("RGB", (8, 8), (250, 0, 0)).save(tmp_path / "a.png")
    feats = datasets.Features({"image": datasets.Image()})
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / "a.png")]}, features=feats)  # stores the path only
    src = as_source(ds)
    before = src.identity(0)
    Image.new("RGB", (8, 8), (0, 0, 250)).save(tmp_path / "a.png")  # the table (and fingerprint) are unchanged
    assert src.identity(0) != before
    assert src.identity(0) == "sha256:" + __import__("hashlib").sha256((tmp_path / "a.png").read_bytes()).hexdigest()
    same = as_source(datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * 20}, features=feats))
    assert len(set(same.identities())) == 1 and same.identities()[0] == same.identity(19)
    gray = as_source(same.ds.cast_column("image", datasets.Image(mode="L")))
    assert gray.identity(0) == same.identity(0) + "|mode=L"  # decoded differently: another key
    with pytest.raises(InvalidInputError, match="streaming datasets"):
        as_source(same.ds.to_iterable_dataset())


def test_dataset_path_and_bytes_columns_are_content_keyed(tiny, tmp_path):
    """A string column of paths (load_dataset("csv"), hand-made datasets) keys the file's bytes, not the row:
    an image overwritten in place (same size, mtime restored) is re-encoded, never served stale features."""
    import hashlib
    import os

    import torch

    from vlmood.features import extract_features

    datasets = pytest.importorskip("datasets")
    (tmp_path / "imgs").mkdir()
    a, b = tmp_path / "imgs" / "a.png", tmp_path / "imgs" / "b.png"
    Image.new("RGB", (8, 8), (250, 0, 0)).save(a, compress_level=0)  # stored: the size depends on 8x8 only
    Image.new("RGB", (8, 8), (0, 250, 0)).save(b, compress_level=0)
    datasets.Dataset.from_dict({"image": [str(a), str(b)], "label": ["x", "y"]}).save_to_disk(tmp_path / "ds")
    spec = f"hf:{tmp_path / 'ds'}"
    red = extract_features(tiny, spec, num_workers=0).features
    st = a.stat()
    Image.new("RGB", (8, 8), (0, 0, 250)).save(a, compress_level=0)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert a.stat().st_size == st.st_size and a.stat().st_mtime_ns == st.st_mtime_ns
    blue = extract_features(tiny, spec, num_workers=0).features
    fresh = extract_features(tiny, spec, cache=False, num_workers=0).features
    assert torch.allclose(blue, fresh) and not torch.allclose(blue[0], red[0]) and torch.allclose(blue[1], red[1])
    src = as_source(spec)
    digest = "sha256:" + hashlib.sha256(a.read_bytes()).hexdigest()
    assert src.identity(0) == src.identities()[0] == digest
    # a binary column holds encoded images: keyed by their bytes, decoded from them (not taken as file names)
    raw = datasets.Dataset.from_dict({"image": [a.read_bytes(), b"not an image"]})
    bsrc = as_source(raw)
    assert bsrc.identities() == [digest, "sha256:" + hashlib.sha256(b"not an image").hexdigest()]
    assert bsrc.load(0).getpixel((0, 0)) == (0, 0, 250)
    with pytest.raises(ImageLoadError, match=r"not an image .*: hf\[1\]"):
        bsrc.load(1)

    class PILRows:  # a dataset-like object whose cells are decoded PIL images: keyed by their pixels
        column_names = ["image"]
        features = {}
        rows = [Image.new("RGB", (4, 4), (1, 2, 3)), Image.new("RGB", (4, 4), (3, 2, 1))]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": self.rows[i]}

    from vlmood.data import HFSource

    pil = HFSource(PILRows())
    assert pil.identities() == [MemorySource(PILRows.rows).identity(k) for k in range(2)]
    assert pil.identity(0) != pil.identity(1)
