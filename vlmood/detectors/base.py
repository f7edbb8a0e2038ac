"""The detector base class: ID class text embeddings, a score rule, calibration and prediction.

Convention: ``score`` is **higher for more in-distribution inputs**; ``is_ood = not (score >= threshold)``, so a
NaN score (from non-finite features) is always OOD, never ID.
"""
from __future__ import annotations

import math
import numbers
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import numpy as np

from .._lazy import as_array, is_tensor, torch
from ..encoders.base import Encoder, ImageInput
from ..errors import InvalidInputError
from ..metrics import threshold_at_tpr
from ..text.embed import CacheArg, class_embedding_array
from ..text.prompts import load_classes, load_templates

if TYPE_CHECKING:
    from ..tuning.prompts import LearnedPrompts

PromptsArg = Union["LearnedPrompts", str, os.PathLike, None]
"""Learned prompts for a detector: a :class:`~vlmood.tuning.LearnedPrompts`, the path of a file it saved, or None."""

DUPLICATE_COSINE = 0.9999
"""Class embeddings with a cosine above this are (near) identical: the model cannot tell those classes apart."""


def _is_features(x: Any) -> bool:
    from ..features import Features

    return isinstance(x, Features)


def _unpack(features: Any, local: Any) -> tuple[Any, Any]:
    """``(global, local)`` of ``Features`` (their arrays: no torch needed) or of separate arguments."""
    if _is_features(features):
        return features.global_array(), features.local if local is None else local
    return features, local


def _as_float_tensor(x: Any) -> torch.Tensor:
    return (x.detach() if is_tensor(x) else torch.as_tensor(np.asarray(x))).float()


def _as_float_array(x: Any) -> np.ndarray:
    """``x`` (tensor, array, nested lists) as a float32 numpy array on the CPU (no copy when it already is one)."""
    return as_array(x, np.float32)


def _numeric_array(x: Any) -> np.ndarray | None:
    """``x`` as a float array when it is numbers (array, tensor, or a list of numbers / of lists of numbers)."""
    if is_tensor(x):
        return x.detach().cpu().double().numpy()
    if isinstance(x, np.ndarray):
        return x.astype(np.float64) if np.issubdtype(x.dtype, np.number) else None
    if isinstance(x, (list, tuple)) and x:
        first = x[0]
        rows = isinstance(first, (list, tuple, np.ndarray)) or is_tensor(first)
        if all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (first if rows else x)):
            try:
                return np.asarray(x, dtype=np.float64)
            except (TypeError, ValueError):
                return None
    return None


def resolve_prompts(prompts: PromptsArg, encoder: Encoder) -> tuple["LearnedPrompts | None", Path | None]:
    """``(learned prompts, the file they were read from)`` for a detector's ``prompts=`` argument.

    A path is read with :meth:`LearnedPrompts.load <vlmood.tuning.LearnedPrompts.load>`; the prompts are then
    checked against ``encoder`` (another context width or an encoder without a causal text tower: one-line
    :class:`InvalidInputError`; another encoder of the same width: a warning). ``vlmood.tuning`` is imported here,
    not at module level, so importing the detectors stays light.
    """
    if prompts is None:
        return None, None
    from ..tuning.prompts import LearnedPrompts

    file = None
    if isinstance(prompts, (str, os.PathLike)):
        text = os.fsdecode(prompts)
        if not text.strip():
            raise InvalidInputError("prompts is an empty path; give a learned-prompts file (.safetensors)")
        file = Path(os.path.abspath(os.path.expanduser(text)))
        prompts = LearnedPrompts.load(file)
    elif not isinstance(prompts, LearnedPrompts):
        raise InvalidInputError(f"prompts must be LearnedPrompts or the path of a learned-prompts file, got "
                                f"{type(prompts).__name__}")
    prompts.check_encoder(encoder)
    return prompts, file


