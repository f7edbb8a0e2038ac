"""Benchmark results: a tidy table, exported as Markdown, CSV and JSON, with score histograms and ROC curves."""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..text.cache import atomic_write_bytes

METRICS = ("fpr95", "auroc", "aupr_in", "aupr_out", "autc")
_HEAD = {"fpr95": "FPR95 ↓", "auroc": "AUROC ↑", "aupr_in": "AUPR-In ↑", "aupr_out": "AUPR-Out ↑", "autc": "AUTC ↓"}


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


@dataclass
class Report:
    """Results of :meth:`Benchmark.run`.

    ``rows``: one dict per (method, group, dataset) with ``fpr95, auroc, aupr_in, aupr_out, autc, n_id, n_ood``;
    a group with several OOD sets also gets a ``dataset == "mean"`` row. ``id_accuracy``: per method, the
    zero-shot accuracy on labelled ID images (None without labels). ``scores``: per method, the score
    arrays of ``"ID"`` and each OOD set. ``skipped``: ``(set, image id, reason)`` for unreadable images.
    """

    name: str
    rows: list[dict[str, Any]]
    id_accuracy: dict[str, float | None]
    scores: dict[str, dict[str, np.ndarray]]
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    def metric(self, method: str, dataset: str, key: str, group: str | None = None) -> float:
        """One number, e.g. ``report.metric("mcm", "textures", "auroc")`` (``dataset="mean"`` needs ``group``)."""
        for r in self.rows:
            if r["method"] == method and r["dataset"] == dataset and (group is None or r["group"] == group):
                return float(r[key])
        raise KeyError(f"no result for method={method!r}, dataset={dataset!r}, group={group!r}")

    def summary(self) -> str:
        methods = list(self.scores)
        n_ood = sum(v for k, v in self.counts.items() if k != "ID")
        best = max(methods, key=lambda m: np.mean([r["auroc"] for r in self.rows
                                                    if r["method"] == m and r["dataset"] != "mean"]))
        return (f"{self.name}: {len(methods)} method(s) on {self.counts.get('ID', 0)} ID and {n_ood} OOD images "
                f"({len(self.skipped)} skipped) in {self.seconds:.1f}s; best mean AUROC: {best}")

    # ------------------------------------------------------------------ table exports
    def to_markdown(self) -> str:
        out = [f"# {self.name}", ""]
        out.append(f"ID images: {self.counts.get('ID', 0)}; OOD sets: "
                   + ", ".join(f"{n} ({self.counts.get(n, 0)})" for g in self.groups.values() for n in g) + ".")
        out.append("Scores are higher for more in-distribution inputs; ID is the positive class.")
        out += ["", "## Summary (mean over each group's OOD sets)", ""]
        groups = list(self.groups)
        head = ["method"] + [f"{g} FPR95 ↓" for g in groups] + [f"{g} AUROC ↑" for g in groups] + ["ID acc ↑"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in self.scores:
            cells = [m]
            for key in ("fpr95", "auroc"):
                for g in groups:
                    ds = "mean" if len(self.groups[g]) > 1 else self.groups[g][0]
                    cells.append(f"{100 * self.metric(m, ds, key, g):.2f}")
            acc = self.id_accuracy.get(m)
            cells.append("n/a" if acc is None else f"{100 * acc:.2f}")
            out.append("| " + " | ".join(cells) + " |")
        out += ["", "## All OOD sets (percent)", ""]
        head = ["method", "group", "dataset"] + [_HEAD[k] for k in METRICS]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            out.append("| " + " | ".join([r["method"], r["group"], r["dataset"]]
                                         + [f"{100 * r[k]:.2f}" for k in METRICS]) + " |")
        if self.skipped:
            out += ["", f"## Skipped images ({len(self.skipped)})", ""]
            out += [f"- `{s}` {i}: {msg}" for s, i, msg in self.skipped]
        return "\n".join(out) + "\n"

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        buf = io.StringIO()
        cols = ["method", "group", "dataset", *METRICS, "id_accuracy", "n_id", "n_ood"]
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({**{k: r[k] for k in cols if k in r}, "id_accuracy": self.id_accuracy.get(r["method"])})
        text = buf.getvalue()
        if path is not None:
            atomic_write_bytes(Path(path), text.encode())
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.rows, "id_accuracy": self.id_accuracy, "counts": self.counts,
                "groups": self.groups, "seconds": self.seconds,
                "skipped": [{"set": s, "id": i, "error": e} for s, i, e in self.skipped]}

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            atomic_write_bytes(Path(path), text.encode())
        return text

    # ------------------------------------------------------------------ plots
    def plot(self, folder: str | os.PathLike) -> list[Path]:
        """Per method: ``hist_<method>.png`` (ID vs each OOD set) and ``roc_<method>.png``. Returns the paths."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        from ..metrics import roc_curve

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        ood_names = [n for g in self.groups.values() for n in g]
        for m, s in self.scores.items():
            fig, axes = plt.subplots(1, len(ood_names), figsize=(4 * len(ood_names), 3.2), squeeze=False)
            for ax, name in zip(axes[0], ood_names):
                lo = min(s["ID"].min(), s[name].min())
                hi = max(s["ID"].max(), s[name].max())
                bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
                ax.hist(s["ID"], bins=bins, alpha=0.6, density=True, label=f"ID ({len(s['ID'])})")
                ax.hist(s[name], bins=bins, alpha=0.6, density=True, label=f"{name} ({len(s[name])})")
                ax.set_title(f"{name}: AUROC {100 * self.metric(m, name, 'auroc'):.1f}")
                ax.set_xlabel(f"{m} score (higher = more ID)")
                ax.legend(fontsize=8)
            fig.tight_layout()
            paths.append(folder / f"hist_{_slug(m)}.png")
            fig.savefig(paths[-1], dpi=100)
            plt.close(fig)

            fig, ax = plt.subplots(figsize=(4.2, 4))
            for name in ood_names:
                fpr, tpr = roc_curve(s["ID"], s[name])
                ax.plot(fpr, tpr, label=f"{name} ({100 * self.metric(m, name, 'auroc'):.1f})")
            ax.plot([0, 1], [0, 1], ls=":", c="gray")
            ax.set_xlabel("FPR (OOD accepted)")
            ax.set_ylabel("TPR (ID kept)")
            ax.set_title(f"ROC, {m}")
            ax.legend(fontsize=8, loc="lower right")
            fig.tight_layout()
            paths.append(folder / f"roc_{_slug(m)}.png")
            fig.savefig(paths[-1], dpi=100)
            plt.close(fig)
        return paths

    def save(self, folder: str | os.PathLike, plots: bool = True) -> dict[str, Path]:
        """Write ``report.md``, ``results.csv``, ``results.json`` (and the plots) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out = {"report": folder / "report.md", "csv": folder / "results.csv", "json": folder / "results.json"}
        atomic_write_bytes(out["report"], self.to_markdown().encode())
        self.to_csv(out["csv"])
        self.to_json(out["json"])
        if plots:
            for p in self.plot(folder):
                out[p.stem] = p
        return out
