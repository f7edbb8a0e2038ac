"""open_clip backend: ``open_clip:ARCH/PRETRAINED``, ``open_clip:ARCH@CKPT``, ``open_clip:hf-hub:ORG/REPO``."""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..errors import CheckpointMismatchError, EncoderLoadError, InvalidInputError, UnknownModelError
from . import registry
from .base import Encoder, EncoderSpec, cast_to_low_precision, resolve_device, resolve_precision

_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_registered = False


def _open_clip():
    global _registered
    import open_clip

    if not _registered:
        open_clip.add_model_config(_CONFIG_DIR)  # vlmood's own small architectures (vlmood-tiny-vit, ...)
        _registered = True
    return open_clip


def _hub_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return os.path.expanduser("~/.cache/huggingface/hub")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (safetensors or torch), unwrapping ``state_dict``/``model`` and ``module.``."""
    if not path.is_file():
        raise EncoderLoadError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]  # torch explains unpickling failures over many lines
        if "weights only load failed" in first.lower() or "weights_only" in first:
            first = ("it is not a checkpoint of tensors (torch.load with weights_only=True refused it: a pickled "
                     "object, or a corrupt file)")
        raise EncoderLoadError(f"cannot read checkpoint {path}: {type(e).__name__}: {first}") from e
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EncoderLoadError(f"checkpoint {path} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


CLIPN_NO_KEYS = ("transformer_no.", "token_embedding_no.", "positional_embedding_no", "ln_final_no.",
                 "text_projection_no", "prompt_no")
"""Prefixes of the parameter names of CLIPN's "no" side (xmed-lab/CLIPN); see :mod:`vlmood.clipn.model`."""


def is_clipn_no_key(name: str) -> bool:
    """Whether a state-dict key belongs to CLIPN's "no" side (a CLIPN checkpoint also holds its base CLIP)."""
    return any(name == k.rstrip(".") or name.startswith(k) for k in CLIPN_NO_KEYS)


