"""The detector base class: ID class text embeddings, a score rule, calibration and prediction.

Convention: ``score`` is **higher for more in-distribution inputs**; ``is_ood = score < threshold``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..encoders.base import Encoder, ImageInput
from ..metrics import threshold_at_tpr
from ..text.embed import CacheArg, class_embeddings
from ..text.prompts import load_classes, load_templates


def _unpack(features: Any, local: Any) -> tuple[Any, Any]:
    from ..features import Features

    if isinstance(features, Features):
        return features.features, features.local if local is None else local
    return features, local


@dataclass
class Prediction:
    """Per-image results: ``labels`` [N] class indices, ``class_names`` [N], ``scores`` [N], ``is_ood`` [N] bools."""

    labels: np.ndarray
    class_names: list[str]
    scores: np.ndarray
    is_ood: np.ndarray


class Detector:
    """Zero-shot OOD detector over a CLIP-style :class:`~vlmood.encoders.Encoder`.

    Args:
        encoder: the image/text encoder.
        classes: ID class names (list, bundled list name, file, or comma-separated string).
        templates: prompt templates (bundled name, file, list); default ``"a photo of a {}."``.
        cache: text-embedding cache (``True``: the default disk cache).

    ``fit()`` prepares the class text embeddings (zero-shot detectors learn nothing from images);
    ``score*`` return ``[N]`` arrays, higher = more in-distribution.
    """

    name = "detector"
    needs_local = False

    def __init__(self, encoder: Encoder, classes: str | Sequence[str], templates: str | Sequence[str] | None = None,
                 *, cache: CacheArg = True):
        self.encoder = encoder
        self.classes = load_classes(classes)
        self.templates = load_templates(templates)
        self.cache = cache
        self.threshold_: float | None = None
        self._text: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.classes)} classes, {len(self.templates)} templates, {self.encoder.spec})"

    # ------------------------------------------------------------------ text side
    def fit(self, *_: Any) -> "Detector":
        """Compute (or read from the cache) the ID class embeddings. Returns ``self``."""
        if self._text is None:
            self._text = class_embeddings(self.encoder, self.classes, self.templates, cache=self.cache)
        return self

    @property
    def text_features(self) -> torch.Tensor:
        """ID class embeddings ``[C, D]``, L2-normalised."""
        return self.fit()._text  # type: ignore[return-value]

    def similarities(self, features: Any) -> torch.Tensor:
        """Cosine similarities to the ID classes: ``[N, D] -> [N, C]`` or ``[N, P, D] -> [N, P, C]``."""
        f = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features).float()
        return f @ self.text_features.T

    # ------------------------------------------------------------------ scoring
    def score_features(self, image_features: Any, local_features: Any = None) -> np.ndarray:
        """ID scores ``[N]`` from L2-normalised global features ``[N, D]`` (and local ``[N, P, D]`` if needed),
        or from a :class:`vlmood.features.Features` (which carries both)."""
        image_features, local_features = _unpack(image_features, local_features)
        if self.needs_local and local_features is None:
            raise ValueError(f"{type(self).__name__} needs local (per-patch) features: pass local_features")
        return self._score(self.similarities(image_features), local_features)

    def _score(self, sims: torch.Tensor, local_features: Any) -> np.ndarray:
        raise NotImplementedError

    def _features(self, images: ImageInput, batch_size: int | None):
        out = self.encoder.encode_images(images, local=self.needs_local, batch_size=batch_size)
        return out if self.needs_local else (out, None)

    def score(self, images: ImageInput, batch_size: int | None = None) -> np.ndarray:
        """ID scores ``[N]`` of images (preprocessed tensor ``[N, 3, H, W]``, PIL images or paths)."""
        return self.score_features(*self._features(images, batch_size))

    def classify_features(self, image_features: Any) -> np.ndarray:
        """Index of the most similar ID class for each image: ``[N, D]`` (or ``Features``) ``-> [N]``."""
        image_features, _ = _unpack(image_features, None)
        return self.similarities(image_features).argmax(dim=-1).numpy()

    def classify(self, images: ImageInput, batch_size: int | None = None) -> np.ndarray:
        """Predicted ID class index ``[N]`` for each image."""
        g = self.encoder.encode_images(images, batch_size=batch_size)
        return self.classify_features(g)

    # ------------------------------------------------------------------ decisions
    def calibrate(self, id_scores_or_images: Any, tpr: float = 0.95) -> float:
        """Set ``threshold_`` to the highest value that keeps a ``tpr`` fraction of ID inputs; returns it.

        Accepts ID scores (a 1-D array) or ID images (anything :meth:`score` accepts).
        """
        x = id_scores_or_images
        is_scores = (isinstance(x, np.ndarray) and x.ndim == 1) or (isinstance(x, torch.Tensor) and x.ndim == 1) or (
            isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(v, (int, float, np.floating)) for v in x)
        )
        scores = np.asarray(x, dtype=np.float64) if is_scores else self.score(x)
        self.threshold_ = threshold_at_tpr(scores, tpr)
        return self.threshold_

    def predict_features(self, image_features: Any, local_features: Any = None,
                         threshold: float | None = None) -> Prediction:
        """Class, score and OOD decision (``score < threshold``) from precomputed features."""
        thr = self.threshold_ if threshold is None else threshold
        if thr is None:
            raise ValueError("no threshold: call calibrate(id_scores_or_images) first or pass threshold=")
        scores = self.score_features(image_features, local_features)
        labels = self.classify_features(image_features)
        return Prediction(labels, [self.classes[i] for i in labels], scores, scores < thr)

    def predict(self, images: ImageInput, threshold: float | None = None, batch_size: int | None = None) -> Prediction:
        """Class, score and OOD decision for images; encodes each image once."""
        g, loc = self._features(images, batch_size)
        return self.predict_features(g, loc, threshold)
