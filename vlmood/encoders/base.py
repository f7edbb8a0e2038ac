"""The backend-independent ``Encoder`` interface, device/precision selection, and spec parsing."""
from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import torch

from ..errors import InvalidInputError

ImageInput = Union[torch.Tensor, Sequence[Any]]
"""A preprocessed batch ``[N, 3, H, W]``, or a sequence of PIL images and/or image paths."""

PRECISIONS = ("fp32", "fp16", "bf16")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as given, else CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidInputError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps ...") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InvalidInputError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """``precision`` as given, else ``bf16`` (or ``fp16``) autocast on CUDA and ``fp32`` on CPU."""
    if precision is None:
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in PRECISIONS:
        raise InvalidInputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for reduced precision (weights stay fp32); a no-op for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def hash_state_dict(state: dict[str, torch.Tensor]) -> str:
    """A content hash (hex) of a state dict: names, shapes, dtypes and bytes of every tensor."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed model spec string.

    Grammar::

        open_clip:ARCH/PRETRAINED      pretrained tag, e.g. open_clip:ViT-B-16/openai
        open_clip:ARCH/none            random initialisation (tests, benchmarks)
        open_clip:ARCH@/path/to/ckpt   local weights (.safetensors, .pt, .bin)
        open_clip:hf-hub:ORG/REPO      an open_clip model on the Hugging Face hub
        hf:MODEL_ID_OR_DIR             a transformers CLIPModel / SiglipModel
        toyworld                       the tiny CLIP vlmood ships, trained on its toy world
    """

    backend: str  # "open_clip" | "hf"
    name: str  # architecture (open_clip) or model id / directory (hf)
    pretrained: str | None = None  # tag, or None for random init / hf-hub
    checkpoint: Path | None = None  # local weights file

    def __str__(self) -> str:
        if self.backend == "hf":
            return f"hf:{self.name}"
        if self.checkpoint is not None:
            return f"open_clip:{self.name}@{self.checkpoint}"
        if self.name.startswith("hf-hub:"):
            return f"open_clip:{self.name}"
        return f"open_clip:{self.name}/{self.pretrained or 'none'}"


def parse_spec(spec: str) -> EncoderSpec:
    """Parse a model spec string (see :class:`EncoderSpec`); raises ``InvalidInputError`` naming the problem."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInputError(f"empty model spec {spec!r}; expected e.g. 'open_clip:ViT-B-16/openai' or 'hf:DIR'")
    spec = spec.strip()
    if spec == "toyworld":
        from ..toyworld import ARCH, CHECKPOINT

        return EncoderSpec("open_clip", ARCH, checkpoint=CHECKPOINT)
    backend, sep, rest = spec.partition(":")
    if not sep or backend not in ("open_clip", "hf"):
        raise InvalidInputError(
            f"model spec {spec!r} must start with 'open_clip:' or 'hf:' "
            "(e.g. 'open_clip:ViT-B-16/openai', 'open_clip:ViT-B-32@model.safetensors', 'hf:openai/clip-vit-base-patch16')"
        )
    if not rest:
        raise InvalidInputError(f"model spec {spec!r} names no model after {backend!r}")
    if backend == "hf":
        return EncoderSpec("hf", rest)
    if rest.startswith("hf-hub:"):
        return EncoderSpec("open_clip", rest)
    if "@" in rest:
        arch, _, path = rest.partition("@")
        if not arch or not path:
            raise InvalidInputError(f"model spec {spec!r}: expected 'open_clip:ARCH@/path/to/checkpoint'")
        return EncoderSpec("open_clip", arch, checkpoint=Path(path).expanduser())
    arch, sep, tag = rest.partition("/")
    if not sep or not arch or not tag:
        raise InvalidInputError(
            f"model spec {spec!r} names no weights: use 'open_clip:{arch or 'ARCH'}/PRETRAINED' "
            f"(e.g. /openai), '/none' for random init, or '@/path/to/checkpoint'"
        )
    return EncoderSpec("open_clip", arch, pretrained=None if tag.lower() == "none" else tag)


