"""GL-MCM: global MCM plus the best local (per-patch) MCM."""
from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

import numpy as np

from .. import scores
from ..encoders.base import Encoder
from ..errors import InvalidInputError
from .base import Detector, _as_float_array
from .mcm import _need_two_classes


class GLMCM(Detector):
    """Global-Local Maximum Concept Matching (Miyai et al., "Zero-Shot In-Distribution Detection in
    Multi-Object Settings Using Vision-Language Foundation Models", 2023).

    ``score = mcm(global) + lam * max_{p, c} softmax_c(cos(x_p, t_c) / T)``, where ``x_p`` are the
    encoder's local patch features (``encode_images(..., local=True)``). Higher = more ID.
    """

    name = "glmcm"
    param_names = ("temperature", "lam")
    needs_local = True

    def __init__(self, encoder: Encoder, classes: str | Sequence[str] | None = None,
                 templates: str | Sequence[str] | None = None, temperature: float = 1.0, lam: float = 1.0, **kw: Any):
        super().__init__(encoder, classes, templates, **kw)
        _need_two_classes(self)
        self.temperature = scores.check_positive(temperature, "temperature")
        if not math.isfinite(lam):
            raise InvalidInputError(f"lam must be a finite number, got {lam!r}")
        self.lam = float(lam)

    def _score(self, sims: np.ndarray, local_features: Any) -> np.ndarray:
        loc = _as_float_array(local_features)
        if loc.ndim != 3 or loc.shape[0] != sims.shape[0]:
            raise InvalidInputError(f"local_features must be [N={sims.shape[0]}, P, D], got {tuple(loc.shape)}")
        self._check_width(loc.shape[2], "local (per-patch) features")
        text = self._text_array().T
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite patches: NaN, then a NaN score (OOD)
            chunks = [  # chunked so [N, P, C] similarities never exist in full
                scores.glmcm(sims[i : i + 256], loc[i : i + 256] @ text, self.temperature, self.lam)
                for i in range(0, loc.shape[0], 256)
            ]
        return np.concatenate(chunks) if chunks else np.empty(0)

    def local_reducer(self):
        """GL-MCM's local term batch by batch: patch features ``[B, P, D]`` to ``max_{p, c} softmax_c(cos(x_p, t_c) /
        T)`` ``[B]`` (NaN for rows with non-finite patch features); :meth:`score_reduced` adds ``mcm(global)`` and
        ``lam`` times it, equal to :meth:`score_features` with the full local features. Its ``cache_key`` names the
        class embeddings and the temperature."""
        text_array = self._text_array()
        temperature = self.temperature
        h = hashlib.sha256(f"glmcm-local-v1|{temperature!r}|{tuple(text_array.shape)}|".encode())
        h.update(np.ascontiguousarray(text_array, dtype=np.float32).tobytes())

        def reduce(local_features: Any) -> np.ndarray:
            loc = _as_float_array(local_features)
            if loc.ndim != 3:
                raise InvalidInputError(f"local_features must be [B, P, D], got {tuple(loc.shape)}")
            self._check_width(loc.shape[2], "local (per-patch) features")
            # numpy's stacked product, as _score computes it: the same values from a batch or the whole set
            with np.errstate(invalid="ignore", over="ignore"):
                out = scores.local_mcm(loc @ text_array.T, temperature)
            out[~np.isfinite(loc.reshape(loc.shape[0], -1)).all(axis=1)] = np.nan
            return out

        reduce.cache_key = f"glmcm-{h.hexdigest()[:32]}"  # type: ignore[attr-defined]
        return reduce

    def _score_reduced(self, sims: np.ndarray, reduced: np.ndarray) -> np.ndarray:
        if reduced.ndim != 1:
            raise InvalidInputError(f"GL-MCM's reduced local values must be [N], got {tuple(reduced.shape)}")
        return scores.mcm(sims, self.temperature) + self.lam * reduced
