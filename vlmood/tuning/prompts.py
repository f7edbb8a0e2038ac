"""Learned prompts: the context vectors of a CoOp/LoCoOp run, its class names and metadata, as one file.

A :class:`LearnedPrompts` is a text side every detector can use in place of templates: ``text_features(encoder)``
gives the ``[C, D]`` L2-normalised class embeddings of ``"[SOS] ctx_1 .. ctx_n classname . [EOS]"``.

File format (``save`` / ``load``): one safetensors file holding the tensor ``ctx`` (``[n_ctx, W]``, or
``[C, n_ctx, W]`` for class-specific context) and the metadata ``format = "vlmood.learned_prompts"``,
``version = "1"`` and ``meta`` (JSON: method, classes, n_ctx, csc, position, init, encoder spec and fingerprint,
hyper-parameters, seed, shots, a hash of the sampled image ids, a training-log summary).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .._io import printable
from ..errors import InvalidInputError

FORMAT = "vlmood.learned_prompts"
VERSION = "1"


@dataclass
class LearnedPrompts:
    """Learned context vectors for ``classes``.

    Attributes:
        classes: the ID class names, in the order of the class embeddings.
        ctx: ``[n_ctx, W]`` shared context, or ``[C, n_ctx, W]`` class-specific context (``csc``), float32 CPU.
        position: where the class token goes; only ``"end"`` (CoOp's default) is supported.
        meta: provenance (method, encoder, hyper-parameters, seed, shots, log summary...), JSON-serialisable.
    """

    classes: list[str]
    ctx: torch.Tensor
    position: str = "end"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.classes = [str(c) for c in self.classes]
        self.ctx = torch.as_tensor(self.ctx).detach().float().cpu()
        _validate(self.classes, self.ctx, self.position, "learned prompts")

    @property
    def n_ctx(self) -> int:
        return int(self.ctx.shape[-2])

    @property
    def csc(self) -> bool:
        """Whether each class has its own context."""
        return self.ctx.dim() == 3

    @property
    def width(self) -> int:
        """Width ``W`` of the token embeddings the context lives in."""
        return int(self.ctx.shape[-1])

    def __repr__(self) -> str:
        kind = "class-specific" if self.csc else "shared"
        method = self.meta.get("method", "learned")
        return f"<LearnedPrompts {method}: {len(self.classes)} classes, {self.n_ctx} {kind} context tokens of width " \
               f"{self.width}>"

    # ------------------------------------------------------------------ text side
    def check_encoder(self, encoder: Any) -> None:
        """Refuse an encoder whose token width differs; warn when it is not the encoder the prompts were
        learned with (the context then lives in another model's embedding space)."""
        from ..encoders.text_forward import require_prompt_learning, text_width

        require_prompt_learning(encoder)
        w = text_width(encoder)
        if w != self.width:
            raise InvalidInputError(f"learned prompts have context width {self.width} but {encoder.spec} has "
                                    f"token embeddings of width {w}; they were learned with "
                                    f"{self.meta.get('encoder', {}).get('spec', 'another model')}")
        fp = self.meta.get("encoder", {}).get("fingerprint")
        if fp and fp != encoder.fingerprint:
            warnings.warn(f"learned prompts were trained with {self.meta['encoder'].get('spec', fp)} "
                          f"(fingerprint {fp}) but are used with {encoder.spec} ({encoder.fingerprint}); "
                          "the learned context may not transfer", stacklevel=3)

    def check_classes(self, classes: Sequence[str] | None) -> list[str]:
        """The class list to score with: ``classes`` must be None or equal ``self.classes`` (order too)."""
        if classes is None:
            return list(self.classes)
        given = [str(c) for c in classes]
        if given == self.classes:
            return given
        missing = [c for c in self.classes if c not in given]
        extra = [c for c in given if c not in self.classes]
        if not missing and not extra:
            what = "the same classes in another order"
        else:
            what = ", ".join(part for part in (
                f"missing {missing[:5]}" if missing else "", f"not learned {extra[:5]}" if extra else "") if part)
        raise InvalidInputError(f"the class list differs from the {len(self.classes)} classes the prompts were "
                                f"learned for: {what}; omit the classes (--classes on the command line, "
                                "classes=None in Python) to use the prompts' own")

    def text_features(self, encoder: Any, batch_size: int | None = None) -> torch.Tensor:
        """``[C, D]`` L2-normalised class embeddings (float32, CPU, no gradient) on ``encoder``."""
        from .learner import build_prompts

        self.check_encoder(encoder)
        bs = batch_size or encoder.text_batch_size
        out = []
        with torch.no_grad():
            for i in range(0, len(self.classes), bs):
                pieces = build_prompts(encoder, self.classes[i : i + bs], self.n_ctx)
                ctx = self.ctx[i : i + bs] if self.csc else self.ctx
                feats = pieces.text_features(encoder, ctx.to(pieces.prefix.device))
                out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file (context + metadata); written to a temporary name, then renamed."""
        from .._io import save_safetensors

        path = Path(path)
        meta = {**self.meta, "classes": self.classes, "n_ctx": self.n_ctx, "csc": self.csc,
                "position": self.position}
        try:
            text = json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"learned-prompt metadata is not JSON-serialisable: {e}") from e
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_safetensors({"ctx": self.ctx}, path, metadata={"format": FORMAT, "version": VERSION, "meta": text})
        except OSError as e:
            raise InvalidInputError(f"cannot write learned prompts to {printable(str(path))}: {e.strerror or e}") \
                from e
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, encoder: Any = None) -> "LearnedPrompts":
        """Read a file written by :meth:`save`; with ``encoder``, also check it fits (see :meth:`check_encoder`).

        Anything wrong (missing or unreadable file, another format or version, shapes that do not match the
        metadata or the encoder) raises a one-line :class:`InvalidInputError` naming the file.
        """
        from safetensors import safe_open

        name = printable(os.fsdecode(path))
        p = Path(os.fsdecode(path)).expanduser()
        if not p.is_file():
            raise InvalidInputError(f"learned-prompts file not found: {name}")
        try:
            with safe_open(str(p), framework="pt") as f:
                header = f.metadata() or {}
                keys = list(f.keys())
                ctx = f.get_tensor("ctx") if "ctx" in keys else None
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise InvalidInputError(f"{name} is not a readable safetensors file: {type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}") from e
        if header.get("format") != FORMAT:
            raise InvalidInputError(f"{name} is not a vlmood learned-prompts file (format "
                                    f"{header.get('format')!r}, expected {FORMAT!r})")
        if header.get("version") != VERSION:
            raise InvalidInputError(f"{name} has learned-prompts version {header.get('version')!r}; this vlmood "
                                    f"reads version {VERSION} (written by another vlmood version?)")
        if ctx is None:
            raise InvalidInputError(f"{name} holds no 'ctx' tensor (tensors: {keys})")
        try:
            meta = json.loads(header.get("meta", ""))
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{name} has unreadable metadata: {e}") from e
        if not isinstance(meta, dict) or not isinstance(meta.get("classes"), list):
            raise InvalidInputError(f"{name} has no class list in its metadata")
        classes, position = meta.pop("classes"), meta.pop("position", "end")
        n_ctx, csc = meta.pop("n_ctx", None), meta.pop("csc", None)
        if not ctx.is_floating_point():
            raise InvalidInputError(f"{name}: ctx has dtype {ctx.dtype}, expected a float tensor")
        if ctx.dim() not in (2, 3) or (n_ctx is not None and ctx.shape[-2] != n_ctx) or \
                (csc is not None and bool(csc) != (ctx.dim() == 3)):
            raise InvalidInputError(f"{name}: ctx of shape {tuple(ctx.shape)} does not match its metadata "
                                    f"(n_ctx={n_ctx}, csc={csc})")
        _validate(classes, ctx, position, name)
        out = cls(classes=classes, ctx=ctx, position=position, meta=meta)
        if encoder is not None:
            out.check_encoder(encoder)
        return out


def _validate(classes: list[Any], ctx: torch.Tensor, position: str, name: str) -> None:
    if not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        raise InvalidInputError(f"{name}: the class list must be non-empty names")
    if len(set(classes)) != len(classes):
        raise InvalidInputError(f"{name}: the class list has duplicate names")
    if position not in ("end",):
        raise InvalidInputError(f"{name}: class-token position {position!r} is not supported (only 'end')")
    if ctx.dim() not in (2, 3) or ctx.shape[-2] < 1 or ctx.shape[-1] < 1:
        raise InvalidInputError(f"{name}: context must be [n_ctx, W] or [C, n_ctx, W], got {tuple(ctx.shape)}")
    if ctx.dim() == 3 and ctx.shape[0] != len(classes):
        raise InvalidInputError(f"{name}: class-specific context for {ctx.shape[0]} classes but {len(classes)} "
                                "class names")
    if not bool(torch.isfinite(ctx).all()):
        raise InvalidInputError(f"{name}: the context holds NaN or infinite values")


def load_prompts(path: str | os.PathLike, encoder: Any = None) -> LearnedPrompts:
    """:meth:`LearnedPrompts.load`."""
    return LearnedPrompts.load(path, encoder)


__all__ = ["FORMAT", "VERSION", "LearnedPrompts", "load_prompts"]
