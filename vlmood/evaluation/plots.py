"""Figures of a benchmark :class:`~vlmood.evaluation.Report`, and of what a detector sees in a few images.

Every function returns a :class:`matplotlib.figure.Figure` drawn with the object-oriented API on its own Agg
canvas: pyplot and matplotlib's global backend are never touched, so a notebook's inline plotting keeps working
whatever is saved. A returned figure shows inline in Jupyter (it has ``_repr_png_``) and saves with
``fig.savefig(path)``. Names (methods, sets, classes, ids) are shown literally: ``$`` never starts mathtext.

- :func:`comparison`: AUROC and FPR95 of every method on every OOD set (grouped bars).
- :func:`histograms`: one method's score densities, ID vs each OOD set, with the threshold at 95% TPR.
- :func:`roc`: one axes per OOD set, the ROC curve of every method on it.
- :func:`top_labels`: a few images with their top ID classes (and NegLabel/CSP's top negative labels).
- :func:`mistakes`: the ID images a method scores lowest and the OOD images it scores highest.

This module imports matplotlib; :mod:`vlmood.evaluation` imports it only when a plot is asked for.
"""
from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .._io import atomic_write_bytes, printable
from ..errors import InvalidInputError
from .report import TPR, Report, _plain

DPI = 100
"""Resolution of saved and inline PNGs."""


class ReportFigure(Figure):
    """A :class:`~matplotlib.figure.Figure` on an Agg canvas that Jupyter shows as a PNG without pyplot."""

    def _repr_png_(self) -> bytes:
        return to_png(self)


def _figure(**kw: Any) -> ReportFigure:
    fig = ReportFigure(layout="constrained", **kw)
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure, dpi: int = DPI, tag: str | None = None) -> bytes:
    """The PNG bytes of ``fig``, rendered with the Agg canvas (no pyplot, no global backend). Figures without
    pictures get a 256-colour palette: plots have few colours, and the files (and notebooks that show them) get 2-4x
    smaller; figures that show images (galleries) keep full colour. ``tag``: written as the PNG text chunk
    ``vlmood-figure`` (what :meth:`Report.save <vlmood.evaluation.Report.save>` reads to keep unchanged figures)."""
    from PIL import Image, PngImagePlugin

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"vlmood-figure": tag} if tag is not None else None)
    if any(ax.images for ax in fig.axes):
        return buf.getvalue()
    buf.seek(0)
    out = io.BytesIO()
    info = None
    if tag is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("vlmood-figure", tag)
    with Image.open(buf) as im:
        im.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(out, format="PNG", optimize=True,
                                                                               pnginfo=info)
    return out.getvalue()


