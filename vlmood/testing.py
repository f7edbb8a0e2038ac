"""Helpers for tests and benchmarks: a tiny random-initialised CLIP built in-process."""
from __future__ import annotations

import torch

from .encoders.base import EncoderSpec
from .encoders.open_clip_backend import OpenCLIPEncoder, load_open_clip

TINY_ARCH = "vlmood-tiny-vit"
"""A registered open_clip architecture: ViT with 32 px images, patch 8, 2 layers, width 64; text width 64, 2 layers."""


def tiny_encoder(seed: int = 0, device: str | torch.device | None = "cpu", precision: str | None = None) -> OpenCLIPEncoder:
    """A small random-initialised CLIP (``open_clip:vlmood-tiny-vit/none:seed=SEED``), deterministic in ``seed``.

    Save it with ``enc.save(path)`` and load it back with ``load_encoder(f"open_clip:{TINY_ARCH}@{path}")``.
    """
    return load_open_clip(EncoderSpec("open_clip", TINY_ARCH, seed=seed), device=device, precision=precision)
