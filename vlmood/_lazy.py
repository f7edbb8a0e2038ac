"""torch, imported when first used.

Importing torch takes 2-3 s on a small machine, more than everything else a fully cached ``vlmood eval`` does
(reading the caches, scoring, writing the report). The modules on that path (detectors, features, text embeddings,
score kernels, encoder records) write ``from .._lazy import torch`` instead of ``import torch``: the name behaves as
the module, and the real import happens at the first attribute access (``torch.cat``, ``torch.Tensor``...). Code
that must not trigger it asks :func:`is_tensor` (false without importing torch when torch is not loaded: then no
tensor can exist) or :func:`loaded`.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any


class _LazyModule:
    """Stands for the module ``name``; every attribute is read from the real module, imported on first use."""

    __slots__ = ("_name",)

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        # import_module, not sys.modules: while another thread is still importing the module, it waits for the
        # import to finish instead of handing out a partly initialised module
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}{' (imported)' if self._name in sys.modules else ''}>"


torch: Any = _LazyModule("torch")
F: Any = _LazyModule("torch.nn.functional")


def loaded() -> bool:
    """Whether torch has been imported in this process."""
    return "torch" in sys.modules


def is_tensor(x: Any) -> bool:
    """``isinstance(x, torch.Tensor)``, without importing torch (when it is not loaded, ``x`` cannot be one)."""
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)  # None too while torch is still being imported
    return tensor is not None and isinstance(x, tensor)


def as_array(x: Any, dtype: Any = None) -> Any:
    """``x`` as a numpy array on the CPU (a tensor is detached and moved; bfloat16/float16 tensors are widened to
    float32 first, numpy having no bfloat16), cast to ``dtype`` when given (no copy when it already is)."""
    import numpy as np

    if is_tensor(x):
        t = x.detach()
        if t.dtype in (sys.modules["torch"].bfloat16, sys.modules["torch"].float16):
            t = t.float()
        x = t.cpu().numpy()
    return np.asarray(x, dtype=dtype)
