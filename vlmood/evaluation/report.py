"""Benchmark results: a tidy table, exported as Markdown, CSV and JSON, with figures (:mod:`.plots`)."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .._io import atomic_write_bytes, printable, read_text

if TYPE_CHECKING:
    from .plots import Figures

TPR = 0.95
"""The ID true-positive rate of ``Report.thresholds`` (and of FPR95)."""

METRICS = ("fpr95", "auroc", "aupr_in", "aupr_out", "autc")
_HEAD = {"fpr95": "FPR95 ↓", "auroc": "AUROC ↑", "aupr_in": "AUPR-In ↑", "aupr_out": "AUPR-Out ↑", "autc": "AUTC ↓"}


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in printable(s))


def _cell(s: Any) -> str:
    """A Markdown table cell: printable, with ``|`` escaped so a name cannot split the row."""
    return printable(str(s)).replace("|", "\\|")


def _plain(s: Any) -> str:
    """Text for a plot: printable, with ``$`` escaped so matplotlib does not parse a name as mathtext, and a leading
    ``_`` behind a zero-width space so matplotlib does not drop the name from a legend (``_x`` labels are hidden)."""
    text = printable(str(s)).replace("$", r"\$")
    return "\u200b" + text if text.startswith("_") else text


def _str_dict(value: Any, where: Any, key: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        from ..errors import InvalidInputError

        raise InvalidInputError(f"{where}: {key!r} must be an object of strings")
    return value


def unique_stems(labels: Any) -> dict[str, str]:
    """A file-name stem per label (:func:`_slug`), ``-2``, ``-3``... added where two labels would share one,
    compared case-insensitively (``MCM`` and ``mcm`` are one file on macOS and Windows)."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for label in labels:
        stem, k = _slug(label), 1
        while stem.casefold() in used:
            k += 1
            stem = f"{_slug(label)}-{k}"
        used.add(stem.casefold())
        out[label] = stem
    return out


