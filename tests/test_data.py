"""Image decoding of awkward files and image sources."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vlmood.data import list_images, load_image
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
