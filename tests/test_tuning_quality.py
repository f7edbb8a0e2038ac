"""Quality floors of few-shot prompt learning on the toy world, the training split, and the few-shot notebook.

The floors are values measured with this exact configuration (CPU, fp32) minus a margin of 0.03. They are a
reduced form of ``benchmarks/toyworld_prompts.py`` (one seed, 4 shots, all else the reference's), whose table
shows that, in the toy world, prompts learned with the reference settings stay below zero-shot MCM; these floors
guard against regressions of the trainers, the learned text path and the scoring, not against that finding.
"""
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import vlmood
from vlmood.toyworld import ID_SHAPES, benchmark
from vlmood.toyworld.fewshot import DISTRACTOR_SHAPES, UNSEEN_SHAPES, cluttered_image, few_shot_images, few_shot_source
from vlmood.toyworld.world import World
from vlmood.tuning import CoOp, LoCoOp

CLASSES = list(ID_SHAPES)
MARGIN = 0.03
# (split, trainer, init): {score: {metric: measured}}, seed 0, 4 shots of a 32-per-class pool, 50 epochs, 8 views,
# evaluated on toyworld.benchmark(n=300, seed=2024)
MEASURED = {
    ("cluttered", "CoOp", None): {"mcm": {"acc": 0.640, "near_auroc": 0.740, "far_auroc": 0.721},
                                  "glmcm": {"acc": 0.640, "near_auroc": 0.745, "far_auroc": 0.751}},
    ("cluttered", "LoCoOp", None): {"mcm": {"acc": 0.627, "near_auroc": 0.744, "far_auroc": 0.726},
                                    "glmcm": {"acc": 0.627, "near_auroc": 0.748, "far_auroc": 0.750}},
    ("clean", "CoOp", "a photo of a"): {"mcm": {"acc": 0.977, "near_auroc": 0.930, "far_auroc": 1.000},
                                        "glmcm": {"acc": 0.977, "near_auroc": 0.899, "far_auroc": 1.000}},
}


@pytest.fixture(scope="module")
def enc():
    return vlmood.load_encoder("toyworld")


@pytest.fixture(scope="module")
def bench(enc):
    b = benchmark(n=300, seed=2024)
    return b, b.extract(enc, local=True, cache=False, progress=False)


@pytest.mark.parametrize("split,method,init", list(MEASURED))
def test_learned_prompt_quality_floors(enc, bench, split, method, init):
    b, feats = bench
    cls = {"CoOp": CoOp, "LoCoOp": LoCoOp}[method]
    prompts = cls(enc, CLASSES, seed=0, init=init).fit(few_shot_source(0, 32, split), shots=4, epochs=50,
                                                       progress=False)
    detectors = {"mcm": {"method": "mcm", "prompts": prompts}, "glmcm": {"method": "glmcm", "prompts": prompts}}
    report = b.run(enc, detectors, features=feats, progress=False)
    for score, expected in MEASURED[(split, method, init)].items():
        got = {"acc": report.id_accuracy[score], "near_auroc": report.metric(score, "other shapes", "auroc"),
               "far_auroc": report.metric(score, "empty backgrounds", "auroc")}
        for metric, value in expected.items():
            assert got[metric] >= value - MARGIN, (split, method, score, metric, got)


# ------------------------------------------------------------------------------------------- the training split
def test_few_shot_split_is_deterministic_balanced_and_labelled():
    a_imgs, a_labels = few_shot_images(3, 4, "cluttered")
    b_imgs, b_labels = few_shot_images(3, 4, "cluttered")
    c_imgs, _ = few_shot_images(4, 4, "cluttered")
    assert a_labels == b_labels == [c for c in CLASSES for _ in range(4)]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a_imgs, b_imgs))
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a_imgs, c_imgs))
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in a_imgs)
    src = few_shot_source(3, 2, "clean")
    assert src.labels == [c for c in CLASSES for _ in range(2)]
    assert not set(DISTRACTOR_SHAPES) & set(UNSEEN_SHAPES) and not set(DISTRACTOR_SHAPES) & set(CLASSES)
    with pytest.raises(ValueError, match="kind must be one of"):
        few_shot_images(0, 1, "messy")


def test_cluttered_image_puts_the_two_objects_in_different_quadrants():
    """Rendering each object alone on a flat background, its pixels fall (mostly) in one quadrant, not the other's."""
    class Flat(World):
        def _background(self, kind):
            return np.full((64, 64, 3), 128.0, np.float32)

    for seed in range(20):
        img = cluttered_image(Flat(seed, shapes=["star"]), "star").astype(int)
        changed = np.abs(img - 128).sum(axis=2) > 30
        quads = [changed[:32, :32], changed[:32, 32:], changed[32:, :32], changed[32:, 32:]]
        counts = sorted((q.sum() for q in quads), reverse=True)
        assert counts[1] > 40 and counts[2] < 0.15 * counts[1], counts  # two occupied quadrants, the rest nearly empty


# ------------------------------------------------------------------------------------------- the notebook
def test_few_shot_notebook_runs(tmp_path, monkeypatch):
    """Executes notebooks/few_shot.ipynb's code cells in order (IPython's display stubbed without Jupyter)."""
    path = Path(__file__).parent.parent / "notebooks" / "few_shot.ipynb"
    nb = json.loads(path.read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    shown = []
    try:
        import IPython.display  # noqa: F401
    except ImportError:
        fake = types.ModuleType("IPython.display")
        fake.Image = lambda filename: filename
        fake.display = shown.append
        ipython = types.ModuleType("IPython")
        ipython.get_ipython = lambda: None
        ipython.version_info = (9, 0)
        monkeypatch.setitem(sys.modules, "IPython", ipython)
        monkeypatch.setitem(sys.modules, "IPython.display", fake)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "few_shot.ipynb", "exec"), scope)
    figure = tmp_path / "locoop-selection.png"
    assert figure.is_file() and figure.stat().st_size < 100_000
    assert (tmp_path / "locoop.safetensors").is_file()
    assert set(scope["selected"]) == {"zero-shot", "LoCoOp"}
    assert all(s.shape == (6, 4) for s in scope["selected"].values())
    assert scope["report"].metric("glmcm", "empty backgrounds", "auroc") > 0.99  # zero-shot GL-MCM, as measured
