"""Regression tests for defects found by reviewing the issue-11 fixes: repeated CLI options, RNG side effects of
loading a model, infinite features, detectors that do not match a benchmark, registry replacement, odd seeds,
float64 batches, Ctrl-C and environment failures in the CLI, unknown words in class names."""
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import vlmood
from vlmood import MCM, Benchmark, Energy, MaxLogit, NegLabel
from vlmood.cli import main
from vlmood.encoders import load_encoder, parse_spec, registry
from vlmood.errors import EncoderLoadError, InvalidInputError
from vlmood.testing import TINY_ARCH

CLASSES = ["red square", "green circle", "blue triangle"]


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    for folder in ("a/x", "a/y", "b"):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
    return tmp_path


def test_repeated_single_value_options_are_refused(images, capsys, monkeypatch):
    """Before: the last --classes/--images/--threshold silently won and the run scored the wrong set."""
    monkeypatch.setattr("vlmood.encoders.load_encoder", lambda *a, **k: pytest.fail("model loaded"))
    code = main(["score", "--model", "toyworld", "--classes", "circle,square", "--classes", "star,heart",
                 "--images", str(images / "a"), "--out", str(images / "o.csv")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--classes given twice ('circle,square' and 'star,heart')" in err
    code = main(["score", "--model", "toyworld", "--classes", "circle,square", "--images", str(images / "a"),
                 "--threshold", "0.1", "--threshold", "0.9", "--out", str(images / "o.csv")])
    assert code == 2 and "--threshold given twice" in capsys.readouterr().err
    # repeatable options still repeat
    code = main(["eval", "--model", "toyworld", "--classes", "x,y", "--id", str(images / "a"), "--ood",
                 f"b={images / 'b'}", "--ood", f"c={images / 'b'}", "--report", str(images / "r"), "--id", "z"])
    assert code == 2 and "--id given twice" in capsys.readouterr().err


def test_loading_a_model_leaves_every_rng_alone(monkeypatch):
    """Before: loading any open_clip model called torch.manual_seed, which reseeds every CUDA device too."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: calls.append(s))
    monkeypatch.setattr(torch, "manual_seed", lambda s: calls.append(("manual_seed", s)))
    torch.random.default_generator.manual_seed(1234)
    expected = torch.rand(3)
    torch.random.default_generator.manual_seed(1234)
    a = load_encoder(f"open_clip:{TINY_ARCH}/none:seed=5")
    load_encoder("toyworld")
    assert calls == []
    assert torch.equal(torch.rand(3), expected)
    b = load_encoder(f"open_clip:{TINY_ARCH}/none:seed=5")
    assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize("cls", [MCM, Energy, MaxLogit])
def test_infinite_features_are_ood(tiny, cls):
    """Before: a +inf feature gave Energy/MaxLogit an infinite score, predicted in-distribution."""
    det = cls(tiny, CLASSES)
    g = torch.nn.functional.normalize(torch.randn(4, tiny.embed_dim), dim=-1)
    g[1, 0] = float("inf")
    g[2, 3] = float("-inf")
    s = det.score_features(g)
    assert np.isnan(s[1]) and np.isnan(s[2]) and np.isfinite(s[[0, 3]]).all()
    pred = det.predict_features(g, threshold=float(np.min(s[[0, 3]])) - 1.0)
    assert pred.is_ood.tolist() == [False, True, True, False]


def test_infinite_features_are_ood_for_neglabel(tiny, tmp_path):
    lex = tmp_path / "lex"
    lex.mkdir()
    (lex / "noun.things.txt").write_text("\n".join(f"thing{i}" for i in range(40)))
    det = NegLabel(tiny, CLASSES, lexicon=str(lex), ratio=0.5, ngroups=2)
    g = torch.nn.functional.normalize(torch.randn(3, tiny.embed_dim), dim=-1)
    g[0, 0] = float("inf")
    s = det.score_features(g)
    assert np.isnan(s[0]) and np.isfinite(s[1:]).all()


def test_benchmark_refuses_detectors_of_another_encoder_or_class_order(tiny, images):
    """Before: scores compared features of one model with texts of another (ID acc 0.08), or a reversed class
    list (ID acc 0.0), without a word."""
    bench = Benchmark(id=str(images / "a"), ood={"b": str(images / "b")}, classes=["x", "y"])
    other = load_encoder(f"open_clip:{TINY_ARCH}/none:seed=9")
    with pytest.raises(InvalidInputError, match="was built on .*seed=9.*images are encoded with"):
        bench.run(tiny, {"mcm": MCM(other, ["x", "y"])}, progress=False)
    with pytest.raises(InvalidInputError, match="other ID classes"):
        bench.run(tiny, {"mcm": MCM(tiny, ["y", "x"])}, progress=False)
    report = bench.run(tiny, {"mcm": MCM(tiny, ["x", "y"])}, progress=False, cache=False)
    assert report.id_accuracy["mcm"] is not None


def test_registry_never_silently_replaces(monkeypatch):
    monkeypatch.setattr(registry, "_models", dict(registry._models))
    spec = lambda: parse_spec(f"open_clip:{TINY_ARCH}/none:seed=7")  # noqa: E731
    registry.register_model("mine", spec)
    registry.register_model("mine", spec)  # the same resolver again is fine
    with pytest.raises(InvalidInputError, match="'mine' is already registered"):
        registry.register_model("mine", lambda: spec())
    registry.register_model("mine", lambda: parse_spec(f"open_clip:{TINY_ARCH}/none:seed=8"), replace=True)
    assert parse_spec("mine").seed == 8
    # a user's own 'toyworld' stands when the built-in provider registers later (if_absent)
    registry._models.pop("toyworld", None)
    registry.register_model("toyworld", spec)
    import vlmood.toyworld.model as tw
    registry.register_model(tw.NAME, tw.spec, if_absent=True)
    assert parse_spec("toyworld").seed == 7


@pytest.mark.parametrize("seed", ["²", "99999999999999999999999", "-1", "1.5"])
def test_odd_seeds_are_one_line_errors(seed):
    with pytest.raises(InvalidInputError, match=r"none:seed=N' with N a non-negative integer below"):
        parse_spec(f"open_clip:{TINY_ARCH}/none:seed={seed}")


def test_float64_batches_are_accepted(tiny):
    """Before: a float64 batch (numpy's default) crashed inside the model with a dtype RuntimeError."""
    x = torch.randn(2, 3, 32, 32)
    ref = tiny.encode_images(x)
    torch.testing.assert_close(tiny.encode_images(x.double()), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(tiny.encode_images(x.double().numpy()), ref, rtol=0, atol=1e-6)


def test_cli_ctrl_c_and_environment_failures(images, capsys, monkeypatch):
    """Ctrl-C: one line and exit 130 (before: a KeyboardInterrupt traceback). A model that cannot be obtained is
    an environment failure: exit 1, not the usage status 2."""
    args = ["score", "--model", "toyworld", "--classes", "circle,square", "--images", str(images / "a"),
            "--out", str(images / "o.csv")]

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("vlmood.encoders.load_encoder", interrupt)
    assert main(args) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmood score: interrupted") and len(err.splitlines()) == 1

    def unavailable(*a, **k):
        raise EncoderLoadError("could not obtain the weights of open_clip:X/openai: offline")

    monkeypatch.setattr("vlmood.encoders.load_encoder", unavailable)
    assert main(args) == 1
    assert capsys.readouterr().err.strip() == "vlmood score: error: could not obtain the weights of open_clip:X/openai: offline"


def test_cli_on_a_latin1_console(images, tmp_path):
    """Before: printing the report table's arrows on a Latin-1 console crashed after all the compute."""
    cmd = [sys.executable, "-m", "vlmood.cli", "eval", "--model", "toyworld", "--classes", "x,y", "--id",
           str(images / "a"), "--ood", f"b={images / 'b'}", "--report", str(tmp_path / "rep"), "--no-cache"]
    env = {**__import__("os").environ, "PYTHONIOENCODING": "latin-1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr.decode("latin-1")[-2000:]
    assert b"FPR95 \\u2193" in out.stdout and b"Traceback" not in out.stderr


def test_unknown_words_in_a_class_name_warn():
    """Before: one out-of-vocabulary class among known ones ('apple' in the toy world) was scored silently."""
    toy = load_encoder("toyworld")
    with pytest.warns(UserWarning, match=r"1 ID class name\(s\) contain words unknown to the tokenizer.*'apple'"):
        MCM(toy, ["circle", "apple"]).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MCM(toy, ["circle", "square"]).fit()
        MCM(vlmood.testing.tiny_encoder(), ["circle", "zorblat"]).fit()  # BPE: no unknown words, no warning
