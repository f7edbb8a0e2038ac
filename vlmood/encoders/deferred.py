"""An encoder that is built only when needed: warm runs answer from the caches without loading the model.

:func:`vlmood.load_encoder` with ``defer=True`` returns a :class:`DeferredEncoder` when a valid fingerprint record
exists for the spec's weights (:mod:`vlmood.encoders.record`). It has the real encoder's fingerprint, logit scale,
embedding width, preprocessing key and the other properties caches and detectors read, so a run whose images and
prompts are all cached never builds the model. Anything else (encoding an image or a prompt that is not cached, the
``model``, ``preprocess``, the tokenizer of an open_clip architecture) builds the real encoder once, checks that its
fingerprint is the recorded one, and delegates to it from then on.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch

from ..errors import EncoderLoadError
from . import record as _record
from .base import Encoder, EncoderSpec, ImageInput, resolve_device, resolve_precision

_OWN = frozenset({"_real", "_card", "_fingerprint", "_device_arg", "_precision_arg", "_tokenizer"})


class DeferredEncoder(Encoder):
    """Stands in for the encoder of ``spec`` (see the module doc); :attr:`loaded` tells whether the model was built."""

    def __init__(self, spec: EncoderSpec, rec: dict[str, Any], device: Any = None, precision: str | None = None):
        object.__setattr__(self, "_real", None)
        self.spec = spec
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self._device_arg, self._precision_arg = device, precision
        self._fingerprint = rec["fingerprint"]
        self._card = rec["card"]
        self.image_batch_size = int(self._card["image_batch_size"])
        self.text_batch_size = int(self._card["text_batch_size"])

    # ---------------------------------------------------------------- from the record
    @property
    def logit_scale(self) -> float:
        return float(self._card["logit_scale"][self.precision])

    @property
    def embed_dim(self) -> int:
        return int(self._card["embed_dim"])

    @property
    def supports_local(self) -> bool:
        return bool(self._card["supports_local"])

    @property
    def preprocess_key(self) -> str:
        return str(self._card["preprocess_key"])

    @property
    def exact_text_trimming(self) -> bool:
        return bool(self._card["exact_text_trimming"])

    @property
    def word_level_tokenizer(self) -> bool:
        if self._real is None:
            return bool(self._card["word_level_tokenizer"])
        return self._real.word_level_tokenizer

    @property
    def loaded(self) -> bool:
        """Whether the real encoder has been built."""
        return self._real is not None

    # ---------------------------------------------------------------- the real encoder
    def materialize(self) -> Encoder:
        """Build the real encoder (once) and return it; its fingerprint must be the recorded one."""
        if self._real is None:
            from . import load_encoder

            real = load_encoder(self.spec, device=self._device_arg, precision=self._precision_arg)
            if real.fingerprint != self._fingerprint:
                _record.forget(self.spec)
                raise EncoderLoadError(
                    f"the weights of {self.spec} changed while this run used their record (recorded fingerprint "
                    f"{self._fingerprint}, now {real.fingerprint}); the record is removed: run again")
            real.image_batch_size, real.text_batch_size = self.image_batch_size, self.text_batch_size
            object.__setattr__(self, "_real", real)
        return self._real

    def __getattr__(self, name: str) -> Any:  # only for what this object does not have (model, preprocess, ...)
        if name in _OWN or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in ("image_batch_size", "text_batch_size") and self._real is not None:
            setattr(self._real, name, value)

    # ---------------------------------------------------------------- delegated work
    def encode_images(self, images: ImageInput, local: bool = False, batch_size: int | None = None):
        return self.materialize().encode_images(images, local=local, batch_size=batch_size)

    def _encode_image_batch(self, batch: torch.Tensor, local: bool):
        return self.materialize()._encode_image_batch(batch, local)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        return self.materialize().tokenize(texts)

    def _encode_token_batch(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        return self.materialize()._encode_token_batch(tokens, length)

    def _own_forward(self) -> contextlib.AbstractContextManager:
        return self.materialize()._own_forward()

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.materialize().autocast()

    def __repr__(self) -> str:
        state = "model built" if self._real is not None else "model not built yet"
        return f"<DeferredEncoder {self.describe()}, {state}>"
