"""MCM and its relatives over global image features: MCM, MaxLogit, Energy."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .. import scores
from ..encoders.base import Encoder
from ..errors import InvalidInputError
from .base import Detector


def _need_two_classes(det: Detector) -> None:
    if len(det.classes) < 2:
        raise InvalidInputError(
            f"{type(det).__name__} needs at least 2 ID classes (a softmax over one class is always 1); "
            f"got {det.classes}. Use Energy, MaxLogit or NegLabel for a single class.")


class MCM(Detector):
    """Maximum Concept Matching (Ming et al., "Delving into OOD Detection with Vision-Language
    Representations", NeurIPS 2022): ``max_c softmax(cos(x, t_c) / T)``. Higher = more ID."""

    name = "mcm"

    def __init__(self, encoder: Encoder, classes: str | Sequence[str], templates: str | Sequence[str] | None = None,
                 temperature: float = 1.0, **kw: Any):
        super().__init__(encoder, classes, templates, **kw)
        _need_two_classes(self)
        self.temperature = temperature

    def _score(self, sims: torch.Tensor, local_features: Any) -> np.ndarray:
        return scores.mcm(sims, self.temperature)


class MaxLogit(Detector):
    """Maximum logit (Hendrycks et al., "Scaling OOD detection to real-world settings", ICML 2022):
    ``logit_scale * max_c cos(x, t_c)``; ``logit_scale=None`` uses the encoder's. Higher = more ID."""

    name = "maxlogit"

    def __init__(self, encoder: Encoder, classes: str | Sequence[str], templates: str | Sequence[str] | None = None,
                 logit_scale: float | None = None, **kw: Any):
        super().__init__(encoder, classes, templates, **kw)
        self.logit_scale = logit_scale

    def _score(self, sims: torch.Tensor, local_features: Any) -> np.ndarray:
        return scores.max_logit(sims, self.logit_scale or self.encoder.logit_scale)


class Energy(Detector):
    """Energy score (Liu et al., "Energy-based OOD detection", NeurIPS 2020) on CLIP logits:
    ``T * logsumexp(logit_scale * cos / T)``; ``logit_scale=None`` uses the encoder's. Higher = more ID."""

    name = "energy"

    def __init__(self, encoder: Encoder, classes: str | Sequence[str], templates: str | Sequence[str] | None = None,
                 logit_scale: float | None = None, temperature: float = 1.0, **kw: Any):
        super().__init__(encoder, classes, templates, **kw)
        self.logit_scale = logit_scale
        self.temperature = temperature

    def _score(self, sims: torch.Tensor, local_features: Any) -> np.ndarray:
        return scores.energy(sims, self.logit_scale or self.encoder.logit_scale, self.temperature)
