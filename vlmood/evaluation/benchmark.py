"""``Benchmark``: one ID set and groups of OOD sets; features are extracted once and scored by every detector."""
from __future__ import annotations

import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from ..detectors import Detector, make_detector
from ..encoders.base import Encoder
from ..errors import InvalidInputError
from ..features import Features, extract_features
from ..metrics import evaluate
from ..text.embed import CacheArg
from ..text.prompts import load_classes
from .report import Report

DetectorsArg = Sequence[Any] | Mapping[str, Any] | str


def map_labels(labels: Sequence[Any], classes: Sequence[str], source: str = "ID set") -> np.ndarray:
    """Map raw labels (class names, indices, or ImageFolder folder names) to class indices ``[N]``.

    Names are matched exactly (``_`` may stand for a space, as in CIFAR-100 folders). Integer labels (or digit strings) are indices. When no label is a class
    name but there are exactly ``C`` distinct labels (e.g. WordNet-id folders), they are mapped in sorted
    order, as torchvision's ImageFolder does. Anything else raises an error naming the unknown labels.
    """
    index = {c: i for i, c in enumerate(classes)}
    index.update({c.replace(" ", "_"): i for i, c in enumerate(classes) if c.replace(" ", "_") not in index})
    distinct = sorted({str(lb) for lb in labels})
    if all(isinstance(lb, (int, np.integer)) or (isinstance(lb, str) and lb.isdigit() and lb not in index)
           for lb in labels):
        ints = np.array([int(lb) for lb in labels])
        bad = sorted({int(v) for v in ints if not 0 <= v < len(classes)})
        if bad:
            raise InvalidInputError(f"{source} has label indices outside the {len(classes)} classes: {bad[:5]}")
        return ints
    unknown = [lb for lb in distinct if lb not in index]
    if not unknown:
        return np.array([index[str(lb)] for lb in labels])
    if len(unknown) == len(distinct) == len(classes):
        order = {lb: i for i, lb in enumerate(distinct)}  # ImageFolder convention: sorted folder names
        return np.array([order[str(lb)] for lb in labels])
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    raise InvalidInputError(
        f"{source} has labels outside the class list: {', '.join(repr(u) for u in unknown[:5])}{more}"
    )


