"""NegLabel and CSP: ID softmax mass against thousands of mined negative labels."""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .. import scores
from .._io import printable, read_text
from .._lazy import torch
from ..encoders.base import Encoder
from ..errors import InvalidInputError
from ..lexicons import Lexicon
from ..negatives import candidate_pool, mine
from ..text.embed import class_embeddings
from ..text.prompts import load_classes, load_templates
from .base import Detector, nan_where_not_finite

_DEFAULTS = {
    "neglabel": {"templates": "neglabel_noun", "neg_templates": {"noun": "neglabel_noun", "adj": "neglabel_adj"},
                 "push_above": None},
    "csp": {"templates": "csp_noun", "neg_templates": {"noun": "csp_noun", "adj": "csp_adj"}, "push_above": 0.95},
}
# NegLabel JSON files of earlier vlmood versions (NegLabel.save now writes the detector file format of
# vlmood.detectors.persist; NegLabel.load and vlmood.load_detector still read these): {"format": FORMAT,
# "version": VERSION, "method", "pool", "encoder", "classes", "templates", "neg_templates", "lexicon",
# "params": {PARAMS}, "negatives": [{"label", "pos"}]}, and for a detector with learned prompts
# "prompts": {"file": absolute path or null, "sha256": prompts_digest(...)} with "templates": [] (the context itself
# stayed in its own file). Files from before the format had a name and a version (no "format" field) still load,
# with the same checks.
FORMAT, VERSION = "vlmood.neglabel", 1
PARAMS = ("percentile", "ratio", "temperature", "ngroups", "seed")
_FIELDS = {"format", "version", "method", "pool", "encoder", "classes", "templates", "neg_templates", "lexicon",
           "params", "negatives", "prompts"}
_OPTIONAL = {"format", "version", "encoder", "lexicon", "prompts"}


def _param_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is not a valid setting ``name`` (one of :data:`PARAMS`), or None. NaN is never valid."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    rules = {
        "percentile": (real and 0.0 <= value <= 1.0, "be in [0, 1]"),
        "ratio": (real and 0.0 < value <= 1.0, "be in (0, 1]"),
        "temperature": (real and math.isfinite(value) and value > 0.0, "be a positive finite number"),
        "ngroups": (integer and value >= 1, "be a positive integer"),
        "seed": (value is None or integer, "be an integer or None"),
    }
    ok, want = rules[name]
    return None if ok else f"{name} must {want}, got {value!r}"


def check_param_set(params: Any, names: Sequence[str], problem: Any, bad: Any) -> None:
    """A saved file's ``params``: an object with exactly ``names``, each valid by ``problem(name, value)`` (None or
    why not); else raises ``bad(field, why)`` (the caller's one-line error naming its file)."""
    if not isinstance(params, dict) or set(params) != set(names):
        keys = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise bad("params", f"expected an object with exactly {', '.join(names)}, got {keys}")
    for key in names:
        why = problem(key, params[key])
        if why:
            raise bad(f"params.{key}", why)


