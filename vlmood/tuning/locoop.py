"""LoCoOp: local regularised context optimisation (Miyai et al., "LoCoOp: Few-Shot Out-of-Distribution Detection
via Prompt Learning", NeurIPS 2023; reference code AtsuMiyai/LoCoOp, ``trainers/locoop.py``).

CoOp plus an entropy-maximisation term on ID-irrelevant patches. With local (per-patch) features ``f_j`` (the
GL-MCM value-path features of the image tower) and ``p_j = softmax(logit_scale * cos(f_j, t))``, a patch is
ID-irrelevant when the label ``y`` is not among its top ``K`` classes; over those patches ``S``::

    L_en     = - mean_{j in S} H(p_j),   H(p) = - sum_c p_c log(p_c + 1e-5)     (0 when S is empty)
    L_LoCoOp = CE(logits, y) + lambda * L_en,    lambda = 0.25,  K = 200 for 1000 classes

(:func:`vlmood.losses.locoop_loss`). ``top_k=None`` scales ``K`` to the class count: ``max(1, round(200 C / 1000))``.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from ..errors import InvalidInputError
from ..losses import locoop_loss
from .trainer import PromptTrainer


def default_top_k(n_classes: int) -> int:
    """The reference's K = 200 for ImageNet-1k, scaled to ``n_classes``: ``max(1, round(200 * C / 1000))``."""
    return max(1, round(200 * n_classes / 1000))


class LoCoOp(PromptTrainer):
    """LoCoOp prompt learning: CoOp's arguments plus ``lam`` (lambda, 0.25) and ``top_k`` (K; None = scaled).

    Needs local (per-patch) image features: an open_clip ViT or ModifiedResNet image tower.
    """

    method = "locoop"
    uses_local = True

    def __init__(self, encoder: Any, classes: Any, n_ctx: int | None = None, init: str | None = None,
                 csc: bool = False, seed: int = 0, lam: float = 0.25, top_k: int | None = None, **kwargs: Any):
        if not encoder.supports_local:
            raise InvalidInputError(f"LoCoOp needs local (per-patch) image features and {encoder.spec} has none "
                                    "(use an open_clip ViT or ModifiedResNet image tower); CoOp works without them")
        super().__init__(encoder, classes, n_ctx=n_ctx, init=init, csc=csc, seed=seed, **kwargs)
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(float(lam)) or lam < 0:
            raise InvalidInputError(f"lam must be a finite number >= 0, got {lam!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
            raise InvalidInputError(f"top_k must be a positive integer or None, got {top_k!r}")
        self.lam = float(lam)
        self.top_k = None if top_k is None else int(top_k)

    @property
    def top_k_(self) -> int:
        """The K in use: ``top_k``, or the reference's 200 scaled to the class count."""
        return self.top_k if self.top_k is not None else default_top_k(len(self.classes))

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "lam": self.lam, "top_k": self.top_k_}

    def _loss(self, logits: torch.Tensor, local_logits: torch.Tensor | None,
              labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert local_logits is not None
        return locoop_loss(logits, local_logits, labels, top_k=self.top_k_, lam=self.lam)
