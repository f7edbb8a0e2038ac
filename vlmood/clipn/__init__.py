"""CLIPN: teaching CLIP to say "no" (Wang et al., ICCV 2023): the model (:mod:`.model`), image-caption training
data (:mod:`.pairs`) and training (:mod:`.trainer`). The detector is :class:`vlmood.detectors.CLIPN`; the loss and
scores are the pure kernels :func:`vlmood.losses.clipn_loss`, :func:`vlmood.scores.ctw` and
:func:`vlmood.scores.atd`."""
from __future__ import annotations

from .model import MEAN_PROMPT, NUM_NO_PROMPTS, CLIPNModel, NoTextEncoder, NoTower
from .pairs import PairSource, as_pairs
from .trainer import CLIPNTrainer

__all__ = ["CLIPNModel", "CLIPNTrainer", "MEAN_PROMPT", "NUM_NO_PROMPTS", "NoTextEncoder", "NoTower", "PairSource",
           "as_pairs"]
