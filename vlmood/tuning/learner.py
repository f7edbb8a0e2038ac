"""Prompt construction for CoOp-style prompt learning: ``[SOS] ctx_1 .. ctx_n classname . [EOS]``.

Each class prompt is tokenised as ``"X X ... X {classname}."`` (``n_ctx`` placeholders, class token at the end,
as in CoOp's and LoCoOp's ``PromptLearner`` with ``CLASS_TOKEN_POSITION=end``); the token embeddings at positions
``1 .. n_ctx`` are then replaced by the learned context vectors and the sequence runs through the frozen text tower
(:func:`vlmood.encoders.text_forward.encode_text_embeddings`), pooled at each prompt's end-of-text position.
Underscores in class names become spaces, as the reference does (``Afghan_hound`` -> ``Afghan hound``).

Context initialisation (reference facts, KaiyangZhou/CoOp ``trainers/coop.py`` and AtsuMiyai/LoCoOp
``trainers/locoop.py``): random ``N(0, 0.02)`` vectors, one shared set ``[n_ctx, W]`` or one per class
``[C, n_ctx, W]`` (``csc``); or the token embeddings of an init phrase such as ``"a photo of a"``, whose token
count then sets ``n_ctx``. Here the random draw uses a generator seeded with the trainer's ``seed`` (the reference
draws from the global RNG after seeding it), and a phrase with ``csc=True`` gives every class its own copy of the
phrase's embeddings (the reference falls back to one shared context when a phrase is given).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from ..encoders.text_forward import (encode_text_embeddings, encode_text_shared_prefix, prompt_tokens,
                                     require_prompt_learning, text_width, token_embeddings)
from ..errors import InvalidInputError

PLACEHOLDER = "X"
"""The word standing for each context position before its embedding is replaced."""
INIT_STD = 0.02
"""Standard deviation of the random context initialisation (CoOp / LoCoOp ``nn.init.normal_(std=0.02)``)."""
DEFAULT_N_CTX = 16
POSITIONS = ("end",)


def class_phrase(name: str) -> str:
    """The class-name part of a prompt: underscores as spaces, as the reference does."""
    return " ".join(str(name).replace("_", " ").split())


def prompt_texts(classes: Sequence[str], n_ctx: int) -> list[str]:
    """``"X X ... X {classname}."`` for every class (``n_ctx`` placeholders)."""
    head = " ".join([PLACEHOLDER] * n_ctx)
    return [f"{head} {class_phrase(c)}." for c in classes]


def _tokens(encoder, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation is detected (and reported per class) by the caller
        tokens, eot = prompt_tokens(encoder, list(texts))
    return tokens, torch.as_tensor(eot, dtype=torch.long)


@dataclass
class PromptPieces:
    """The frozen parts of the ``C`` class prompts, trimmed to the longest prompt (``L`` positions).

    ``prefix`` ``[C, 1, W]`` is the start token's embedding, ``suffix`` ``[C, L - 1 - n_ctx, W]`` the embeddings
    of the class name, full stop, end token and padding; ``eot`` ``[C]`` the end-of-text positions.
    """

    prefix: torch.Tensor
    suffix: torch.Tensor
    eot: torch.Tensor
    n_ctx: int

    def assemble(self, ctx: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings ``[C, L, W]`` with positions ``1 .. n_ctx`` taken from ``ctx`` (shared or per class)."""
        c = self.prefix.shape[0]
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(c, -1, -1)
        return torch.cat([self.prefix, ctx.to(self.prefix.dtype), self.suffix], dim=1)

    def text_features(self, encoder, ctx: torch.Tensor) -> torch.Tensor:
        """Unnormalised class text features ``[C, D]`` through the frozen tower; differentiable in ``ctx``.

        With a shared context (``ctx`` ``[n_ctx, W]``) the start token and context, the same for every class, run
        through the tower once (:func:`encode_text_shared_prefix`); class-specific context runs every prompt whole.
        """
        if ctx.dim() == 2 and self.prefix.shape[0]:
            prefix = torch.cat([self.prefix[0], ctx.to(self.prefix.dtype)], dim=0)
            return encode_text_shared_prefix(encoder, prefix, self.suffix, self.eot)
        return encode_text_embeddings(encoder, self.assemble(ctx), self.eot)


