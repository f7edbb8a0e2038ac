"""`vlmood lvlm score|envision` against the loopback server, and a Benchmark report mixing MCM (toy world) and the
LVLM detector served over HTTP (the issue's must-show), with invalid answers counted per set."""
import csv
import hashlib

import numpy as np
import pytest

pytest.importorskip("httpx")

from lvlm_server import loopback, reject, request_image, request_text  # noqa: F401 (loopback: a fixture)

import vlmood
from vlmood.cli import main
from vlmood.data import MemorySource
from vlmood.lvlm.detector import LVLMDetector
from vlmood.lvlm.http import OpenAIClient
from vlmood.metrics import evaluate
from vlmood.toyworld import ID_SHAPES, OOD_SHAPES, load_images

CLASSES = list(ID_SHAPES)


def _key(im) -> str:
    return hashlib.sha256(im.convert("RGB").tobytes()).hexdigest()


def _oracle(truth: dict, broken: dict):
    """A server that answers by image: its shape (looked up by pixels) as a confident prediction, or none of these
    classes for the other shapes; images in ``broken`` get the scripted bad answer instead."""
    def script(req):
        key = _key(request_image(req))
        if key in broken:
            return broken[key]
        shape = truth[key]
        if shape in CLASSES:
            conf = ", ".join(f"{c}: {90 if c == shape else 2}" for c in CLASSES)
            return f"Prediction: {shape}\nConfidence: {{{conf}, none of these classes: 5}}"
        conf = ", ".join(f"{c}: 4" for c in CLASSES)
        return f"Prediction: none of these classes\nConfidence: {{{conf}, none of these classes: 93}}"
    return script


def test_benchmark_mixes_mcm_and_the_lvlm_detector_over_http(loopback, capsys):
    ids, id_shapes = load_images(2030, 12, ID_SHAPES)
    near, near_shapes = load_images(2031, 12, OOD_SHAPES)
    truth = {_key(im): s for im, s in zip(ids + near, id_shapes + near_shapes)}
    broken = {_key(ids[0]): "I'm sorry, I can't help with identifying this image.",
              _key(ids[1]): "Prediction: circle\nConfidence: {circle: 9",
              _key(near[0]): "It is a colourful geometric figure on a plain background."}
    server = loopback(_oracle(truth, broken))
    client = OpenAIClient(server.base_url, "loopback-vl", concurrency=8)
    bench = vlmood.Benchmark(id=MemorySource(ids, id_shapes, name="id"),
                             ood={"near": {"other shapes": MemorySource(near, name="other")}}, classes=CLASSES)
    enc = vlmood.load_encoder("toyworld")
    report = bench.run(enc, {"mcm": "mcm", "lvlm": LVLMDetector(client, CLASSES)}, progress=False)
    rows = {r["method"]: r for r in report.rows}
    # the LVLM's metrics come from its valid answers only: 10 ID, 11 near (an oracle: perfect separation)
    keep_id = [i for i in range(12) if i not in (0, 1)]
    assert rows["lvlm"]["auroc"] == pytest.approx(evaluate(np.full(10, 0.9), np.full(11, 0.04))["auroc"]) == 1.0
    assert len(report.scores["lvlm"]["ID"]) == len(keep_id) and len(report.scores["lvlm"]["other shapes"]) == 11
    md = report.to_markdown()
    assert "refusal: 1" in md and "truncated: 1" in md and "no_confidence: 1" in md
    assert server.requests == 24
    # a second run is served from the response cache: no request
    server.reset()
    bench.run(enc, {"lvlm": LVLMDetector(OpenAIClient(server.base_url, "loopback-vl"), CLASSES)}, progress=False)
    assert server.requests == 0


def test_cli_score_writes_statuses_and_resumes_from_the_cache(loopback, tmp_path, capsys):
    ids, shapes = load_images(2032, 4, ID_SHAPES)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(ids):
        im.save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"not a png")  # unreadable: never sent, recorded
    truth = {_key(im): s for im, s in zip(ids, shapes)}
    server = loopback(_oracle(truth, {_key(ids[2]): "I cannot help with that."}))
    out = tmp_path / "scores.csv"
    args = ["lvlm", "score", "--base-url", server.base_url, "--model", "loopback-vl", "--classes", ",".join(CLASSES),
            "--images", str(folder), "--out", str(out), "--threshold", "0.5"]
    assert main(args) == 0
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [r["status"] for r in rows] == ["complete", "complete", "refusal", "unreadable"]
    assert rows[0]["class"] == shapes[0] and float(rows[0]["score"]) == pytest.approx(0.9)
    assert rows[0]["is_ood"] == "0" and rows[2]["score"] == "" and rows[2]["is_ood"] == "1"
    assert "invalid 2" in capsys.readouterr().out
    assert server.requests == 3
    server.reset()
    assert main(args) == 0 and server.requests == 0  # every answer from the cache


def test_cli_envision_and_bad_input(loopback, tmp_path, capsys):
    server = loopback(lambda req: "1. ring\n2. moon\n3. Circle" if "similar" in request_text(req).lower()
                      else "- gradient\n- noise")
    out = tmp_path / "neg.txt"
    assert main(["lvlm", "envision", "--base-url", server.base_url, "--model", "loopback-vl", "--classes",
                 "circle,square", "--out", str(out), "--near", "2", "--far", "2"]) == 0
    words = out.read_text(encoding="utf-8").split()
    assert "circle" not in [w.lower() for w in words] and {"ring", "moon"} <= set(words)
    capsys.readouterr()
    # an unreachable server: one line naming the URL, before any image is read
    load_images(2033, 1, ID_SHAPES)[0][0].save(tmp_path / "a.png")
    dead = "http://127.0.0.1:9/v1"
    assert main(["lvlm", "score", "--base-url", dead, "--model", "m", "--classes", "a,b", "--images",
                 str(tmp_path), "--out", str(tmp_path / "s.csv")]) == 1  # the environment (the server), not the arguments
    err = capsys.readouterr().err.strip()
    assert "127.0.0.1:9" in err and "\n" not in err
    assert main(["lvlm", "score", "--base-url", server.base_url, "--model", "not-served", "--classes", "a,b",
                 "--images", str(tmp_path), "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not-served" in err and "loopback-vl" in err and "\n" not in err
    assert main(["lvlm", "envision", "--base-url", server.base_url, "--model", "loopback-vl", "--classes", "a",
                 "--out", str(out), "--near", "0", "--far", "0"]) == 2
    assert "nothing to ask for" in capsys.readouterr().err
