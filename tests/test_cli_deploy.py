"""The deploy path from the CLI: ``vlmood calibrate`` fits and calibrates a detector on ID images and saves it;
``vlmood score --detector`` scores new images with the saved threshold; ``vlmood eval --save-detectors`` saves
every evaluated detector; ``score`` reads every source ``eval`` reads (hf: datasets with named columns)."""
import csv
import math

import numpy as np
import pytest

import vlmood
from vlmood import toyworld
from vlmood.cli import main
from vlmood.toyworld import ID_SHAPES, OOD_SHAPES

CLASSES = ",".join(ID_SHAPES)


def _save(images, folder, labels=None):
    for i, im in enumerate(images):
        sub = folder / labels[i] if labels is not None else folder
        sub.mkdir(parents=True, exist_ok=True)
        im.save(sub / f"{i:03d}.png")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Calibration ID images (ImageFolder layout), fresh ID images of another seed, and near-OOD images."""
    root = tmp_path_factory.mktemp("deploy")
    imgs, labels = toyworld.load_images(101, 200)
    _save(imgs, root / "calib", labels)
    _save(toyworld.load_images(202, 200)[0], root / "fresh-id")
    _save(toyworld.load_images(303, 200, OOD_SHAPES)[0], root / "ood")
    return root


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _threshold_by_hand(scores, tpr):
    """The largest t keeping at least ceil(tpr * n) scores at or above it: the ceil(tpr * n)-th largest score."""
    s = sorted(scores, reverse=True)
    return s[math.ceil(tpr * len(s)) - 1]


def test_calibrate_then_score_with_the_saved_detector(world, tmp_path, capsys):
    det_file = tmp_path / "detector.vlmood"
    rc = main(["calibrate", "--model", "toyworld", "--classes", CLASSES, "--method", "mcm",
               "--id", str(world / "calib"), "--tpr", "0.9", "--out", str(det_file)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "keeps 180/200 (90.00%; target 90%)" in out and "ID accuracy on these images" in out

    # the threshold is the hand-computed quantile of an independent MCM's scores on the same files
    enc = vlmood.load_encoder("toyworld", device="cpu")
    paths = sorted(str(p) for p in (world / "calib").rglob("*.png"))
    ref = vlmood.MCM(enc, list(ID_SHAPES)).score(paths)
    det = vlmood.load_detector(det_file, enc)
    assert det.threshold_ == pytest.approx(_threshold_by_hand(ref, 0.9), rel=1e-6) and det.tpr_ == 0.9
    assert det.classes == list(ID_SHAPES) and type(det) is vlmood.MCM

    # score new images with the saved threshold (no --model: the file records it)
    for name in ("fresh-id", "ood"):
        out_csv = tmp_path / f"{name}.csv"
        assert main(["score", "--detector", str(det_file), "--images", str(world / name),
                     "--out", str(out_csv)]) == 0
        rows = _rows(out_csv)
        assert len(rows) == 200 and not any(r["error"] for r in rows)
        expected = det.score([r["path"] for r in rows])
        np.testing.assert_allclose([float(r["score"]) for r in rows], expected, rtol=1e-5)
        assert [r["is_ood"] for r in rows] == [str(int(not s >= det.threshold_)) for s in expected]
    printed = capsys.readouterr().out
    assert "calibrated at 90% TPR" in printed
    tpr_fresh = np.mean([r["is_ood"] == "0" for r in _rows(tmp_path / "fresh-id.csv")])
    fpr_ood = np.mean([r["is_ood"] == "0" for r in _rows(tmp_path / "ood.csv")])
    assert abs(tpr_fresh - 0.9) <= 0.06  # a fresh sample of the same world: close to the target
    assert fpr_ood < 0.5  # near-OOD shapes mostly flagged (MCM's near FPR95 in the toy world is about 16%)

    # --threshold overrides the saved one
    assert main(["score", "--detector", str(det_file), "--images", str(world / "ood"), "--threshold", "-1",
                 "--out", str(tmp_path / "all-id.csv")]) == 0
    assert {r["is_ood"] for r in _rows(tmp_path / "all-id.csv")} == {"0"}


def test_saved_detector_refuses_clashing_options_and_bad_files_before_the_model(world, tmp_path, capsys, monkeypatch):
    import vlmood.encoders as encoders

    def no_model(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(encoders, "load_encoder", no_model)
    bad = tmp_path / "bad.vlmood"
    bad.write_bytes(b"not a detector")
    assert main(["score", "--detector", str(bad), "--images", str(world / "ood"), "--out",
                 str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert "bad.vlmood" in err and len(err.strip().splitlines()) == 1
    assert main(["score", "--detector", str(tmp_path / "missing.vlmood"), "--images", str(world / "ood"),
                 "--out", str(tmp_path / "s.csv")]) == 2
    assert "missing.vlmood" in capsys.readouterr().err
    good = tmp_path / "mcm.vlmood"
    monkeypatch.undo()
    vlmood.MCM(vlmood.load_encoder("toyworld", device="cpu"), list(ID_SHAPES)).save(good)
    monkeypatch.setattr(encoders, "load_encoder", no_model)
    for extra in (["--method", "energy"], ["--classes", "a,b"], ["--param", "temperature=2"]):
        assert main(["score", "--detector", str(good), "--images", str(world / "ood"), "--out",
                     str(tmp_path / "s.csv"), *extra]) == 2
        err = capsys.readouterr().err
        assert f"drop {extra[0]}" in err and len(err.strip().splitlines()) == 1
    assert main(["score", "--images", str(world / "ood"), "--classes", "a,b", "--out", str(tmp_path / "s.csv")]) == 2
    assert "give --model SPEC (or --detector FILE" in capsys.readouterr().err
    assert main(["calibrate", "--model", "toyworld", "--classes", CLASSES, "--id", str(world / "calib"),
                 "--tpr", "1.5", "--out", str(tmp_path / "d.vlmood")]) == 2
    assert "--tpr must be in (0, 1]" in capsys.readouterr().err
    assert main(["score", "--model", "toyworld", "--classes", CLASSES, "--images", str(world / "ood"),
                 "--image-column", "img", "--out", str(tmp_path / "s.csv")]) == 2
    assert "--image-column name columns of hf: datasets" in capsys.readouterr().err


def test_eval_saves_calibrated_detectors(world, tmp_path, capsys):
    saved = tmp_path / "dets"
    rc = main(["eval", "--model", "toyworld", "--classes", CLASSES, "--id", str(world / "calib"),
               "--ood", f"near={world / 'ood'}", "--methods", "mcm,energy", "--report", str(tmp_path / "rep"),
               "--save-detectors", str(saved)])
    assert rc == 0
    enc = vlmood.load_encoder("toyworld", device="cpu")
    rep = vlmood.Report.load(tmp_path / "rep")
    for method in ("mcm", "energy"):
        det = vlmood.load_detector(saved / f"{method}.vlmood", enc)
        id_scores = rep.all_scores[method]["ID"]
        assert det.threshold_ == pytest.approx(_threshold_by_hand(id_scores[np.isfinite(id_scores)], 0.95))
        assert det.tpr_ == 0.95 and det.name == method


def test_score_reads_hf_datasets_with_named_columns(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    imgs, labels = toyworld.load_images(7, 6)
    ds = datasets.Dataset.from_dict({"picture": imgs, "shape": labels},
                                    features=datasets.Features({"picture": datasets.Image(),
                                                                "shape": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "s.csv"
    src = f"hf:{tmp_path / 'ds'}"
    assert main(["score", "--model", "toyworld", "--classes", CLASSES, "--images", src, "--image-column", "picture",
                 "--label-column", "shape", "--workers", "0", "--out", str(out)]) == 0
    rows = _rows(out)
    assert [r["id"] for r in rows] == [f"{src}[{i}]" for i in range(6)]
    det = vlmood.MCM(vlmood.load_encoder("toyworld", device="cpu"), list(ID_SHAPES))
    np.testing.assert_allclose([float(r["score"]) for r in rows], det.score(imgs), rtol=1e-5)
    assert main(["score", "--model", "toyworld", "--classes", CLASSES, "--images", src, "--image-column", "picture",
                 "--label-column", "kind", "--out", str(out)]) == 2
    assert "has no label column 'kind'" in capsys.readouterr().err
    assert main(["score", "--model", "toyworld", "--classes", CLASSES, "--images", src, "--out", str(out)]) == 2
    assert "has no image column 'image'" in capsys.readouterr().err


def test_deploy_review_cases(world, tmp_path, capsys, tiny):
    """calibrate never overwrites its --id manifest; a detector scored with another model's encoder drops the saved
    threshold (is_ood empty, the warning says why); eval's --label-column applies to the ID dataset only."""
    datasets = pytest.importorskip("datasets")
    man = tmp_path / "man.csv"
    man.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted((world / "calib").rglob("*.png"))[:8]))
    assert main(["calibrate", "--model", "toyworld", "--classes", CLASSES, "--id", str(man), "--out", str(man)]) == 2
    assert "is the --id manifest itself" in capsys.readouterr().err and man.read_text().startswith("path,label")

    det_file = tmp_path / "m.vlmood"
    assert main(["calibrate", "--model", "toyworld", "--classes", CLASSES, "--id", str(man), "--out",
                 str(det_file)]) == 0
    ckpt = tmp_path / "tiny.safetensors"
    tiny.save(ckpt)
    out = tmp_path / "other.csv"
    assert main(["score", "--detector", str(det_file), "--model", f"open_clip:vlmood-tiny-vit@{ckpt}", "--images",
                 str(world / "ood"), "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "is dropped: calibrate again on this one" in cap.err and "no threshold: is_ood left empty" in cap.out
    assert {r["is_ood"] for r in _rows(out)} == {""}

    imgs, labels = toyworld.load_images(8, 6)
    for name, cols in (("id", {"picture": imgs, "shape": labels}), ("ood", {"picture": imgs})):
        feats = {"picture": datasets.Image(), **({"shape": datasets.Value("string")} if "shape" in cols else {})}
        datasets.Dataset.from_dict(cols, features=datasets.Features(feats)).save_to_disk(str(tmp_path / name))
    assert main(["eval", "--model", "toyworld", "--classes", CLASSES, "--id", f"hf:{tmp_path / 'id'}",
                 "--ood", f"near=hf:{tmp_path / 'ood'}", "--image-column", "picture", "--label-column", "shape",
                 "--report", str(tmp_path / "rep")]) == 0
    rep = vlmood.Report.load(tmp_path / "rep")
    assert rep.labels == labels and rep.id_accuracy["mcm"] is not None
    assert main(["score", "--model", "toyworld", "--classes", CLASSES, "--images", f"hf:{tmp_path / 'id'}",
                 "--image-column", "picture", "--label-column", "", "--out", str(out)]) == 2
    assert "--label-column is empty" in capsys.readouterr().err