class Figures(dict):
    """``{name: Figure}`` as :meth:`Report.plot <vlmood.evaluation.Report.plot>` returns it.

    As a notebook cell's last line it shows every figure inline (``_repr_html_`` embeds their PNGs);
    ``figs["comparison"]`` is one figure; :meth:`save` writes ``<name>.png`` for each.
    """

    def _repr_html_(self) -> str:
        parts = []
        for name, fig in self.items():
            data = base64.b64encode(to_png(fig)).decode("ascii")
            parts.append(f"<figure style='margin: 0 0 1em 0'><figcaption><code>{html.escape(printable(name))}"
                         f"</code></figcaption><img src='data:image/png;base64,{data}'/></figure>")
        return "\n".join(parts)

    def save(self, folder: str | os.PathLike, tags: Mapping[str, str] | None = None) -> dict[str, Path]:
        """Write each figure to ``folder/<name>.png`` (atomically); returns ``{name: path}``. ``tags``: per name, the
        text stored in the PNG's ``vlmood-figure`` chunk (see :func:`to_png`)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out = {}
        for name, fig in self.items():
            out[name] = folder / f"{name}.png"
            atomic_write_bytes(out[name], to_png(fig, tag=(tags or {}).get(name)))
        return out


def _ood_names(report: Report) -> list[str]:
    return [n for g in report.groups.values() for n in g]


def _check_method(report: Report, method: str) -> None:
    if method not in report.scores:
        raise InvalidInputError(f"no method {method!r} in the report; methods: {list(report.scores)}")


# ---------------------------------------------------------------------------------------------- report figures
def comparison(report: Report) -> ReportFigure:
    """AUROC (higher is better) and FPR95 (lower is better), in percent, of every method on every OOD set: two
    axes (AUROC left, FPR95 right), each with one row of horizontal bars per method (report order, top to bottom)
    and one bar per OOD set, labelled with its value; ``ax.containers[j]`` holds OOD set ``j``'s bars. The AUROC
    axis starts at 50 (chance) unless a value is lower."""
    names, methods = _ood_names(report), list(report.scores)
    height = 0.8 / max(1, len(names))
    fig = _figure(figsize=(11, 1.3 + 0.22 * len(methods) * max(len(names), 2)))
    axes = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(methods))[::-1]
    for ax, key, label in ((axes[0], "auroc", "AUROC (%) ↑"), (axes[1], "fpr95", "FPR95 (%) ↓")):
        lows = []
        for j, n in enumerate(names):
            vals = np.array([100 * report.metric(m, n, key) for m in methods])
            bars = ax.barh(y - (j - (len(names) - 1) / 2) * height, vals, height, label=_plain(n))
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
            lows.append(vals.min())
        lo = min(50.0, 10 * np.floor(min(lows) / 10)) if key == "auroc" else 0.0
        ax.set_xlim(lo, 100 + 0.12 * (100 - lo))  # room for the value labels
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [_plain(m) for m in methods])
    axes[0].set_ylabel("method")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(4, len(names)),
               fontsize=8, title="OOD set", title_fontsize=8)
    fig.suptitle(_plain(report.name), fontsize=10)
    return fig


def histograms(report: Report, method: str) -> ReportFigure:
    """Score densities of ``method``: one axes per OOD set with the ID scores and that set's, and the report's
    threshold at 95% TPR (``report.thresholds[method]``) as a dashed vertical line whose legend entry gives its
    value. y axis: density (each histogram integrates to 1)."""
    _check_method(report, method)
    names, s = _ood_names(report), report.scores[method]
    thr = report.thresholds.get(method)
    fig = _figure(figsize=(4 * len(names), 3.3))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        both = np.concatenate([s["ID"], s[name]])
        if both.size:
            lo, hi = float(both.min()), float(both.max())
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
            # one filled step outline per histogram (not 40 bars): the same area, drawn in about half the time
            ax.hist(s["ID"], bins=bins, alpha=0.6, density=True, histtype="stepfilled",
                    label=_plain(f"ID ({len(s['ID'])})"))
            ax.hist(s[name], bins=bins, alpha=0.6, density=True, histtype="stepfilled",
                    label=_plain(f"{name} ({len(s[name])})"))
        if thr is not None:
            ax.axvline(thr, color="black", ls="--", lw=1, label=f"threshold @{100 * TPR:.0f}% TPR = {thr:.4g}")
        ax.set_title(_plain(f"{name}: AUROC {100 * report.metric(method, name, 'auroc'):.1f}"))
        ax.set_xlabel(_plain(f"{method} score (higher = more ID)"))
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    return fig


def roc(report: Report) -> ReportFigure:
    """ROC curves (FPR on OOD vs TPR on ID): one axes per OOD set, every method's curve on it (legend: method and
    AUROC in percent), and the chance diagonal (no legend entry)."""
    from ..metrics import roc_curve

    names = _ood_names(report)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig = _figure(figsize=(4.2 * cols, 4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        for m, s in report.scores.items():
            fpr, tpr = roc_curve(s["ID"], s[name])
            ax.plot(fpr, tpr, label=_plain(f"{m} ({100 * report.metric(m, name, 'auroc'):.1f})"))
        ax.plot([0, 1], [0, 1], ls=":", c="gray", label="_chance")
        ax.set_xlabel("FPR (OOD accepted)")
        ax.set_ylabel("TPR (ID kept)")
        ax.set_title(_plain(f"ROC, {name}"))
        ax.legend(fontsize=8, loc="lower right", title="method (AUROC)", title_fontsize=8)
    for ax in axes[len(names):]:
        ax.set_axis_off()
    return fig


# ---------------------------------------------------------------------------------------------- images
def _short(s: Any, n: int = 28) -> str:
    text = printable(str(s))
    base = os.path.basename(text.rstrip("/\\")) or text
    return base if len(base) <= n else "…" + base[-(n - 1):]


def _show(ax: Any, im: Any) -> None:
    """Draw an image (PIL or a ``[3, H, W]`` tensor, min-max scaled) without ticks."""
    if hasattr(im, "detach"):
        a = im.detach().float().cpu().numpy().transpose(1, 2, 0)
        im = (a - a.min()) / (a.max() - a.min() + 1e-12)
    ax.imshow(np.asarray(im))
    ax.set_xticks([])
    ax.set_yticks([])


def _barh(ax: Any, names: list[str], values: np.ndarray, xlabel: str, fmt: str) -> None:
    y = np.arange(len(names))[::-1]  # the highest on top
    ax.barh(y, values, color="tab:blue")
    ax.set_yticks(y, [_plain(n) for n in names], fontsize=8)
    for yi, v in zip(y, values):
        ax.text(v, yi, " " + fmt.format(v), va="center", fontsize=7)
    ax.set_xlabel(xlabel, fontsize=8)


def top_labels(detector: Any, images: Any, k: int = 5, max_images: int = 6) -> ReportFigure:
    """For each of the first ``max_images`` images (anything ``detector.encoder.encode_images`` takes: paths, a
    folder, PIL images, a ``[N, 3, H, W]`` batch): the image with the detector's score, its ``k`` most likely ID
    classes, and for detectors with negative labels (NegLabel, CSP: ``negatives_``) the ``k`` negative labels most
    similar to it.

    ID class probabilities are CLIP's zero-shot ones over the ID classes only,
    ``softmax(logit_scale * cos(image, class))`` with the detector's class embeddings (``detector.similarities``)
    and the encoder's logit scale; negative labels are ranked by their cosine similarity. One row per image:
    columns image, ID classes[, negative labels].
    """
    import torch

    from ..data import load_image
    from ..encoders.base import image_items

    if getattr(detector, "needs_images", False) or not hasattr(detector, "similarities"):
        raise InvalidInputError(f"top_labels needs a detector over an image encoder (MCM, NegLabel, ...), got "
                                f"{type(detector).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInputError(f"k must be an integer >= 1, got {k!r}")
    if isinstance(images, torch.Tensor):
        pics: list[Any] = list(images[:max_images])
        titles = [f"image {i}" for i in range(len(pics))]
        batch: Any = images[:max_images]
    else:
        items = image_items(images)[:max_images]
        pics = [load_image(x) for x in items]
        titles = [_short(os.fsdecode(x)) if isinstance(x, (str, bytes, os.PathLike)) else f"image {i}"
                  for i, x in enumerate(items)]
        batch = pics
    if not pics:
        raise InvalidInputError("top_labels: no images given")
    g, loc = detector._features(batch, None)
    scores = detector.score_features(g, loc)
    sims = detector.similarities(g).double()
    probs = torch.softmax(detector.encoder.logit_scale * sims, dim=-1).numpy()
    negs = getattr(detector, "negatives_", None)
    neg_sims = (g.float() @ detector.negative_features.T.float()).numpy() if negs else None
    thr = getattr(detector, "threshold_", None)
    cols = 3 if neg_sims is not None else 2
    fig = _figure(figsize=(3.6 * cols, 2.3 * len(pics)))
    axes = fig.subplots(len(pics), cols, squeeze=False, width_ratios=[0.7] + [1.0] * (cols - 1))
    kc = min(k, probs.shape[1])
    for i, row in enumerate(axes):
        _show(row[0], pics[i])
        verdict = "" if thr is None else (" (ID)" if scores[i] >= thr else " (OOD)")
        row[0].set_title(_plain(f"{titles[i]}\nscore {scores[i]:.4g}{verdict}"), fontsize=8)
        top = np.argsort(-probs[i], kind="stable")[:kc]
        _barh(row[1], [detector.classes[c] for c in top], probs[i][top], "p(class), ID classes only", "{:.2f}")
        row[1].set_xlim(0, 1.15)
        if neg_sims is not None:
            kn = min(k, neg_sims.shape[1])
            top = np.argsort(-neg_sims[i], kind="stable")[:kn]
            _barh(row[2], [negs[j][0] for j in top], neg_sims[i][top], "cosine similarity", "{:.3f}")
            lo, hi = min(0.0, float(neg_sims[i][top].min())), max(0.0, float(neg_sims[i][top].max()))
            row[2].set_xlim(lo, hi + 0.2 * (hi - lo or 1.0))  # room for the value labels
    axes[0][1].set_title(f"top {kc} ID classes", fontsize=9)
    if neg_sims is not None:
        axes[0][2].set_title(f"top {min(k, neg_sims.shape[1])} negative labels", fontsize=9)
    return fig


def _sources(sources: Any) -> Mapping[str, Any]:
    from .benchmark import Benchmark

    if isinstance(sources, Benchmark):
        return {"ID": sources.id, **{n: s for g in sources.ood.values() for n, s in g.items()}}
    if not isinstance(sources, Mapping):
        raise InvalidInputError(f"sources must map set names ('ID' and each OOD set) to image sources, or be the "
                                f"Benchmark the report came from; got {type(sources).__name__}")
    return sources


def mistakes(report: Report, method: str, sources: Any, k: int = 4) -> ReportFigure:
    """``method``'s worst mistakes: the ``k`` ID images it scores lowest (top row) and the ``k`` OOD images, over
    every OOD set, it scores highest (bottom row), each titled with its set, id and score (ties: report order).

    ``sources``: ``{set name: image source}`` (anything :func:`vlmood.data.as_source` accepts; ``"ID"`` and the
    OOD set names) or the :class:`~vlmood.evaluation.Benchmark` the report came from. Images are found by the
    report's per-image ``ids`` (a repeated id: its n-th occurrence); a report without per-image ids (built from
    ``scores`` only) is matched by position. An id missing from its source raises :class:`InvalidInputError`.
    """
    from ..data import as_source

    _check_method(report, method)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInputError(f"k must be an integer >= 1, got {k!r}")
    given = _sources(sources)
    ids, full = report._per_image()
    s = full[method]
    ood = []  # (score, set, position)
    for name in _ood_names(report):
        ood += [(float(v), name, j) for j, v in enumerate(s[name]) if np.isfinite(v)]
    id_pos = [j for j in np.argsort(s["ID"], kind="stable") if np.isfinite(s["ID"][j])][:k]
    order = sorted(range(len(ood)), key=lambda i: -ood[i][0])[:k]
    picks = [[(float(s["ID"][j]), "ID", int(j)) for j in id_pos], [ood[i] for i in order]]
    opened: dict[str, Any] = {}

    def image(name: str, j: int) -> Any:
        if name not in given:
            raise InvalidInputError(f"sources has no set {name!r} (given: {list(given)}); give every set of the "
                                    "report or the Benchmark it came from")
        if name not in opened:
            opened[name] = as_source(given[name])
        src = opened[name]
        if not report.all_scores:
            i = j
        else:
            key = ids[name][j]
            where = [i for i, x in enumerate(src.ids) if x == key]
            nth = ids[name][:j].count(key)
            if nth >= len(where):
                raise InvalidInputError(f"image {printable(key)!r} of set {name!r} is not in the source given for "
                                        f"it ({printable(src.name)}); pass the sources the report was made from")
            i = where[nth]
        if i >= len(src):
            raise InvalidInputError(f"set {name!r}: image {j} is beyond its source ({len(src)} images)")
        return src.load(i)

    cols = max(1, max(len(p) for p in picks))
    thr = report.thresholds.get(method)
    fig = _figure(figsize=(2.4 * cols, 6.0))
    tail = "" if thr is None else f" (threshold @{100 * TPR:.0f}% TPR = {thr:.4g})"
    fig.suptitle(_plain(f"{method}: worst mistakes{tail}"), fontsize=10)
    subs = fig.subfigures(2, 1)
    for sub, row, what in zip(subs, picks, ("ID images scored lowest", "OOD images scored highest")):
        sub.suptitle(what, fontsize=9)
        axes = sub.subplots(1, cols, squeeze=False)[0]
        for ax, (score, name, j) in zip(axes, row):
            _show(ax, image(name, j))
            ax.set_title(_plain(f"{name}: {_short(ids[name][j], 20)}\nscore {score:.4g}"), fontsize=8)
        for ax in axes[len(row):]:
            ax.set_axis_off()
    return fig
