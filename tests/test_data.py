"""Image decoding of awkward files and image sources."""
import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmood.data import ImageItem, list_images, load_image
from vlmood.features import extract_features
from vlmood.errors import ImageLoadError, InvalidInputError


def test_modes_become_rgb(tmp_path):
    Image.new("L", (4, 3), 77).save(tmp_path / "gray.png")
    assert np.asarray(load_image(tmp_path / "gray.png"))[0, 0].tolist() == [77, 77, 77]
    p = Image.new("P", (4, 3))
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putpixel((0, 0), 1)
    p.save(tmp_path / "pal.png")
    assert np.asarray(load_image(tmp_path / "pal.png"))[0, 0].tolist() == [10, 200, 30]
    Image.new("RGBA", (4, 3), (200, 0, 0, 0)).save(tmp_path / "clear.png")  # fully transparent -> white
    assert np.asarray(load_image(tmp_path / "clear.png"))[0, 0].tolist() == [255, 255, 255]
    Image.new("RGBA", (4, 3), (200, 0, 0, 255)).save(tmp_path / "opaque.png")
    assert np.asarray(load_image(tmp_path / "opaque.png"))[0, 0].tolist() == [200, 0, 0]
    Image.new("CMYK", (4, 3), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    r, g, b = np.asarray(load_image(tmp_path / "cmyk.jpg"))[1, 1].tolist()
    assert r > 240 and g < 15 and b < 15  # pure red ink


def test_sixteen_bit_is_rescaled(tmp_path):
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)  # 32896 = 128 * 257
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert np.asarray(load_image(tmp_path / "g16.png"))[0, :, 0].tolist() == [0, 128, 255]
    Image.fromarray(arr).save(tmp_path / "g16.tif")
    assert np.asarray(load_image(tmp_path / "g16.tif"))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_rotation_applied(tmp_path):
    im = Image.new("RGB", (20, 10), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 5, 5))  # a red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    im.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (10, 20)
    px = np.asarray(out)
    assert px[1, -2, 0] > 200 and px[-2, 1, 0] < 50  # the red corner is displayed top right


def _png_header_only(path, w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))


def test_decompression_bomb_refused(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 40000, 40000)
    with pytest.raises(ImageLoadError, match=r"bomb.png refused: .*40000x40000|bomb.png refused"):
        load_image(tmp_path / "bomb.png")
    _png_header_only(tmp_path / "big.png", 10000, 10000)  # over the limit but under Pillow's own error level
    with pytest.raises(ImageLoadError, match=r"big.png refused: 10000x10000 = 100,000,000 pixels"):
        load_image(tmp_path / "big.png")


def test_bad_files_named(tiny, tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "ok.jpg").read_bytes()[:200])
    with pytest.raises(ImageLoadError, match="empty .*empty.jpg"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageLoadError, match="not an image.*text.png"):
        load_image(tmp_path / "text.png")
    with pytest.raises(ImageLoadError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageLoadError, match="not found.*nope.jpg"):
        load_image(tmp_path / "nope.jpg")
    feats = extract_features(tiny, tmp_path, on_error="skip", cache=False, num_workers=0)
    assert [i.rsplit("/", 1)[1] for i in feats.ids] == ["ok.jpg"]
    assert sorted(i.rsplit("/", 1)[1] for i, _ in feats.errors) == ["cut.jpg", "empty.jpg", "text.png"]
    with pytest.raises(ImageLoadError):
        extract_features(tiny, tmp_path, on_error="raise", cache=False, num_workers=0)


def test_sources(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ["a/1.png", "a/b/2.jpg", "3.png"]:
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "notes.md").write_text("x")
    assert len(list_images(tmp_path)) == 3
    assert len(list_images(str(tmp_path / "**" / "*.png"))) == 2
    (tmp_path / "m.csv").write_text("path,label\na/1.png,cat\n3.png,\n")
    items = list_images(tmp_path / "m.csv")
    assert [(i.path.endswith("1.png"), i.label) for i in items] == [(True, "cat"), (False, None)]
    (tmp_path / "bad.csv").write_text("path\na/1.png\nmissing.png\n")
    with pytest.raises(InvalidInputError, match="1 missing file.*missing.png"):
        list_images(tmp_path / "bad.csv")
    (tmp_path / "nopath.csv").write_text("label,path\ncat,a/1.png\ndog\n")
    with pytest.raises(InvalidInputError, match="nopath.csv line 3 has no path"):
        list_images(tmp_path / "nopath.csv")
    with pytest.raises(InvalidInputError, match="not found"):
        list_images(tmp_path / "nothing_here")
    with pytest.raises(InvalidInputError, match="matches no files"):
        list_images(str(tmp_path / "*.webp"))


