"""CLIPN's detectors (Wang et al., "CLIPN for Zero-Shot OOD Detection: Teaching CLIP to Say No", ICCV 2023).

With ``s`` the logit scale, image feature ``x``, and per ID class ``c`` the template-ensemble embeddings ``t_c`` of
the "yes" (original) text tower and ``u_c`` of the trained "no" tower (mean no prompt)::

    logits_yes_c = s * x . t_c          logits_no_c = s * x . u_c
    p_yes_c      = softmax([logits_yes_c, logits_no_c])[0]
    CTW  = p_yes at argmax_c logits_yes                       (competing-to-win)
    ATD  = sum_c softmax(logits_yes)_c * p_yes_c                (agreeing-to-differ, as the reference code)

Higher = more in-distribution for both. As xmed-lab/CLIPN (``src/zero_shot_infer.py``, ``src/classification.py``):
the class embeddings are the normalised sums of the per-template normalised embeddings (equal to vlmood's
normalised mean), the default templates are the reference's 128 (``prompts/templates/clipn.txt``). One difference:
the reference multiplies by a fixed ``s = 100`` ("the logit scale in CLIPN", the value of its ViT-B/16's learned
scale); vlmood uses the encoder's own scale unless ``logit_scale`` is given, so ``logit_scale=100`` reproduces the
reference on any model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .. import scores
from .._lazy import torch
from ..errors import InvalidInputError
from ..text.embed import class_embeddings
from .base import Detector, _unpack, nan_where_not_finite

if TYPE_CHECKING:
    from ..clipn.model import CLIPNModel
    from ..encoders.base import Encoder

SCORES = ("ctw", "atd")
DEFAULT_TEMPLATES = "clipn"


def _resolve_model(encoder_or_model: Any, no: Any) -> "CLIPNModel":
    """The CLIPN model of the detector's first argument and ``no=`` (see :class:`CLIPN`)."""
    from ..clipn.model import CLIPNModel

    if isinstance(encoder_or_model, CLIPNModel):
        if no is not None:
            raise InvalidInputError("give a CLIPNModel or an encoder with no=, not both")
        return encoder_or_model
    enc = encoder_or_model
    if isinstance(no, CLIPNModel):
        if no.encoder is not enc and no.encoder.fingerprint != enc.fingerprint:
            raise InvalidInputError(f"the CLIPN model was trained on {no.encoder.spec}, not on {enc.spec}")
        return no
    if isinstance(no, (str, os.PathLike)):
        return CLIPNModel.load(no, encoder=enc, arch=enc.spec.name)
    if no is not None:
        raise InvalidInputError(f"no= must be a CLIPNModel or the path of a CLIPN file, got {type(no).__name__}")
    shipped = shipped_no_side(enc)
    if shipped is None:
        raise InvalidInputError(
            f"CLIPN needs a trained 'no' text tower for {enc.spec}: pass a CLIPNModel, no='clipn.safetensors' "
            "(from `vlmood train clipn` or CLIPNModel.save), or a reference checkpoint (CLIPN.load)")
    return CLIPNModel.load(shipped, encoder=enc)


def shipped_no_side(encoder: "Encoder") -> Path | None:
    """The no side that ships with vlmood for ``encoder`` (the toy world's CLIP), or None."""
    import json

    from ..toyworld.model import CLIPN_CHECKPOINT

    if not CLIPN_CHECKPOINT.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(CLIPN_CHECKPOINT), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    return CLIPN_CHECKPOINT if meta.get("encoder", {}).get("fingerprint") == encoder.fingerprint else None


