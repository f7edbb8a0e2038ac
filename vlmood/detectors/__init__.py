"""Detectors: one small class per method; every ``score`` is higher for more in-distribution inputs."""
from __future__ import annotations

from typing import Any, Sequence

from ..encoders.base import Encoder
from ..errors import InvalidInputError
from .base import Detector, Prediction
from .glmcm import GLMCM
from .mcm import MCM, Energy, MaxLogit
from .neglabel import CSP, NegLabel

DETECTORS: dict[str, type[Detector]] = {cls.name: cls for cls in (MCM, GLMCM, Energy, MaxLogit, NegLabel, CSP)}


def canonical_method(name: str) -> str:
    """The registry key of a method name (case, ``-`` and ``_`` ignored: ``GL-MCM`` -> ``glmcm``)."""
    key = str(name).lower().replace("-", "").replace("_", "").replace(" ", "")
    if key not in DETECTORS:
        raise InvalidInputError(f"unknown method {name!r}; choose from {', '.join(DETECTORS)}")
    return key


def make_detector(name: str, encoder: Encoder, classes: str | Sequence[str], **kwargs: Any) -> Detector:
    """A detector by method name (``mcm``, ``glmcm``, ``energy``, ``maxlogit``, ``neglabel``, ``csp``)."""
    return DETECTORS[canonical_method(name)](encoder, classes, **kwargs)


__all__ = ["CSP", "DETECTORS", "canonical_method", "Detector", "Energy", "GLMCM", "MCM", "MaxLogit", "NegLabel", "Prediction",
           "make_detector"]
