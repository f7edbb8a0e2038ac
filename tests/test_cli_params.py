"""``--param [METHOD.]NAME=VALUE`` and ``--seed`` on ``vlmood score`` / ``eval``: the values reach the detectors
(numbers equal the Python API's and a hand computation), and every mistake is one line with exit status 2."""
import csv
import json

import numpy as np
import pytest
import torch

import vlmood
from vlmood import toyworld
from vlmood.cli import main, method_params

CLASSES = "circle,square,triangle"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    imgs, _ = toyworld.load_images(3, 12)
    for i, im in enumerate(imgs):
        for sub in ("imgs", "id" if i < 6 else "ood"):
            (root / sub).mkdir(exist_ok=True)
            im.save(root / sub / f"{i:02d}.png")
    toyworld.write_lexicon(root / "lex")
    return root


@pytest.fixture(scope="module")
def enc():
    return vlmood.load_encoder("toyworld", device="cpu")


def _scores(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["path"] for r in rows], np.array([float(r["score"]) for r in rows])


def _score(world, tmp_path, *extra):
    out = tmp_path / "s.csv"
    rc = main(["score", "--model", "toyworld", "--device", "cpu", "--classes", CLASSES, "--images",
               str(world / "imgs"), "--out", str(out), *extra])
    assert rc == 0
    return _scores(out)


def test_mcm_temperature_reaches_the_detector(world, tmp_path, enc):
    paths, s1 = _score(world, tmp_path, "--method", "mcm")
    _, s05 = _score(world, tmp_path, "--method", "mcm", "--param", "temperature=0.05")
    assert not np.allclose(s1, s05)  # the parameter changes the scores ...
    x = enc.encode_images(paths).float()  # ... to max softmax(sims / T), by hand
    t = vlmood.MCM(enc, CLASSES.split(",")).text_features
    want = torch.softmax((x @ t.T) / 0.05, dim=-1).max(dim=-1).values.numpy()
    np.testing.assert_allclose(s05, want, rtol=1e-4)
    np.testing.assert_allclose(s05, vlmood.MCM(enc, CLASSES.split(","), temperature=0.05).score(paths), rtol=1e-5)


def test_seed_reaches_neglabel(world, tmp_path, enc):
    lex = str(world / "lex")
    common = ["--method", "neglabel", "--param", f"lexicon={lex}", "--param", "ngroups=3", "--param", "ratio=1"]
    paths, s5 = _score(world, tmp_path, *common, "--seed", "5")
    _, s0 = _score(world, tmp_path, *common)
    kw = dict(lexicon=lex, ngroups=3, ratio=1.0)
    np.testing.assert_allclose(s5, vlmood.NegLabel(enc, CLASSES.split(","), seed=5, **kw).score(paths), rtol=1e-5)
    np.testing.assert_allclose(s0, vlmood.NegLabel(enc, CLASSES.split(","), seed=0, **kw).score(paths), rtol=1e-5)
    assert not np.allclose(s5, s0)  # the seed matters here, so the comparison above can fail


def test_eval_scoped_and_shared_params(world, tmp_path, enc):
    rep = tmp_path / "rep"
    rc = main(["eval", "--model", "toyworld", "--device", "cpu", "--classes", CLASSES, "--id", str(world / "id"),
               "--ood", f"far={world / 'ood'}", "--methods", "mcm,glmcm", "--param", "temperature=0.5",
               "--param", "glmcm.lam=0", "--report", str(rep)])
    assert rc == 0
    rows = {r["method"]: r for r in json.loads((rep / "results.json").read_text())["rows"]
            if r["dataset"] == "far"}
    ids, oods = (sorted(str(p) for p in (world / d).glob("*.png")) for d in ("id", "ood"))
    for m, det in (("mcm", vlmood.MCM(enc, CLASSES.split(","), temperature=0.5)),
                   ("glmcm", vlmood.GLMCM(enc, CLASSES.split(","), temperature=0.5, lam=0.0))):
        want = vlmood.metrics.auroc(det.score(ids), det.score(oods))
        assert rows[m]["auroc"] == pytest.approx(want, abs=1e-6), m
        default = vlmood.make_detector(m, enc, CLASSES.split(","))
        assert want != pytest.approx(vlmood.metrics.auroc(default.score(ids), default.score(oods))), m


def _err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    return err


SCORE = ["score", "--model", "toyworld", "--classes", CLASSES, "--images", "nowhere", "--out", "o.csv"]
EVAL = ["eval", "--model", "toyworld", "--classes", CLASSES, "--id", "nowhere", "--ood", "x=nowhere",
        "--report", "rep"]


@pytest.mark.parametrize("argv,needle", [
    (SCORE + ["--param", "ngroups=5"], "mcm takes no parameter 'ngroups'; its parameters: temperature"),
    (SCORE + ["--param", "temperature=1", "--param", "temperature=2"], "'temperature' of mcm is already set"),
    (SCORE + ["--param", "temperature=nan"], "must be a finite number, got 'nan'"),
    (SCORE + ["--param", "temperature=inf"], "must be a finite number, got 'inf'"),
    (SCORE + ["--param", "temperature=hot"], "expected a number, got 'hot'"),
    (SCORE + ["--param", "temperature"], "--param expects NAME=VALUE"),
    (SCORE + ["--method", "neglabel", "--param", "ngroups=2.5"], "expected an integer, got '2.5'"),
    (SCORE + ["--method", "neglabel", "--seed", "1", "--param", "seed=2"], "both set the seed"),
    (SCORE + ["--seed", "1"], "--seed applies to the methods that draw random numbers (neglabel, csp"),
    (SCORE + ["--param", "glmcm.lam=1"], "glmcm is not among --method (mcm)"),
    (EVAL + ["--methods", "mcm,neglabel", "--param", "ngroups=5"],
     "mcm takes no parameter 'ngroups'; its parameters: temperature (scope it to a method"),
    (EVAL + ["--methods", "mcm", "--param", "neglabel.ngroups=5"], "neglabel is not among --methods"),
    (EVAL + ["--methods", "mcm", "--param", "mcmm.temperature=5"], "did you mean 'mcm'"),
    (EVAL + ["--methods", "mcm,glmcm", "--param", "temperature=2", "--param", "glmcm.temperature=3"],
     "'temperature' of glmcm is already set by --param temperature=2"),
    (["mine-negatives", "--model", "toyworld", "--classes", CLASSES, "--seed", "1", "--out", "n.txt"],
     "--seed sets the grouping a saved detector scores with"),
])
def test_param_mistakes_are_one_line_before_the_model(capsys, argv, needle):
    assert needle in _err(capsys, argv)


def test_bad_value_checked_by_the_detector_is_one_line(world, tmp_path, capsys):
    err = _err(capsys, SCORE[:5] + ["--images", str(world / "imgs"), "--out", str(tmp_path / "o.csv"),
                                    "--param", "temperature=-1"])
    assert "temperature must be a finite number > 0, got -1" in err


def test_params_are_read_from_the_signatures():
    assert list(method_params("mcm")) == ["temperature"]
    assert list(method_params("glmcm")) == ["temperature", "lam"]
    assert {"ngroups", "seed", "percentile", "ratio", "temperature"} <= set(method_params("csp"))
    assert not {"encoder", "classes", "templates", "cache", "prompts", "no"} & set(method_params("neglabel"))