def _clean(obj: Any) -> Any:
    """``obj`` with every string made printable (file names with undecodable bytes), for JSON."""
    if isinstance(obj, str):
        return printable(obj)
    if isinstance(obj, dict):
        return {_clean(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def metric_rows(scores: dict[str, dict[str, np.ndarray]], groups: dict[str, list[str]],
                excluded: dict[str, dict[str, int]] | None = None) -> list[dict[str, Any]]:
    """The report's rows from each method's finite scores per set (``"ID"`` and each OOD set): one row per
    (method, group, set) and a ``"mean"`` row per group of several sets. ``excluded``: per method (detectors that
    read images) and set, how many images were left out; adds ``n_id_excluded`` / ``n_ood_excluded``."""
    from ..metrics import evaluate

    excluded = excluded or {}
    rows: list[dict[str, Any]] = []
    for label, s in scores.items():
        for group, sets in groups.items():
            group_rows = []
            for name in sets:
                row = {"method": label, "group": group, "dataset": name, **evaluate(s["ID"], s[name]),
                       "n_id": len(s["ID"]), "n_ood": len(s[name])}
                if label in excluded:
                    row.update(n_id_excluded=excluded[label]["ID"], n_ood_excluded=excluded[label][name])
                rows.append(row)
                group_rows.append(row)
            if len(group_rows) > 1:
                mean = {k: float(np.mean([r[k] for r in group_rows])) for k in METRICS}
                rows.append({"method": label, "group": group, "dataset": "mean", **mean,
                             "n_id": len(s["ID"]), "n_ood": sum(r["n_ood"] for r in group_rows)})
    return rows


def _num(x: str) -> float:
    return float(x) if x != "" else float("nan")


def thresholds_of(scores: dict[str, dict[str, np.ndarray]]) -> dict[str, float | None]:
    """Per method, the score threshold that keeps 95% of ID images (:data:`TPR`):
    ``vlmood.metrics.threshold_at_tpr`` of its finite ID scores; None when it has none."""
    from ..metrics import threshold_at_tpr

    out: dict[str, float | None] = {}
    for m, s in scores.items():
        a = np.asarray(s["ID"], dtype=np.float64)
        a = a[np.isfinite(a)]
        out[m] = threshold_at_tpr(a, TPR) if a.size else None
    return out


_SOURCE_HASH: list[str] = []


def _source_hash() -> str:
    """A hash of the source of every vlmood module (read once per process): a figure drawn by other code (an edited
    checkout at the same version) is drawn again."""
    if not _SOURCE_HASH:
        root = Path(__file__).resolve().parents[1]
        h = hashlib.sha256()
        try:
            for path in sorted(root.rglob("*.py")):
                h.update(str(path.relative_to(root)).encode("utf-8", "surrogateescape") + b"\0")
                h.update(path.read_bytes())
        except OSError as e:  # pragma: no cover - an unreadable install: never matches, figures always drawn
            h.update(os.urandom(16) + repr(e).encode())
        _SOURCE_HASH.append(h.hexdigest())
    return _SOURCE_HASH[0]


_NOT_STYLE = ("backend", "backend_fallback", "interactive", "webagg.", "savefig.directory", "figure.max_open_warning")


def _style_key() -> str:
    """matplotlib's style as far as it can change between two saves: the ``matplotlibrc`` files it reads (read
    without importing matplotlib) and, when it is imported, the ``rcParams`` changed since it read them."""
    parts = []
    env = os.environ.get("MATPLOTLIBRC")
    # every folder matplotlib may take as its config folder, on any system (reading one too many only redraws)
    configs = [os.environ.get("MPLCONFIGDIR"),
               os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "matplotlib"),
               os.path.expanduser("~/.matplotlib"),
               os.path.join(os.environ["LOCALAPPDATA"], "matplotlib") if os.environ.get("LOCALAPPDATA") else None]
    for path in ([env, os.path.join(env, "matplotlibrc")] if env else []) + ["matplotlibrc"] + [
            os.path.join(c, "matplotlibrc") for c in configs if c]:
        try:
            with open(path, "rb") as f:
                parts.append(f"{path}\0".encode("utf-8", "surrogateescape") + f.read())
        except OSError:  # absent (or a folder): not read by matplotlib either
            continue
    mpl = sys.modules.get("matplotlib")
    rc, orig = getattr(mpl, "rcParams", None), getattr(mpl, "rcParamsOrig", None)
    changed: list[tuple[str, str]] = []  # the same (nothing) whether matplotlib is imported or not, when unchanged
    if isinstance(rc, dict) and isinstance(orig, dict):
        # dict's own methods: the stored values, without RcParams.__getitem__ (which resolves the backend, and may
        # import pyplot, for "backend")
        changed = sorted((k, repr(v)) for k, v in dict.items(rc)
                         if not k.startswith(_NOT_STYLE) and repr(dict.get(orig, k)) != repr(v))
    parts.append(repr(changed).encode())
    return repr([hashlib.sha256(x).hexdigest()[:16] for x in parts])


class Recomputed(NamedTuple):
    """What :meth:`Report.recompute` gives: the rows, the ID accuracy and the thresholds, per method."""

    rows: list[dict[str, Any]]
    id_accuracy: dict[str, float | None]
    thresholds: dict[str, float | None]


@dataclass(repr=False)
class Report:
    """Results of :meth:`Benchmark.run`.

    ``rows``: one dict per (method, group, dataset) with ``fpr95, auroc, aupr_in, aupr_out, autc, n_id, n_ood``;
    a group with several OOD sets also gets a ``dataset == "mean"`` row. ``id_accuracy``: per method, the
    zero-shot accuracy on labelled ID images (None without labels). ``scores``: per method, the score
    arrays of ``"ID"`` and each OOD set. ``skipped``: ``(set, image id, reason)`` for unreadable images.
    ``notes``: caveats shown in the report (e.g. why ID accuracy is n/a). ``invalid``: for detectors that ask a
    vision-language model (:class:`vlmood.lvlm.LVLMDetector`), per method and set ``{"images", "invalid", "rate",
    "excluded", "statuses"}``: how many responses were invalid, the excluded images (left out of the metrics and of
    ``scores``) and the count of each parse status; empty for CLIP-only runs (their reports are unchanged).

    Per-image data (saved as ``scores.csv``, read back by :meth:`load`): ``ids``: per set, the image ids;
    ``labels``: the ID images' class names (None when unlabelled); ``all_scores``: per method and set, one score per
    id (NaN: an image the method excluded or could not score); ``predictions``: per method, the predicted ID class
    name of each ID image (None: no prediction). ``provenance``: how the report was made (see ``results.json``).

    ``thresholds``: per method, the score that keeps 95% of the ID images (``threshold_at_tpr`` of its finite ID
    scores; None without any), computed from ``scores`` when not given. ``descriptions``: per method label, one
    sentence saying what the row is (:meth:`Benchmark.run` fills a default per detector; callers may replace
    them), shown in ``report.md`` under "Methods".
    """

    name: str
    rows: list[dict[str, Any]]
    id_accuracy: dict[str, float | None]
    scores: dict[str, dict[str, np.ndarray]]
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    invalid: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    ids: dict[str, list[str]] = field(default_factory=dict)
    labels: list[str | None] | None = None
    all_scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    predictions: dict[str, list[str | None]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, float | None] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.thresholds:
            self.thresholds = thresholds_of(self.scores)

    def metric(self, method: str, dataset: str, key: str, group: str | None = None) -> float:
        """One number, e.g. ``report.metric("mcm", "textures", "auroc")`` (``dataset="mean"`` needs ``group``)."""
        for r in self.rows:
            if r["method"] == method and r["dataset"] == dataset and (group is None or r["group"] == group):
                return float(r[key])
        raise KeyError(f"no result for method={method!r}, dataset={dataset!r}, group={group!r}")

    def __repr__(self) -> str:
        """One line (the per-image arrays would fill a notebook): see :meth:`summary`."""
        return f"<Report {self.summary()}>" if self.scores else f"<Report {printable(self.name)}: no methods>"

    def summary(self) -> str:
        methods = list(self.scores)
        n_ood = sum(v for k, v in self.counts.items() if k != "ID")
        best = max(methods, key=lambda m: np.mean([r["auroc"] for r in self.rows
                                                    if r["method"] == m and r["dataset"] != "mean"]))
        return (f"{self.name}: {len(methods)} method(s) on {self.counts.get('ID', 0)} ID and {n_ood} OOD images "
                f"({len(self.skipped)} skipped) in {self.seconds:.1f}s; best mean AUROC: {best}")

    # ------------------------------------------------------------------ table exports
    def _repr_markdown_(self) -> str:
        """Jupyter shows a report as its markdown tables."""
        return self.to_markdown()

    def to_markdown(self) -> str:
        out = [f"# {printable(self.name)}", ""]
        out.append(f"ID images: {self.counts.get('ID', 0)}; OOD sets: "
                   + ", ".join(f"{printable(n)} ({self.counts.get(n, 0)})" for g in self.groups.values() for n in g)
                   + ".")
        out.append("Scores are higher for more in-distribution inputs; ID is the positive class.")
        out += [f"Note: {printable(n)}." for n in self.notes]
        out += self._provenance_lines()
        out += ["", "## Summary (mean over each group's OOD sets)", ""]
        groups = list(self.groups)
        head = (["method"] + [f"{_cell(g)} FPR95 ↓" for g in groups] + [f"{_cell(g)} AUROC ↑" for g in groups]
                + ["ID acc ↑", f"threshold @{100 * TPR:.0f}% TPR"])
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in self.scores:
            cells = [_cell(m)]
            for key in ("fpr95", "auroc"):
                for g in groups:
                    ds = "mean" if len(self.groups[g]) > 1 else self.groups[g][0]
                    cells.append(f"{100 * self.metric(m, ds, key, g):.2f}")
            acc = self.id_accuracy.get(m)
            cells.append("n/a" if acc is None else f"{100 * acc:.2f}")
            thr = self.thresholds.get(m)
            cells.append("n/a" if thr is None else f"{thr:.6g}")
            out.append("| " + " | ".join(cells) + " |")
        if self.descriptions:
            out += ["", "## Methods", ""]
            order = [m for m in self.scores if m in self.descriptions]  # only rows the report has
            out += [f"- `{printable(m)}`: {printable(self.descriptions[m])}" for m in order]
        out += ["", "## All OOD sets (percent)", ""]
        head = ["method", "group", "dataset"] + [_HEAD[k] for k in METRICS]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            out.append("| " + " | ".join([_cell(r["method"]), _cell(r["group"]), _cell(r["dataset"])]
                                         + [f"{100 * r[k]:.2f}" for k in METRICS]) + " |")
        if self.invalid:
            out += ["", "## Invalid responses (vision-language model detectors)", "",
                    "Invalid responses are excluded from the metrics (NaN scores) or scored 0 (OOD), per the "
                    "detector's rule; rate = invalid / images.", ""]
            head = ["method", "set", "images", "invalid", "rate %", "excluded", "statuses"]
            out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for m, sets in self.invalid.items():
                for name, v in sets.items():
                    st = ", ".join(f"{k}: {c}" for k, c in v["statuses"].items())
                    out.append("| " + " | ".join([_cell(m), _cell(name), str(v["images"]), str(v["invalid"]),
                                                  f"{100 * v['rate']:.2f}", str(v["excluded"]), _cell(st)]) + " |")
        if self.skipped:
            out += ["", f"## Skipped images ({len(self.skipped)})", ""]
            out += [f"- `{printable(s)}` {printable(i)}: {printable(msg)}" for s, i, msg in self.skipped]
        return "\n".join(out) + "\n"

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        buf = io.StringIO()
        cols = ["method", "group", "dataset", *METRICS, "id_accuracy", "n_id", "n_ood"]
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({**{k: r[k] for k in cols if k in r}, "id_accuracy": self.id_accuracy.get(r["method"])})
        text = printable(buf.getvalue())
        if path is not None:
            atomic_write_bytes(Path(path), text.encode("utf-8"))
        return text

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "rows": self.rows, "id_accuracy": self.id_accuracy, "counts": self.counts,
               "groups": self.groups, "seconds": self.seconds, "notes": self.notes,
               "skipped": [{"set": s, "id": i, "error": e} for s, i, e in self.skipped]}
        if self.invalid:  # only runs with LVLM detectors: CLIP-only results keep their exact content
            out["invalid"] = self.invalid
        if self.provenance:
            out["provenance"] = self.provenance
        out["methods"] = list(self.scores)
        out["thresholds"] = self.thresholds  # per method, at threshold_tpr
        out["threshold_tpr"] = TPR
        out["descriptions"] = self.descriptions
        return _clean(out)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            atomic_write_bytes(Path(path), text.encode("utf-8"))
        return text

    def _provenance_lines(self) -> list[str]:
        """A short header (3 lines) saying how the report was made; none without provenance."""
        p = self.provenance
        if not p:
            return []
        enc = p.get("encoder") or {}
        cls = p.get("classes") or {}
        return ["", f"Made with vlmood {p.get('vlmood')} on {p.get('date')} in {p.get('seconds', 0.0):.1f}s: "
                    f"`{printable(p.get('command', ''))}`.",
                f"Encoder: {printable(enc.get('spec', 'none'))} (fingerprint {printable(enc.get('fingerprint'))}), "
                f"device {enc.get('device')}, precision {enc.get('precision')}.",
                f"Classes: {len(cls.get('names', []))} (sha256 {str(cls.get('sha256', ''))[:12]}); "
                f"per-image scores in scores.csv, full provenance in results.json."]

    # ------------------------------------------------------------------ per-image scores
    def _per_image(self) -> tuple[dict[str, list[str]], dict[str, dict[str, np.ndarray]]]:
        """Ids and full score arrays per set; reports built without per-image data fall back to ``scores``
        (ids ``0, 1, ...``)."""
        sets = ["ID", *(n for g in self.groups.values() for n in g)]
        if self.all_scores:
            return self.ids, self.all_scores
        ids = {n: [str(i) for i in range(len(next(iter(self.scores.values()))[n]))] for n in sets} \
            if self.scores else {}
        return ids, self.scores

    def scores_csv(self, path: str | os.PathLike | None = None) -> str:
        """Per-image scores: ``set, id, label, prediction`` then one score column per method (empty: excluded),
        then ``prediction:<method>`` for each further method whose predictions differ from the first one's."""
        ids, full = self._per_image()
        methods = list(self.scores)
        pred = {m: self.predictions.get(m) for m in methods}
        first = pred[methods[0]] if methods else None
        extra = [m for m in methods[1:] if pred[m] is not None and pred[m] != first]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["set", "id", "label", "prediction", *methods, *(f"prediction:{m}" for m in extra)])
        for name in ["ID", *(n for g in self.groups.values() for n in g)]:
            for k, i in enumerate(ids.get(name, [])):
                is_id = name == "ID"
                lab = self.labels[k] if is_id and self.labels is not None else None
                p = first[k] if is_id and first is not None else None
                vals = [full[m][name][k] for m in methods]
                w.writerow([name, i, lab or "", p or "", *("" if not np.isfinite(v) else repr(float(v)) for v in vals),
                            *((pred[m][k] or "") if is_id else "" for m in extra)])
        text = printable(buf.getvalue())
        if path is not None:
            atomic_write_bytes(Path(path), text.encode("utf-8"))
        return text

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Report":
        """A saved report (``results.json`` + ``scores.csv``) read back without any model; its rows are recomputed
        from the per-image scores (:meth:`recompute`)."""
        from ..errors import InvalidInputError

        folder = Path(folder)
        texts = {name: read_text(folder / name, "saved report file") for name in ("results.json", "scores.csv")}
        try:
            data = json.loads(texts["results.json"])
            lines = list(csv.reader(io.StringIO(texts["scores.csv"])))
        except (ValueError, csv.Error) as e:
            raise InvalidInputError(f"cannot read a saved report from {folder}: {e}") from None
        methods = data.get("methods", [])
        head, body = (lines[0], lines[1:]) if lines else ([], [])
        if head[:4] != ["set", "id", "label", "prediction"] or len(head) < 4 + len(methods):
            raise InvalidInputError(f"{folder / 'scores.csv'}: unexpected header {head[:6]}")
        extra = [h[len("prediction:"):] for h in head[4 + len(methods):]]
        sets = ["ID", *(n for g in data["groups"].values() for n in g)]
        ids: dict[str, list[str]] = {n: [] for n in sets}
        full: dict[str, dict[str, list[float]]] = {m: {n: [] for n in sets} for m in methods}
        labels: list[str | None] = []
        preds: dict[str, list[str | None]] = {m: [] for m in [*methods[:1], *extra]}
        for r in body:
            name = r[0]
            if name not in ids:
                raise InvalidInputError(f"{folder / 'scores.csv'}: unknown set {name!r}")
            ids[name].append(r[1])
            for j, m in enumerate(methods):
                full[m][name].append(_num(r[4 + j]))
            if name == "ID":
                labels.append(r[2] or None)
                if methods:
                    preds[methods[0]].append(r[3] or None)
                for j, m in enumerate(extra):
                    preds[m].append(r[4 + len(methods) + j] or None)
        for m in methods[1:]:  # methods without their own column predicted what the first one did
            preds.setdefault(m, list(preds[methods[0]]))
        all_scores = {m: {n: np.asarray(v, dtype=np.float64) for n, v in s.items()} for m, s in full.items()}
        rep = cls(name=data["name"], rows=data["rows"], id_accuracy=data["id_accuracy"],
                  scores={m: {n: a[np.isfinite(a)] for n, a in s.items()} for m, s in all_scores.items()},
                  skipped=[(s["set"], s["id"], s["error"]) for s in data.get("skipped", [])],
                  counts=data.get("counts", {}), groups=data["groups"], seconds=data.get("seconds", 0.0),
                  notes=data.get("notes", []), invalid=data.get("invalid", {}), ids=ids,
                  labels=labels if any(lb is not None for lb in labels) else None, all_scores=all_scores,
                  predictions=preds if any(p is not None for v in preds.values() for p in v) else {},
                  provenance=data.get("provenance", {}),
                  descriptions=_str_dict(data.get("descriptions", {}), folder / "results.json", "descriptions"))
        # thresholds are recomputed from the per-image scores (exact and cheap); a stored value that differs (an
        # edited or stale results.json) is named rather than shown as fact
        stored = data.get("thresholds") or {}
        if not isinstance(stored, dict):
            raise InvalidInputError(f"{folder / 'results.json'}: 'thresholds' must be an object, got "
                                    f"{type(stored).__name__}")
        differ = [m for m, t in rep.thresholds.items() if m in stored and not (
            stored[m] is None and t is None or isinstance(stored[m], (int, float)) and t is not None
            and abs(stored[m] - t) <= 1e-9 * max(1.0, abs(t)))]
        if differ:
            warnings.warn(f"{folder / 'results.json'}: stored thresholds of {', '.join(differ)} differ from those of "
                          "scores.csv; using the ones recomputed from scores.csv", stacklevel=2)
        return rep

    def recompute(self) -> Recomputed:
        """``(rows, id_accuracy, thresholds)`` computed again from the per-image scores, labels and predictions
        only (a :class:`Recomputed` named tuple)."""
        _, full = self._per_image()
        finite = {m: {n: a[np.isfinite(a)] for n, a in s.items()} for m, s in full.items()}
        excluded = {m: {n: int(np.count_nonzero(~np.isfinite(a))) for n, a in s.items()}
                    for m, s in full.items() if m in self.invalid}
        rows = metric_rows(finite, self.groups, excluded)
        acc: dict[str, float | None] = {}
        for m in full:
            pred = self.predictions.get(m)
            if self.labels is None or pred is None:
                acc[m] = None
                continue
            keep = np.isfinite(full[m]["ID"])
            acc[m] = float(np.mean([p == lb for p, lb, k in zip(pred, self.labels, keep) if k]))
        return Recomputed(rows, acc, thresholds_of(full))

    # ------------------------------------------------------------------ plots
    def plot(self, folder: str | os.PathLike | None = None) -> "Figures":
        """Every report figure, as :class:`~vlmood.evaluation.plots.Figures` (a dict of name -> matplotlib
        ``Figure`` that a notebook shows inline as a cell's last line):

        - ``"comparison"``: AUROC and FPR95 of every method on every OOD set (:func:`.plots.comparison`);
        - ``"hist_<method>"`` per method: ID vs each OOD set, density, threshold at 95% TPR
          (:func:`.plots.histograms`); ``<method>`` is the label with characters other than letters, digits,
          ``-_.`` replaced by ``_`` (``-2``, ``-3``... when two labels give the same name);
        - ``"roc"``: one axes per OOD set with every method's ROC curve (:func:`.plots.roc`).

        With ``folder``, also writes each as ``<name>.png`` there (as :meth:`save` does). Figures are drawn on
        their own Agg canvas: pyplot's state and the user's matplotlib backend are left untouched.
        """
        from . import plots

        figs = plots.Figures({name: draw() for name, draw in self._figure_makers().items()})
        if folder is not None:
            figs.save(folder)
        return figs

    def _figure_makers(self) -> dict[str, Any]:
        """``{figure name: function drawing it}`` for :meth:`plot`, in its order (matplotlib imported on call)."""
        def make(kind: str, *args: Any) -> Any:
            def draw() -> Any:
                from . import plots

                return getattr(plots, kind)(self, *args)

            return draw

        makers = {"comparison": make("comparison")}
        for m, stem in unique_stems(self.scores).items():  # two labels never overwrite each other's plots
            makers[f"hist_{stem}"] = make("histograms", m)
        makers["roc"] = make("roc")
        return makers

    def figure_key(self) -> str:
        """A hash of everything the report figures show and of what draws them: the name, the OOD groups, every
        method's scores per set (in order), the metric rows and the thresholds; vlmood's version and the source of
        every one of its modules; the matplotlib and Pillow versions; matplotlib's style: the ``matplotlibrc`` files
        it reads (``$MATPLOTLIBRC``, ``./matplotlibrc``, the user's config folder) and, when matplotlib is imported,
        every ``rcParams`` entry changed in this session (``matplotlib.style.use``...). :meth:`save` writes it into
        each figure's PNG (text chunk ``vlmood-figure``) and redraws only figures whose key differs."""
        from importlib import metadata

        from .. import __version__

        h = hashlib.sha256(b"vlmood-figures-v1\0")

        def add(text: str) -> None:
            data = text.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little") + data)

        add(repr(self.name))
        add(json.dumps(self.groups))
        add(json.dumps(self.rows, sort_keys=True, default=repr))
        add(json.dumps({m: (None if t is None else repr(float(t))) for m, t in self.thresholds.items()}))
        for m, sets in self.scores.items():
            add(repr(m))
            for n, a in sets.items():
                arr = np.ascontiguousarray(np.asarray(a, dtype=np.float64))
                add(f"{n!r}|{arr.shape}")
                h.update(arr.tobytes())
        add(__version__)
        add(_source_hash())
        add(_style_key())
        for dist in ("matplotlib", "pillow"):
            try:
                add(f"{dist}={metadata.version(dist)}")
            except metadata.PackageNotFoundError:  # pragma: no cover
                add(f"{dist}=absent")
        return h.hexdigest()[:32]

    def save(self, folder: str | os.PathLike, plots: bool = True) -> dict[str, Path]:
        """Write ``report.md``, ``results.csv``, ``results.json``, ``scores.csv`` (per-image scores, see
        :meth:`scores_csv`; :meth:`load` reads the report back) and, with ``plots``, the figures of :meth:`plot`
        (``comparison.png``, ``hist_<method>.png`` per method, ``roc.png``) into ``folder``. Returns
        ``{"report", "csv", "json", "scores", <figure name>...: path}``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out = {"report": folder / "report.md", "csv": folder / "results.csv", "json": folder / "results.json",
               "scores": folder / "scores.csv"}
        atomic_write_bytes(out["report"], self.to_markdown().encode("utf-8"))
        self.to_csv(out["csv"])
        self.scores_csv(out["scores"])
        self.to_json(out["json"])
        if plots:
            out.update(self._save_figures(folder))
        return out

    def _save_figures(self, folder: Path) -> dict[str, Path]:
        """Write :meth:`plot`'s figures as ``<name>.png``, each tagged with :meth:`figure_key` and its name. A PNG
        already there with that tag, and intact (its chunks' checksums verified), shows exactly this report with this
        code: it is kept, not drawn again (matplotlib is not even imported when every figure is kept)."""
        from PIL import Image

        key = self.figure_key()
        out: dict[str, Path] = {}
        todo = {}
        for name, draw in self._figure_makers().items():
            path = out[name] = folder / f"{name}.png"
            tag = f"{key}:{name}"
            try:
                with Image.open(path) as im:
                    same = im.format == "PNG" and im.info.get("vlmood-figure") == tag
                    if same:
                        im.verify()
            except Exception:  # missing, unreadable or damaged: drawn again
                same = False
            if not same:
                todo[name] = (draw, tag)
        if todo:
            from .plots import Figures

            Figures({name: draw() for name, (draw, _) in todo.items()}).save(
                folder, tags={name: tag for name, (_, tag) in todo.items()})
        return out