# ------------------------------------------------------------------ issue 11: cache identity, scanning, decoding
def _ppm(path, rgb):
    """An 8x8 PPM of one colour: every such file has the same byte size."""
    Image.new("RGB", (8, 8), rgb).save(path)
    return path


def test_identity_keys_content_not_mtime(tiny, tmp_path):
    from vlmood.data import PathSource, as_source
    from vlmood.text.cache import EmbeddingCache

    a = _ppm(tmp_path / "x.ppm", (250, 10, 10))
    src = PathSource(list_images(a))
    before = src.identity(0)
    cache = EmbeddingCache(tmp_path / "cache", kind="features")
    red = extract_features(tiny, [a], cache=cache, num_workers=0).features
    st = a.stat()
    b_bytes = _ppm(tmp_path / "y.ppm", (10, 10, 250)).read_bytes()
    assert len(b_bytes) == st.st_size and b_bytes != a.read_bytes()
    a.write_bytes(b_bytes)  # same size, then restore the mtime as cp -p / rsync -t / tar x do
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert a.stat().st_mtime_ns == st.st_mtime_ns and a.stat().st_size == st.st_size
    assert src.identity(0) != before
    blue = extract_features(tiny, [a], cache=cache, num_workers=0).features
    fresh = extract_features(tiny, [a], cache=False, num_workers=0).features
    assert torch.allclose(blue, fresh) and not torch.allclose(blue, red)
    # identical bytes at two paths share a key (their features are identical); a missing file never hits
    both = as_source([a, tmp_path / "y.ppm"])
    assert both.identity(0) == both.identity(1) == f"sha256:{hashlib.sha256(b_bytes).hexdigest()}"
    gone = PathSource([ImageItem(str(tmp_path / "gone.ppm"))])
    assert gone.identity(0).startswith("unreadable:") and gone.identity(0) != gone.identity(0)


