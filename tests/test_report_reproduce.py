"""A saved report carries its per-image scores and provenance; it reloads without any model and its metrics
recompute from the per-image scores to the saved table."""
from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest

import vlmood
from vlmood import toyworld
from vlmood.evaluation.report import METRICS, Report


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    enc = vlmood.load_encoder("toyworld", device="cpu")
    dets = {k: v for k, v in toyworld.demo_detectors().items() if k in ("mcm", "energy", "neglabel")}
    report = toyworld.benchmark(n=40).run(enc, dets, progress=False)
    folder = tmp_path_factory.mktemp("rep")
    report.save(folder, plots=False)
    return report, folder, enc


def test_scores_csv_holds_every_image_and_score(saved):
    report, folder, _ = saved
    rows = list(csv.reader((folder / "scores.csv").open(encoding="utf-8")))
    assert rows[0][:7] == ["set", "id", "label", "prediction", "mcm", "energy", "neglabel"]
    body = rows[1:]
    assert [r[0] for r in body] == ["ID"] * 40 + ["other shapes"] * 40 + ["empty backgrounds"] * 40
    ood = [r for r in body if r[0] != "ID"]
    assert all(r[2] == "" and r[3] == "" for r in ood)  # OOD images: no label, no prediction
    id_rows = body[:40]
    assert {r[2] for r in id_rows} <= set(toyworld.ID_SHAPES) and all(r[2] for r in id_rows)
    # the scores are the report's, to full precision, in the same order
    for j, m in enumerate(("mcm", "energy", "neglabel")):
        got = np.array([float(r[4 + j]) for r in body if r[0] == "other shapes"])
        np.testing.assert_array_equal(got, report.scores[m]["other shapes"])
    # predictions are the zero-shot classes: accuracy from the CSV equals the report's
    acc = np.mean([r[2] == r[3] for r in id_rows])
    assert acc == pytest.approx(report.id_accuracy["mcm"], abs=1e-12)


def test_reload_without_model_recomputes_the_saved_table(saved):
    report, folder, _ = saved
    loaded = Report.load(folder)  # no encoder, no detector
    rows, acc, thr = loaded.recompute()
    saved_rows = json.loads((folder / "results.json").read_text())["rows"]
    assert len(rows) == len(saved_rows) == 3 * 2  # 3 methods x 2 single-set groups
    for a, b in zip(rows, saved_rows):
        assert (a["method"], a["group"], a["dataset"], a["n_id"], a["n_ood"]) == \
            (b["method"], b["group"], b["dataset"], b["n_id"], b["n_ood"])
        for k in METRICS:
            assert abs(a[k] - b[k]) <= 1e-9, (a["method"], a["dataset"], k)
    for m, v in report.id_accuracy.items():
        assert abs(acc[m] - v) <= 1e-9
    assert thr == loaded.thresholds == report.thresholds  # exact: same finite ID scores, same rule
    assert loaded.metric("energy", "empty backgrounds", "auroc") == report.metric("energy", "empty backgrounds",
                                                                                   "auroc")


def test_excluded_images_are_empty_cells_and_stay_out_of_recomputed_metrics(tmp_path):
    ids = {"ID": ["a", "b", "c"], "x": ["u", "v", "w"]}
    full = {"m": {"ID": np.array([0.9, np.nan, 0.7]), "x": np.array([0.1, 0.8, np.nan])}}
    rep = Report(name="t", rows=[], id_accuracy={"m": None}, scores={"m": {k: v[np.isfinite(v)]
                                                                             for k, v in full["m"].items()}},
                 groups={"g": ["x"]}, ids=ids, all_scores=full, invalid={"m": {}})
    text = rep.scores_csv()
    assert text.splitlines()[2] == "ID,b,,,"
    assert text.splitlines()[6] == "x,w,,,"
    rep.rows = rep.recompute()[0]
    rep.save(tmp_path, plots=False)
    rows, _, thr = Report.load(tmp_path).recompute()
    assert thr == {"m": 0.7}  # 95% of the 2 finite ID scores {0.9, 0.7}: both kept, so the lower one
    # hand computation: ID {0.9, 0.7} vs OOD {0.1, 0.8}: pairs won 3 of 4 -> AUROC 0.75
    assert rows[0]["auroc"] == 0.75 and rows[0]["n_id"] == 2 and rows[0]["n_ood"] == 2
    assert rows[0]["n_id_excluded"] == 1 and rows[0]["n_ood_excluded"] == 1


def test_provenance_in_results_json_and_report_header(saved):
    report, folder, enc = saved
    p = json.loads((folder / "results.json").read_text())["provenance"]
    assert p["vlmood"] == vlmood.__version__
    assert p["encoder"] == {"spec": str(enc.spec), "fingerprint": enc.fingerprint, "device": "cpu",
                            "precision": enc.precision}
    assert p["classes"]["names"] == list(toyworld.ID_SHAPES)
    assert p["classes"]["sha256"] == hashlib.sha256("\n".join(toyworld.ID_SHAPES).encode()).hexdigest()
    assert set(p["detectors"]) == {"mcm", "energy", "neglabel"}
    assert p["detectors"]["neglabel"]["ngroups"] == 1 and p["detectors"]["neglabel"]["ratio"] == 0.5
    assert p["sets"]["ID"] == {"source": "toyworld-id", "size": 40, "skipped": 0}
    assert p["sets"]["empty backgrounds"]["source"] == "empty"
    assert p["date"].endswith("+00:00") and p["seconds"] > 0
    md = (folder / "report.md").read_text(encoding="utf-8")
    assert f"Made with vlmood {vlmood.__version__} on {p['date']}" in md
    assert f"Encoder: {enc.spec} (fingerprint {enc.fingerprint}), device cpu, precision {enc.precision}." in md
