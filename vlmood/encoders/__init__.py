"""Encoders: one :class:`Encoder` interface over open_clip and Hugging Face transformers models."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from .base import (Encoder, EncoderSpec, device_type_without_torch, image_items, parse_spec, resolve_device,
                   resolve_precision)
from .registry import register_model, register_tokenizer

if TYPE_CHECKING:
    import torch


def load_encoder(spec: str | EncoderSpec, device: str | torch.device | None = None, precision: str | None = None,
                 defer: bool = False) -> Encoder:
    """Load a CLIP-style encoder from a spec string.

    Args:
        spec: ``open_clip:ARCH/PRETRAINED`` (e.g. ``open_clip:ViT-B-16/openai``), ``open_clip:ARCH/none``
            (random init, seed 0; ``open_clip:ARCH/none:seed=N`` for another seed),
            ``open_clip:ARCH@/path/to/checkpoint``, ``open_clip:hf-hub:ORG/REPO``,
            ``hf:MODEL_ID_OR_DIR`` (transformers ``CLIPModel``/``SiglipModel``), or a registered name such as
            ``toyworld`` (see :class:`EncoderSpec` and :mod:`vlmood.encoders.registry`).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``...; default CUDA when available, else CPU.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``: the dtype the weights are held and run in (cast once at
            load, as open_clip's ``precision`` option: LayerNorms, embeddings and the logit scale stay float32);
            default bf16 (else fp16) on CUDA, fp32 on CPU. Features are float32 at every precision, and the
            fingerprint names the weights whatever the precision (caches key the precision apart).
        defer: for runs that mostly read caches (``vlmood eval``, ``score``, ``calibrate`` use it): when these
            weights were loaded with ``defer=True`` before and are unchanged (a checkpoint file, a pretrained tag's
            file in the hub cache, an ``hf:`` folder or random initialisation; see :mod:`vlmood.encoders.record`),
            return a
            :class:`~vlmood.encoders.deferred.DeferredEncoder` that builds the model only if something is not
            cached; otherwise load now and record the weights' fingerprint for the next time.
    """
    parsed = spec if isinstance(spec, EncoderSpec) else parse_spec(spec)
    if defer:
        from . import record

        if device_type_without_torch(device) == "cpu":  # no GPU visible: the CPU, told without torch
            device = "cpu"
        with warnings.catch_warnings():  # the precision's own warning comes once, from the encoder built below
            warnings.simplefilter("ignore")
            prec = resolve_precision(precision, device_type_without_torch(device) or resolve_device(device))
        rec = record.lookup(parsed, prec)
        if rec is not None:
            from .deferred import DeferredEncoder

            return DeferredEncoder(parsed, rec, device=device, precision=precision)
        guard = record.file_guard(parsed)
        encoder = load_encoder(parsed, device=device, precision=precision)
        record.remember(parsed, encoder, guard)
        return encoder
    if parsed.backend == "open_clip":
        from .open_clip_backend import load_open_clip

        return load_open_clip(parsed, device=device, precision=precision)
    from .hf_backend import load_hf

    return load_hf(parsed, device=device, precision=precision)


__all__ = ["Encoder", "EncoderSpec", "image_items", "load_encoder", "parse_spec", "register_model",
           "register_tokenizer", "resolve_device", "resolve_precision"]