def prompts_digest(prompts: Any) -> str:
    """SHA-256 of learned prompts' class names and context (float32): what a saved NegLabel detector records, so
    that loading it with other prompts than those its negatives were mined against is refused."""
    h = hashlib.sha256(json.dumps([prompts.classes, list(prompts.ctx.shape)]).encode("utf-8"))
    h.update(prompts.ctx.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _lexicon_spec(lexicon: Any) -> str | list[str]:
    """The lexicon setting as JSON: a selection name or path, or a list of file names."""
    if isinstance(lexicon, str):
        return lexicon
    if isinstance(lexicon, Lexicon):
        return list(lexicon.files) or lexicon.name
    return [str(x) for x in lexicon]


class NegLabel(Detector):
    """NegLabel (Jiang et al., "Negative Label Guided OOD Detection with Pretrained Vision-Language Models",
    ICLR 2024). Higher score = more in-distribution.

    ``fit()`` mines ``floor(ratio * n)`` negatives per part of speech from the lexicon: the candidates least
    similar to the ID classes at their ``percentile`` quantile (words equal to an ID class name are dropped
    first — a deliberate difference: NegLabel's reference keeps them, so an ID class name can be mined there). The
    score is :func:`vlmood.scores.neglabel` over the ID and negative label similarities. Text embeddings go
    through the disk cache, so the ~70k-word lexicon is encoded once per model. ``seed`` also seeds CSP's
    superclass draws (``None`` draws with seed 0).

    Args:
        templates: ID class templates (default ``the nice {}``, no full stop, as the reference).
        lexicon: word selection (see :func:`vlmood.lexicons.load`), e.g. ``"neglabel"`` or a folder.
        neg_templates: templates per part of speech, with a ``"noun"`` entry (used for any part of speech without
            its own); default nouns ``the nice {}``, adjectives ``This is a {} photo``.
        percentile, ratio: the mining rule (:func:`vlmood.negatives.mine`); temperature (> 0), ngroups, seed: the
            score (:func:`vlmood.scores.neglabel`). NaN is refused everywhere.
        pool: ``"neglabel"`` or ``"csp"`` (conjugated semantic pool, see :class:`CSP`).
        negatives: use these negative labels as they are instead of mining the lexicon (words, scored with the
            noun templates, or ``(word, part of speech)`` pairs), e.g. an LLM's envisioned outlier classes
            (:func:`vlmood.lvlm.envision_negatives`, in the spirit of EOE, Cao et al., ICML 2024).
        prompts: learned prompts for the ID side (see :class:`~vlmood.detectors.base.Detector`); they replace
            ``templates`` only: the negatives keep their ``neg_templates``, and mining compares them with the
            learned ID embeddings.
    """

    name = "neglabel"
    pool_name = "neglabel"
    param_names = PARAMS + ("pool", "lexicon")

    def __init__(self, encoder: Encoder, classes: str | Sequence[str] | None = None,
                 templates: str | Sequence[str] | None = None,
                 lexicon: str | Sequence[str] = "neglabel", neg_templates: dict[str, Any] | None = None,
                 percentile: float = 0.95, ratio: float = 0.15, temperature: float = 0.01, ngroups: int = 100,
                 seed: int | None = 0, pool: str | None = None, negatives: Sequence[Any] | None = None,
                 **kw: Any):
        self.pool = pool or self.pool_name
        if self.pool not in _DEFAULTS:
            raise InvalidInputError(f"unknown pool {self.pool!r}; choose 'neglabel' or 'csp'")
        d = _DEFAULTS[self.pool]
        learned = kw.get("prompts") is not None  # learned prompts replace the ID templates (never both)
        super().__init__(encoder, classes, templates if templates is not None or learned else d["templates"], **kw)
        for name, value in zip(PARAMS, (percentile, ratio, temperature, ngroups, seed)):
            problem = _param_problem(name, value)
            if problem:
                raise InvalidInputError(problem)
        neg_templates = neg_templates or d["neg_templates"]
        if not isinstance(neg_templates, Mapping) or "noun" not in neg_templates:
            raise InvalidInputError("neg_templates must map parts of speech to templates and include 'noun', "
                                    f"e.g. {{'noun': 'the nice {{}}', 'adj': 'This is a {{}} photo'}}; "
                                    f"got {neg_templates!r}")
        self.lexicon = lexicon
        self.neg_templates = {str(k): load_templates(v) for k, v in neg_templates.items()}
        self.percentile, self.ratio, self.temperature = float(percentile), float(ratio), float(temperature)
        self.ngroups, self.seed = int(ngroups), None if seed is None else int(seed)
        self.negatives_: list[tuple[str, str]] | None = None  # (label, part of speech)
        self._neg: torch.Tensor | None = None
        if negatives is not None:
            self.negatives_ = self._given_negatives(negatives)

    def _given_negatives(self, negatives: Sequence[Any]) -> list[tuple[str, str]]:
        """``negatives=`` as ``(label, part of speech)``: words (nouns) or ``(word, pos)`` pairs, e.g. an LLM's
        envisioned outlier classes (:func:`vlmood.lvlm.envision_negatives`). Blank entries are refused; repeats
        (case-insensitive) are kept once and ID class names dropped, each with a count in one warning."""
        if isinstance(negatives, (str, bytes)):
            raise InvalidInputError("negatives must be a list of words, not a single string")
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        ids = {c.strip().lower() for c in self.classes}
        repeats = id_hits = 0
        for k, item in enumerate(negatives):
            word, pos = (item, "noun") if isinstance(item, str) else (tuple(item) + ("noun",))[:2] \
                if isinstance(item, (tuple, list)) else (None, None)
            if not isinstance(word, str) or not word.strip() or not isinstance(pos, str):
                raise InvalidInputError(f"negatives entry {k + 1} must be a non-empty word or a (word, pos) pair, "
                                        f"got {item!r}")
            key = word.strip().lower()
            if key in ids:
                id_hits += 1
            elif key in seen:
                repeats += 1
            else:
                seen.add(key)
                out.append((word.strip(), pos))
        if repeats or id_hits:
            warnings.warn(f"negatives: dropped {repeats} repeated word(s) and {id_hits} ID class name(s); "
                          f"{len(out)} negatives left", stacklevel=3)
        if len(out) < self.ngroups:
            raise InvalidInputError(f"{len(out)} negatives given but ngroups={self.ngroups}; give more words or "
                                    "lower ngroups")
        return out

    def _templates_for(self, pos: str) -> list[str]:
        return self.neg_templates.get(pos) or self.neg_templates["noun"]

    def _embed_labels(self, labels: Sequence[str], pos: Sequence[str]) -> torch.Tensor:
        """Prompt-ensemble embeddings ``[M, D]`` of labels, each with its part of speech's templates."""
        out = torch.empty(len(labels), self.encoder.embed_dim)
        for p in dict.fromkeys(pos):
            idx = [i for i, q in enumerate(pos) if q == p]
            out[idx] = class_embeddings(self.encoder, [labels[i] for i in idx], self._templates_for(p),
                                        cache=self.cache, progress=None, check=False)
        return out

    def fit(self, *_: Any) -> "NegLabel":
        """Embed the ID classes, then mine the negatives once (skipped when loaded with :meth:`load`)."""
        super().fit()
        if self.negatives_ is None:
            cands = candidate_pool(self.pool, self.lexicon, seed=self.seed or 0)
            id_names = {c.strip().lower() for c in self.classes}
            exclude = [w.strip().lower() in id_names for w in cands.labels]
            feats = self._embed_labels(cands.labels, cands.pos)
            idx = mine(self._text, feats, self.percentile, self.ratio, groups=cands.pos, exclude=exclude,
                       push_above=_DEFAULTS[self.pool]["push_above"])
            self.negatives_ = [(cands.labels[i], cands.pos[i]) for i in idx]
            self._neg = feats[torch.as_tensor(idx, dtype=torch.long)]
            if len(self.negatives_) < self.ngroups:
                raise InvalidInputError(
                    f"only {len(self.negatives_)} negatives were mined but ngroups={self.ngroups}; "
                    "lower ngroups or raise ratio")
        if self._neg is None:
            words, pos = zip(*self.negatives_) if self.negatives_ else ((), ())
            self._neg = self._embed_labels(list(words), list(pos))
        return self

    @property
    def negative_features(self) -> torch.Tensor:
        """Negative label embeddings ``[M, D]``."""
        return self.fit()._neg  # type: ignore[return-value]

    def score_features(self, image_features: Any, local_features: Any = None) -> np.ndarray:
        f = self.global_features(image_features)
        text, neg = self.text_features.T, self.negative_features.T
        chunks = [  # rows in chunks: [N, M] similarities to ~10k negatives never exist in full
            scores.neglabel(f[i : i + 4096] @ text, f[i : i + 4096] @ neg, self.temperature, self.ngroups, self.seed)
            for i in range(0, f.shape[0], 4096)
        ]
        return nan_where_not_finite(np.concatenate(chunks) if chunks else np.empty(0), f)

    # ------------------------------------------------------------------ persistence
    def get_params(self) -> dict[str, Any]:
        return {**super().get_params(), "lexicon": _lexicon_spec(self.lexicon)}

    def saved_neg_templates(self) -> dict[str, list[str]]:
        """The negative templates a detector file records: every part of speech of the negatives has its own."""
        return {**self.neg_templates, **{p: self._templates_for(p) for _, p in self.negatives_ or []}}

    @classmethod
    def load(cls, path: str | os.PathLike, encoder: Encoder, **overrides: Any) -> "NegLabel":
        """A detector from a detector file (:meth:`~vlmood.detectors.base.Detector.save`, see
        :mod:`vlmood.detectors.persist`) or from a NegLabel JSON file of earlier vlmood versions (format
        ``vlmood.neglabel``, or without a format); the stored negatives are used, never re-mined.

        The file decides the class: ``NegLabel.load`` of a CSP file returns a :class:`CSP` detector, while
        ``CSP.load`` refuses a NegLabel file. Every field is checked (also in JSON files written before the format
        had a version): a file of another kind, a missing or unknown field, an invalid setting (``ngroups`` 0,
        ``ratio`` 2, NaN), a negative whose part of speech has no templates, fewer negatives than ``ngroups`` or
        an empty class list gives one :class:`InvalidInputError` naming the file and the field. ``overrides``
        replace stored settings (``temperature=...``) and are checked the same way.

        A JSON file saved with learned prompts reads them from the recorded file, or from ``prompts=`` (a path or
        :class:`~vlmood.tuning.LearnedPrompts`), and refuses prompts other than those the negatives were mined
        with. ``prompts=`` given for a file saved without learned prompts scores its stored negatives against the
        learned ID embeddings (the file's ID templates are then dropped).
        """
        from .persist import is_detector_file, load_detector

        p = Path(path)
        name = printable(str(p))
        if not p.exists():
            raise InvalidInputError(f"NegLabel file not found: {name}")
        if is_detector_file(p):
            return load_detector(p, encoder, _want=cls, _overrides=overrides)
        data, (target, classes, kw, negatives, saved_prompts) = read_legacy(p)
        if not issubclass(target, cls):
            raise InvalidInputError(f"{name} holds a saved {target.__name__} detector, not {cls.__name__}; "
                                    f"load it with vlmood.{target.__name__}.load")
        if data.get("encoder") != encoder.fingerprint:
            warnings.warn(f"{name} was mined with another encoder ({data.get('encoder')}); using its negatives "
                          f"with {encoder.fingerprint}", stacklevel=2)
        if saved_prompts is not None or overrides.get("prompts") is not None:
            kw.pop("templates", None)
        file = None
        if saved_prompts is not None:
            kw["prompts"], file = _saved_prompts(saved_prompts, overrides.pop("prompts", None), name)
        kw.update(overrides)
        det = target(encoder, classes, **kw)
        if file is not None:
            det.prompts_file = file
        if len(negatives) < det.ngroups:
            raise InvalidInputError(f"{name} holds {len(negatives)} negatives, fewer than ngroups={det.ngroups}")
        det.negatives_ = negatives
        return det


def read_legacy(p: Path) -> tuple[dict[str, Any], tuple]:
    """``(the JSON, _parse_saved's result)`` of a NegLabel JSON file written by earlier vlmood versions."""
    name = printable(str(p))
    text = read_text(p, "NegLabel/CSP detector file")  # BOM dropped; non-UTF-8 -> one-line error
    try:
        data = json.loads(text)
    except ValueError as e:
        raise InvalidInputError(f"{name} is not a saved NegLabel/CSP detector: invalid JSON ({e})") from None
    return data, _parse_saved(data, name)


def _saved_prompts(saved: dict[str, Any], given: Any, name: str) -> tuple[Any, Path | None]:
    """The learned prompts a saved detector was mined with, and their file: ``given`` (``load(..., prompts=)``) or
    the recorded file, checked against the recorded digest (the encoder is checked when the detector is built)."""
    from ..tuning.prompts import LearnedPrompts

    source = given if given is not None else saved["file"]
    if source is None:
        raise InvalidInputError(f"{name} was saved with learned prompts that were not read from a file; pass "
                                "prompts=FILE (or the LearnedPrompts) to NegLabel.load")
    file = None
    if isinstance(source, (str, os.PathLike)):
        file = Path(os.path.abspath(os.path.expanduser(os.fsdecode(source))))
        try:
            prompts = LearnedPrompts.load(file)
        except InvalidInputError as e:
            raise InvalidInputError(f"{name} was mined with learned prompts: {e}") from None
    elif isinstance(source, LearnedPrompts):
        prompts = source
    else:
        raise InvalidInputError(f"prompts must be LearnedPrompts or the path of a learned-prompts file, got "
                                f"{type(source).__name__}")
    if prompts_digest(prompts) != saved["sha256"]:
        what = "the given prompts" if given is not None else f"the prompts file {printable(str(file))}"
        raise InvalidInputError(f"{name}: {what} differ from the learned prompts its negatives were mined with "
                                "(SHA-256 mismatch); mine again with these prompts, or pass prompts= with the "
                                "original ones")
    return prompts, file


def check_negatives(neg_t: Any, raw: Any, ngroups: int, name: str, any_pos: bool = False
                    ) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """Validate a saved detector's ``neg_templates`` (template lists per part of speech, with ``"noun"``) and
    ``negatives`` (``[{"label", "pos"}]``: non-empty labels, no repeats, at least ``ngroups``, each part of speech
    with its templates unless ``any_pos``); ``(neg_templates, [(label, pos)])``. Errors name ``name`` and the
    field."""
    def bad(field: str, problem: str) -> InvalidInputError:
        return InvalidInputError(f"{name}: invalid field {field!r}: {problem}")

    if not isinstance(neg_t, dict) or "noun" not in neg_t:
        raise bad("neg_templates", "expected an object of template lists with a 'noun' entry")
    neg_templates = {}
    for pos, ts in neg_t.items():
        if not isinstance(ts, list) or not all(isinstance(x, str) for x in ts):
            raise bad(f"neg_templates.{pos}", f"expected a list of strings, got {type(ts).__name__}")
        try:
            neg_templates[pos] = load_templates(ts)
        except InvalidInputError as e:
            raise bad(f"neg_templates.{pos}", str(e)) from None
    if not isinstance(raw, list) or not all(isinstance(n, dict) and set(n) == {"label", "pos"} for n in raw):
        raise bad("negatives", 'expected a list of {"label": ..., "pos": ...} objects')
    negatives = [(n["label"], n["pos"]) for n in raw]
    for i, (label, pos) in enumerate(negatives):
        if not isinstance(label, str) or not label.strip():
            raise bad(f"negatives[{i}].label", f"expected a non-empty string, got {label!r}")
        if not isinstance(pos, str) or (pos not in neg_templates and not any_pos):
            raise bad(f"negatives[{i}].pos", f"{pos!r} has no templates in neg_templates "
                                             f"({', '.join(neg_templates)})")
    repeated = [f"{w} ({p})" for (w, p), k in Counter(negatives).items() if k > 1]
    if repeated:
        raise bad("negatives", f"repeated labels: {', '.join(repeated[:3])}")
    if len(negatives) < ngroups:
        raise bad("negatives", f"{len(negatives)} negatives, fewer than params.ngroups={ngroups}")
    return neg_templates, negatives


def _parse_saved(data: Any, name: str) -> tuple[type[NegLabel], list[str], dict[str, Any], list[tuple[str, str]],
                                                dict[str, Any] | None]:
    """Validate a saved detector's JSON: (class, classes, keyword settings, negatives, recorded learned prompts or
    None). See :meth:`NegLabel.load`."""
    def bad(field: str, problem: str) -> InvalidInputError:
        return InvalidInputError(f"{name}: invalid field {field!r}: {problem}")

    def str_list(field: str, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise bad(field, f"expected a list of strings, got {type(value).__name__}")
        return value

    if not isinstance(data, dict):
        raise InvalidInputError(f"{name} is not a saved NegLabel/CSP detector: it holds a JSON "
                                f"{type(data).__name__}, not a detector object")
    if "format" in data and data["format"] != FORMAT:
        raise InvalidInputError(f"{name} is not a saved NegLabel/CSP detector: its format is "
                                f"{data['format']!r}, not {FORMAT!r}")
    if "format" not in data and "negatives" not in data:
        raise InvalidInputError(f"{name} is not a saved NegLabel/CSP detector (no 'format' or 'negatives' field); "
                                "detector files are written by det.save(FILE.vlmood) and read by vlmood.load_detector")
    version = data.get("version", 0 if "format" not in data else None)
    if not isinstance(version, int) or isinstance(version, bool) or version < (1 if "format" in data else 0):
        raise bad("version", f"expected a positive integer, got {version!r}")
    if version > VERSION:
        raise InvalidInputError(f"{name} has format version {version}; this vlmood reads versions up to {VERSION}: "
                                "upgrade vlmood")
    missing = sorted(_FIELDS - _OPTIONAL - set(data))
    unknown = sorted(set(data) - _FIELDS)
    if missing or unknown:
        raise InvalidInputError(f"{name}: " + "; ".join(
            ([f"missing field(s) {', '.join(missing)}"] if missing else [])
            + ([f"unknown field(s) {', '.join(map(repr, unknown))}"] if unknown else [])))
    classes_by_method = {c.name: c for c in (NegLabel, CSP)}
    if data["method"] not in classes_by_method:
        raise bad("method", f"expected one of {', '.join(classes_by_method)}, got {data['method']!r}")
    if data["pool"] not in _DEFAULTS:
        raise bad("pool", f"expected one of {', '.join(_DEFAULTS)}, got {data['pool']!r}")
    try:
        classes = load_classes(str_list("classes", data["classes"]))
    except InvalidInputError as e:
        raise bad("classes", str(e)) from None
    saved_prompts = data.get("prompts")
    if saved_prompts is not None:
        if not isinstance(saved_prompts, dict) or set(saved_prompts) != {"file", "sha256"} or \
                not isinstance(saved_prompts["sha256"], str) or \
                not isinstance(saved_prompts["file"], (str, type(None))):
            raise bad("prompts", 'expected {"file": path or null, "sha256": hex digest}')
        if data["templates"] != []:
            raise bad("templates", "must be [] in a detector saved with learned prompts")
    try:
        templates = load_templates(str_list("templates", data["templates"])) if saved_prompts is None else []
    except InvalidInputError as e:
        raise bad("templates", str(e)) from None
    lexicon = data.get("lexicon", "neglabel")
    if not isinstance(lexicon, str):
        lexicon = str_list("lexicon", lexicon)
    params = data["params"]
    check_param_set(params, PARAMS, _param_problem, bad)
    # files written before version 1 fell back to the noun templates for a part of speech without its own
    neg_templates, negatives = check_negatives(data["neg_templates"], data["negatives"], params["ngroups"], name,
                                               any_pos=version < 1)
    kw = dict(templates=templates, lexicon=lexicon, neg_templates=neg_templates, pool=data["pool"], **params)
    return classes_by_method[data["method"]], classes, kw, negatives, saved_prompts


class CSP(NegLabel):
    """NegLabel with the Conjugated Semantic Pool (Chen et al., "Conjugated Semantic Pool Improves OOD Detection
    with Pre-trained Vision-Language Models", NeurIPS 2024): nouns (without person, quantity and group
    words) plus adjectives conjugated with superclass words ("<adjective> object/scene/creature/..."),
    prompt ensembles for both (``csp_noun``, ``csp_adj``), and candidates nearly identical to an ID class (max
    similarity > 0.95) ranked last. Scoring is NegLabel's. Higher score = more in-distribution. The pool and its
    one deliberate difference from the reference (file order) are described in
    :func:`vlmood.negatives.candidate_pool`."""

    name = "csp"
    pool_name = "csp"
