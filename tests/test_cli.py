"""CLI: score an image folder with a checkpoint the test saved, skip bad files, one-line argument errors."""
import csv
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vlmood import MCM, load_encoder
from vlmood.cli import main
from vlmood.testing import TINY_ARCH


@pytest.fixture
def setup(tiny, tmp_path):
    ckpt = tmp_path / "tiny.safetensors"
    tiny.save(ckpt)
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    Image.new("L", (30, 50), 128).save(imgs / "sub" / "gray.jpg")
    (imgs / "broken.jpg").write_bytes(b"garbage")
    return f"open_clip:{TINY_ARCH}@{ckpt}", imgs


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method", ["mcm", "glmcm"])
def test_score_writes_rows_and_skips_bad_images(setup, tmp_path, capsys, method):
    spec, imgs = setup
    out = tmp_path / "scores.csv"
    rc = main(["score", "--model", spec, "--classes", "cat,dog,car", "--images", str(imgs), "--method", method,
               "--threshold", "0.34", "--out", str(out), "--on-error", "skip"])
    assert rc == 0
    rows = read(out)
    assert len(rows) == 7
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("broken.jpg") and "broken.jpg" in bad[0]["error"]
    good = [r for r in rows if not r["error"]]
    # the CLI's numbers equal the Python API's on the same files
    enc = load_encoder(spec)
    det = __import__("vlmood").make_detector(method, enc, ["cat", "dog", "car"])
    expected = det.score([r["path"] for r in good])
    np.testing.assert_allclose([float(r["score"]) for r in good], expected, rtol=1e-5)
    assert [r["is_ood"] for r in good] == [str(int(s < 0.34)) for s in expected]
    assert "skipped 1" in capsys.readouterr().out


def test_score_checks_outputs_and_local_features_first(setup, tmp_path, capsys):
    spec, imgs = setup
    assert main(["score", "--model", spec, "--classes", "cat,dog", "--images", str(imgs), "--out", str(imgs)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_score_raise_stops_on_bad_image(setup, tmp_path, capsys):
    spec, imgs = setup
    rc = main(["score", "--model", spec, "--classes", "cat,dog", "--images", str(imgs), "--out", str(tmp_path / "o.csv")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "--on-error skip" in err
    assert not (tmp_path / "o.csv").exists()


def test_embed_texts_fills_cache(setup, tmp_path, monkeypatch):
    spec, _ = setup
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat.\na photo of a dog.\n")
    assert main(["embed-texts", "--model", spec, "--prompts", str(prompts), "--classes", "cat,dog"]) == 0
    enc = load_encoder(spec)
    monkeypatch.setattr(type(enc), "_encode_token_batch", lambda *a: pytest.fail("cache miss"))
    MCM(enc, ["cat", "dog"]).fit()  # served entirely from the cache


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "vlmood", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["score", "--model", "open_clip:x/none"], "the following arguments are required"),
    (["score", "--model", "m", "--classes", "a", "--images", ".", "--out", "o", "--method", "knn"], "unknown method 'knn'"),
    (["score", "--model", "bogus", "--classes", "a", "--images", ".", "--out", "o"], "must start with 'open_clip:'"),
    (["score", "--model", "open_clip:vlmood-tiny-vit/none", "--classes", "a,a", "--images", ".", "--out", "o"],
     "duplicate class names: 'a'"),
    (["score", "--model", "open_clip:vlmood-tiny-vit/none", "--classes", "a,b", "--images", "nowhere/", "--out", "o"],
     "image source not found: 'nowhere/'"),
    (["score", "--model", "open_clip:ViT-B-3/none", "--classes", "a,b", "--images", "vlmood/*.py", "--out", "o"],
     "did you mean"),
    (["embed-texts", "--model", "open_clip:vlmood-tiny-vit/none"], "give --prompts"),
])
def test_bad_arguments_exit_2_with_one_line(args, needle):
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_help_everywhere():
    for args in (["--help"], ["score", "--help"], ["eval", "--help"], ["demo", "--help"], ["mine-negatives", "--help"],
                 ["embed-texts", "--help"]):
        r = run_cli(*args)
        assert r.returncode == 0 and "usage: vlmood" in r.stdout


def test_version_and_no_prefix_matching(capsys):
    """`vlmood --version` prints the version; an abbreviated or near-miss option is refused, never silently taken
    for another one (`--meth` is not `--method`, `--methods` is not an option of `score`)."""
    import vlmood

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"vlmood {vlmood.__version__}"
    assert main(["score", "--model", "toyworld", "--classes", "a,b", "--images", "x", "--out", "o.csv",
                 "--meth", "mcm"]) == 2
    assert "unrecognized arguments: --meth mcm" in capsys.readouterr().err
    assert main(["score", "--model", "toyworld", "--classes", "a,b", "--images", "x", "--out", "o.csv",
                 "--methods", "mcm"]) == 2
    assert "unrecognized arguments: --methods mcm" in capsys.readouterr().err


def test_report_renders_as_markdown_in_jupyter():
    from vlmood.evaluation import Report

    r = Report(name="x", rows=[], id_accuracy={}, scores={}, skipped=[], counts={"ID": 0}, groups={}, seconds=0.0)
    assert r._repr_markdown_() == r.to_markdown()
