"""Benchmarks and reports: numbers checked against independent scoring, exports, plots, clear errors."""
import csv
import json
import warnings

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
    pngs = {p.name for p in (world / "report").glob("*.png")}
    assert pngs == {"comparison.png", "hist_mcm.png", "hist_maxlogit.png", "roc.png"}
    for name in pngs:
        png = world / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Image.open(png).size[0] > 200


def test_map_labels():
    classes = ["tench", "goldfish", "great white shark"]
    assert map_labels(["goldfish", "tench"], classes).tolist() == [1, 0]
    assert map_labels(["great_white_shark"], classes).tolist() == [2]
    assert map_labels([2, 0], classes).tolist() == [2, 0]
    assert map_labels(["2", "1"], classes).tolist() == [2, 1]
    # ImageFolder convention: WordNet-id folders map in sorted order
    with pytest.warns(UserWarning, match="sorted order"):
        assert map_labels(["n01443537", "n01440764", "n01484850"], classes).tolist() == [1, 0, 2]
    with pytest.raises(InvalidInputError, match="labels outside the class list: 'shark'"):
        map_labels(["tench", "shark"], classes)
    with pytest.raises(InvalidInputError, match=r"outside the 3 classes: \[7\]"):
        map_labels([0, 7], classes)


def test_bad_benchmarks(tiny, world):
    with pytest.raises(InvalidInputError, match="no OOD sets"):
        Benchmark(id=world / "id", ood={}, classes=["red", "blue"])
    with pytest.raises(InvalidInputError, match="other than 'ID'"):
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
                                                           "hist_glmcm.png", "roc.png", "comparison.png"}
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
        report = [] if "--report" in bad else ["--report", str(world / "rep2")]
        args = ["eval", "--model", f"open_clip:{TINY_ARCH}@{ckpt}", "--classes", "red,blue", "--id",
                str(world / "id"), *report, *bad]
        assert main(args) == 2
        assert needle in capsys.readouterr().err


def test_no_ood_set_replaces_another(world):
    # a flat set and an explicit "ood" group are merged; before, the group replaced the flat set silently
    bench = Benchmark(id=world / "id", ood={"gray": world / "gray", "ood": {"green": world / "green"}},
                      classes=["red", "blue"])
    assert bench.ood == {"ood": {"gray": world / "gray", "green": world / "green"}}
    for ood, needle in (({"near": {"x": world / "gray"}, "far": {"x": world / "green"}}, r"repeated: \['x'\]"),
                        ({"x": world / "gray", "ood": {"x": world / "green"}}, r"repeated: \['x'\]"),
                        ({"far": {"mean": world / "gray", "b": world / "green"}}, "other than 'ID'.*and 'mean'"),
                        ({"ID": {"x": world / "gray"}}, r"invalid OOD group name\(s\) \['ID'\]")):
        with pytest.raises(InvalidInputError, match=needle):
            Benchmark(id=world / "id", ood=ood, classes=["red", "blue"])
    with pytest.raises(InvalidInputError, match="on_error must be 'raise' or 'skip', got 'skp'"):
        Benchmark(id=world / "id", ood={"g": world / "green"}, classes=["red", "blue"], on_error="skp")


def test_unlabelled_id_set_is_said_once(tiny, world):
    bench = Benchmark(id=world / "green", ood={"g": world / "gray"}, classes=["red", "blue"])
    with pytest.warns(UserWarning, match="ID set has no labels: ID accuracy not computed") as rec:
        report = bench.run(tiny, ["mcm", "energy"], num_workers=0, progress=False)
    assert len([w for w in rec if "no labels" in str(w.message)]) == 1  # once, not once per method
    assert report.id_accuracy == {"mcm": None, "energy": None}
    assert "Note: ID set has no labels" in report.to_markdown()
    assert json.loads(report.to_json())["notes"] == [report.notes[0]]
    # labelled ID set: no warning, no note
    labelled = Benchmark(id=world / "id", ood={"g": world / "gray"}, classes=["red", "blue"])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="ID set has no labels")
        report = labelled.run(tiny, ["mcm"], num_workers=0, progress=False)
    assert report.notes == [] and report.id_accuracy["mcm"] is not None


