"""Image-caption pairs for CLIPN: in-memory, CSV/TSV manifests, tar shards, Hugging Face datasets."""
import hashlib
import io
import json
import os
import pickle
import re
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from vlmood.clipn.pairs import PairSource, _expand_braces, as_pairs
from vlmood.data import MemorySource, PathSource, ImageItem
from vlmood.errors import ImageLoadError, InvalidInputError
from vlmood.toyworld import World


def _arr(seed):
    return np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)


def _png(seed) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_arr(seed)).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(pairs, k):
    return np.asarray(pairs.load(k))


def _no_warnings(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*a, **kw)


def _tar(path, members):
    """Write an uncompressed tar; members: (name, bytes) or (name, ("symlink", target))."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, data[1]
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return str(path)


# ---------------------------------------------------------------------------------------------- memory
def test_memory_round_trip_and_drop_counts():
    arrays, captions, _ = World(3).batch(6)
    images = [Image.fromarray(a) for a in arrays]
    cells = [captions[0], None, "  \n", float("nan"), 5, "  " + captions[5] + " "]
    with pytest.warns(UserWarning) as rec:
        pairs = PairSource.from_memory(images, cells, name="toy")
    assert [str(w.message) for w in rec] == ["toy: read 2 pairs; skipped 4 (empty caption: 3, caption not text: 1)"]
    assert pairs.captions == [captions[0], captions[5]] and len(pairs) == 2
    assert pairs.skipped == {"empty caption": 3, "caption not text": 1}
    assert len(pairs.images) == 2 and pairs.image_index.tolist() == [0, 1]  # unused images are not listed
    assert np.array_equal(_pixels(pairs, 0), arrays[0]) and np.array_equal(_pixels(pairs, 1), arrays[5])
    assert pairs.images.identity(1) == MemorySource([images[5]]).identity(0)
    assert as_pairs(pairs) is pairs


def test_memory_list_cells_and_errors():
    images = [Image.fromarray(_arr(k)) for k in range(2)]
    pairs = _no_warnings(PairSource.from_memory, images, [["a red cat", "a cat"], "a dog"])
    assert pairs.captions == ["a red cat", "a cat", "a dog"] and pairs.image_index.tolist() == [0, 0, 1]
    assert np.array_equal(_pixels(pairs, 1), _arr(0)) and np.array_equal(_pixels(pairs, 2), _arr(1))
    with pytest.raises(InvalidInputError, match=r"^pair source 'x' has no usable image-caption pairs "
                                                r"\(empty caption: 2\)$"):
        PairSource.from_memory(images, ["", None], name="x")
    with pytest.raises(InvalidInputError, match="has 2 images but 1 captions"):
        PairSource.from_memory(images, ["a"])
    with pytest.raises(InvalidInputError, match="must hold 1 integers in 0..1"):
        PairSource(MemorySource(images), ["a"], "p", image_index=np.array([2]))
    with pytest.raises(InvalidInputError, match=r"caption 0 is empty or not text: ' '"):
        PairSource(MemorySource(images[:1]), [" "], "p")


def test_subset():
    images = [Image.fromarray(_arr(k)) for k in range(3)]
    pairs = _no_warnings(PairSource.from_memory, images, [["a", "b"], "c", ["d", "e"]])
    sub = pairs.subset([4, 0, 2])
    assert sub.captions == ["e", "a", "c"] and sub.image_index.tolist() == [2, 0, 1] and sub.images is pairs.images
    assert np.array_equal(_pixels(sub, 0), _arr(2))
    mask = pairs.subset(np.array([False, True, False, True, False]))
    assert mask.captions == ["b", "d"] and mask.image_index.tolist() == [0, 2]
    assert len(pairs.subset([])) == 0
    for bad in ([5], [-1], [0.5]):
        with pytest.raises(InvalidInputError, match=r"must be integers in 0\.\.4$"):
            pairs.subset(bad)
    with pytest.raises(InvalidInputError, match=r"subset mask has shape \(2,\), expected \(5,\)"):
        pairs.subset(np.array([True, False]))


# ---------------------------------------------------------------------------------------------- manifests
def test_manifest_bom_quotes_relative_paths_and_shared_images(tmp_path):
    (tmp_path / "imgs").mkdir()
    for k in range(3):
        Image.fromarray(_arr(k)).save(tmp_path / "imgs" / f"{k}.png")
    other = tmp_path / "elsewhere"
    other.mkdir()
    Image.fromarray(_arr(9)).save(other / "abs.png")
    text = ("Image,id,Caption\n"
            'imgs/0.png,1,"a cat, sitting"\n'
            'imgs/1.png,2,"two lines\nof caption"\n'
            "./imgs/0.png,3,another caption of the same cat\n"
            "\n"
            f"{other / 'abs.png'},4,  absolute  \n"
            "imgs/2.png,5,\n")
    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    with pytest.warns(UserWarning, match=r"m\.csv: read 4 pairs; skipped 1 \(empty caption: 1\)$"):
        pairs = as_pairs(str(tmp_path / "m.csv"))
    assert pairs.captions == ["a cat, sitting", "two lines\nof caption", "another caption of the same cat", "absolute"]
    assert pairs.image_index.tolist() == [0, 1, 0, 2] and len(pairs.images) == 3  # 2.png only had an empty caption
    assert [np.array_equal(_pixels(pairs, k), _arr(s)) for k, s in enumerate([0, 1, 0, 9])] == [True] * 4
    assert pairs.images.identity(0) == "sha256:" + hashlib.sha256((tmp_path / "imgs/0.png").read_bytes()).hexdigest()

    (tmp_path / "m.tsv").write_text("file\ttext\nimgs/1.png\tone\timgs/2.png\n", encoding="utf-8")
    pairs = _no_warnings(as_pairs, tmp_path / "m.tsv", caption_column="TEXT")
    assert pairs.captions == ["one"] and np.array_equal(_pixels(pairs, 0), _arr(1))


def test_manifest_errors(tmp_path):
    Image.fromarray(_arr(0)).save(tmp_path / "a.png")
    m = tmp_path / "m.csv"

    def fails(text, message):
        m.write_text(text, encoding="utf-8")
        with pytest.raises(InvalidInputError) as e:
            as_pairs(m)
        assert str(e.value) == message.replace("M", str(m)) and "\n" not in str(e.value)

    fails("path,text\na.png,x\n", "manifest M has no caption column 'caption'; columns: 'path', 'text' "
                                  "(choose one with caption_column=)")
    fails("name,caption\na.png,x\n", "manifest M has no image column (one of image, path, filepath, file_path, "
                                     "filename, file_name, file, image_path); columns: 'name', 'caption'")
    # a column the user names must exist: never another one in its place
    m = tmp_path / "named.csv"
    m.write_text("path,thumb,caption\na.png,a.png,x\n", encoding="utf-8")
    with pytest.raises(InvalidInputError) as e:
        as_pairs(m, image_column="thumbs")
    assert str(e.value) == f"manifest {m} has no image column 'thumbs'; columns: 'path', 'thumb', 'caption'"
    fails("path,caption,caption\na.png,x,y\n", "manifest M has 2 columns named 'caption'; columns: 'path', "
                                               "'caption', 'caption'")
    fails("path,caption\na.png,x\nb.png,y\n", f"manifest M line 3 lists a missing file: {tmp_path / 'b.png'}")
    fails("path,caption\na.png,x\n,y\n", "manifest M line 3 has no image path: ',y'")
    fails("path,caption\na.png,cat\na.png,dog\n./a.png, cat \n",
          f"manifest M lists the same image and caption twice (lines 2 and 4: {tmp_path / 'a.png'}); "
          "each pair must appear once")
    fails("", "manifest M is empty")
    m.write_bytes(b"path,caption\na.png,caf\xe9\n")
    with pytest.raises(InvalidInputError, match=r"is not UTF-8 text \(byte 0xe9 on line 2\)"):
        as_pairs(m)
    with pytest.raises(InvalidInputError, match=r"^unsupported pair source '.*x\.json'"):
        as_pairs(tmp_path / "x.json")


# ---------------------------------------------------------------------------------------------- tar shards
def test_tar_grouping_and_skips(tmp_path):
    meta = json.dumps({"caption": "  a json caption ", "url": "u"}).encode()
    shard = _tar(tmp_path / "s.tar", [
        ("sub/a.jpg", _png(0)), ("sub/a.txt", "\ufeffa text caption\n".encode()), ("sub/a.json", meta),
        ("b.PNG", _png(1)), ("b.json", meta),
        ("c.jpg", _png(2)),                                   # without a caption
        ("d.txt", b"no image"),                               # without an image
        ("e.jpg", _png(3)), ("e.txt", b"   "),                # empty caption
        (".hidden.jpg", _png(4)), ("sub/.x.txt", b"x"),       # 2 hidden members
        ("link.jpg", ("symlink", "c.jpg")),                   # link
        ("f.jpg", _png(5)), ("f.png", _png(5)), ("f.txt", b"f"),  # several images
        ("g.jpg", _png(6)), ("g.json", b'{"text": "no caption key"}'),  # without a caption
        ("h.jpg", _png(7)), ("h.txt", b"caf\xe9"),            # unreadable caption
        ("i.jpg", _png(8)), ("i.txt", b"first"), ("i.txt", b"second"),  # repeated member name
        ("sub/b.jpg", _png(9)), ("sub/b.seg.png", _png(1)), ("sub/b.txt", b"same key, other folder"),
    ])
    with pytest.warns(UserWarning) as rec:
        pairs = as_pairs(shard)
    assert [str(w.message) for w in rec] == [
        f"{shard}: read 3 pairs; skipped 10 (hidden member: 2, link or special member: 1, without a caption: 2, "
        "without an image: 1, several images: 1, unreadable caption: 1, repeated member name: 1, empty caption: 1)"]
    assert pairs.captions == ["a text caption", "a json caption", "same key, other folder"]
    assert pairs.images.ids == [f"{shard}:sub/a.jpg", f"{shard}:b.PNG", f"{shard}:sub/b.jpg"]
    assert [np.array_equal(_pixels(pairs, k), _arr(s)) for k, s in enumerate([0, 1, 9])] == [True] * 3
    # a DataLoader worker: pickled (spawn) or forked (another pid) copies open their own handles
    copy = pickle.loads(pickle.dumps(pairs))
    assert np.array_equal(_pixels(copy, 2), _arr(9))
    pairs.images._pid = -1
    assert np.array_equal(_pixels(pairs, 1), _arr(1)) and pairs.images._pid == os.getpid()
    # the shard rewritten after listing: offsets would be wrong, so it is refused by name
    pairs.images.close()
    _tar(tmp_path / "s.tar", [("sub/a.jpg", _png(5))])
    with pytest.raises(ImageLoadError, match=re.escape(f"tar shard {shard} changed since it was listed")):
        pairs.load(0)


def test_tar_shard_specs_and_errors(tmp_path):
    for k in range(3):
        _tar(tmp_path / f"shard-{k:05d}.tar", [(f"{k}.png", _png(k)), (f"{k}.txt", f"caption {k}".encode())])
    braces = _no_warnings(as_pairs, str(tmp_path / "shard-{00000..00002}.tar"))
    assert braces.captions == ["caption 0", "caption 1", "caption 2"]
    assert np.array_equal(_pixels(braces, 2), _arr(2))
    assert _no_warnings(as_pairs, str(tmp_path / "shard-*.tar")).captions == braces.captions
    with ThreadPoolExecutor(4) as pool:  # reads share one handle per shard under a lock
        got = list(pool.map(lambda k: _pixels(braces, k % 3), range(60)))
    assert all(np.array_equal(g, _arr(k % 3)) for k, g in enumerate(got))
    assert repr(braces) == f"<PairSource '{tmp_path}/shard-{{00000..00002}}.tar': 3 pairs over 3 images>"
    listed = _no_warnings(as_pairs, [tmp_path / "shard-00002.tar", str(tmp_path / "shard-00000.tar")])
    assert listed.captions == ["caption 2", "caption 0"] and listed.name == "2 tar shards"
    with pytest.raises(InvalidInputError, match=f"^tar shard not found: {re.escape(str(tmp_path))}/shard-00003.tar$"):
        as_pairs(str(tmp_path / "shard-{00000..00003}.tar"))
    with pytest.raises(InvalidInputError, match=r"shard-00001\.tar is listed twice \(also as .*shard-00001\.tar\)"):
        as_pairs([tmp_path / "shard-00001.tar"] * 2)
    with tarfile.open(tmp_path / "gz.tar", "w:gz") as tf:
        tf.add(tmp_path / "shard-00000.tar", "x.tar")
    with pytest.raises(InvalidInputError, match="gz.tar is not a readable uncompressed tar file .*decompress them"):
        as_pairs(tmp_path / "gz.tar")
    _tar(tmp_path / "none.tar", [("a.txt", b"x")])
    with pytest.raises(InvalidInputError, match=r"has no usable image-caption pairs \(without an image: 1\)$"):
        as_pairs(tmp_path / "none.tar")


def test_expand_braces():
    assert _expand_braces("s-{00008..00010}.tar") == ["s-00008.tar", "s-00009.tar", "s-00010.tar"]
    assert _expand_braces("{a,b}{9..11}") == ["a9", "a10", "a11", "b9", "b10", "b11"]
    assert _expand_braces("{2..0}-{x}") == ["2-{x}", "1-{x}", "0-{x}"]
    with pytest.raises(InvalidInputError, match="expands to more than 1,000,000 names"):
        _expand_braces("{0..99999999}")


def test_tar_identity_is_sha256_of_image_bytes(tmp_path):
    data = _png(0)
    one = _no_warnings(as_pairs, _tar(tmp_path / "one.tar", [("x.png", data), ("x.txt", b"a")]))
    two = _no_warnings(as_pairs, _tar(tmp_path / "two.tar", [("pad.png", _png(1)), ("pad.txt", b"p"),
                                                             ("y.png", data), ("y.txt", b"b")]))
    (tmp_path / "file.png").write_bytes(data)
    key = "sha256:" + hashlib.sha256(data).hexdigest()
    assert one.images.identity(0) == two.images.identity(1) == key
    assert PathSource([ImageItem(str(tmp_path / "file.png"))]).identity(0) == key
    changed = bytearray(data)
    changed[-5] ^= 1  # inside the IEND/CRC bytes: a different file
    three = _no_warnings(as_pairs, _tar(tmp_path / "three.tar", [("x.png", bytes(changed)), ("x.txt", b"a")]))
    assert three.images.identities() == ["sha256:" + hashlib.sha256(bytes(changed)).hexdigest()] != [key]


# ---------------------------------------------------------------------------------------------- datasets
def test_hf_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.fromarray(_arr(k)) for k in range(4)]
    ds = datasets.Dataset.from_dict({"image": images, "text": ["zero", " ", None, "three"],
                                     "all": [["a"], [], ["b ", "c"], ["d", ""]]})
    with pytest.warns(UserWarning, match=r"^hf: read 2 pairs; skipped 2 \(empty caption: 2\)$"):
        pairs = as_pairs(ds, caption_column="text")
    assert pairs.captions == ["zero", "three"] and pairs.image_index.tolist() == [0, 1]
    assert len(pairs.images) == 2 and np.array_equal(_pixels(pairs, 1), _arr(3))  # rows without pairs left out
    with pytest.warns(UserWarning, match=r"^hf: read 4 pairs; skipped 2 \(empty caption: 2\)$"):
        lists = as_pairs(ds, caption_column="all")
    assert lists.captions == ["a", "b", "c", "d"] and lists.image_index.tolist() == [0, 1, 1, 2]
    assert np.array_equal(_pixels(lists, 2), _arr(2)) and np.array_equal(_pixels(lists, 3), _arr(3))
    with pytest.raises(InvalidInputError, match=r"^dataset 'hf' has no caption column 'caption'; columns: "
                                                r"\['image', 'text', 'all'\]$"):
        as_pairs(ds)
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([3])})
    test = _no_warnings(as_pairs, dd, caption_column="text", split="test")
    assert test.name == "hf:test"
    assert test.captions == ["three"] and np.array_equal(_pixels(test, 0), _arr(3))
    with pytest.raises(InvalidInputError, match=r"has splits \['train', 'test'\]; choose one"):
        as_pairs(dd, caption_column="text")
    dd.save_to_disk(str(tmp_path / "saved"))
    saved = _no_warnings(as_pairs, f"hf:{tmp_path / 'saved'}:test", caption_column="text")
    assert saved.captions == ["three"] and np.array_equal(_pixels(saved, 0), _arr(3))
    assert saved.images.identity(0) == test.images.identity(0)
