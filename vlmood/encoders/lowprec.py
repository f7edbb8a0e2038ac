"""A float32 LayerNorm for towers held in bf16/fp16 (its own module: it subclasses ``torch.nn.Module``, so importing
:mod:`vlmood.encoders.base` needs no torch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class LayerNormFp32(torch.nn.LayerNorm):
    """A LayerNorm with float32 parameters that normalises in float32 and returns the input's dtype (open_clip's
    ``LayerNormFp32``), for towers whose other weights are held in bf16/fp16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)
