"""An encoder that is built only when needed: warm runs answer from the caches without loading the model.

:func:`vlmood.load_encoder` with ``defer=True`` returns a :class:`DeferredEncoder` when a valid fingerprint record
exists for the spec's weights (:mod:`vlmood.encoders.record`). It has the real encoder's fingerprint, logit scale,
embedding width, preprocessing key and the other properties caches and detectors read, so a run whose images and
prompts are all cached never builds the model. The tokenizer of an architecture with a registered one (the toy
world's) is built alone. Anything else (encoding an image or a prompt that is not cached, the ``model``,
``preprocess``, open_clip's tokenizer, assigning an attribute other than the batch sizes) builds the real encoder
once (outside any ``torch.inference_mode``, so it can still be trained through), checks that its fingerprint is the
recorded one, and from then on every property and attribute is the real encoder's.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any, Sequence

from .._lazy import torch
from ..errors import EncoderLoadError
from . import record as _record
from . import registry
from .base import Encoder, EncoderSpec, ImageInput, device_type_without_torch, resolve_device, resolve_precision

_PRIVATE = frozenset({"_real", "_card", "_fingerprint", "_device_arg", "_precision_arg", "_tokenizer", "_device",
                      "_device_type"})
_MIRRORED = frozenset({"spec", "precision", "image_batch_size", "text_batch_size"})
"""Held by the proxy and, once it is built, set on the real encoder too."""
_OWN = _PRIVATE | _MIRRORED
_BUILD = threading.RLock()  # one build per proxy, whichever thread asks first


class DeferredEncoder(Encoder):
    """Stands in for the encoder of ``spec`` (see the module doc); :attr:`loaded` tells whether the model was built."""

    def __init__(self, spec: EncoderSpec, rec: dict[str, Any], device: Any = None, precision: str | None = None):
        object.__setattr__(self, "_real", None)
        self._tokenizer = None
        self.spec = spec
        # the CPU is told without importing torch where the machine shows no GPU (a warm run then never imports it);
        # the real encoder is then built on the CPU too, whatever torch would pick: the precision and the cache keys
        # used before the build are the CPU's
        self._device_type = device_type_without_torch(device)
        self._device = None if self._device_type is not None else resolve_device(device)
        self.precision = resolve_precision(precision, self._device_type or self._device)
        self._device_arg = "cpu" if self._device_type == "cpu" else device
        self._precision_arg = precision
        self._fingerprint = rec["fingerprint"]
        self._card = rec["card"]
        self.image_batch_size = int(self._card["image_batch_size"])
        self.text_batch_size = int(self._card["text_batch_size"])

    def _recorded(self, name: str) -> Any:
        """The real encoder's ``name`` once built, else the record's."""
        return getattr(self._real, name) if self._real is not None else self._card[name]

    # ---------------------------------------------------------------- from the record
    @property
    def logit_scale(self) -> float:
        if self._real is None and isinstance(self._card["logit_scale"].get(self.precision), float):
            return float(self._card["logit_scale"][self.precision])
        return self.materialize().logit_scale

    @property
    def embed_dim(self) -> int:
        return int(self._recorded("embed_dim"))

    @property
    def supports_local(self) -> bool:
        return bool(self._recorded("supports_local"))

    @property
    def preprocess_key(self) -> str:
        return str(self._recorded("preprocess_key"))

    @property
    def exact_text_trimming(self) -> bool:
        return bool(self._recorded("exact_text_trimming"))

    @property
    def word_level_tokenizer(self) -> bool:
        return bool(self._recorded("word_level_tokenizer"))

    @property
    def tokenizer(self) -> Any:
        """The real encoder's tokenizer; before the model is built, a registered architecture tokenizer (the toy
        world's) is built on its own, as the real encoder builds it; open_clip's own needs the real encoder."""
        if self._real is None and self._tokenizer is None:
            factory = registry.tokenizer_factory(self.spec.name)
            if factory is not None:
                self._tokenizer = factory(self.spec)
        return self._tokenizer if self._real is None and self._tokenizer is not None else self.materialize().tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self.materialize().tokenizer = value

    @property
    def device(self) -> "torch.device":
        """The real encoder's device once built; before, the one it will be built on (resolved now if it was not)."""
        if self._real is not None:
            return self._real.device
        if self._device is None:
            object.__setattr__(self, "_device", resolve_device(self._device_arg))
        return self._device

    @device.setter
    def device(self, value: Any) -> None:
        if self._real is not None:
            self._real.device = value
            return
        dev = resolve_device(value)  # checked before anything is changed: a bad device leaves the proxy as it was
        object.__setattr__(self, "_device", dev)
        object.__setattr__(self, "_device_arg", value)  # what the real encoder will be built with
        object.__setattr__(self, "_device_type", None)
        if self._precision_arg is None:  # the default precision follows the device, as it will in the build
            object.__setattr__(self, "precision", resolve_precision(None, dev))

    @property
    def device_name(self) -> str:
        if self._real is None and self._device is None and self._device_type is not None:
            return self._device_type
        return str(self.device)

    @property
    def loaded(self) -> bool:
        """Whether the real encoder has been built."""
        return self._real is not None

    # ---------------------------------------------------------------- the real encoder
    def materialize(self) -> Encoder:
        """Build the real encoder (once) and return it; its fingerprint must be the recorded one."""
        if self._real is None:
            with _BUILD:
                if self._real is None:
                    self._build()
        return self._real

    def _build(self) -> None:
        from . import load_encoder

        with torch.inference_mode(False), warnings.catch_warnings():
            # inference_mode(False): parameters built inside inference mode could never be trained through; the
            # precision's warning was given when this proxy was made
            warnings.filterwarnings("ignore", message=r"(bf16|fp16) on CPU", category=UserWarning)
            real = load_encoder(self.spec, device=self._device_arg, precision=self._precision_arg)
        if real.fingerprint != self._fingerprint:
            _record.forget(self.spec)
            raise EncoderLoadError(
                f"the weights of {self.spec} changed while this run used their record (recorded fingerprint "
                f"{self._fingerprint}, now {real.fingerprint}); the record is removed: run again")
        if real.precision != self.precision:  # not expected: the build gets the device the precision was resolved for
            raise EncoderLoadError(f"{self.spec} was built at {real.precision}, but this run keyed its caches for "
                                   f"{self.precision}; pass --device/--precision (device=, precision=) explicitly")
        real.image_batch_size, real.text_batch_size = self.image_batch_size, self.text_batch_size
        if self._tokenizer is not None:  # the registered tokenizer handed out (and perhaps changed) before the build
            real.tokenizer = self._tokenizer
        object.__setattr__(self, "_real", real)

    def __getattr__(self, name: str) -> Any:
        """Only for what this object does not have: an attribute of the real encoder (``model``, ``preprocess``,
        ...; the record lists them) builds it; any other name is an AttributeError, as on the real encoder."""
        if name in _OWN or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        card = self.__dict__.get("_card") or {}
        if self.__dict__.get("_real") is None and name not in card.get("attributes", ()):
            raise AttributeError(f"{type(self).__name__} (of {card.get('class', 'an encoder')}) has no attribute "
                                 f"{name!r}")
        return getattr(self.materialize(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN or hasattr(type(self), name):  # the proxy's fields, and its methods (e.g. monkeypatched)
            if isinstance(getattr(type(self), name, None), property):
                return object.__setattr__(self, name, value)  # a property: its setter, or the usual error
            object.__setattr__(self, name, value)
            if name in _MIRRORED:
                if self._real is not None:
                    setattr(self._real, name, value)
                elif name in ("device", "precision"):  # what the real encoder will be built with
                    object.__setattr__(self, f"_{name}_arg", value)
            return
        setattr(self.materialize(), name, value)  # e.g. preprocess: the real encoder's, so that its keys follow

    def __delattr__(self, name: str) -> None:
        if name in self.__dict__:
            object.__delattr__(self, name)
        elif self._real is not None and name in self._real.__dict__:
            delattr(self._real, name)
        else:
            raise AttributeError(name)

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
