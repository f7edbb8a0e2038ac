"""MCM and its relatives over global image features: MCM, MaxLogit, Energy."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .. import scores
from ..encoders.base import Encoder
from ..errors import InvalidInputError
from .base import Detector


def _need_two_classes(det: Detector) -> None:
    if len(det.classes) < 2:
        raise InvalidInputError(
            f"{type(det).__name__} needs at least 2 ID classes (a softmax over one class is always 1); "
            f"got {det.classes}. Use Energy, MaxLogit or NegLabel for a single class.")


REFERENCE = "deeplearning-wisc/MCM, utils/detection_util.py, get_ood_scores_clip (commit ea7130f)"
"""Where the reference MCM / MaxLogit / Energy formulas were read: scores from raw cosines, ``T = 1``."""


def _scale(det: "MaxLogit | Energy") -> float:
    """The detector's logit scale: its own when set (``1.0`` included), else the encoder's."""
    return det.encoder.logit_scale if det.logit_scale is None else det.logit_scale


class MCM(Detector):
    """Maximum Concept Matching (Ming et al., "Delving into OOD Detection with Vision-Language
    Representations", NeurIPS 2022): ``max_c softmax(cos(x, t_c) / T)``. Higher = more ID.

    Same rule as the reference (``REFERENCE``: softmax of raw cosines, ``T = 1``); its prompt is the single
    template ``a photo of a {}``, so ``MCM(enc, classes, templates=["a photo of a {}"])`` reproduces it.
    """

    name = "mcm"
    param_names = ("temperature",)

    def __init__(self, encoder: Encoder, classes: str | Sequence[str] | None = None,
                 templates: str | Sequence[str] | None = None, temperature: float = 1.0, **kw: Any):
        super().__init__(encoder, classes, templates, **kw)
        _need_two_classes(self)
        self.temperature = scores.check_positive(temperature, "temperature")

    def _score(self, sims: np.ndarray, local_features: Any) -> np.ndarray:
        return scores.mcm(sims, self.temperature)


class MaxLogit(Detector):
    """Maximum logit (Hendrycks et al., "Scaling OOD detection to real-world settings", ICML 2022):
    ``logit_scale * max_c cos(x, t_c)``; ``logit_scale=None`` uses the encoder's (about 100 for CLIP).
    Higher = more ID.

    The MCM reference (``REFERENCE``) scores the raw maximum cosine (no scale, no temperature):
    ``MaxLogit(enc, classes, templates=["a photo of a {}"], logit_scale=1.0)`` gives its numbers. The scale
    only multiplies every score by a positive constant, so AUROC, FPR95, AUPR and AUTC are the same either
    way; thresholds and raw scores differ by that factor.
    """

    name = "maxlogit"
    param_names = ("logit_scale",)

    def __init__(self, encoder: Encoder, classes: str | Sequence[str] | None = None,
                 templates: str | Sequence[str] | None = None, logit_scale: float | None = None, **kw: Any):
        super().__init__(encoder, classes, templates, **kw)
        self.logit_scale = None if logit_scale is None else scores.check_positive(logit_scale, "logit_scale")

    def _score(self, sims: np.ndarray, local_features: Any) -> np.ndarray:
        return scores.max_logit(sims, _scale(self))


class Energy(Detector):
    """Energy score (Liu et al., "Energy-based OOD detection", NeurIPS 2020) on CLIP logits:
    ``T * logsumexp(logit_scale * cos / T)``; ``logit_scale=None`` uses the encoder's (about 100 for CLIP),
    as CLIP's own logits do. Higher = more ID.

    The MCM reference (``REFERENCE``) computes ``T * logsumexp(cos / T)`` on raw cosines with ``T = 1``
    (and negates it, lower = ID): ``Energy(enc, classes, templates=["a photo of a {}"], logit_scale=1.0)``
    reproduces its numbers. Unlike MaxLogit this changes the ranking: with the default scale the score is
    close to ``logit_scale * max cos``, with ``1.0`` it is about ``log C`` + the mean cosine.
    """

    name = "energy"
    param_names = ("logit_scale", "temperature")

    def __init__(self, encoder: Encoder, classes: str | Sequence[str] | None = None,
                 templates: str | Sequence[str] | None = None, logit_scale: float | None = None,
                 temperature: float = 1.0, **kw: Any):
        super().__init__(encoder, classes, templates, **kw)
        self.logit_scale = None if logit_scale is None else scores.check_positive(logit_scale, "logit_scale")
        self.temperature = scores.check_positive(temperature, "temperature")

    def _score(self, sims: np.ndarray, local_features: Any) -> np.ndarray:
        return scores.energy(sims, _scale(self), self.temperature)