class CLIPN(Detector):
    """CLIPN's CTW or ATD score (see the module docstring for the formulas); higher = more ID.

    Args:
        encoder_or_model: a :class:`vlmood.clipn.CLIPNModel` (base CLIP + trained no side), or an encoder together
            with ``no=``. For the toy world's CLIP (``load_encoder("toyworld")``) the no side vlmood ships is used
            when ``no`` is None.
        classes: ID class names.
        templates: prompt templates for both towers (default the reference's 128, ``clipn``).
        score: ``"ctw"`` or ``"atd"``.
        no: the no side: a :class:`~vlmood.clipn.CLIPNModel` or the path of a CLIPN file (vlmood's or the
            reference's checkpoint) trained on this encoder.
        logit_scale: ``s``; None uses the encoder's (the reference fixes 100).
        cache: text-embedding cache; the no side's class embeddings are keyed by the no side's own fingerprint.

    Attributes: ``model`` (the :class:`~vlmood.clipn.CLIPNModel`), ``text_features_no`` ``[C, D]``.
    """

    name = "clipn"
    param_names = ("score", "logit_scale")

    def __init__(self, encoder_or_model: Any, classes: str | Sequence[str] | None = None,
                 templates: str | Sequence[str] | None = None, *, score: str = "ctw", no: Any = None,
                 logit_scale: float | None = None, cache: Any = True, prompts: Any = None):
        if prompts is not None:
            raise InvalidInputError("CLIPN does not take learned prompts (prompts=): its text side is the template "
                                    "ensemble of both towers")
        if score not in SCORES:
            raise InvalidInputError(f"CLIPN score must be one of {SCORES}, got {score!r}")
        from ..clipn.model import CLIPNModel

        model = encoder_or_model if isinstance(encoder_or_model, CLIPNModel) else None
        encoder = model.encoder if model is not None else encoder_or_model
        super().__init__(encoder, classes, DEFAULT_TEMPLATES if templates is None else templates, cache=cache)
        self.model = _resolve_model(encoder_or_model, no)
        self.score_rule = score
        self.logit_scale = None if logit_scale is None else scores.check_positive(logit_scale, "logit_scale")
        self._text_no: torch.Tensor | None = None

    @classmethod
    def load(cls, path: str | os.PathLike, classes: str | Sequence[str], templates: Any = None, *,
             encoder: "Encoder | None" = None, arch: str = "ViT-B-16", score: str = "ctw", **kw: Any) -> "CLIPN":
        """A detector from a CLIPN file: vlmood's (``CLIPNModel.save``) or a reference checkpoint (base CLIP of the
        open_clip architecture ``arch`` plus the ``_no`` keys). ``encoder=None`` builds the base CLIP from the
        file; a given encoder must be the one the file was trained on."""
        from ..clipn.model import CLIPNModel

        return cls(CLIPNModel.load(path, encoder=encoder, arch=arch), classes, templates, score=score, **kw)

    def __repr__(self) -> str:
        return f"CLIPN({len(self.classes)} classes, {self.score_rule}, {len(self.templates)} templates, " \
               f"{self.encoder.spec})"

    def get_params(self) -> dict[str, Any]:
        return {"score": self.score_rule, "logit_scale": self.logit_scale}

    @property
    def scale(self) -> float:
        """The logit scale ``s`` used: ``logit_scale`` or the encoder's."""
        return self.encoder.logit_scale if self.logit_scale is None else self.logit_scale

    def fit(self, *_: Any) -> "CLIPN":
        """Compute (or read from the cache) the yes and no class embeddings. Returns ``self``."""
        super().fit()
        if self._text_no is None:
            self._text_no = class_embeddings(self.model.no_text_encoder(), self.classes, self.templates,
                                             cache=self.cache)
        return self

    @property
    def text_features_no(self) -> torch.Tensor:
        """No-side class embeddings ``[C, D]``, L2-normalised."""
        return self.fit()._text_no  # type: ignore[return-value]

    def logits(self, image_features: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits_yes, logits_no)``, both ``[N, C]`` (scaled), of global features ``[N, D]`` or ``Features``."""
        g = self.global_features(_unpack(image_features, None)[0])
        return self.scale * (g @ self.text_features.T), self.scale * (g @ self.text_features_no.T)

    def p_yes(self, image_features: Any) -> np.ndarray:
        """Per-class "yes" probabilities ``[N, C]`` (``softmax([yes_c, no_c])[0]``)."""
        return scores.p_yes(*self.logits(image_features))

    def score_features(self, image_features: Any, local_features: Any = None) -> np.ndarray:
        g = self.global_features(_unpack(image_features, None)[0])
        ly, ln = self.logits(g)
        out = scores.ctw(ly, ln) if self.score_rule == "ctw" else scores.atd(ly, ln)
        return nan_where_not_finite(out, g)


class CLIPNATD(CLIPN):
    """:class:`CLIPN` with the ATD score by default (method name ``clipn-atd``)."""

    name = "clipnatd"

    def __init__(self, encoder_or_model: Any, classes: str | Sequence[str] | None = None,
                 templates: str | Sequence[str] | None = None, *, score: str = "atd", **kw: Any):
        super().__init__(encoder_or_model, classes, templates, score=score, **kw)