def test_partly_labelled_id_set_is_refused(tiny, world):
    (world / "m.csv").write_text("path,label\nid/red/00.png,red\nid/red/01.png,\nid/blue/00.png,blue\n")
    with pytest.raises(InvalidInputError, match=r"ID set: 1 of 3 image\(s\) have no label \(first: .*01.png\)"):
        Benchmark(id=world / "m.csv", ood={"g": world / "green"}, classes=["red", "blue"]).run(
            tiny, ["mcm"], num_workers=0, progress=False)


def test_open_sources_finds_bad_paths_before_any_model(world):
    bench = Benchmark(id=world / "id", ood={"g": world / "green", "n": world / "nowhere"}, classes=["red", "blue"])
    with pytest.raises(InvalidInputError, match="image source not found: .*nowhere"):
        bench.open_sources()
    bench = Benchmark(id=world / "id", ood={"g": world / "green"}, classes=["red", "blue"]).open_sources()
    assert len(bench.id) == 16 and len(bench.ood["ood"]["g"]) == 6


def fake_report(names, methods, seed=0):
    """A Report over random scores (one group 'ood'), built without an encoder."""
    from vlmood.evaluation import Report

    rng = np.random.default_rng(seed)
    scores = {m: {"ID": rng.normal(1, 1, 30), **{n: rng.normal(0, 1, 20) for n in names}} for m in methods}
    rows = [{"method": m, "group": "ood", "dataset": n, **evaluate(s["ID"], s[n]), "n_id": 30, "n_ood": 20}
            for m, s in scores.items() for n in names]
    rows += [{"method": m, "group": "ood", "dataset": "mean", "n_id": 30, "n_ood": 20 * len(names),
              **{k: np.mean([r[k] for r in rows if r["method"] == m]) for k in rows[0] if k not in
                 ("method", "group", "dataset", "n_id", "n_ood")}} for m in methods]
    return Report(name="fake", rows=rows, id_accuracy={m: None for m in methods}, scores=scores,
                  counts={"ID": 30, **{n: 20 for n in names}}, groups={"ood": list(names)})


def test_report_save_leaves_matplotlib_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    try:
        matplotlib.use("svg")  # a user's backend (Jupyter's inline one, say) must survive report.save
        plt.figure()  # and so must the user's open figures
        figs = plt.get_fignums()
        fake_report(["a", "b"], ["mcm"]).save(tmp_path)
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == figs
    finally:
        plt.close("all")
        matplotlib.use(before)
    assert (tmp_path / "hist_mcm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_take_any_name(tmp_path):
    names = ["$x^2$", "a$_$b", "$\\frac$ | _hidden"]  # mathtext that does not parse, '|' and a leading '_'
    report = fake_report(names, ["a/b", "a_b", "$m$"])
    paths = report.save(tmp_path)
    pngs = {p.name for p in tmp_path.glob("*.png")}
    # colliding slugs ('a/b' and 'a_b') get distinct files instead of overwriting each other
    assert pngs == {"hist_a_b.png", "hist_a_b-2.png", "hist__m_.png", "roc.png", "comparison.png"}
    assert len([k for k in paths if k.startswith("hist")]) == 3
    md = paths["report"].read_text()
    assert "| a/b | ood | $\\frac$ \\| _hidden |" in md  # a '|' in a name cannot split the table row


def test_suite_files_are_validated(tmp_path):
    from vlmood.evaluation.suites import read_suite

    path = tmp_path / "s.json"
    path.write_text('{"classes": "cifar10", "id": "a", "ood": {"far": {"x": "x"}, "far": {"y": "y"}}}')
    with pytest.raises(InvalidInputError, match=f"suite file {path}: key 'far' appears twice"):
        read_suite(str(path))
    path.write_text('{"classes": [], "id": "a", "ood": {"far": {"x": "x"}}}')
    with pytest.raises(InvalidInputError, match=f"suite file {path}: 'classes' must be"):
        read_suite(str(path))
    with pytest.raises(InvalidInputError, match="data root is empty"):
        load_suite("imagenet-mos", "")
