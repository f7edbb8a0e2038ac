"""NegLabel and CSP: ID softmax mass against thousands of mined negative labels."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import scores
from ..encoders.base import Encoder
from ..errors import InvalidInputError
from ..negatives import candidate_pool, mine
from ..text.embed import class_embeddings
from ..text.prompts import load_templates
from .base import Detector, _unpack

_DEFAULTS = {
    "neglabel": {"templates": "neglabel_noun", "neg_templates": {"noun": "neglabel_noun", "adj": "neglabel_adj"},
                 "push_above": None},
    "csp": {"templates": "csp_noun", "neg_templates": {"noun": "csp_noun", "adj": "csp_adj"}, "push_above": 0.95},
}


class NegLabel(Detector):
    """NegLabel (Jiang et al., "Negative Label Guided OOD Detection with Pretrained Vision-Language Models",
    ICLR 2024). Higher score = more in-distribution.

    ``fit()`` mines ``floor(ratio * n)`` negatives per part of speech from the lexicon: the candidates least
    similar to the ID classes at their ``percentile`` quantile (words equal to an ID class name are dropped
    first). The score is :func:`vlmood.scores.neglabel` over the ID and negative label similarities. Text
    embeddings go through the disk cache, so the ~70k-word lexicon is encoded once per model.

    Args:
        templates: ID class templates (default ``the nice {}.``).
        lexicon: word selection (see :func:`vlmood.lexicons.load`), e.g. ``"neglabel"`` or a folder.
        neg_templates: templates per part of speech; default nouns ``the nice {}.``, adjectives ``This is a {} photo``.
        pool: ``"neglabel"`` or ``"csp"`` (conjugated semantic pool, see :class:`CSP`).
    """

    name = "neglabel"
    pool_name = "neglabel"

    def __init__(self, encoder: Encoder, classes: str | Sequence[str], templates: str | Sequence[str] | None = None,
                 lexicon: str | Sequence[str] = "neglabel", neg_templates: dict[str, Any] | None = None,
                 percentile: float = 0.95, ratio: float = 0.15, temperature: float = 0.01, ngroups: int = 100,
                 seed: int | None = 0, pool: str | None = None, **kw: Any):
        self.pool = pool or self.pool_name
        if self.pool not in _DEFAULTS:
            raise InvalidInputError(f"unknown pool {self.pool!r}; choose 'neglabel' or 'csp'")
        d = _DEFAULTS[self.pool]
        super().__init__(encoder, classes, templates if templates is not None else d["templates"], **kw)
        if not 0.0 < ratio <= 1.0:
            raise InvalidInputError(f"ratio must be in (0, 1], got {ratio}")
        if not 0.0 <= percentile <= 1.0:
            raise InvalidInputError(f"percentile must be in [0, 1], got {percentile}")
        if not isinstance(ngroups, int) or ngroups < 1:
            raise InvalidInputError(f"ngroups must be a positive integer, got {ngroups!r}")
        self.lexicon = lexicon
        self.neg_templates = {k: load_templates(v) for k, v in (neg_templates or d["neg_templates"]).items()}
        self.percentile, self.ratio, self.temperature = percentile, ratio, temperature
        self.ngroups, self.seed = ngroups, seed
        self.negatives_: list[tuple[str, str]] | None = None  # (label, part of speech)
        self._neg: torch.Tensor | None = None

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
        image_features, _ = _unpack(image_features, local_features)
        f = torch.as_tensor(np.asarray(image_features) if not isinstance(image_features, torch.Tensor)
                            else image_features).float()
        text, neg = self.text_features.T, self.negative_features.T
        chunks = [  # rows in chunks: [N, M] similarities to ~10k negatives never exist in full
            scores.neglabel(f[i : i + 4096] @ text, f[i : i + 4096] @ neg, self.temperature, self.ngroups, self.seed)
            for i in range(0, f.shape[0], 4096)
        ]
        return np.concatenate(chunks) if chunks else np.empty(0)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the mined negatives and settings as JSON; :meth:`load` restores the detector without mining."""
        self.fit()
        data = {
            "method": self.name, "pool": self.pool, "encoder": self.encoder.fingerprint, "classes": self.classes,
            "templates": self.templates, "neg_templates": self.neg_templates,
            "lexicon": self.lexicon if isinstance(self.lexicon, str) else list(self.lexicon),
            "params": {"percentile": self.percentile, "ratio": self.ratio, "temperature": self.temperature,
                       "ngroups": self.ngroups, "seed": self.seed},
            "negatives": [{"label": w, "pos": p} for w, p in self.negatives_ or []],
        }
        from ..text.cache import atomic_write_bytes

        atomic_write_bytes(Path(path), json.dumps(data, indent=1).encode())

    @classmethod
    def load(cls, path: str | os.PathLike, encoder: Encoder, **overrides: Any) -> "NegLabel":
        """A detector from :meth:`save`'s file: the stored negatives are embedded (cache), never re-mined."""
        p = Path(path)
        if not p.is_file():
            raise InvalidInputError(f"NegLabel file not found: {p}")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            negatives = [(n["label"], n["pos"]) for n in data["negatives"]]
            kw = dict(templates=data["templates"], lexicon=data["lexicon"], neg_templates=data["neg_templates"],
                      pool=data["pool"], **data["params"])
            classes = data["classes"]
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidInputError(f"{p} is not a saved NegLabel detector: {type(e).__name__}: {e}") from e
        if data.get("encoder") != encoder.fingerprint:
            warnings.warn(f"{p} was mined with another encoder ({data.get('encoder')}); using its negatives "
                          f"with {encoder.fingerprint}", stacklevel=2)
        kw.update(overrides)
        det = cls(encoder, classes, **kw)
        det.negatives_ = negatives
        return det


class CSP(NegLabel):
    """NegLabel with the Conjugated Semantic Pool (Chen et al., "Conjugated Semantic Pool Improves OOD Detection
    with Pre-trained Vision-Language Models", NeurIPS 2024): nouns (without person, quantity and group
    words) plus adjectives conjugated with superclass words ("<adjective> object/scene/creature/..."),
    prompt ensembles for both, and candidates nearly identical to an ID class (max similarity > 0.95) ranked
    last. Scoring is NegLabel's. Higher score = more in-distribution."""

    name = "csp"
    pool_name = "csp"
