"""vlmood: out-of-distribution detection with vision-language models.

Convention everywhere: a detector's score is **higher for more in-distribution inputs**, and metrics treat
in-distribution as the positive class.

The public names below are imported on first use (PEP 562), so ``import vlmood``, ``vlmood --version`` and the
CLI's argument checks do not pay for torch, open_clip or matplotlib until they are needed.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CLIPNModel": "clipn", "CLIPNTrainer": "clipn",
    "CLIPN": "detectors", "CSP": "detectors", "DETECTORS": "detectors", "GLMCM": "detectors", "MCM": "detectors",
    "Detector": "detectors", "Energy": "detectors", "MaxLogit": "detectors", "NegLabel": "detectors",
    "Prediction": "detectors", "load_detector": "detectors", "make_detector": "detectors",
    "Encoder": "encoders", "load_encoder": "encoders", "parse_spec": "encoders",
    "Benchmark": "evaluation", "Report": "evaluation",
    "Features": "features", "extract_features": "features",
    "evaluate": "metrics",
    "EmbeddingCache": "text", "class_embeddings": "text", "embed_texts": "text", "load_classes": "text",
    "load_templates": "text",
    "CoOp": "tuning", "LearnedPrompts": "tuning", "LoCoOp": "tuning", "load_prompts": "tuning",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # a submodule (vlmood.data, vlmood.evaluation, ...), imported on first use as well
        if not name.startswith("_"):
            try:
                return importlib.import_module(f".{name}", __name__)
            except ModuleNotFoundError as e:
                if e.name != f"{__name__}.{name}":
                    raise
        raise AttributeError(f"module 'vlmood' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .clipn import CLIPNModel, CLIPNTrainer
    from .detectors import (CLIPN, CSP, DETECTORS, GLMCM, MCM, Detector, Energy, MaxLogit, NegLabel, Prediction,
                            load_detector, make_detector)
    from .encoders import Encoder, load_encoder, parse_spec
    from .evaluation import Benchmark, Report
    from .features import Features, extract_features
    from .metrics import evaluate
    from .text import EmbeddingCache, class_embeddings, embed_texts, load_classes, load_templates
    from .tuning import CoOp, LearnedPrompts, LoCoOp, load_prompts
