"""Detectors: one small class per method; every ``score`` is higher for more in-distribution inputs."""
from __future__ import annotations

import difflib
from typing import Any, Sequence

from ..encoders.base import Encoder
from ..errors import InvalidInputError
from .base import Detector, Prediction
from .clipn import CLIPN, CLIPNATD
from .glmcm import GLMCM
from .mcm import MCM, Energy, MaxLogit
from .neglabel import CSP, NegLabel
from .persist import load_detector, read_detector_meta

DETECTORS: dict[str, type[Detector]] = {cls.name: cls for cls in (MCM, GLMCM, Energy, MaxLogit, NegLabel, CSP, CLIPN,
                                                                   CLIPNATD)}
DETECTORS["clipnctw"] = CLIPN  # CLIPN's default score, by its name


def canonical_method(name: str) -> str:
    """The registry key of a method name (case, ``-`` and ``_`` ignored: ``GL-MCM`` -> ``glmcm``).

    An unknown name raises a one-line :class:`InvalidInputError` suggesting the closest method (``mcmm`` -> ``mcm``).
    """
    key = str(name).lower().replace("-", "").replace("_", "").replace(" ", "")
    if key not in DETECTORS:
        close = difflib.get_close_matches(key, list(DETECTORS), n=1, cutoff=0.6)
        choices = ", ".join(DETECTORS)
        hint = f"did you mean {close[0]!r}? (methods: {choices})" if close else f"choose from {choices}"
        raise InvalidInputError(f"unknown method {name!r}; {hint}")
    return key


def make_detector(name: str, encoder: Encoder, classes: str | Sequence[str] | None, **kwargs: Any) -> Detector:
    """A detector by method name (``mcm``, ``glmcm``, ``energy``, ``maxlogit``, ``neglabel``, ``csp``, ``clipn`` /
    ``clipn-ctw``, ``clipn-atd``).

    ``kwargs`` go to the detector, e.g. ``templates=`` or ``prompts=`` (learned prompts or their file; ``classes``
    may then be None).
    """
    return DETECTORS[canonical_method(name)](encoder, classes, **kwargs)


__all__ = ["CLIPN", "CLIPNATD", "CSP", "DETECTORS", "canonical_method", "Detector", "Energy", "GLMCM", "MCM", "MaxLogit", "NegLabel", "Prediction",
           "load_detector", "make_detector", "read_detector_meta"]