def build_prompts(encoder, classes: Sequence[str], n_ctx: int) -> PromptPieces:
    """Tokenise and embed the class prompts of ``classes`` with ``n_ctx`` context positions.

    Raises a one-line :class:`InvalidInputError` when the encoder cannot learn prompts, when the placeholder does
    not tokenise to exactly one token per position, or when a prompt does not fit the text context (naming the
    classes and the number of tokens needed).
    """
    require_prompt_learning(encoder)
    names = [class_phrase(c) for c in classes]
    head, head_eot = _tokens(encoder, [" ".join([PLACEHOLDER] * n_ctx)])
    if int(head_eot[0]) != n_ctx + 1:
        raise InvalidInputError(f"{n_ctx} context placeholders tokenise to {int(head_eot[0]) - 1} tokens on "
                                f"{encoder.spec}, expected one each (n_ctx too large for its text context?)")
    tokens, eot = _tokens(encoder, prompt_texts(classes, n_ctx))
    _, name_eot = _tokens(encoder, [f"{n}." for n in names])
    need = n_ctx + name_eot + 1  # positions: start, context, name and full stop, end
    ctx_len = tokens.shape[1]
    bad = [i for i in range(len(names)) if int(eot[i]) + 1 != int(need[i]) or int(need[i]) > ctx_len]
    if bad:
        shown = ", ".join(f"{classes[i]!r} ({int(need[i])} tokens)" for i in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise InvalidInputError(f"with n_ctx={n_ctx}, the prompts of {len(bad)} class(es) do not fit the text "
                                f"context of {ctx_len} tokens of {encoder.spec}: {shown}{more}; lower n_ctx or "
                                "shorten the class names")
    if not bool((tokens[:, 1 : 1 + n_ctx] == head[0, 1 : 1 + n_ctx]).all()):
        raise InvalidInputError(f"the context placeholders of some class prompts tokenise differently on "
                                f"{encoder.spec}; cannot place the learned context")
    length = int(eot.max()) + 1
    with torch.no_grad():
        emb = token_embeddings(encoder, tokens[:, :length]).float()
    return PromptPieces(prefix=emb[:, :1], suffix=emb[:, 1 + n_ctx :], eot=eot.to(emb.device), n_ctx=n_ctx)


def _unk_id(encoder) -> int | None:
    """The unknown-token id of a word-level tokenizer (the toy world's, a Hugging Face one), else None (open_clip's
    byte-level BPE has no unknown words)."""
    tok = encoder.tokenizer
    for obj in (tok, getattr(tok, "tokenizer", None)):
        unk = getattr(obj, "unk_token_id", None)
        if isinstance(unk, int):
            return unk
    return None


def unknown_words(encoder, phrase: str) -> list[str]:
    """The words of ``phrase`` that the encoder's tokenizer maps to its unknown token (empty without one)."""
    unk = _unk_id(encoder)
    if unk is None:
        return []
    out = []
    for word in phrase.split():
        tokens, eot = _tokens(encoder, [word])
        if bool((tokens[0, 1 : int(eot[0])] == unk).any()) and word not in out:
            out.append(word)
    return out


def init_context(encoder, n_classes: int, n_ctx: int | None, init: str | None, csc: bool,
                 seed: int) -> torch.Tensor:
    """Initial context ``[n_ctx, W]`` (or ``[C, n_ctx, W]`` with ``csc``), float32 on the CPU.

    ``init=None``: ``N(0, 0.02)`` from a generator seeded with ``seed``; ``n_ctx`` defaults to 16. ``init`` a phrase:
    the embeddings of its tokens; ``n_ctx`` must then be None or equal to the phrase's token count.
    """
    require_prompt_learning(encoder)
    width = text_width(encoder)
    if init is None:
        n = DEFAULT_N_CTX if n_ctx is None else n_ctx
        gen = torch.Generator().manual_seed(seed)
        shape = (n_classes, n, width) if csc else (n, width)
        return torch.randn(shape, generator=gen, dtype=torch.float32) * INIT_STD
    phrase = " ".join(init.replace("_", " ").split())
    tokens, eot = _tokens(encoder, [phrase])
    n = int(eot[0]) - 1
    if not phrase or n < 1:
        raise InvalidInputError(f"init phrase {init!r} gives no tokens on {encoder.spec}")
    unknown = unknown_words(encoder, phrase)
    if unknown:
        raise InvalidInputError(f"init phrase {init!r} has words the tokenizer of {encoder.spec} does not know: "
                                f"{', '.join(repr(w) for w in unknown)} (they would all start from the same "
                                "unknown-token embedding); use words of its vocabulary")
    if int(eot[0]) + 1 >= tokens.shape[1]:
        raise InvalidInputError(f"init phrase {init!r} does not fit the text context of {tokens.shape[1]} tokens")
    if n_ctx is not None and n_ctx != n:
        raise InvalidInputError(f"init phrase {init!r} is {n} tokens but n_ctx={n_ctx}; the phrase sets the "
                                "context length (leave n_ctx unset)")
    with torch.no_grad():
        vec = token_embeddings(encoder, tokens[:, : n + 1])[0, 1 : 1 + n].detach().float().cpu()
    return vec.unsqueeze(0).repeat(n_classes, 1, 1) if csc else vec.clone()