def _normalise_ood(ood: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    if not ood:
        raise InvalidInputError("no OOD sets: give at least one, e.g. ood={'far': {'textures': 'dtd/images'}}")
    groups: dict[str, dict[str, Any]] = {}
    for key, value in ood.items():
        if isinstance(value, Mapping):
            if not value:
                raise InvalidInputError(f"OOD group {key!r} is empty")
            groups[key] = dict(value)
        else:
            groups.setdefault("ood", {})[key] = value
    names = [n for g in groups.values() for n in g]
    bad = [n for n in names if not str(n).strip() or n == "ID"]
    if bad:
        raise InvalidInputError(f"invalid OOD set name(s) {bad}: names must be non-empty and not 'ID' (the ID set's key)")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise InvalidInputError(f"OOD set names must be unique across groups; repeated: {dups}")
    return groups


class Benchmark:
    """An OOD benchmark: an ID image source, OOD sources in named groups, and the ID class names.

    Args:
        id: ID images (anything :func:`vlmood.data.as_source` accepts).
        ood: ``{"near": {"ssb_hard": SOURCE, ...}, "far": {...}}``, or a flat ``{"name": SOURCE}`` (group "ood").
        classes: ID class names (list, bundled name, file).
        templates: prompt templates for detectors built from names.
        name: shown in reports.
        on_error: ``"skip"`` lists unreadable images in the report instead of stopping.
    """

    def __init__(self, id: Any, ood: Mapping[str, Any], classes: Any, templates: Any = None,
                 name: str = "benchmark", on_error: str = "raise"):
        self.id = id
        self.ood = _normalise_ood(ood)
        self.classes = load_classes(classes)
        self.templates = templates
        self.name = name
        self.on_error = on_error

    @classmethod
    def from_suite(cls, suite: str, root: str, **kwargs: Any) -> "Benchmark":
        """A standard suite (see :func:`vlmood.evaluation.list_suites`) with data under ``root``."""
        from .suites import load_suite

        return load_suite(suite, root, **kwargs)

    def _detectors(self, encoder: Encoder, detectors: DetectorsArg) -> dict[str, Detector]:
        if isinstance(detectors, str):
            detectors = [d.strip() for d in detectors.split(",") if d.strip()]
        items = detectors.items() if isinstance(detectors, Mapping) else [(None, d) for d in detectors]
        out: dict[str, Detector] = {}
        for key, d in items:
            if isinstance(d, Detector):
                det = d
            elif isinstance(d, Mapping):  # {"label": {"method": "mcm", "temperature": 0.5}}
                kw = dict(d)
                det = make_detector(kw.pop("method", key), encoder, self.classes, templates=self.templates, **kw)
            else:
                det = make_detector(str(d), encoder, self.classes, templates=self.templates)
            label = key or det.name
            if label in out:
                raise InvalidInputError(f"two detectors are both named {label!r}; pass a dict to label them")
            out[label] = det
        if not out:
            raise InvalidInputError("no detectors to evaluate")
        return out

    def extract(self, encoder: Encoder, local: bool = False, cache: CacheArg = True, **kw: Any) -> dict[str, Features]:
        """Features of the ID set (key ``"ID"``) and of every OOD set, each image encoded once."""
        feats = {"ID": extract_features(encoder, self.id, local=local, cache=cache, on_error=self.on_error, **kw)}
        for group in self.ood.values():
            for name, src in group.items():
                feats[name] = extract_features(encoder, src, local=local, cache=cache, on_error=self.on_error, **kw)
        return feats

    def run(self, encoder: Encoder, detectors: DetectorsArg = ("mcm",), cache: CacheArg = True,
            batch_size: int | None = None, num_workers: int | None = None, progress: bool | None = None,
            features: Mapping[str, Features] | None = None) -> Report:
        """Score every set with every detector and compute the metrics.

        Images are encoded once (local patch features only when a detector needs them) and every detector
        scores the same :class:`Features`. ``features`` may pass precomputed ones (from :meth:`extract`).
        """
        t0 = time.perf_counter()
        dets = self._detectors(encoder, detectors)
        local = any(d.needs_local for d in dets.values())
        if local:
            encoder.require_local()  # before any image is encoded
        feats = dict(features) if features is not None else self.extract(
            encoder, local=local, cache=cache, batch_size=batch_size, num_workers=num_workers, progress=progress)
        id_feats = feats["ID"]
        id_labels = map_labels(id_feats.labels, self.classes) if id_feats.labels is not None else None

        rows: list[dict[str, Any]] = []
        scores: dict[str, dict[str, np.ndarray]] = {}
        accuracy: dict[str, float | None] = {}
        for label, det in dets.items():
            s = {"ID": det.score_features(id_feats)}
            accuracy[label] = (float(np.mean(det.classify_features(id_feats) == id_labels))
                               if id_labels is not None else None)
            for group, sets in self.ood.items():
                group_rows = []
                for name in sets:
                    s[name] = det.score_features(feats[name])
                    m = evaluate(s["ID"], s[name])
                    row = {"method": label, "group": group, "dataset": name, **m,
                           "n_id": len(id_feats), "n_ood": len(feats[name])}
                    rows.append(row)
                    group_rows.append(row)
                if len(group_rows) > 1:
                    mean = {k: float(np.mean([r[k] for r in group_rows]))
                            for k in ("auroc", "fpr95", "aupr_in", "aupr_out", "autc")}
                    rows.append({"method": label, "group": group, "dataset": "mean", **mean,
                                 "n_id": len(id_feats), "n_ood": sum(r["n_ood"] for r in group_rows)})
            scores[label] = s
        skipped = [(name, i, msg) for name, f in feats.items() for i, msg in f.errors]
        report = Report(name=self.name, rows=rows, id_accuracy=accuracy, scores=scores, skipped=skipped,
                        counts={k: len(v) for k, v in feats.items()}, groups={g: list(s) for g, s in self.ood.items()},
                        seconds=time.perf_counter() - t0)
        if progress is not False:
            print(report.summary(), file=sys.stderr)
        return report