class Encoder(ABC):
    """A CLIP-style image/text encoder pair.

    All features returned are L2-normalised ``float32`` tensors on the CPU.
    Subclasses set ``model``, ``tokenizer``, ``preprocess``, ``device``, ``precision`` and ``spec``.
    """

    model: torch.nn.Module
    tokenizer: Any
    preprocess: Callable[[Any], torch.Tensor]
    device: torch.device
    precision: str
    spec: EncoderSpec
    image_batch_size: int = 64
    text_batch_size: int = 256

    # ---------------------------------------------------------------- properties
    @property
    @abstractmethod
    def logit_scale(self) -> float:
        """The model's learned inverse temperature ``exp(t)`` (about 100 for CLIP)."""

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """Dimension ``D`` of the joint embedding space."""

    @property
    def supports_local(self) -> bool:
        """Whether ``encode_images(..., local=True)`` can return per-patch features."""
        return False

    def require_local(self) -> None:
        """Raise a clear error when this encoder cannot give per-patch features (GL-MCM needs them)."""
        if not self.supports_local:
            raise InvalidInputError(
                f"{self.spec} has no local (per-patch) features; GL-MCM needs an open_clip ViT or ModifiedResNet "
                "image tower (Hugging Face backends give global features only)"
            )

    @property
    def preprocess_key(self) -> str:
        """A string that changes whenever image preprocessing changes (part of the feature-cache key)."""
        return repr(self.preprocess)

    @property
    def exact_text_trimming(self) -> bool:
        """Whether text batches are run only up to their longest prompt (exact for causal towers)."""
        return False

    @property
    def fingerprint(self) -> str:
        """Stable string naming the architecture and the exact weights; used as a cache key."""
        fp = getattr(self, "_fingerprint", None)
        if fp is None:
            fp = f"{self.spec.backend}:{self._arch_name()}:{hash_state_dict(self.model.state_dict())}"
            self._fingerprint = fp
        return fp

    def _arch_name(self) -> str:
        return self.spec.name

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.precision)

    # ---------------------------------------------------------------- images
    def encode_images(
        self, images: ImageInput, local: bool = False, batch_size: int | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Embed images.

        Args:
            images: a preprocessed tensor ``[N, 3, H, W]``, or a sequence of PIL images / paths
                (decoded with :func:`vlmood.data.load_image` and transformed with ``preprocess``).
            local: also return per-patch features (ViT towers; see :attr:`supports_local`).
            batch_size: images per forward pass (default ``image_batch_size``).

        Returns:
            ``[N, D]`` L2-normalised global features, or with ``local=True`` a pair
            ``([N, D], [N, P, D])`` where ``P`` is the number of patches.
        """
        if local:
            self.require_local()
        bs = batch_size or self.image_batch_size
        globals_, locals_ = [], []
        for batch in self._image_batches(images, bs):
            with torch.inference_mode(), self.autocast():
                out = self._encode_image_batch(batch.to(self.device, non_blocking=True), local)
            g, loc = out if local else (out, None)
            globals_.append(torch.nn.functional.normalize(g.float(), dim=-1).cpu())
            if loc is not None:
                locals_.append(torch.nn.functional.normalize(loc.float(), dim=-1).cpu())
        d = self.embed_dim
        g = torch.cat(globals_) if globals_ else torch.empty(0, d)
        if not local:
            return g
        return g, (torch.cat(locals_) if locals_ else torch.empty(0, 0, d))

    def _image_batches(self, images: ImageInput, bs: int) -> Iterator[torch.Tensor]:
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise InvalidInputError(f"image tensor must be [N, 3, H, W], got shape {tuple(images.shape)}")
            for i in range(0, images.shape[0], bs):
                yield images[i : i + bs]
            return
        from ..data import load_image

        items = list(images)
        for i in range(0, len(items), bs):
            chunk = [self.preprocess(load_image(x)) for x in items[i : i + bs]]
            yield torch.stack(chunk)

    @abstractmethod
    def _encode_image_batch(self, batch: torch.Tensor, local: bool):
        """Unnormalised features of one preprocessed batch on ``self.device``."""

    # ---------------------------------------------------------------- texts
    def encode_texts(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        cache: Any = None,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """Embed prompts: ``[M, D]`` L2-normalised.

        Prompts are sorted by token length and each batch runs only up to its longest prompt
        when the tower allows it exactly (:attr:`exact_text_trimming`). ``cache`` may be an
        :class:`vlmood.text.EmbeddingCache`, ``True`` for the default cache, or ``None``/``False``.
        ``progress``: show a progress bar (``None``: only for large sets on a terminal).
        """
        from ..text.embed import embed_texts

        return embed_texts(self, texts, batch_size=batch_size, cache=cache, progress=progress)

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """Token ids ``[M, L]`` (full context) and each prompt's length up to and including its end token."""

    @abstractmethod
    def _encode_token_batch(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        """Unnormalised features of a token batch on ``self.device``, run over the first ``length`` positions."""

    def describe(self) -> str:
        return f"{self.spec} on {self.device} ({self.precision})"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
