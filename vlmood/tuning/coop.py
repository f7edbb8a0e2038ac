"""CoOp: context optimisation for a frozen CLIP (Zhou et al., "Learning to Prompt for Vision-Language Models",
IJCV 2022; reference code KaiyangZhou/CoOp, ``trainers/coop.py``).

The class prompts are ``[SOS] ctx_1 .. ctx_n classname . [EOS]`` with learnable context vectors ``ctx``; with
``t_c`` the normalised text feature of class ``c`` and ``f`` the normalised global image feature::

    logits_c = logit_scale * cos(f, t_c)
    L_CoOp   = CE(logits, y)

Only ``ctx`` trains; both towers stay frozen (see :mod:`vlmood.tuning.trainer` for the optimisation schedule).
"""
from __future__ import annotations

import torch

from ..losses import coop_loss
from .trainer import PromptTrainer


class CoOp(PromptTrainer):
    """CoOp prompt learning; see :class:`~vlmood.tuning.trainer.PromptTrainer` for the arguments and ``fit``."""

    method = "coop"
    uses_local = False

    def _loss(self, logits: torch.Tensor, local_logits: torch.Tensor | None,
              labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce = coop_loss(logits, labels)
        return ce, {"ce": ce}