def check_threshold(threshold: Any) -> float:
    """``threshold`` as a float; a one-line :class:`InvalidInputError` unless it is a finite number."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise InvalidInputError(f"threshold must be a finite number, got {threshold!r}") from None
    if not math.isfinite(t):
        raise InvalidInputError(f"threshold must be a finite number, got {threshold!r}")
    return t


@dataclass
class Prediction:
    """Per-image results: ``labels`` [N] class indices, ``class_names`` [N], ``scores`` [N], ``is_ood`` [N] bools.

    ``is_ood`` is ``not (score >= threshold)``: a NaN score is OOD (its label is meaningless).
    """

    labels: np.ndarray
    class_names: list[str]
    scores: np.ndarray
    is_ood: np.ndarray


def nan_where_not_finite(scores: np.ndarray, features: Any, local: Any = None) -> np.ndarray:
    """``scores`` with NaN for every row whose global (or local) features hold NaN/Inf: such an image is OOD, never
    ID (an infinite feature would otherwise give Energy or MaxLogit an infinite, maximally-ID score). Features may be
    tensors or arrays."""
    g = _as_float_array(features)
    bad = ~np.isfinite(g).all(axis=1)
    if local is not None:
        loc = _as_float_array(local)
        if loc.ndim == 3 and loc.shape[0] == g.shape[0]:
            bad |= ~np.isfinite(loc.reshape(loc.shape[0], -1)).all(axis=1)
    if bool(bad.any()):
        scores = np.array(scores, dtype=np.float64 if scores.dtype == np.float64 else np.float32, copy=True)
        scores[bad] = np.nan
    return scores


class Detector:
    """Zero-shot OOD detector over a CLIP-style :class:`~vlmood.encoders.Encoder`.

    Args:
        encoder: the image/text encoder.
        classes: ID class names (list, bundled list name, file, or comma-separated string). With ``prompts``:
            None (the prompts' classes) or exactly the prompts' classes in the same order.
        templates: prompt templates (bundled name, file, list); default the bundled ``simple`` list
            (MCM's ``a photo of a {}``, see :func:`vlmood.text.load_templates`). Not together with ``prompts``.
        cache: text-embedding cache (``True``: the default disk cache).
        prompts: learned prompts (:class:`vlmood.tuning.LearnedPrompts`, or the path of a file saved by
            ``LearnedPrompts.save`` / ``vlmood train``): the ID class embeddings are then
            ``prompts.text_features(encoder)`` instead of the template ensemble. A file made with another encoder
            warns; one whose context does not fit the encoder is refused.

    Attributes: ``prompts`` (the :class:`~vlmood.tuning.LearnedPrompts` or None), ``prompts_file`` (the absolute
    path they were read from, or None), ``threshold_`` and ``tpr_`` (set by :meth:`calibrate`, None before; both
    kept by :meth:`save` / :func:`vlmood.load_detector`).

    ``fit()`` prepares the class text embeddings (zero-shot detectors learn nothing from images);
    ``score*`` return ``[N]`` arrays, higher = more in-distribution. Images may be given as anything
    :meth:`Encoder.encode_images <vlmood.encoders.Encoder.encode_images>` accepts (a path, folder, glob,
    manifest, PIL image, a list of these, or a preprocessed batch) or as :class:`vlmood.features.Features`.
    """

    name = "detector"
    needs_local = False
    param_names: tuple[str, ...] = ()
    """The hyper-parameters of ``__init__`` that :meth:`get_params` returns and detector files record."""

    def __init__(self, encoder: Encoder, classes: str | Sequence[str] | None = None,
                 templates: str | Sequence[str] | None = None, *, cache: CacheArg = True, prompts: PromptsArg = None):
        self.encoder = encoder
        if prompts is not None and templates is not None:
            raise InvalidInputError("give templates or prompts, not both: learned prompts replace the templates "
                                    "of the ID classes")
        self.prompts, self.prompts_file = resolve_prompts(prompts, encoder)
        if self.prompts is not None:
            self.classes = self.prompts.check_classes(None if classes is None else load_classes(classes))
            self.templates: list[str] = []  # the learned context replaces them
        else:
            if classes is None:
                raise InvalidInputError(f"{type(self).__name__} needs the ID classes (classes=...), or learned "
                                        "prompts (prompts=...) that carry them")
            self.classes = load_classes(classes)
            self.templates = load_templates(templates)
        self.cache = cache
        self.threshold_: float | None = None
        self.tpr_: float | None = None
        self._text: np.ndarray | None = None  # [C, D] float32; text_features gives it as a tensor

    def _text_side(self) -> str:
        if self.prompts is None:
            return f"{len(self.templates)} templates"
        p, method = self.prompts, self.prompts.meta.get("method")
        what = f"learned {method} prompts" if method else "learned prompts"
        where = f" from {self.prompts_file.name}" if self.prompts_file is not None else ""
        return f"{what}{where} ({p.n_ctx} {'class-specific' if p.csc else 'shared'} context tokens)"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.classes)} classes, {self._text_side()}, {self.encoder.spec})"

    def _class_text(self) -> np.ndarray:
        """``[C, D]`` L2-normalised ID class embeddings (float32 array): learned prompts' or the template
        ensemble's."""
        if self.prompts is None:
            return class_embedding_array(self.encoder, self.classes, self.templates, cache=self.cache)
        with warnings.catch_warnings():  # the other-encoder warning was given once, when the detector was built
            warnings.filterwarnings("ignore", message="learned prompts were trained with")
            return _as_float_array(self.prompts.text_features(self.encoder))

    def get_params(self) -> dict[str, Any]:
        """The method's hyper-parameters as ``__init__`` takes them (:attr:`param_names`), JSON values."""
        return {k: getattr(self, k) for k in self.param_names}

    def save(self, path: str | os.PathLike) -> Path:
        """Fit, then write the detector (settings, class list, text side, calibration, encoder record) as one
        ``vlmood.detector`` file (suffix ``.vlmood`` recommended); read it back with :func:`vlmood.load_detector`.
        See :mod:`vlmood.detectors.persist` for the format. Returns the path written."""
        from .persist import save_detector

        return save_detector(self, path)

    # ------------------------------------------------------------------ text side
    def fit(self, *_: Any) -> "Detector":
        """Compute (or read from the cache) the ID class embeddings, or those of the learned prompts. Returns
        ``self``.

        Warns when two classes get (near) identical embeddings (cosine > :data:`DUPLICATE_COSINE`): the model
        cannot tell them apart, typically because their names are unknown to its tokenizer.
        """
        if self._text is None:
            self._text = np.ascontiguousarray(self._class_text(), dtype=np.float32)
            self._warn_identical_classes(self._text)
            self._warn_unknown_words()
        return self

    def _warn_unknown_words(self) -> None:
        """Word-level tokenizers (the toy world's) map words outside their vocabulary to one unknown token: such a
        class name is scored as if the word were absent. BPE tokenizers (CLIP's) have no unknown words."""
        if not getattr(self.encoder, "word_level_tokenizer", False):
            return  # BPE tokenizers (open_clip, Hugging Face) have no unknown words; HF CLIP's unk id is its eos
        tok = getattr(self.encoder, "tokenizer", None)
        unk, encode = getattr(tok, "unk_token_id", None), getattr(tok, "encode", None)
        if unk is None or encode is None:
            return
        bad = [c for c in self.classes if unk in encode(c)]
        if bad:
            shown = ", ".join(repr(c) for c in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            warnings.warn(f"{len(bad)} ID class name(s) contain words unknown to the tokenizer of "
                          f"{self.encoder.spec}: {shown}; the model cannot read them, so their scores are meaningless",
                          stacklevel=3)

    def _warn_identical_classes(self, text: np.ndarray) -> None:
        pairs: list[tuple[int, int]] = []
        for start in range(0, len(text), 1024):  # row blocks: never a [C, C] matrix for 21k classes
            cos = text[start : start + 1024] @ text.T
            rows, cols = np.nonzero(cos > DUPLICATE_COSINE)
            pairs += [(start + r, c) for r, c in zip(rows.tolist(), cols.tolist()) if c > start + r]
        if not pairs:
            return
        shown = ", ".join(f"{self.classes[a]!r} ~ {self.classes[b]!r}" for a, b in pairs[:5])
        more = f" and {len(pairs) - 5} more" if len(pairs) > 5 else ""
        warnings.warn(
            f"{len(pairs)} pair(s) of ID classes have (near) identical text embeddings on {self.encoder.spec} "
            f"(cosine > {DUPLICATE_COSINE}): {shown}{more}. The model cannot tell them apart, so their scores are "
            "meaningless; the names may be unknown to the model's tokenizer (out of its vocabulary)",
            stacklevel=3)

    @property
    def text_features(self) -> torch.Tensor:
        """ID class embeddings ``[C, D]``, L2-normalised (a float32 tensor sharing the detector's array)."""
        return torch.from_numpy(self._text_array())

    def _text_array(self) -> np.ndarray:
        """The ID class embeddings as the detector holds them: a float32 numpy array ``[C, D]``."""
        return self.fit()._text  # type: ignore[return-value]

    def _check_width(self, width: int, what: str) -> None:
        d = self._text_array().shape[-1]
        if width != d:
            raise InvalidInputError(
                f"{what} have width {width} but the class text embeddings of {self.encoder.spec} have width {d}: "
                "the features were probably extracted with a different encoder than this detector's")

    def similarities(self, features: Any) -> torch.Tensor:
        """Cosine similarities to the ID classes: ``[N, D] -> [N, C]`` or ``[N, P, D] -> [N, P, C]`` (a float32
        tensor; computed as :meth:`_similarity_array`)."""
        return torch.from_numpy(self._similarity_array(features))

    def _similarity_array(self, features: Any) -> np.ndarray:
        """:meth:`similarities` as a float32 numpy array: the float32 matrix product of the features and the class
        embeddings, on the CPU (what the scores are computed from, whatever the features came as)."""
        f = _as_float_array(features)
        self._check_width(f.shape[-1] if f.ndim else 0, "image features")
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows give NaN, then NaN scores (OOD)
            return f @ self._text_array().T

    def global_features(self, image_features: Any) -> torch.Tensor:
        """Global features ``[N, D]`` (array, tensor or ``Features``) as float32, checked against the text side."""
        return torch.from_numpy(self._global_array(image_features))

    def _global_array(self, image_features: Any) -> np.ndarray:
        """:meth:`global_features` as a float32 numpy array."""
        f = _as_float_array(_unpack(image_features, None)[0])
        if f.ndim != 2:
            hint = " (one image: add a batch axis, x[None])" if f.ndim == 1 else ""
            raise InvalidInputError(f"image features must be [N, D], got shape {tuple(f.shape)}{hint}")
        self._check_width(f.shape[1], "image features")
        return f

    # ------------------------------------------------------------------ scoring
    def score_features(self, image_features: Any, local_features: Any = None) -> np.ndarray:
        """ID scores ``[N]`` from L2-normalised global features ``[N, D]`` (and local ``[N, P, D]`` if needed),
        or from a :class:`vlmood.features.Features` (which carries both). Rows with non-finite features
        score NaN (OOD)."""
        from_features = _is_features(image_features)
        image_features, local_features = _unpack(image_features, local_features)
        if self.needs_local and local_features is None:
            how = ("these Features were extracted without them: pass local=True to extract_features"
                   if from_features else "pass local_features [N, P, D] (encode_images(..., local=True)) or "
                   "Features from extract_features(..., local=True)")
            raise InvalidInputError(f"{type(self).__name__} needs local (per-patch) features; {how}")
        g = self._global_array(image_features)
        return nan_where_not_finite(self._score(self._similarity_array(g), local_features), g,
                                    local_features if self.needs_local else None)

    def _score(self, sims: np.ndarray, local_features: Any) -> np.ndarray:
        """Scores ``[N]`` from the global similarities ``[N, C]`` (float32 array) and, for detectors that need them,
        the local features."""
        raise NotImplementedError

    def local_reducer(self) -> Callable[[Any], Any] | None:
        """For a detector that needs local (patch) features: a function from one batch's patch features
        ``[B, P, D]`` to this detector's local values ``[B]`` (or ``[B, k]``), which :meth:`score_reduced` turns
        into scores; with it, patch features are reduced batch by batch and dropped
        (:func:`vlmood.features.extract_features`'s ``local_reducers``), so memory does not grow with the number
        of images. Its ``cache_key`` attribute names what it computes (the feature cache keeps its values).
        None (the default): the detector scores from the full local features only."""
        return None

    def score_reduced(self, image_features: Any, reduced: Any) -> np.ndarray:
        """ID scores ``[N]`` from global features ``[N, D]`` (or ``Features``) and the values of
        :meth:`local_reducer` for the same images (``Features.reduced[label]``); equal to :meth:`score_features`
        with the full local features. Rows whose global features or reduced values are not finite score NaN."""
        g = self._global_array(image_features)
        r = as_array(reduced, np.float64)
        if r.ndim not in (1, 2) or r.shape[0] != g.shape[0]:
            raise InvalidInputError(f"reduced local values must be [N={g.shape[0]}] or [N, k], got {tuple(r.shape)}")
        out = nan_where_not_finite(self._score_reduced(self._similarity_array(g), r), g)
        bad = ~np.isfinite(r.reshape(r.shape[0], -1)).all(axis=1)
        if bool(bad.any()):
            out = np.array(out, dtype=np.float64, copy=True)
            out[bad] = np.nan
        return out

    def _score_reduced(self, sims: np.ndarray, reduced: np.ndarray) -> np.ndarray:
        raise InvalidInputError(f"{type(self).__name__} has no local reducer: score it with score_features")

    def _features(self, images: ImageInput | Any, batch_size: int | None):
        if _is_features(images):
            return images, None
        out = self.encoder.encode_images(images, local=self.needs_local, batch_size=batch_size)
        return out if self.needs_local else (out, None)

    def score(self, images: ImageInput, batch_size: int | None = None) -> np.ndarray:
        """ID scores ``[N]`` of images: a path, folder, glob, manifest, PIL image, a list of these, a preprocessed
        tensor ``[N, 3, H, W]``, or ``Features``."""
        return self.score_features(*self._features(images, batch_size))

    def classify_features(self, image_features: Any) -> np.ndarray:
        """Index of the most similar ID class for each image: ``[N, D]`` (or ``Features``) ``-> [N]``."""
        return np.argmax(self._similarity_array(self._global_array(image_features)), axis=-1)

    def classify(self, images: ImageInput, batch_size: int | None = None) -> np.ndarray:
        """Predicted ID class index ``[N]`` for each image (same inputs as :meth:`score`)."""
        if _is_features(images):
            return self.classify_features(images)
        return self.classify_features(self.encoder.encode_images(images, batch_size=batch_size))

    # ------------------------------------------------------------------ decisions
    def calibrate(self, id_scores_or_images: Any, tpr: float = 0.95) -> float:
        """Set ``threshold_`` to the highest value that keeps a ``tpr`` fraction of ID inputs (and ``tpr_`` to
        ``tpr``); returns it.

        Accepts ID scores (1-D: an array, tensor or list of numbers) or ID images (anything :meth:`score`
        accepts, including ``Features``). Other arrays (features ``[N, D]``, scores ``[N, 1]``) and NaN scores
        raise a one-line :class:`InvalidInputError`.
        """
        x = id_scores_or_images
        images = _is_features(x) or ((isinstance(x, np.ndarray) or is_tensor(x)) and x.ndim == 4)
        arr = None if images else _numeric_array(x)
        if arr is None:
            scores = self.score(x)
        elif arr.ndim == 1:
            scores = arr
        else:
            hint = "; flatten it with .ravel()" if arr.ndim == 2 and 1 in arr.shape else (
                "; for image features use calibrate(det.score_features(features))" if arr.ndim == 2 else "")
            raise InvalidInputError(
                f"calibrate expects 1-D ID scores [N] or ID images (paths, a folder, PIL images, a [N, 3, H, W] "
                f"batch, Features); got an array of shape {arr.shape}{hint}")
        self.threshold_ = threshold_at_tpr(scores, tpr)
        self.tpr_ = float(tpr)
        return self.threshold_

    def predict_features(self, image_features: Any, local_features: Any = None,
                         threshold: float | None = None) -> Prediction:
        """Class, score and OOD decision (``not score >= threshold``: NaN scores are OOD) from precomputed features."""
        thr = self._threshold(threshold)
        scores = self.score_features(image_features, local_features)
        labels = self.classify_features(image_features)
        return Prediction(labels, [self.classes[i] for i in labels], scores, ~(np.isfinite(scores) & (scores >= thr)))

    def predict(self, images: ImageInput, threshold: float | None = None, batch_size: int | None = None) -> Prediction:
        """Class, score and OOD decision for images (same inputs as :meth:`score`); encodes each image once."""
        thr = self._threshold(threshold)  # before any image is encoded
        g, loc = self._features(images, batch_size)
        return self.predict_features(g, loc, thr)

    def _threshold(self, threshold: Any) -> float:
        thr = self.threshold_ if threshold is None else threshold
        if thr is None:
            raise InvalidInputError("no threshold: call calibrate(id_scores_or_images) first or pass threshold=")
        return check_threshold(thr)