def test_hidden_entries_skipped(tmp_path):
    (tmp_path / "rose" / ".thumbs").mkdir(parents=True)
    (tmp_path / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "rose" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "rose" / ".thumbs" / "t.png")
    Image.new("RGB", (8, 8)).save(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png")
    (tmp_path / "rose" / "._a.png").write_bytes(b"\0\5\26\7AppleDouble")  # macOS resource fork
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    items = list_images(tmp_path)
    assert [(Path(i.path).relative_to(tmp_path).as_posix(), i.label) for i in items] == [("rose/a.png", "rose")]
    assert [Path(p.path).name for p in list_images(str(tmp_path / "**" / "*.png"))] == ["a.png"]
    only_hidden = tmp_path / "h"
    (only_hidden / ".cache").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(only_hidden / ".cache" / "x.png")
    with pytest.raises(InvalidInputError, match="no image files .* hidden entries, names starting with '.'"):
        list_images(only_hidden)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlinked_folders_followed_once(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "elsewhere" / "roses"
    (root / "tulip").mkdir(parents=True)
    outside.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(outside / "r.png")
    Image.new("RGB", (8, 8)).save(root / "tulip" / "t.png")
    (root / "rose").symlink_to(outside, target_is_directory=True)
    (root / "tulip" / "loop").symlink_to(root, target_is_directory=True)  # a loop back to the root
    items = list_images(root)
    assert [(Path(i.path).name, i.label) for i in items] == [("r.png", "rose"), ("t.png", "tulip")]
    globbed = list_images(str(root / "**" / "*.png"))
    assert sorted(Path(i.path).name for i in globbed) == ["r.png", "t.png"]  # once each, despite the loop
    (root / "tulip" / "loop2").symlink_to(root / "tulip", target_is_directory=True)  # two loops: no blow-up
    assert len(list_images(str(root / "**" / "*.png"))) == 2
    (root / "zz_rose").symlink_to(outside, target_is_directory=True)  # the same folder as a second class
    with pytest.warns(UserWarning, match="reachable under two class folders"):
        again = list_images(root)
    assert [(Path(i.path).name, i.label) for i in again] == [("r.png", "rose"), ("t.png", "tulip")]


def test_empty_paths_refused(tmp_path, monkeypatch):
    from vlmood.data import as_source

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "here.png")  # what scanning the current folder would find
    for bad in ("", "   ", Path("   ")):
        with pytest.raises(InvalidInputError, match="empty image source path"):
            list_images(bad)
    with pytest.raises(InvalidInputError, match="empty image source path"):
        as_source("")
    with pytest.raises(InvalidInputError, match="entry 2 is an empty path"):
        as_source(["here.png", ""])
    with pytest.raises(InvalidInputError, match="empty dataset name"):
        as_source("hf:")
    with pytest.raises(ImageLoadError, match="empty image path"):
        load_image("")


def test_glob_characters_in_existing_names_are_literal(tmp_path):
    Image.new("RGB", (8, 8), (1, 1, 1)).save(tmp_path / "a[1].png")
    Image.new("RGB", (8, 8), (2, 2, 2)).save(tmp_path / "a1.png")  # what the pattern a[1].png matches
    assert [Path(i.path).name for i in list_images(str(tmp_path / "a[1].png"))] == ["a[1].png"]
    d = tmp_path / "set [x]"
    d.mkdir()
    Image.new("RGB", (8, 8)).save(d / "p.png")
    assert [Path(i.path).name for i in list_images(str(d / "*.png"))] == ["p.png"]
    assert sorted(Path(i.path).name for i in list_images(str(tmp_path / "a*.png"))) == ["a1.png", "a[1].png"]


def test_extreme_aspect_ratio_refused(tmp_path):
    Image.new("L", (100_000, 1), 9).save(tmp_path / "strip.png")  # 100,000 pixels: passes the bomb guard
    assert (tmp_path / "strip.png").stat().st_size < 2000
    with pytest.raises(ImageLoadError, match=r"strip.png refused: 100000x1 has an aspect ratio of 100,000:1"):
        load_image(tmp_path / "strip.png")
    Image.new("L", (1, 1000), 9).save(tmp_path / "tall.png")
    with pytest.raises(ImageLoadError, match=r"tall.png refused: 1x1000 .*limit of 100:1"):
        load_image(tmp_path / "tall.png")
    assert load_image(tmp_path / "tall.png", max_aspect=1000).size == (1, 1000)
    assert load_image(Image.new("RGB", (500, 5))).size == (500, 5)  # exactly 100:1 is accepted
    with pytest.raises(ImageLoadError, match="in-memory image refused: 501x5"):
        load_image(Image.new("RGB", (501, 5)))


def test_dark_sixteen_bit_integer_images(tmp_path):
    vals = np.array([[0, 100, 128, 129, 200, 255]], dtype=np.uint16)  # dark: every value below 256
    want = np.rint(vals[0] / 257).astype(int).tolist()  # 16-bit -> 8-bit: value / 257
    assert want == [0, 0, 0, 1, 1, 1]
    Image.fromarray(vals).save(tmp_path / "d.png")
    (tmp_path / "d.pgm").write_bytes(b"P5\n6 1\n65535\n" + vals.astype(">u2").tobytes())
    Image.fromarray(vals.astype(np.int32)).save(tmp_path / "d32.tif")  # 32-bit integer TIFF (mode I)
    for name in ("d.png", "d.pgm", "d32.tif"):
        assert np.asarray(load_image(tmp_path / name))[0, :, 0].tolist() == want, name
    Image.fromarray(np.array([[0, 70_000]], dtype=np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(ImageLoadError, match=r"wide.tif: .*0\.\.70000, outside the 16-bit range"):
        load_image(tmp_path / "wide.tif")


def test_undecodable_file_names(tiny, tmp_path):
    from vlmood._io import printable
    from vlmood.data import PathSource
    from vlmood.text.cache import prompt_key

    folder = os.fsencode(tmp_path / "imgs")
    os.mkdir(folder)
    try:
        good = os.path.join(folder, b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8
        Image.new("RGB", (8, 8)).save(open(good, "wb"), format="PNG")
        with open(os.path.join(folder, b"bad\xff.jpg"), "wb") as f:
            f.write(b"not an image")
    except OSError:
        pytest.skip("the filesystem refuses non-UTF-8 names")
    src = PathSource(list_images(tmp_path / "imgs"))
    assert len(src) == 2
    for i in range(2):
        prompt_key(src.identity(i))  # cache keys must encode as UTF-8
    feats = extract_features(tiny, tmp_path / "imgs", on_error="skip", num_workers=0)
    assert len(feats) == 1 and len(feats.errors) == 1
    (bad_id, msg), = feats.errors
    msg.encode("utf-8")  # messages are printable
    assert "bad\\xff.jpg" in msg and printable(bad_id).endswith("bad\\xff.jpg")


def test_identities_in_parallel_match_one_by_one(tmp_path):
    from vlmood.data import PathSource

    for k in range(20):
        _ppm(tmp_path / f"{k:02d}.ppm", (k, 0, 0))
    src = PathSource(list_images(tmp_path))
    keys = src.identities()
    assert keys == [src.identity(i) for i in range(20)] and len(set(keys)) == 20
    assert keys[3] == "sha256:" + hashlib.sha256((tmp_path / "03.ppm").read_bytes()).hexdigest()


# ------------------------------------------------------------------ review of issue 11: globs, special files, hashing
@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_glob_finds_files_through_a_symlinked_folder_reached_first_by_a_non_matching_path(tmp_path):
    import glob

    data = tmp_path / "g" / "data"
    (data / "raw").mkdir(parents=True)
    (data / "sets" / "id").mkdir(parents=True)
    _ppm(data / "raw" / "x.ppm", (1, 2, 3))
    _ppm(data / "sets" / "id" / "y.ppm", (4, 5, 6))
    (data / "sets" / "ood").symlink_to("../raw", target_is_directory=True)  # raw/ itself sorts (and is met) first
    pattern = str(data / "*" / "*" / "*.ppm")
    want = sorted(glob.glob(pattern))
    assert [Path(p).relative_to(data).as_posix() for p in want] == ["sets/id/y.ppm", "sets/ood/x.ppm"]
    assert [i.path for i in list_images(pattern)] == want
    # the same real folder searched again for other pattern positions, yet each real file once
    assert [Path(i.path).relative_to(data).as_posix() for i in list_images(str(data / "**" / "*.ppm"))] == \
        ["raw/x.ppm", "sets/id/y.ppm"]
    assert [Path(i.path).relative_to(data).as_posix() for i in list_images(str(data / "sets" / "*" / "x.ppm"))] == \
        ["sets/ood/x.ppm"]
    (data / "raw" / "up").symlink_to("..", target_is_directory=True)  # a loop: ends, nothing twice
    looped = list_images(str(data / "**" / "*.ppm"))
    assert sorted(Path(i.path).name for i in looped) == ["x.ppm", "y.ppm"]
    deep = list_images(str(data / "raw" / "*" / "*" / "*" / "*.ppm"))  # through the loop, as glob finds them
    assert [i.path for i in deep] == sorted(glob.glob(str(data / "raw" / "*" / "*" / "*" / "*.ppm")))
    assert [Path(i.path).relative_to(data).as_posix() for i in deep] == ["raw/up/sets/id/y.ppm",
                                                                         "raw/up/sets/ood/x.ppm"]


def _unblock(fifo):
    """Open ``fifo`` for writing and close it, so that a reader blocked in open() gets end-of-file."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_named_pipes_are_never_opened(tmp_path):
    import threading
    import warnings

    from vlmood.data import PathSource, file_digest

    (tmp_path / "imgs").mkdir()
    good = _ppm(tmp_path / "imgs" / "a.png", (9, 9, 9))
    fifo = tmp_path / "imgs" / "b.png"
    os.mkfifo(fifo)
    done = {}

    def scan():
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            items = list_images(tmp_path / "imgs")
            done["globbed"] = list_images(str(tmp_path / "imgs" / "*.png"))
        done["warnings"] = [str(w.message) for w in record]
        done["items"] = [Path(i.path).name for i in items]
        done["keys"] = PathSource(items).identities()
        done["digest"] = file_digest(fifo)
        done["listed"] = PathSource([ImageItem(str(good)), ImageItem(str(fifo))]).identities()
        try:
            load_image(fifo)
        except ImageLoadError as e:
            done["load"] = str(e)

    t = threading.Thread(target=scan, daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():
        _unblock(fifo)
        t.join(5)
        pytest.fail("blocked reading a named pipe")
    assert done["items"] == ["a.png"] and [Path(i.path).name for i in done["globbed"]] == ["a.png"]
    assert len(done["warnings"]) == 2 and all("not regular files (named pipes" in w and "b.png" in w
                                              for w in done["warnings"])
    assert done["keys"] == ["sha256:" + hashlib.sha256(good.read_bytes()).hexdigest()]
    assert done["digest"] is None
    assert done["listed"][0] == done["keys"][0] and done["listed"][1].startswith("unreadable:")
    assert done["load"] == f"not an image file (a named pipe (FIFO)): {fifo}"
    with pytest.raises(InvalidInputError, match=r"b.png' is a named pipe \(FIFO\), not an image file"):
        list_images(fifo)


def test_parallel_hashing_only_for_large_files(tmp_path, monkeypatch):
    import threading

    import vlmood.data as data_mod
    from vlmood.data import PathSource

    monkeypatch.setattr(data_mod, "_PARALLEL_HASH_BYTES", 1000)
    paths = [_ppm(tmp_path / f"s{k:02d}.ppm", (k, 0, 0)) for k in range(20)]  # 8x8 PPM: 207 bytes
    for k in range(3):
        (tmp_path / f"l{k}.bin").write_bytes(bytes([k]) * 5000)
        paths.append(tmp_path / f"l{k}.bin")
    threads = {}
    real = data_mod.file_digest
    monkeypatch.setattr(data_mod, "file_digest", lambda p: threads.setdefault(Path(p).name, threading.get_ident())
                        and real(p))
    src = PathSource([ImageItem(str(p)) for p in paths])
    keys = src.identities()
    assert keys == ["sha256:" + hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    here = threading.get_ident()
    assert all(threads[p.name] == here for p in paths[:20])  # small files: no pool
    assert all(threads[p.name] != here for p in paths[20:])  # large ones: in the pool
