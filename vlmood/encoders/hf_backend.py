"""Hugging Face transformers backend: ``hf:MODEL_ID_OR_DIR`` (``CLIPModel``; ``SiglipModel`` with full-length text)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import EncoderLoadError
from .base import Encoder, EncoderSpec, resolve_device, resolve_precision

_CAUSAL_TYPES = ("clip",)  # text towers verified causal with end-token pooling: trimming is exact
_SUPPORTED = ("clip", "siglip", "siglip2")


def _features(out: Any) -> torch.Tensor:
    """transformers < 5 returns a tensor from ``get_*_features``; 5.x returns an output with ``pooler_output``."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFEncoder(Encoder):
    """A transformers dual encoder behind the :class:`Encoder` interface."""

    def __init__(self, model, tokenizer, image_processor, spec: EncoderSpec, device, precision: str):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.spec = spec
        self.device = device
        self.precision = precision
        self.model_type = model.config.model_type
        # bf16/fp16: every weight in that dtype (what transformers' torch_dtype gives) except the LayerNorms, which
        # normalise in float32, and the logit scale and bias (see base.cast_to_low_precision)
        self._hold_precision(self.model)
        self.model.to(device)
        tcfg = model.config.text_config
        self.context_length = int(getattr(tcfg, "max_position_embeddings", 77))

    def preprocess(self, image) -> torch.Tensor:  # type: ignore[override]
        """PIL image -> ``[3, H, W]`` tensor with the model's own image processor."""
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    @property
    def preprocess_key(self) -> str:
        return self.image_processor.to_json_string()

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp().reshape(-1)[0])

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim if hasattr(self.model.config, "projection_dim")
                   else self.model.config.text_config.hidden_size)

    @property
    def exact_text_trimming(self) -> bool:
        return self.model_type in _CAUSAL_TYPES

    def _encode_image_batch(self, batch: torch.Tensor, local: bool):
        return _features(self.model.get_image_features(pixel_values=batch))

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        enc = self.tokenizer(
            list(texts), padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        )
        ids = enc["input_ids"]
        if self.exact_text_trimming and "attention_mask" in enc:
            lengths = enc["attention_mask"].sum(dim=1).tolist()
        else:
            lengths = [ids.shape[1]] * len(texts)
        return ids, lengths

    def _encode_token_batch(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        # CLIP's text tower is causal and pools at the end token, so positions after it (padding) never
        # reach the pooled output: no attention mask is needed, and trimming to ``length`` is exact.
        ids = tokens[:, :length] if self.exact_text_trimming else tokens
        with self._own_forward():
            return _features(self.model.get_text_features(input_ids=ids))

    def _arch_name(self) -> str:
        return f"{self.model_type}:{Path(self.spec.name).name}"


def load_hf(spec: EncoderSpec, device=None, precision: str | None = None) -> HFEncoder:
    """Load a transformers dual encoder (``CLIPModel``, ``SiglipModel``) from a hub id or a local folder."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    name = spec.name
    try:
        cfg = AutoConfig.from_pretrained(name)
    except Exception as e:
        where = "local folder" if Path(name).exists() else "hub model"
        raise EncoderLoadError(
            f"could not load the config of {where} {name!r}: {type(e).__name__}: {e}. Hub models are cached under "
            "HF_HOME; offline, set HF_HUB_OFFLINE=1 with a filled cache or pass a local folder (hf:/path/to/model)."
        ) from e
    if cfg.model_type not in _SUPPORTED:
        raise EncoderLoadError(
            f"hf:{name} is a {cfg.model_type!r} model; vlmood supports {', '.join(_SUPPORTED)} dual encoders"
        )
    try:
        model = AutoModel.from_pretrained(name).float()
        tokenizer = AutoTokenizer.from_pretrained(name)
        image_processor = AutoImageProcessor.from_pretrained(name)
    except Exception as e:
        raise EncoderLoadError(f"could not load hf:{name}: {type(e).__name__}: {e}") from e
    return HFEncoder(model, tokenizer, image_processor, spec, dev, prec)
