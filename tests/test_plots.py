"""Report figures (comparison, histograms, ROC, top labels, worst mistakes), thresholds and method descriptions:
each checked against an independent computation on small synthetic reports built directly from ``Report(...)``."""
from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

import vlmood
from vlmood.data import MemorySource
from vlmood.errors import InvalidInputError
from vlmood.evaluation import Benchmark, Report, describe_detector, plots
from vlmood.evaluation.benchmark import DESCRIPTIONS
from vlmood.evaluation.report import metric_rows
from vlmood.metrics import evaluate

SETS = {"near": ["close"], "far": ["empty", "noise"]}
NAMES = ["close", "empty", "noise"]
METHODS = ["mcm", "energy", "$m$"]


def hand_threshold(x) -> float:
    """The largest score t (brute force) that at least 95% of the finite scores reach (>= t)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return float(max(t for t in x if np.mean(x >= t) >= 0.95))


def solid(i: int, j: int) -> Image.Image:
    """A small image whose pixels say which one it is (set j, image i)."""
    return Image.fromarray(np.full((6, 6, 3), (i, 40 * j, 7), dtype=np.uint8))


@pytest.fixture
def report():
    """3 methods, 3 OOD sets in 2 groups; per-image ids and scores with a NaN (an excluded image) per set."""
    rng = np.random.default_rng(0)
    sizes = {"ID": 23, "close": 11, "empty": 9, "noise": 7}
    ids = {n: [f"{n}[{i}]" for i in range(k)] for n, k in sizes.items()}
    full = {}
    for j, m in enumerate(METHODS):
        full[m] = {n: rng.normal(1.0 if n == "ID" else 0.2 * j, 1, k) for n, k in sizes.items()}
        full[m]["ID"][3] = np.nan
        full[m]["noise"][0] = np.nan
    scores = {m: {n: a[np.isfinite(a)] for n, a in s.items()} for m, s in full.items()}
    return Report(name="synthetic $x$", rows=metric_rows(scores, SETS), id_accuracy={m: None for m in METHODS},
                  scores=scores, counts=sizes, groups=SETS, ids=ids, all_scores=full)


def sources():
    return {n: MemorySource([solid(i, j) for i in range(k)], name=n)
            for j, (n, k) in enumerate({"ID": 23, "close": 11, "empty": 9, "noise": 7}.items())}


def test_comparison_has_a_bar_per_method_and_set(report):
    fig = plots.comparison(report)
    assert isinstance(fig, Figure)
    auroc, fpr = fig.axes[:2]
    assert "AUROC" in auroc.get_xlabel() and "FPR95" in fpr.get_xlabel()
    assert [t.get_text() for t in auroc.get_yticklabels()] == ["mcm", "energy", r"\$m\$"]  # top to bottom
    for ax, key in ((auroc, "auroc"), (fpr, "fpr95")):
        assert len(ax.containers) == len(NAMES)
        for name, bars in zip(NAMES, ax.containers):
            by_y = sorted(bars.patches, key=lambda p: -p.get_y())  # top bar first = first method
            want = [100 * evaluate(report.scores[m]["ID"], report.scores[m][name])[key] for m in METHODS]
            np.testing.assert_allclose([p.get_width() for p in by_y], want, atol=1e-9)
    plots.to_png(fig)  # renders


def test_histograms_mark_the_threshold_on_a_density_axis(report):
    fig = plots.histograms(report, "energy")
    assert len(fig.axes) == len(NAMES)
    t = hand_threshold(report.all_scores["energy"]["ID"])
    assert report.thresholds["energy"] == t
    for ax, name in zip(fig.axes, NAMES):
        assert ax.get_ylabel() == "density"
        line = [ln for ln in ax.get_lines() if ln.get_label().startswith("threshold")]
        assert len(line) == 1 and list(line[0].get_xdata()) == [t, t]
        assert f"threshold @95% TPR = {t:.4g}" in [x.get_text() for x in ax.get_legend().get_texts()]
        id_hist = ax.patches[0]  # densities: the ID histogram's filled outline encloses an area of 1
        x, y = id_hist.get_path().vertices.T
        assert 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) == pytest.approx(1.0)
        assert id_hist.get_label().startswith("ID (") and len(ax.patches) == 2
        assert name in ax.get_title()
    assert r"\$m\$" in plots.histograms(report, "$m$").axes[0].get_xlabel()  # shown literally, no mathtext
    with pytest.raises(InvalidInputError, match=r"no method 'knn' in the report; methods: \['mcm'"):
        plots.histograms(report, "knn")


def test_roc_has_one_axes_per_set_and_a_curve_per_method(report):
    fig = plots.roc(report)
    axes = [ax for ax in fig.axes if ax.axison]
    assert len(axes) == len(NAMES)
    for ax, name in zip(axes, NAMES):
        assert len(ax.get_legend().get_lines()) == len(METHODS)
        curves = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
        assert [ln.get_label().split(" (")[0] for ln in curves] == ["mcm", "energy", r"\$m\$"]
        s_id, s_ood = report.scores["energy"]["ID"], report.scores["energy"][name]
        ts = np.unique(np.r_[s_id, s_ood])[::-1]  # by hand: every distinct threshold, highest first
        want = np.array([(0.0, 0.0)] + [(np.mean(s_ood >= t), np.mean(s_id >= t)) for t in ts])
        got = np.c_[curves[1].get_xdata(), curves[1].get_ydata()]
        np.testing.assert_allclose(got, want)
        auc = 100 * evaluate(s_id, s_ood)["auroc"]
        assert curves[1].get_label() == f"energy ({auc:.1f})"


def test_mistakes_shows_the_lowest_id_and_highest_ood_images(report):
    k = 3
    fig = plots.mistakes(report, "mcm", sources(), k=k)
    full = report.all_scores["mcm"]
    idx = [i for i in np.argsort(np.where(np.isfinite(full["ID"]), full["ID"], np.inf))[:k]]
    ood = sorted(((v, n, i) for n in NAMES for i, v in enumerate(full[n]) if np.isfinite(v)), key=lambda x: -x[0])
    want = [(full["ID"][i], "ID", i) for i in idx] + ood[:k]
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 2 * k
    for ax, (score, name, i) in zip(shown, want):
        j = ["ID", *NAMES].index(name)
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), np.asarray(solid(i, j)))
        assert ax.get_title().startswith(f"{name}: {name}[{i}]") and f"score {score:.4g}" in ax.get_title()
    # a Benchmark stands for its sources
    bench = Benchmark(id=sources()["ID"], ood={g: {n: sources()[n] for n in ns} for g, ns in SETS.items()},
                      classes=["a", "b"])
    again = [ax for ax in plots.mistakes(report, "mcm", bench, k=k).axes if ax.images]
    for a, b in zip(shown, again):
        np.testing.assert_array_equal(np.asarray(a.images[0].get_array()), np.asarray(b.images[0].get_array()))
    wrong = {**sources(), "ID": MemorySource([solid(0, 0)] * 23, name="elsewhere")}
    with pytest.raises(InvalidInputError, match=r"image 'ID\[\d+\]' of set 'ID' is not in the source given for it "
                                                r"\(elsewhere\)"):
        plots.mistakes(report, "mcm", wrong)
    with pytest.raises(InvalidInputError, match="sources has no set 'ID'"):
        plots.mistakes(report, "mcm", {"close": sources()["close"]})


@pytest.fixture(scope="module")
def toy():
    enc = vlmood.load_encoder("toyworld", device="cpu")
    from vlmood import toyworld

    images, _ = toyworld.bench.load_images(5, 2)
    empty, _ = toyworld.bench.load_images(6, 1, empty=True)
    neg = vlmood.make_detector("neglabel", enc, list(toyworld.ID_SHAPES), lexicon=str(toyworld.lexicon_dir()),
                               ratio=0.5, ngroups=1)
    return enc, images + empty, neg


def test_top_labels_ranks_id_classes_and_negative_labels(toy):
    import torch

    enc, images, neg = toy
    k = 3
    fig = plots.top_labels(neg, images, k=k)
    assert len(fig.axes) == 3 * len(images)
    feats = enc.encode_images(images)
    probs = torch.softmax(enc.logit_scale * (feats @ neg.text_features.T).double(), dim=-1).numpy()
    cos = (feats @ neg.negative_features.T).numpy()
    words = [w for w, _ in neg.negatives_]
    for r in range(len(images)):
        img_ax, id_ax, neg_ax = fig.axes[3 * r : 3 * r + 3]
        np.testing.assert_array_equal(np.asarray(img_ax.images[0].get_array()), np.asarray(images[r]))
        for ax, values, names in ((id_ax, probs[r], neg.classes), (neg_ax, cos[r], words)):
            top = np.argsort(-values)[:k]
            bars = sorted(ax.patches, key=lambda p: -p.get_y())  # top to bottom
            assert [t.get_text() for t in sorted(ax.get_yticklabels(), key=lambda t: -t.get_position()[1])] == \
                [names[i] for i in top]
            np.testing.assert_allclose([p.get_width() for p in bars], values[top], rtol=1e-5, atol=1e-6)
        assert f"score {neg.score(images[r:r + 1])[0]:.4g}" in img_ax.get_title()
    mcm = vlmood.make_detector("mcm", enc, neg.classes)
    assert len(plots.top_labels(mcm, images[:1]).axes) == 2  # no negatives: image and ID classes
    with pytest.raises(InvalidInputError, match="top_labels needs a detector over an image encoder"):
        plots.top_labels(object(), images)


def test_plot_shows_inline_and_save_leaves_matplotlib_alone(report, tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    figs = report.plot()
    assert list(figs) == ["comparison", "hist_mcm", "hist_energy", "hist__m_", "roc"]
    assert all(isinstance(f, Figure) for f in figs.values())
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", figs._repr_html_())
    assert len(pngs) == len(figs)
    assert Image.open(io.BytesIO(base64.b64decode(pngs[0]))).size == Image.open(
        io.BytesIO(figs["comparison"]._repr_png_())).size
    before = matplotlib.get_backend()
    try:
        matplotlib.use("svg")  # the user's backend (Jupyter's inline one, say) must survive report.save
        plt.figure()
        open_figs = plt.get_fignums()
        paths = report.save(tmp_path)
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == open_figs
        after = report.plot()  # plotting after a save still works, in the same process
        assert plots.to_png(after["roc"])[:8] == b"\x89PNG\r\n\x1a\n"
        fig = plt.figure()  # and so does the user's own pyplot
        fig.gca().plot([0, 1])
        fig.canvas.draw()
        assert matplotlib.get_backend() == "svg"
    finally:
        plt.close("all")
        matplotlib.use(before)
    assert {p.name for p in tmp_path.glob("*.png")} == {f"{k}.png" for k in figs}
    assert {k: paths[k].name for k in figs} == {k: f"{k}.png" for k in figs}
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporary files
    small = {"mcm": {n: report.scores["mcm"][n] for n in ("ID", "close")}}
    small = Report(name="small", rows=metric_rows(small, {"near": ["close"]}), id_accuracy={}, scores=small,
                   groups={"near": ["close"]})
    figs = small.plot(tmp_path / "again")  # plot(folder) also writes each figure as <name>.png
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(f"{k}.png" for k in figs) == \
        ["comparison.png", "hist_mcm.png", "roc.png"]


def test_thresholds_are_saved_shown_recomputed_and_reloaded(report, tmp_path):
    want = {m: hand_threshold(report.all_scores[m]["ID"]) for m in METHODS}
    assert report.thresholds == want
    paths = report.save(tmp_path, plots=False)
    data = json.loads(paths["json"].read_text())
    assert data["thresholds"] == want and data["threshold_tpr"] == 0.95
    md = paths["report"].read_text()
    assert "| ID acc ↑ | threshold @95% TPR |" in md
    assert f"| mcm | {100 * report.metric('mcm', 'close', 'fpr95'):.2f} |" in md
    assert [ln for ln in md.splitlines() if ln.startswith("| energy |")][0].endswith(
        f"| n/a | {want['energy']:.6g} |")
    loaded = Report.load(tmp_path)
    assert loaded.thresholds == want and loaded.recompute().thresholds == want
    # a report saved before thresholds existed gets them from its per-image scores
    del data["thresholds"]
    paths["json"].write_text(json.dumps(data))
    assert Report.load(tmp_path).thresholds == want
    # a method with no finite ID score has no threshold
    nan = {**report.all_scores, "mcm": {**report.all_scores["mcm"], "ID": np.full(23, np.nan)}}
    assert Report(name="x", rows=[], id_accuracy={}, scores=nan, groups=SETS).thresholds["mcm"] is None


def test_descriptions_round_trip_and_are_listed_under_methods(report, tmp_path):
    assert "## Methods" not in report.to_markdown()  # none given: no section
    report.descriptions = {"energy": "Energy with $T = 1$ | the default.", "mcm": "MCM, zero-shot."}
    paths = report.save(tmp_path, plots=False)
    md = paths["report"].read_text()
    section = md.split("## Methods\n\n")[1].split("\n\n")[0].splitlines()
    assert section == ["- `mcm`: MCM, zero-shot.", "- `energy`: Energy with $T = 1$ | the default."]  # report order
    assert json.loads(paths["json"].read_text())["descriptions"] == report.descriptions
    assert Report.load(tmp_path).descriptions == report.descriptions


def test_benchmark_describes_each_detector(tiny):
    images = [Image.fromarray(np.full((32, 32, 3), c, dtype=np.uint8)) for c in ((200, 0, 0), (0, 0, 200)) * 3]
    bench = Benchmark(id=MemorySource(images, ["red", "blue"] * 3, name="id"),
                      ood={"g": MemorySource(images[:2], name="g")}, classes=["red", "blue"])
    report = bench.run(tiny, {"mcm": "mcm", "mcm cold": {"method": "mcm", "temperature": 0.5},
                              "energy": {"method": "energy", "logit_scale": 1.0}}, num_workers=0, progress=False)
    assert report.descriptions == {"mcm": DESCRIPTIONS["MCM"] + ".",
                                   "mcm cold": DESCRIPTIONS["MCM"] + "; temperature=0.5.",
                                   "energy": DESCRIPTIONS["Energy"] + "; logit_scale=1."}
    assert "- `mcm cold`: MCM (Ming et al., NeurIPS 2022)" in report.to_markdown()
    det = vlmood.make_detector("neglabel", tiny, ["red", "blue"], ratio=0.5, ngroups=1, seed=3)
    assert describe_detector(det) == DESCRIPTIONS["NegLabel"] + "; ratio=0.5, ngroups=1, seed=3."



def test_description_names_the_learned_prompts_file(tmp_path):
    from vlmood.tuning import LearnedPrompts
    from vlmood.tuning.learner import init_context

    enc = vlmood.load_encoder("toyworld", device="cpu")
    classes = ["circle", "square"]
    prompts = LearnedPrompts(classes, init_context(enc, 2, None, "a photo of a", csc=False, seed=0),
                             meta={"method": "locoop"})
    path = prompts.save(tmp_path / "my prompts.safetensors")
    det = vlmood.make_detector("mcm", enc, None, prompts=path, temperature=2.0)
    assert describe_detector(det) == (DESCRIPTIONS["MCM"] + "; temperature=2; learned locoop prompts from "
                                      "my prompts.safetensors.")
    det = vlmood.make_detector("mcm", enc, None, prompts=prompts)
    assert describe_detector(det) == DESCRIPTIONS["MCM"] + "; learned locoop prompts."


def test_save_keeps_figures_that_show_the_same_report_and_redraws_the_rest(report, tmp_path, monkeypatch):
    import copy
    import os

    report.save(tmp_path)
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pngs] == ["comparison.png", "hist__m_.png", "hist_energy.png", "hist_mcm.png", "roc.png"]
    key = report.figure_key()
    for p in pngs:
        with Image.open(p) as im:
            assert im.info["vlmood-figure"] == f"{key}:{p.stem}"
    state = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in pngs}
    drawn = []
    real = dict(plots.__dict__)
    for kind in ("comparison", "histograms", "roc"):
        monkeypatch.setattr(plots, kind, lambda r, *a, _k=kind: drawn.append(_k) or real[_k](r, *a))
    paths = report.save(tmp_path)  # the same report: nothing drawn, files untouched
    assert drawn == [] and {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in pngs} == state
    assert {k: v.name for k, v in paths.items() if k not in ("report", "csv", "json", "scores")} == \
        {p.stem: p.name for p in pngs}
    # a missing, a damaged and a foreign figure (no tag, or another figure's tag) are drawn again, alone
    (tmp_path / "roc.png").unlink()
    data = (tmp_path / "hist_mcm.png").read_bytes()
    (tmp_path / "hist_mcm.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (4, 4)).save(tmp_path / "comparison.png")
    os.replace(tmp_path / "hist_energy.png", tmp_path / "hist__m_.png")  # hist_energy's tag under hist__m_
    report.save(tmp_path)
    assert sorted(drawn) == ["comparison", "histograms", "histograms", "histograms", "roc"]
    for p in pngs:
        with Image.open(p) as im:
            assert im.info["vlmood-figure"] == f"{key}:{p.stem}"
            im.verify()
    # another report (one score changed, the name, a group, a threshold): every figure drawn again
    changed = copy.deepcopy(report)
    changed.scores["energy"]["noise"][1] += 1e-9
    variants = [changed]
    for field, value in (("name", "other"), ("groups", {"near": ["close"], "far": ["noise", "empty"]}),
                         ("thresholds", {**report.thresholds, "mcm": report.thresholds["mcm"] + 1e-12})):
        v = copy.deepcopy(report)
        setattr(v, field, value)
        variants.append(v)
    keys = {v.figure_key() for v in variants}
    assert len(keys) == len(variants) and key not in keys
    drawn.clear()
    changed.save(tmp_path)
    assert len(drawn) == 5


def test_figure_key_follows_the_matplotlib_style(report, tmp_path, monkeypatch):
    import matplotlib

    key = report.figure_key()
    with matplotlib.rc_context({"lines.linewidth": 7.0}):  # a style changed in this session
        assert report.figure_key() != key
    assert report.figure_key() == key
    monkeypatch.chdir(tmp_path)
    (tmp_path / "matplotlibrc").write_text("lines.linewidth: 5\n")  # a matplotlibrc that a new process would read
    assert report.figure_key() != key
    (tmp_path / "matplotlibrc").unlink()
    matplotlib.use(matplotlib.get_backend())  # the backend is not style: unchanged key
    assert report.figure_key() == key


def test_figure_key_is_the_same_with_or_without_matplotlib_imported(report, monkeypatch):
    import sys

    import matplotlib

    assert dict.items(matplotlib.rcParams) is not None
    with_mpl = report.figure_key()
    monkeypatch.delitem(sys.modules, "matplotlib")  # as in a fresh process that never drew
    assert report.figure_key() == with_mpl