def load_matching_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, arch: str) -> None:
    """Load ``sd`` into ``model``; any missing, unexpected or mis-shaped tensor raises an error naming them."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} (checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)})"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:

        def few(xs: list[str]) -> str:
            return ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {few(shapes)}")
        raise CheckpointMismatchError(
            f"checkpoint {source} does not match architecture {arch!r}; " + "; ".join(parts)
        )
    model.load_state_dict(sd, strict=True)


class OpenCLIPEncoder(Encoder):
    """An open_clip model behind the :class:`Encoder` interface."""

    def __init__(self, model, preprocess, tokenizer, spec: EncoderSpec, device, precision: str):
        """``model``: a float32 open_clip model (on the CPU, best: a reduced ``precision`` casts it there first,
        after taking the fingerprint) that is moved to ``device``."""
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.spec = spec
        self.device = device
        self.precision = precision
        self._hold_precision(self.model)
        self.model.to(device)
        self._trim_verified = False
        self._tower = self._text_tower()

    # ------------------------------------------------------------ properties
    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp().reshape(-1)[0])

    @property
    def embed_dim(self) -> int:
        visual = self.model.visual
        out = getattr(visual, "output_dim", None)
        if out:
            return int(out)
        if getattr(self, "_embed_dim", None) is None:  # exotic towers: ask the text tower once
            with torch.inference_mode(), self._own_forward():
                self._embed_dim = int(self.model.encode_text(self.tokenizer(["a"]).to(self.device)).shape[-1])
        return self._embed_dim

    @property
    def supports_local(self) -> bool:
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        v = self.model.visual
        if isinstance(v, ModifiedResNet):
            return getattr(v, "attnpool", None) is not None
        return (
            isinstance(v, VisionTransformer)
            and hasattr(v, "_embeds")
            and v.attn_pool is None
            and getattr(v, "pool_type", "tok") == "tok"
            and not getattr(v, "final_ln_after_pool", False)
            and isinstance(v.transformer.resblocks[-1], ResidualAttentionBlock)
            and isinstance(v.transformer.resblocks[-1].attn, torch.nn.MultiheadAttention)
        )

    @property
    def exact_text_trimming(self) -> bool:
        return self._tower is not None

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", None) or getattr(self.model, "context_length", 77))

    def _text_tower(self) -> dict[str, Any] | None:
        """The pieces needed to run the text tower over a trimmed length, or None when trimming is not exact."""
        m = self.model
        tower = m.text if hasattr(m, "text") else m
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
        if not all(hasattr(tower, n) for n in needed):
            return None  # e.g. Hugging Face text towers
        pool = getattr(tower, "pool_type", None) or getattr(tower, "text_pool_type", None)
        eos = getattr(tower, "eos_id", None) if hasattr(tower, "pool_type") else getattr(tower, "text_eos_id", None)
        if (
            tower.attn_mask is None  # bidirectional: every position sees padding
            or pool not in ("argmax", "eos")
            or getattr(tower, "cls_emb", None) is not None
            or getattr(tower, "use_pad_mask", False)
        ):
            return None
        return {"tower": tower, "pool": pool, "eos": eos}

    def _cast_weights(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        """What ``open_clip.create_model(..., precision="bf16"/"fp16")`` builds: for open_clip's own towers,
        ``convert_weights_to_lp`` (linear, convolution and attention weights and the projections in ``dtype``;
        embeddings, LayerNorms and the logit scale stay float32) and LayerNorms that normalise in float32
        (``LayerNormFp32``); for other towers (timm, Hugging Face text), everything in ``dtype`` but the LayerNorms
        and the logit scale and bias, as open_clip does for timm models (which also casts the logit scale)."""
        from open_clip.model import convert_weights_to_lp
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import LayerNorm, LayerNormFp32, TextTransformer, VisionTransformer

        text = getattr(model, "text", None)
        native_text = isinstance(text, TextTransformer) or (text is None and hasattr(model, "transformer"))
        if isinstance(getattr(model, "visual", None), (VisionTransformer, ModifiedResNet)) and native_text:
            convert_weights_to_lp(model, dtype=dtype)
            for m in model.modules():
                if type(m) is LayerNorm:
                    m.__class__ = LayerNormFp32  # the class open_clip builds for bf16/fp16 (same parameters)
        else:
            cast_to_low_precision(model, dtype, ln_class=LayerNormFp32, ln_types=(LayerNorm, LayerNormFp32))

    # ------------------------------------------------------------ images
    def _encode_image_batch(self, batch: torch.Tensor, local: bool):
        if not local:
            return self.model.encode_image(batch)
        from open_clip.modified_resnet import ModifiedResNet

        if isinstance(self.model.visual, ModifiedResNet):
            return self._resnet_global_and_local(batch)
        return self._global_and_local(batch)

    def _resnet_global_and_local(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ResNet towers: the attention pool's output, and per position of the last feature map its value
        path ``c_proj(v_proj(x))`` without query-key attention or positional embedding (as GL-MCM does for RN50)."""
        v = self.model.visual
        x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(batch.to(v.conv1.weight.dtype))))))
        pooled = v.attnpool(x)
        ap = v.attnpool
        tokens = x.flatten(2).transpose(1, 2)  # [N, H*W, C]
        return pooled, ap.c_proj(ap.v_proj(tokens))

    def _global_and_local(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global features and GL-MCM local features of a ViT tower.

        In the last block the value path skips query-key attention (as in the GL-MCM reference):
        ``v = x + out_proj(v_proj(ln_1(x))); v = v + mlp(ln_2(v))``, then ``ln_post`` and the projection
        for every patch token. The global feature is the ordinary forward.
        """
        visual = self.model.visual
        tr = visual.transformer
        x = visual._embeds(batch)
        if not tr.batch_first:
            x = x.transpose(0, 1)
        for blk in tr.resblocks[:-1]:
            x = blk(x)
        last = tr.resblocks[-1]
        width = last.attn.embed_dim
        w, b = last.attn.in_proj_weight, last.attn.in_proj_bias
        v = F.linear(last.ln_1(x), w[2 * width :], None if b is None else b[2 * width :])
        v = x + last.ls_1(last.attn.out_proj(v))
        v = v + last.ls_2(last.mlp(last.ln_2(v)))
        x = last(x)
        if not tr.batch_first:
            x, v = x.transpose(0, 1), v.transpose(0, 1)
        pooled, _ = visual._pool(x)
        patches = visual.ln_post(v[:, 1:])
        if visual.proj is not None:
            pooled = pooled @ visual.proj
            patches = patches @ visual.proj
        return pooled, patches

    # ------------------------------------------------------------ texts
    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        tokens = self.tokenizer(list(texts))
        ctx = tokens.shape[1]
        t = self._tower
        if t is not None and t["pool"] == "eos":
            lengths = ((tokens == t["eos"]).int().argmax(dim=-1) + 1).tolist()
        elif t is not None:
            lengths = (tokens.argmax(dim=-1) + 1).tolist()
        else:
            lengths = [ctx] * len(texts)
        self._warn_truncated(texts, tokens)
        return tokens, lengths

    def _truncated_rows(self, texts: Sequence[str], tokens: torch.Tensor) -> list[int]:
        """Rows of ``texts`` longer than the text context (cut by the tokenizer)."""
        full = (tokens[:, -1] != 0).nonzero().flatten().tolist()  # only rows reaching the last position can be cut
        if not full:
            return []
        enc = getattr(self.tokenizer, "encode", None)
        inner = getattr(self.tokenizer, "tokenizer", None)
        ctx = tokens.shape[1]
        cut = []
        for i in full:
            if enc is not None:
                n = len(enc(texts[i])) + 2
            elif inner is not None:
                n = len(inner(texts[i])["input_ids"])
            else:
                n = ctx + 1
            if n > ctx:
                cut.append(i)
        return cut

    def _warn_truncated(self, texts: Sequence[str], tokens: torch.Tensor) -> None:
        cut = [texts[i] for i in self._truncated_rows(texts, tokens)]
        if cut:
            ctx = tokens.shape[1]
            shown = "; ".join(repr(c if len(c) <= 80 else c[:77] + "...") for c in cut[:3])
            more = f" and {len(cut) - 3} more" if len(cut) > 3 else ""
            warnings.warn(
                f"{len(cut)} prompt(s) longer than the text context of {ctx} tokens were truncated: {shown}{more}",
                stacklevel=4,
            )

    def _encode_token_batch(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        with self._own_forward():
            if self._tower is None or length >= tokens.shape[1]:
                return self.model.encode_text(tokens)
            out = self._encode_trimmed(tokens, length)
            if not self._trim_verified and not self._verify_trimming(tokens[:4], out[:4]):
                return self.model.encode_text(tokens)  # this batch too: never keep (or cache) inexact embeddings
            return out

    def _encode_trimmed(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        t = self._tower
        tower = t["tower"]
        tok = tokens[:, :length]
        cast = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(tok).to(cast)
        x = x + tower.positional_embedding[:length].to(cast)
        x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
        x = tower.ln_final(x)
        x = text_global_pool(x, tok, t["pool"], eos_token_id=t["eos"])
        proj = tower.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
        return x

    def _verify_trimming(self, tokens: torch.Tensor, trimmed: torch.Tensor) -> bool:
        """Guard against model variants where trimming is not exact: compare once with the full forward.
        Returns whether trimming is exact; if not, trimming is switched off for good."""
        full = self.model.encode_text(tokens)
        diff = (F.normalize(full.float(), dim=-1) - F.normalize(trimmed.float(), dim=-1)).abs().max().item()
        tol = 1e-4 if self.precision == "fp32" else 2e-2
        self._trim_verified = True
        if diff > tol:
            warnings.warn(
                f"length-trimmed text encoding differs from the full forward by {diff:.2e} on {self.spec}; "
                "falling back to full-context encoding",
                stacklevel=5,
            )
            self._tower = None
            return False
        return True

    def save(self, path: str | os.PathLike) -> None:
        """Write the model's weights to ``path`` (safetensors); load back with ``open_clip:ARCH@path``.

        Only a float32 encoder can: one loaded at bf16/fp16 holds rounded weights, which would be another model
        (with another fingerprint)."""
        from .._io import save_safetensors

        if self.precision != "fp32":
            raise InvalidInputError(f"cannot save {self.spec} loaded at {self.precision}: its weights are rounded to "
                                    f"{self.precision}; load it with precision='fp32' to save it")
        save_safetensors(dict(self.model.state_dict()), path, metadata={"vlmood_arch": self.spec.name})


def _check_arch(open_clip, arch: str) -> None:
    if arch.startswith(("hf-hub:", "local-dir:")):
        return
    models = open_clip.list_models()
    if arch not in models:
        close = difflib.get_close_matches(arch, models, n=5, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
        raise UnknownModelError(f"unknown open_clip architecture {arch!r}{hint}")


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init(active: bool):
    """open_clip logs 'Model initialized randomly' before vlmood loads a local checkpoint; that would mislead."""
    if not active:
        yield
        return
    flt = _DropRandomInitNotice()
    logging.getLogger().addFilter(flt)  # open_clip logs through the root logger
    try:
        yield
    finally:
        logging.getLogger().removeFilter(flt)


def fast_tokenizer(tokenizer: Any) -> Any:
    from .bpe import fast_tokenizer as wrap

    return wrap(tokenizer)


def load_open_clip(
    spec: EncoderSpec, device: str | torch.device | None = None, precision: str | None = None
) -> OpenCLIPEncoder:
    """Build an :class:`OpenCLIPEncoder` from a parsed spec (see :func:`vlmood.load_encoder`).

    Random initialisation (``open_clip:ARCH/none[:seed=N]``) runs with the CPU generator seeded by ``spec.seed`` in a
    forked RNG, so the weights and the fingerprint are the same in every process and the caller's RNG is untouched.
    The tokenizer is the one registered for the architecture (:mod:`vlmood.encoders.registry`), else open_clip's.
    """
    open_clip = _open_clip()
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    arch = spec.name
    _check_arch(open_clip, arch)
    tag = spec.pretrained
    if tag is not None and not arch.startswith("hf-hub:"):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tag not in tags and not Path(tag).is_file():
            raise UnknownModelError(
                f"no pretrained weights {tag!r} for {arch!r}; available tags: {', '.join(tags) or 'none'}"
                f" (or use 'open_clip:{arch}@/path/to/checkpoint' for a local file)"
            )
    downloading = tag is not None or arch.startswith("hf-hub:")
    try:
        with torch.random.fork_rng(devices=[]), _quiet_random_init(spec.checkpoint is not None):
            # the model is built on the CPU: seed only the CPU generator (fork_rng restores it); torch.manual_seed
            # would also reseed every CUDA device behind the caller's back
            torch.default_generator.manual_seed(spec.seed)
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=tag, precision="fp32", device="cpu", pretrained_text=downloading
            )
    except Exception as e:
        if downloading:
            raise EncoderLoadError(
                f"could not obtain the weights of {spec}: {type(e).__name__}: {e}. "
                f"Weights are downloaded from the Hugging Face hub into {_hub_cache_dir()} "
                "(set HF_HOME / HF_HUB_CACHE to move it). On a machine without internet, copy that cache from a "
                "machine that has it and set HF_HUB_OFFLINE=1, or pass a local file with "
                f"'open_clip:{arch}@/path/to/checkpoint'."
            ) from e
        raise EncoderLoadError(f"could not build {spec}: {type(e).__name__}: {e}") from e
    if spec.checkpoint is not None:
        sd = read_state_dict(spec.checkpoint)
        if "prompt_no" in sd:  # a CLIPN checkpoint (xmed-lab/CLIPN): its base CLIP, without the "no" side
            sd = {k: v for k, v in sd.items() if not is_clipn_no_key(k)}
        load_matching_state_dict(model, sd, str(spec.checkpoint), arch)
    factory = registry.tokenizer_factory(arch)  # e.g. the toy world's word-level tokenizer
    # open_clip's CLIP BPE tokenizer behind an exact, faster front end (vlmood.encoders.bpe)
    tokenizer = factory(spec) if factory is not None else fast_tokenizer(open_clip.get_tokenizer(arch))
    return OpenCLIPEncoder(model, preprocess, tokenizer, spec, dev, prec)
