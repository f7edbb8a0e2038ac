"""Benchmarks and reports: numbers checked against independent scoring, exports, plots, clear errors."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

import vlmood
from vlmood.cli import main
from vlmood.errors import InvalidInputError
from vlmood.evaluation import Benchmark, load_suite, map_labels
from vlmood.metrics import evaluate
from vlmood.testing import TINY_ARCH


def colour_images(folder, n, colour, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(folder / f"{i:02d}.png")
    return sorted(folder.glob("*.png"))


@pytest.fixture
def world(tmp_path):
    colour_images(tmp_path / "id" / "red", 8, (220, 30, 30), 0)
    colour_images(tmp_path / "id" / "blue", 8, (30, 30, 220), 1)
    colour_images(tmp_path / "green", 6, (30, 200, 30), 2)
    colour_images(tmp_path / "gray", 5, (128, 128, 128), 3)
    colour_images(tmp_path / "white", 4, (250, 250, 250), 4)
    return tmp_path


def test_report_numbers_match_independent_scoring(tiny, world):
    bench = Benchmark(id=world / "id", ood={"near": {"green": world / "green"},
                                            "far": {"gray": world / "gray", "white": world / "white"}},
                      classes=["red", "blue"], name="colours")
    report = bench.run(tiny, ["mcm", "energy", "glmcm"], num_workers=0, progress=False)
    id_paths = sorted((world / "id").rglob("*.png"))
    for method in ("mcm", "energy", "glmcm"):
        det = vlmood.make_detector(method, tiny, ["red", "blue"])
        s_id = det.score(id_paths)
        for name in ("green", "gray", "white"):
            expected = evaluate(s_id, det.score(sorted((world / name).glob("*.png"))))
            for k, v in expected.items():
                assert report.metric(method, name, k) == pytest.approx(v, abs=1e-6)
        far = [evaluate(s_id, det.score(sorted((world / n).glob("*.png"))))["auroc"] for n in ("gray", "white")]
        assert report.metric(method, "mean", "auroc", group="far") == pytest.approx(np.mean(far), abs=1e-6)
        labels = np.array([0 if p.parent.name == "red" else 1 for p in id_paths])
        assert report.id_accuracy[method] == pytest.approx(np.mean(det.classify(id_paths) == labels))
    assert not [r for r in report.rows if r["group"] == "near" and r["dataset"] == "mean"]  # one set: no mean row


def test_report_exports(tiny, world):
    (world / "white" / "broken.png").write_bytes(b"\x89PNG broken")
    bench = Benchmark(id=world / "id", ood={"green": world / "green", "white": world / "white"},
                      classes=["red", "blue"], on_error="skip")
    report = bench.run(tiny, ["mcm", "maxlogit"], num_workers=0, progress=False)
    paths = report.save(world / "report")
    md = paths["report"].read_text()
    assert "| mcm | ood | green |" in md and "## Skipped images (1)" in md and "broken.png" in md
    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == 6  # 2 methods x (2 sets + mean)
    assert float(rows[0]["auroc"]) == pytest.approx(report.rows[0]["auroc"])
    data = json.loads(paths["json"].read_text())
    assert data["skipped"][0]["id"].endswith("broken.png") and data["counts"]["white"] == 4
    for m in ("mcm", "maxlogit"):
        for kind in ("hist", "roc"):
            png = world / "report" / f"{kind}_{m}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert Image.open(png).size[0] > 200


def test_map_labels():
    classes = ["tench", "goldfish", "great white shark"]
    assert map_labels(["goldfish", "tench"], classes).tolist() == [1, 0]
    assert map_labels(["great_white_shark"], classes).tolist() == [2]
    assert map_labels([2, 0], classes).tolist() == [2, 0]
    assert map_labels(["2", "1"], classes).tolist() == [2, 1]
    # ImageFolder convention: WordNet-id folders map in sorted order
    assert map_labels(["n01443537", "n01440764", "n01484850"], classes).tolist() == [1, 0, 2]
    with pytest.raises(InvalidInputError, match="labels outside the class list: 'shark'"):
        map_labels(["tench", "shark"], classes)
    with pytest.raises(InvalidInputError, match=r"outside the 3 classes: \[7\]"):
        map_labels([0, 7], classes)


def test_bad_benchmarks(tiny, world):
    with pytest.raises(InvalidInputError, match="no OOD sets"):
        Benchmark(id=world / "id", ood={}, classes=["red", "blue"])
    with pytest.raises(InvalidInputError, match="not 'ID'"):
        Benchmark(id=world / "id", ood={"ID": world / "green"}, classes=["red", "blue"])
    with pytest.raises(InvalidInputError, match="OOD group 'near' is empty"):
        Benchmark(id=world / "id", ood={"near": {}}, classes=["red", "blue"])
    (world / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no image files .* under folder .*empty"):
        Benchmark(id=world / "id", ood={"e": world / "empty"}, classes=["red", "blue"]).run(tiny, ["mcm"], progress=False)
    with pytest.raises(InvalidInputError, match="labels outside the class list: 'blue'"):
        Benchmark(id=world / "id", ood={"g": world / "green"}, classes=["red", "green", "yellow"]).run(
            tiny, ["mcm"], progress=False)
    (world / "m.csv").write_text("path,label\nid/red/00.png,red\nid/red/nope.png,red\n")
    with pytest.raises(InvalidInputError, match="1 missing file.*nope.png"):
        Benchmark(id=world / "m.csv", ood={"g": world / "green"}, classes=["red", "blue"]).run(tiny, ["mcm"])


def test_suite_missing_root_lists_everything(tmp_path):
    (tmp_path / "imagenet_1k" / "val").mkdir(parents=True)
    (tmp_path / "ninco").mkdir()
    with pytest.raises(InvalidInputError) as e:
        load_suite("openood-v1.5-imagenet1k", tmp_path)
    msg = str(e.value)
    assert "4 of 6 data folders missing" in msg
    for name in ("ssb_hard", "inaturalist", "textures", "openimage_o"):
        assert f"{name}: {tmp_path / name}" in msg
    assert "ninco:" not in msg and "expected layout" in msg
    with pytest.raises(InvalidInputError, match="unknown suite 'cifar11'"):
        load_suite("cifar11", tmp_path)


def test_suite_runs_on_a_matching_layout(tiny, tmp_path):
    for i, c in enumerate(vlmood.load_classes("cifar10")):
        colour_images(tmp_path / "cifar10" / "test" / c, 1, (20 * i, 100, 200 - 15 * i), i)
    for i, name in enumerate(["cifar100/test", "tin", "mnist", "svhn", "texture", "places365"]):
        colour_images(tmp_path / name, 2, (10 * i, 10 * i, 10 * i), 20 + i)
    report = Benchmark.from_suite("openood-v1.5-cifar10", tmp_path).run(tiny, ["mcm"], num_workers=0, progress=False)
    assert report.counts["ID"] == 10 and set(report.groups) == {"near", "far"}
    assert report.id_accuracy["mcm"] is not None


def test_cli_eval_writes_report(tiny, world, capsys):
    ckpt = world / "tiny.safetensors"
    tiny.save(ckpt)
    rc = main(["eval", "--model", f"open_clip:{TINY_ARCH}@{ckpt}", "--classes", "red,blue", "--id", str(world / "id"),
               "--ood", f"near/green={world / 'green'}", "--ood", f"far/gray={world / 'gray'}",
               "--ood", f"far/white={world / 'white'}", "--methods", "mcm,glmcm,energy,maxlogit",
               "--report", str(world / "rep"), "--workers", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| method | near FPR95 ↓ | far FPR95 ↓ | near AUROC ↑ | far AUROC ↑ | ID acc ↑ |" in out
    assert {p.name for p in (world / "rep").iterdir()} >= {"report.md", "results.csv", "results.json",
                                                           "hist_glmcm.png", "roc_energy.png"}
    assert main(["eval", "--model", f"open_clip:{TINY_ARCH}@{ckpt}", "--id", str(world / "id"),
                 "--report", str(world / "rep")]) == 2
    assert "give --classes, --ood" in capsys.readouterr().err
    assert main(["eval", "--model", f"open_clip:{TINY_ARCH}@{ckpt}", "--classes", "a,b", "--id", "x",
                 "--ood", "nonsense", "--report", "r"]) == 2
    assert "--ood expects [GROUP/]NAME=SOURCE" in capsys.readouterr().err
    for bad, needle in ((["--ood", f"ID={world / 'green'}"], "other than 'ID'"),
                        (["--ood", f"g={world / 'green'}", "--workers", "-1"], "--workers must be >= 0"),
                        (["--ood", f"g={world / 'green'}", "--methods", "knn"], "unknown method 'knn'"),
                        (["--ood", f"g={world / 'green'}", "--report", str(ckpt)], "is not a folder")):
        args = ["eval", "--model", f"open_clip:{TINY_ARCH}@{ckpt}", "--classes", "red,blue", "--id",
                str(world / "id"), "--report", str(world / "rep2"), *bad]
        assert main(args) == 2
        assert needle in capsys.readouterr().err
