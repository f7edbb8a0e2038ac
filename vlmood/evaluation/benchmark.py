"""``Benchmark``: one ID set and groups of OOD sets; features are extracted once and scored by every detector."""
from __future__ import annotations

import datetime
import hashlib
import inspect
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .._io import printable
from ..data import as_source, map_labels
from ..detectors import Detector, make_detector
from ..encoders.base import Encoder
from ..errors import InvalidInputError
from ..features import Features, LocalReducer, extract_features, local_plan, score_detector
from ..text.embed import CacheArg
from ..text.prompts import load_classes
from .report import Report, metric_rows

DetectorsArg = Sequence[Any] | Mapping[str, Any] | str


RESERVED_NAMES = ("ID", "mean")
"""Names an OOD set cannot take: ``"ID"`` keys the ID set's scores, ``"mean"`` a group's mean row."""

NO_LABELS = ("ID set has no labels: ID accuracy not computed "
             "(give an ImageFolder layout or a manifest label column)")


def _normalise_ood(ood: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{group: {name: source}}`` from nested or flat (group ``"ood"``) input; names must be unique and not
    reserved, so no set can silently replace another."""
    if not ood:
        raise InvalidInputError("no OOD sets: give at least one, e.g. ood={'far': {'textures': 'dtd/images'}}")
    entries: list[tuple[str, str, Any]] = []
    for key, value in ood.items():
        if isinstance(value, Mapping):
            if not value:
                raise InvalidInputError(f"OOD group {key!r} is empty")
            entries += [(key, name, src) for name, src in value.items()]
        else:
            entries.append(("ood", key, value))
    bad = [n for _, n, _ in entries if not isinstance(n, str) or not n.strip() or n in RESERVED_NAMES]
    if bad:
        raise InvalidInputError(f"invalid OOD set name(s) {bad}: names must be non-empty strings other than "
                                "'ID' (the ID set's key) and 'mean' (a group's mean row)")
    bad = sorted({g for g, _, _ in entries if not isinstance(g, str) or not g.strip() or g == "ID"}, key=str)
    if bad:
        raise InvalidInputError(f"invalid OOD group name(s) {bad}: names must be non-empty strings other than 'ID'")
    names = [n for _, n, _ in entries]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise InvalidInputError(f"OOD set names must be unique across groups; repeated: {dups}")
    groups: dict[str, dict[str, Any]] = {}
    for group, name, src in entries:
        groups.setdefault(group, {})[name] = src
    return groups


def _keys(ids: Sequence[str]) -> list[tuple[str, int]]:
    """``(id, occurrence)`` per image, so repeated ids (a manifest listing a file twice) stay distinct."""
    seen: dict[str, int] = {}
    out = []
    for i in ids:
        seen[i] = seen.get(i, -1) + 1
        out.append((i, seen[i]))
    return out


def _union_keys(*lists: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The keys of every list, in first-seen order (the feature and image paths may keep different images)."""
    out = dict.fromkeys(k for keys in lists for k in keys)
    return list(out)


def _align(keys: list[tuple[str, int]], src: list[tuple[str, int]], values: np.ndarray, fill: float) -> np.ndarray:
    """``values`` (one per ``src`` key) placed at each of ``keys``; ``fill`` where a key has no value."""
    pos = {k: j for j, k in enumerate(src)}
    out = np.full(len(keys), fill, dtype=np.float64)
    for j, k in enumerate(keys):
        if k in pos:
            out[j] = values[pos[k]]
    return out


def _device_name(encoder: Any) -> str:
    """``str(encoder.device)``; a deferred encoder answers without resolving (importing torch for) its device."""
    name = getattr(encoder, "device_name", None)
    return name if isinstance(name, str) else str(getattr(encoder, "device", None))


def _simple(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    return isinstance(v, (list, tuple)) and all(x is None or isinstance(x, (bool, int, float, str)) for x in v)


def _hyper(det: Any) -> dict[str, Any]:
    """A detector's hyper-parameters read generically: its public attributes of simple types (long lists are
    summarised by their length and sha256); fitted attributes (trailing ``_``) and the class list are left out."""
    out: dict[str, Any] = {}
    for k, v in sorted(vars(det).items()):
        if k.startswith("_") or k.endswith("_") or k == "classes" or not _simple(v):
            continue
        if isinstance(v, (list, tuple)) and len(v) > 50:
            v = {"len": len(v), "sha256": hashlib.sha256(json.dumps(list(v)).encode()).hexdigest()}
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


DESCRIPTIONS = {
    "MCM": "MCM (Ming et al., NeurIPS 2022): max softmax of image-class cosines / T",
    "GLMCM": "GL-MCM (Miyai et al., 2023): MCM of the whole image plus lam × the best MCM over local patches",
    "Energy": "Energy (Liu et al., NeurIPS 2020): T × logsumexp of the image-class logits / T",
    "MaxLogit": "MaxLogit (Hendrycks et al., ICML 2022): the largest image-class logit",
    "NegLabel": "NegLabel (Jiang et al., ICLR 2024): the ID classes' share of a softmax over ID and negative labels "
                "mined from a lexicon",
    "CSP": "CSP (Chen et al., NeurIPS 2024): NegLabel with negatives from a conjugated semantic pool "
           "(nouns, adjective + superclass phrases)",
    "CLIPN:ctw": "CLIPN-CTW (Wang et al., ICCV 2023): 'yes' probability of the best class against a trained 'no' "
                 "text tower",
    "CLIPN:atd": "CLIPN-ATD (Wang et al., ICCV 2023): 'yes' probabilities against a trained 'no' text tower, "
                 "weighted by the class probabilities",
    "LVLMDetector": "LVLM (after ReGuide, Kim et al., ICLR 2025): the highest ID-class confidence a "
                    "vision-language model states",
}
"""The start of a detector's default description in a report, by class name (CLIPN: by its score rule)."""

_NOT_SHOWN = {"encoder", "encoder_or_model", "client", "classes", "templates", "neg_templates", "cache", "prompts",
              "negatives", "no", "score", "progress", "chunk_size"}


def _defaults(cls: type) -> dict[str, Any]:
    """The keyword defaults of ``cls.__init__`` and of its bases' (a subclass's own default wins)."""
    out: dict[str, Any] = {}
    for c in reversed(cls.__mro__):
        init = c.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        out.update({p.name: p.default for p in params if p.default is not inspect.Parameter.empty})
    return out


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return f"{len(v)} items"
    if isinstance(v, str) and ("/" in v or os.sep in v):
        return os.path.basename(v.rstrip("/" + os.sep)) or v
    return str(v)


def describe_detector(det: Any) -> str:
    """One sentence saying what a detector's report row is: the method and its paper (:data:`DESCRIPTIONS`;
    other classes: the first sentence of their docstring), then the hyper-parameters that differ from the
    defaults and where learned prompts came from, e.g. ``"NegLabel (Jiang et al., ICLR 2024): ...; ratio=0.5,
    ngroups=1."``"""
    cls = type(det)
    key = f"CLIPN:{det.score_rule}" if hasattr(det, "score_rule") else cls.__name__
    base = DESCRIPTIONS.get(key)
    if base is None:
        doc = " ".join((cls.__doc__ or "").split())
        base = doc.split(". ")[0].rstrip(".")[:120] or cls.__name__
    params = []
    for name, default in _defaults(cls).items():
        if name in _NOT_SHOWN or name.startswith("_") or not hasattr(det, name):
            continue
        v = getattr(det, name)
        if name == "pool" and v == getattr(cls, "pool_name", None):
            continue
        if _simple(v) and v != default:
            params.append(f"{name}={_show(v)}")
    parts = [base] + ([", ".join(params)] if params else [])
    prompts = getattr(det, "prompts", None)
    if prompts is not None and hasattr(prompts, "meta"):
        method = prompts.meta.get("method")
        what = f"learned {method} prompts" if method else "learned prompts"
        file = getattr(det, "prompts_file", None)
        parts.append(f"{what} from {file.name}" if file is not None else what)
    return "; ".join(parts) + "."


@dataclass
class _Loaded:
    """A set's decoded images, their ids and labels (None: unlabelled set), and ``(id, error)`` of skipped ones."""

    images: list[Any]
    ids: list[str]
    labels: list[Any] | None
    errors: list[tuple[str, str]]


class Benchmark:
    """An OOD benchmark: an ID image source, OOD sources in named groups, and the ID class names.

    Args:
        id: ID images (anything :func:`vlmood.data.as_source` accepts).
        ood: ``{"near": {"ssb_hard": SOURCE, ...}, "far": {...}}``, or a flat ``{"name": SOURCE}`` (group "ood").
        classes: ID class names (list, bundled name, file).
        templates: prompt templates for detectors built from names (and from dict entries without their own
            ``templates`` or ``prompts``).
        name: shown in reports.
        on_error: ``"skip"`` lists unreadable images in the report instead of stopping.
    """

    def __init__(self, id: Any, ood: Mapping[str, Any], classes: Any, templates: Any = None,
                 name: str = "benchmark", on_error: str = "raise"):
        if on_error not in ("raise", "skip"):
            raise InvalidInputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
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

    def open_sources(self) -> "Benchmark":
        """Resolve every image source now (scan folders, read manifests), so a missing or empty path fails
        before any model is loaded. Returns ``self``."""
        self.id = as_source(self.id)
        self.ood = {g: {n: as_source(s) for n, s in sets.items()} for g, sets in self.ood.items()}
        return self

    def build_detectors(self, encoder: Encoder | None, detectors: DetectorsArg) -> dict[str, Any]:
        """``{report label: detector object}`` as :meth:`run` builds them from ``detectors`` (same forms), checked
        against ``encoder`` and the benchmark's classes. Pass the result to :meth:`run` to keep the fitted objects
        (e.g. to calibrate and save each one after the run)."""
        return self._detectors(encoder, detectors)

    def _detectors(self, encoder: Encoder | None, detectors: DetectorsArg) -> dict[str, Detector]:
        if isinstance(detectors, str):
            detectors = [d.strip() for d in detectors.split(",") if d.strip()]
        items = detectors.items() if isinstance(detectors, Mapping) else [(None, d) for d in detectors]
        out: dict[str, Detector] = {}
        for key, d in items:
            if getattr(d, "needs_images", False):  # an LVLM detector: scores images, not features
                det = d
                if list(det.classes) != list(self.classes):
                    raise InvalidInputError(
                        f"detector {key or det.name!r} has other ID classes (or another order) than the benchmark: "
                        f"{det.classes[:3]}... vs {self.classes[:3]}...")
            elif encoder is None:
                raise InvalidInputError(f"detector {key or d!r} scores image features: pass the encoder to run() "
                                        "(only detectors that read images, such as LVLMDetector, run without one)")
            elif isinstance(d, Detector):
                det = d
                # a detector built elsewhere must share the images' encoder and the benchmark's classes, or its
                # scores and accuracy would silently compare features and texts of different models or class orders
                if det.encoder is not encoder and det.encoder.fingerprint != encoder.fingerprint:
                    raise InvalidInputError(
                        f"detector {key or det.name!r} was built on {det.encoder.spec}, but the images are encoded "
                        f"with {encoder.spec}: build it with the encoder passed to run()")
                if list(det.classes) != list(self.classes):
                    raise InvalidInputError(
                        f"detector {key or det.name!r} has other ID classes (or another order) than the benchmark: "
                        f"{det.classes[:3]}... vs {self.classes[:3]}...")
            elif isinstance(d, Mapping):  # {"label": {"method": "mcm", "temperature": 0.5}}
                kw = dict(d)
                if kw.get("prompts") is None:  # learned prompts replace the templates; an entry's own ones win
                    kw.setdefault("templates", self.templates)
                det = make_detector(kw.pop("method", key), encoder, self.classes, **kw)
            else:
                det = make_detector(str(d), encoder, self.classes, templates=self.templates)
            label = key or det.name
            if label in out:
                raise InvalidInputError(f"two detectors are both named {label!r}; pass a dict to label them")
            out[label] = det
        if not out:
            raise InvalidInputError("no detectors to evaluate")
        return out

    def _id_labels(self, ids: Sequence[str], labels: Sequence[Any] | None) -> np.ndarray | None:
        """Class indices of the ID images, or None when the set has no labels; partly labelled sets are refused."""
        if labels is None:
            return None
        missing = [i for i, lb in zip(ids, labels) if lb is None]
        if missing:
            raise InvalidInputError(f"ID set: {len(missing)} of {len(ids)} image(s) have no label "
                                    f"(first: {printable(str(missing[0]))}); label every image or none")
        return map_labels(labels, self.classes)

    def load_images(self) -> dict[str, "_Loaded"]:
        """The decoded images of every set (key ``"ID"`` and each OOD set name), for detectors that read images
        (``needs_images``, e.g. :class:`vlmood.lvlm.LVLMDetector`). An unreadable image stops the run, or with
        ``on_error="skip"`` is listed and left out. Every image of a set is held in memory."""
        from ..errors import ImageLoadError

        out: dict[str, _Loaded] = {}
        for name, src in (("ID", self.id), *((n, s) for g in self.ood.values() for n, s in g.items())):
            src = as_source(src)
            loaded = _Loaded([], [], [], [])
            for i in range(len(src)):
                try:
                    im = src.load(i)
                except ImageLoadError as e:
                    if self.on_error == "raise":
                        raise
                    loaded.errors.append((src.ids[i], str(e)))
                    continue
                loaded.images.append(im)
                loaded.ids.append(src.ids[i])
                loaded.labels.append(src.labels[i] if src.labels is not None else None)
            if src.labels is None:
                loaded.labels = None
            out[name] = loaded
        return out

    def _score_images(self, label: str, det: Any, images: dict[str, "_Loaded"], id_labels: np.ndarray | None,
                      ) -> tuple[dict[str, np.ndarray], float | None, dict[str, dict[str, Any]],
                                 dict[str, np.ndarray], np.ndarray]:
        """Scores of an image detector with its excluded (NaN) images dropped, its ID accuracy over the kept ID
        images (an invalid response counts as wrong), per set its response statuses, and the full per-image
        scores (NaN kept, aligned with each set's ids) and ID predictions (class index, -1 when invalid)."""
        scores: dict[str, np.ndarray] = {}
        full: dict[str, np.ndarray] = {}
        id_pred = np.zeros(0, dtype=int)
        invalid: dict[str, dict[str, Any]] = {}
        accuracy = None
        for name, loaded in images.items():
            s, labels = det.respond(loaded.images)
            keep = np.isfinite(s)
            n = len(s)
            if not keep.any():
                raise InvalidInputError(
                    f"detector {label!r}: none of the {n} image(s) of set {name!r} got a valid response "
                    f"(statuses: {dict(det.statuses_)}); no metric can be computed")
            invalid[name] = {"images": n, "invalid": int(det.n_invalid_), "rate": det.n_invalid_ / n if n else 0.0,
                             "excluded": int(n - keep.sum()), "statuses": dict(sorted(det.statuses_.items()))}
            scores[name], full[name] = s[keep], np.asarray(s, dtype=np.float64)
            if name == "ID":
                id_pred = np.asarray(labels)
                if id_labels is not None:
                    accuracy = float(np.mean(labels[keep] == id_labels[keep]))
        return scores, accuracy, invalid, full, id_pred

    def _provenance(self, encoder: Encoder | None, dets: Mapping[str, Any], skipped: list[tuple[str, str, str]],
                    seconds: float) -> dict[str, Any]:
        """How a run was made, for ``results.json`` (and the header of ``report.md``)."""
        from .. import __version__

        argv = [a for a in sys.argv if a]
        if "ipykernel" in sys.modules:  # a kernel's argv (launcher, -f connection file) says nothing of the call
            argv = ["Benchmark.run in a Jupyter kernel"]
        enc = None
        if encoder is not None:
            enc = {"spec": str(encoder.spec), "fingerprint": encoder.fingerprint,
                   "device": _device_name(encoder), "precision": getattr(encoder, "precision", None)}
        sets = {}
        for name, src in (("ID", self.id), *((n, s) for g in self.ood.values() for n, s in g.items())):
            src = as_source(src)
            sets[name] = {"source": getattr(src, "name", str(src)), "size": len(src),
                          "skipped": sum(1 for s, _, _ in skipped if s == name)}
        return {"vlmood": __version__, "command": " ".join(argv) if argv else "python", "encoder": enc,
                "classes": {"names": list(self.classes),
                            "sha256": hashlib.sha256("\n".join(self.classes).encode("utf-8")).hexdigest()},
                "templates": self.templates if _simple(self.templates) else repr(self.templates),
                "detectors": {k: {"type": type(d).__name__, **_hyper(d)} for k, d in dets.items()},
                "sets": sets, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "seconds": seconds}

    def extract(self, encoder: Encoder, local: bool = False, cache: CacheArg = True,
                local_reducers: Mapping[str, LocalReducer] | None = None, **kw: Any) -> dict[str, Features]:
        """Features of the ID set (key ``"ID"``) and of every OOD set, each image encoded once (keyword arguments
        as :func:`vlmood.features.extract_features`: ``local=True`` holds every patch feature of a set in memory,
        ``local_reducers`` reduces them batch by batch instead)."""
        kw.update(local=local, cache=cache, local_reducers=local_reducers, on_error=self.on_error)
        feats = {"ID": extract_features(encoder, self.id, **kw)}
        for group in self.ood.values():
            for name, src in group.items():
                feats[name] = extract_features(encoder, src, **kw)
        return feats

    def run(self, encoder: Encoder | None, detectors: DetectorsArg = ("mcm",), cache: CacheArg = True,
            batch_size: int | None = None, num_workers: int | None = None, progress: bool | None = None,
            features: Mapping[str, Features] | None = None, cache_local: bool = False) -> Report:
        """Score every set with every detector and compute the metrics.

        ``detectors``: method names (``"mcm,glmcm"`` or a list), :class:`Detector` objects, or a dict from report
        label to a name, a detector, or the keyword arguments of :func:`vlmood.make_detector` with ``"method"``.
        Zero-shot and learned prompts compare in one run, e.g.
        ``{"mcm": "mcm", "mcm+locoop": {"method": "mcm", "prompts": learned}}`` (``learned``: a
        :class:`~vlmood.tuning.LearnedPrompts` or its file; its classes must be the benchmark's, same order).

        Images are encoded once (local patch features only when a detector needs them) and every detector
        scores the same :class:`Features`. ``features`` may pass precomputed ones (from :meth:`extract`).
        Memory does not grow with the number of images beyond their global features and scores: the patch
        features a detector needs (GL-MCM) are reduced to its local scores batch by batch and dropped
        (:meth:`Detector.local_reducer <vlmood.detectors.Detector.local_reducer>`); the cache keeps those scores,
        and with ``cache_local=True`` the patch features too, as float16 (see
        :func:`~vlmood.features.extract_features`).

        Detectors that read images rather than features (``needs_images = True``: an
        :class:`vlmood.lvlm.LVLMDetector`, passed as an object) run in the same call on each set's decoded images
        (:meth:`load_images`); the encoder then only serves the CLIP detectors (with LVLM detectors alone it may be
        None). Their excluded images (NaN scores: invalid responses under ``invalid="exclude"``/``"retry"``) are
        left out of their metrics; each row says how many (``n_id_excluded``, ``n_ood_excluded``) and
        ``Report.invalid`` holds the invalid-response counts, rates and statuses per set.

        The report's ``descriptions`` say what each row is (:func:`describe_detector`; replace them freely) and its
        ``thresholds`` give each method's score at 95% TPR on the ID set.
        """
        t0 = time.perf_counter()
        dets = self._detectors(encoder, detectors)
        by_image = {k for k, d in dets.items() if getattr(d, "needs_images", False)}
        full_local, reducers = local_plan({k: d for k, d in dets.items() if k not in by_image})
        if full_local or reducers:
            encoder.require_local()  # before any image is encoded
        feats: dict[str, Features] = {}
        if len(by_image) < len(dets):  # images are encoded only for the detectors that score features
            feats = dict(features) if features is not None else self.extract(
                encoder, local=full_local, cache=cache, local_reducers=reducers or None, batch_size=batch_size,
                num_workers=num_workers, progress=progress, cache_local=cache_local)
            absent = [n for n in ("ID", *(n for g in self.ood.values() for n in g)) if n not in feats]
            if absent:
                raise InvalidInputError(f"features= lacks the set(s) {absent}; pass Benchmark.extract's result")
        images = self.load_images() if by_image else {}
        # the two paths may keep different images (features also drop non-finite encodings): labels per path
        image_labels = self._id_labels(images["ID"].ids, images["ID"].labels) if images else None
        id_labels = self._id_labels(feats["ID"].ids, feats["ID"].labels) if feats else image_labels
        notes = [] if id_labels is not None else [NO_LABELS]
        if id_labels is None:
            warnings.warn(NO_LABELS, stacklevel=2)

        scores: dict[str, dict[str, np.ndarray]] = {}
        accuracy: dict[str, float | None] = {}
        invalid: dict[str, dict[str, dict[str, Any]]] = {}
        set_names = ["ID", *(n for g in self.ood.values() for n in g)]
        keys = {n: _union_keys(*(_keys(x[n].ids) for x in (feats, images) if x)) for n in set_names}
        all_scores: dict[str, dict[str, np.ndarray]] = {}
        predictions: dict[str, list[str | None]] = {}
        for label, det in dets.items():
            if label in by_image:
                s, accuracy[label], invalid[label], full, id_pred = self._score_images(label, det, images,
                                                                                       image_labels)
                src_ids = {n: images[n].ids for n in set_names}
            else:
                id_feats = feats["ID"]
                s = {"ID": score_detector(det, id_feats, label)}
                id_pred = det.classify_features(id_feats)
                accuracy[label] = float(np.mean(id_pred == id_labels)) if id_labels is not None else None
                for sets in self.ood.values():
                    for name in sets:
                        s[name] = score_detector(det, feats[name], label)
                full = s
                src_ids = {n: feats[n].ids for n in set_names}
            scores[label] = s
            all_scores[label] = {n: _align(keys[n], _keys(src_ids[n]), full[n], np.nan) for n in set_names}
            pred = _align(keys["ID"], _keys(src_ids["ID"]), np.asarray(id_pred, dtype=np.float64), -1.0)
            predictions[label] = [self.classes[int(p)] if p >= 0 else None for p in pred]
        excluded = {m: {k: v["excluded"] for k, v in sets.items()} for m, sets in invalid.items()}
        rows = metric_rows(scores, {g: list(s) for g, s in self.ood.items()}, excluded)
        labels = None
        if id_labels is not None:  # each ID image's class name, from whichever path kept it
            lab = np.full(len(keys["ID"]), -1.0)
            for x, ys in ((images, image_labels), (feats, id_labels)):
                if x and ys is not None:
                    got = _align(keys["ID"], _keys(x["ID"].ids), np.asarray(ys, dtype=np.float64), -1.0)
                    lab = np.where(got >= 0, got, lab)
            labels = [self.classes[int(x)] if x >= 0 else None for x in lab]
        skipped = [(name, i, msg) for name, f in feats.items() for i, msg in f.errors]
        seen = {(name, i) for name, i, _ in skipped}
        skipped += [(name, i, msg) for name, x in images.items() for i, msg in x.errors if (name, i) not in seen]
        counts = {k: len(v) for k, v in feats.items()} if feats else {k: len(v.images) for k, v in images.items()}
        report = Report(name=self.name, rows=rows, id_accuracy=accuracy, scores=scores, skipped=skipped,
                        counts=counts, groups={g: list(s) for g, s in self.ood.items()},
                        seconds=time.perf_counter() - t0, notes=notes, invalid=invalid,
                        ids={n: [k[0] for k in keys[n]] for n in set_names}, labels=labels, all_scores=all_scores,
                        predictions=predictions,
                        descriptions={label: describe_detector(det) for label, det in dets.items()})
        report.provenance = self._provenance(encoder, dets, skipped, report.seconds)
        if progress is not False:
            print(report.summary(), file=sys.stderr)
        return report
