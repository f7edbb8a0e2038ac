"""A differentiable text forward over prompt *embeddings*, for prompt learning (CoOp, LoCoOp, CLIPN).

Prompt learning replaces some token embeddings of a prompt by learnable vectors and runs the result through the
frozen text tower. These functions do that for open_clip encoders with a causal text tower, the same way the
cached text path runs token ids (:meth:`OpenCLIPEncoder._encode_trimmed`): only the first ``L' = max(eot) + 1``
positions are computed, which is exact because with causal attention no position up to ``L'`` sees a later one.

Typical use::

    tokens, eot = prompt_tokens(enc, ["X X X X cat.", "X X X X dog."])
    base = token_embeddings(enc, tokens)                  # [C, L, W], frozen
    embeds = torch.cat([base[:, :1], ctx.expand(C, -1, -1), base[:, 1 + n_ctx:]], dim=1)
    feats = encode_text_embeddings(enc, embeds, eot)      # [C, D], differentiable w.r.t. ctx

Encoders without such a tower (Hugging Face backends, bidirectional or class-token towers, or an open_clip model
whose trimmed forward was found inexact) raise a one-line :class:`InvalidInputError`. Exactness is checked once
per encoder, on the first call: the trimmed forward over the embeddings of two prompts must equal
``model.encode_text`` on their ids (the encoder's own check guards only its cached text path).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..errors import InvalidInputError

if TYPE_CHECKING:
    from .base import Encoder


def _tower(enc: "Encoder") -> dict[str, Any] | None:
    """The open_clip text-tower pieces (``OpenCLIPEncoder._text_tower()``), or None when prompt learning cannot
    run exactly on ``enc``."""
    fn = getattr(enc, "_text_tower", None)
    t = fn() if callable(fn) else None
    if t is None:
        return None
    if "_tower" in vars(enc) and enc._tower is None:  # type: ignore[attr-defined]  # trimming proved inexact
        return None
    return t


def supports_prompt_learning(enc: "Encoder") -> bool:
    """Whether ``enc`` has an open_clip causal text tower that :func:`encode_text_embeddings` runs exactly (the
    once-per-encoder check of :func:`require_prompt_learning` included)."""
    try:
        _require(enc)
    except InvalidInputError:
        return False
    return True


_CHECK_TEXTS = ("a photo of a cat.", "a dog.")
"""Prompts of two lengths for the trimming check: the batch trims to the longer, the shorter has padding."""
_CHECKED = "_prompt_forward_diff"
"""Attribute in which an encoder keeps the result of its trimming check (so it runs once per encoder)."""


def _trim_difference(enc: "Encoder", t: dict[str, Any]) -> float:
    """Largest difference of the L2-normalised features of :data:`_CHECK_TEXTS` between the trimmed forward over
    their embeddings and ``model.encode_text`` on their full-context ids (0 when nothing would be trimmed)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokens, lengths = enc.tokenize(list(_CHECK_TEXTS))
    eot = torch.as_tensor(lengths, dtype=torch.long).reshape(-1) - 1
    if int(eot.max()) + 1 >= tokens.shape[1]:
        return 0.0
    tokens = tokens.to(enc.device)
    with torch.no_grad():
        embeds = t["tower"].token_embedding(tokens).float()
        trimmed = _forward(enc, t["tower"], embeds, eot)
        with enc.autocast():
            full = enc.model.encode_text(tokens)
    a = torch.nn.functional.normalize(full.double(), dim=-1)
    b = torch.nn.functional.normalize(trimmed.double(), dim=-1)
    return float((a - b).abs().max())


def _require(enc: "Encoder") -> dict[str, Any]:
    t = _tower(enc)
    if t is None:
        fn = getattr(enc, "_text_tower", None)
        if callable(fn) and fn() is not None:
            raise InvalidInputError(f"prompt learning needs an exact length-trimmed text tower; on {enc.spec} the "
                                    "trimmed text forward differed from the full one")
        raise InvalidInputError(f"prompt learning needs an open_clip text tower with causal attention; "
                                f"{enc.spec} has none")
    # The encoder's own trimming check (OpenCLIPEncoder._verify_trimming) guards its cached text path on token ids,
    # and runs only when that path does; check this path, on embeddings, once per encoder.
    diff = vars(enc).get(_CHECKED)
    if diff is None:
        diff = vars(enc)[_CHECKED] = _trim_difference(enc, t)
    tol = 1e-4 if getattr(enc, "precision", "fp32") == "fp32" else 2e-2  # as OpenCLIPEncoder._verify_trimming
    if not diff <= tol:
        raise InvalidInputError(f"prompt learning needs an exact length-trimmed text tower; on {enc.spec} the "
                                f"trimmed forward over prompt embeddings differs from the full one (model.encode_text)"
                                f" by {diff:.2e}, more than {tol:g}")
    return t


def require_prompt_learning(enc: "Encoder") -> None:
    """Raise a one-line :class:`InvalidInputError` unless ``enc`` can learn prompts: an open_clip causal text tower
    whose trimmed forward over embeddings equals ``model.encode_text`` (checked once per encoder on two prompts)."""
    _require(enc)


def text_width(enc: "Encoder") -> int:
    """``W``, the width of the text tower's token embeddings (the size of one learnable context vector)."""
    return int(_require(enc)["tower"].token_embedding.weight.shape[1])


def text_context_length(enc: "Encoder") -> int:
    """The most positions a prompt may have (rows of the positional embedding: 77 for CLIP, 20 for the toy world)."""
    return int(_require(enc)["tower"].positional_embedding.shape[0])


def prompt_tokens(enc: "Encoder", texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[M, L]`` (full context, CPU) of ``texts`` and each prompt's end-of-text position ``[M]``.

    Uses the encoder's tokenizer (which warns about truncated prompts); the end positions are
    ``length - 1`` of :meth:`Encoder.tokenize`.
    """
    _require(enc)
    from ..text.embed import as_texts

    texts = as_texts(texts)
    tokens, lengths = enc.tokenize(texts)
    return tokens, torch.as_tensor(lengths, dtype=torch.long).reshape(-1) - 1


def token_embeddings(enc: "Encoder", tokens: torch.Tensor) -> torch.Tensor:
    """The frozen token embeddings ``[M, L, W]`` (float32, on ``enc.device``, no gradient) of ids ``[M, L]``.

    Computed under ``torch.no_grad`` (not inference mode), so the result can enter an autograd graph.
    """
    tower = _require(enc)["tower"]
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.is_floating_point() \
            or tokens.dtype == torch.bool:
        raise InvalidInputError("tokens must be an integer tensor [M, L], got "
                                + (f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor)
                                   else type(tokens).__name__))
    vocab, ctx = tower.token_embedding.weight.shape[0], tower.positional_embedding.shape[0]
    if tokens.shape[1] > ctx:
        raise InvalidInputError(f"tokens have {tokens.shape[1]} positions; the text context of {enc.spec} is {ctx}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise InvalidInputError(f"token ids must lie in [0, {vocab}) for {enc.spec}; got "
                                f"{int(tokens.min())}..{int(tokens.max())}")
    with torch.no_grad():
        return tower.token_embedding(tokens.to(enc.device).long()).float()


def _check_eot(eot: Any, m: int, lo_ok: int, hi_ok: int, where: str) -> torch.Tensor:
    """``eot`` as ``m`` integer end-of-text positions, each in ``[lo_ok, hi_ok)`` (``where`` describes that range)."""
    eot = torch.as_tensor(eot)
    if eot.ndim != 1 or eot.shape[0] != m or eot.is_floating_point() or eot.dtype == torch.bool:
        raise InvalidInputError(f"eot must be {m} integer end-of-text positions (one per prompt), got "
                                f"{eot.dtype} {tuple(eot.shape)}")
    if m:
        lo, hi = int(eot.min()), int(eot.max())
        if lo < lo_ok or hi >= hi_ok:
            raise InvalidInputError(f"eot positions must lie in {where}; got {lo}..{hi}")
    return eot


def eot_positions(enc: "Encoder", tokens: torch.Tensor) -> torch.Tensor:
    """End-of-text positions ``[M]`` of token ids ``[M, L]``, by the text tower's pooling rule: the highest id
    (``argmax``, CLIP's end token has the largest id) or the first end token (``eos``)."""
    t = _require(enc)
    if t["pool"] == "eos" and t["eos"] is not None:
        return (tokens == t["eos"]).int().argmax(dim=-1)
    return tokens.argmax(dim=-1)


def text_tower(enc: "Encoder") -> Any:
    """The open_clip text-tower object of ``enc`` (whose ``token_embedding``, ``positional_embedding``,
    ``transformer``, ``attn_mask``, ``ln_final`` and ``text_projection`` the forward uses), for copying it (CLIPN's
    "no" tower)."""
    return _require(enc)["tower"]


def encode_text_embeddings(enc: "Encoder", embeds: torch.Tensor, eot: torch.Tensor | Sequence[int],
                           tower: Any = None) -> torch.Tensor:
    """Unnormalised text features ``[M, D]`` (float32, float64 for a float64 model; on ``enc.device``) of prompt
    embeddings ``[M, L, W]``.

    ``tower``: another text tower of the same shape to run instead of the encoder's own (an object with
    ``positional_embedding``, ``transformer``, ``attn_mask``, ``ln_final``, ``text_projection`` and
    ``token_embedding``, such as CLIPN's "no" tower, :meth:`vlmood.clipn.NoTower.as_tower`); None: the encoder's.

    Runs the frozen tower over the first ``L' = max(eot) + 1`` positions: ``+ positional_embedding[:L']``, the
    transformer with the causal mask ``[:L', :L']``, ``ln_final``, the row at ``eot[i]`` of each prompt, and the
    text projection (a matrix or an ``nn.Linear``). Equal to the full-context forward (``model.encode_text`` on
    the same ids) up to float rounding, and differentiable with respect to ``embeds``; runs under the encoder's
    autocast (its reduced precision on CUDA; fp32 on CPU by default). ``embeds`` is moved to ``enc.device``.
    """
    t = _require(enc)
    tower = t["tower"] if tower is None else tower
    width, ctx = tower.token_embedding.weight.shape[1], tower.positional_embedding.shape[0]
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or not embeds.is_floating_point():
        raise InvalidInputError("embeds must be a float tensor [M, L, W], got "
                                + (f"{embeds.dtype} {tuple(embeds.shape)}" if isinstance(embeds, torch.Tensor)
                                   else type(embeds).__name__))
    m, length, w = embeds.shape
    if w != width:
        raise InvalidInputError(f"embeds have width {w}; the text tower of {enc.spec} has width {width}")
    if length > ctx:
        raise InvalidInputError(f"embeds have {length} positions; the text context of {enc.spec} is {ctx}")
    eot = _check_eot(eot, m, 0, length, f"[0, {length}) (the prompts' length)")
    if m == 0:
        return torch.zeros(0, enc.embed_dim, device=enc.device)
    return _forward(enc, tower, embeds, eot)


def _forward(enc: "Encoder", tower: Any, embeds: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """:func:`encode_text_embeddings` on checked arguments."""
    n = int(eot.max()) + 1
    rows = torch.arange(embeds.shape[0], device=enc.device)
    with enc.autocast():
        cast = tower.transformer.get_cast_dtype()
        x = embeds[:, :n].to(device=enc.device, dtype=cast)
        x = x + tower.positional_embedding[:n].to(cast)
        x = tower.transformer(x, attn_mask=tower.attn_mask[:n, :n])  # batch_first handled by open_clip
        x = tower.ln_final(x)
        x = x[rows, eot.to(enc.device).long()]  # text_global_pool ('argmax'/'eos') by explicit position
        proj = tower.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x if x.dtype == torch.float64 else x.float()  # never below float32; float64 models stay exact


def _standard_blocks(tower: Any) -> bool:
    """Whether ``tower.transformer`` is open_clip's ``Transformer`` of plain ``ResidualAttentionBlock`` s (self-
    attention through an ``nn.MultiheadAttention`` with packed q/k/v, no extra key/value biases, no dropout) and
    ``tower.attn_mask`` is the causal mask, so that :func:`encode_text_shared_prefix` can run the blocks by hand."""
    try:
        from open_clip.transformer import ResidualAttentionBlock, Transformer
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return False
    tr = getattr(tower, "transformer", None)
    if type(tr).forward is not Transformer.forward or not isinstance(getattr(tr, "resblocks", None),
                                                                          torch.nn.ModuleList):
        return False
    for b in tr.resblocks:
        attn = getattr(b, "attn", None)
        if (type(b).forward is not ResidualAttentionBlock.forward
                or type(b).attention is not ResidualAttentionBlock.attention
                or not isinstance(attn, torch.nn.MultiheadAttention) or hasattr(b, "ln_1_kv")
                or not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.bias_v is not None
                or attn.add_zero_attn or (attn.dropout and attn.training)):
            return False
    mask = tower.attn_mask
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        return False
    n = mask.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
    return bool((mask[causal] == float("-inf")).all() and (mask[~causal] == 0).all())


def _block_shared(block: Any, xp: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``ResidualAttentionBlock`` over the shared prefix ``xp`` ``[1, Lp, W]`` and the per-prompt suffixes
    ``xs`` ``[C, Ls, W]`` (batch first): the prefix attends causally to itself, each suffix to the whole prefix and
    causally to itself — what the block computes on the concatenated sequences, without repeating the prefix."""
    attn = block.attn
    heads, (lp, ls) = attn.num_heads, (xp.shape[1], xs.shape[1])

    def qkv(x: torch.Tensor) -> list[torch.Tensor]:
        q, k, v = torch.nn.functional.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
        return [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)]  # [B, H, L, hd]

    def out(a: torch.Tensor) -> torch.Tensor:
        return attn.out_proj(a.transpose(1, 2).flatten(2))

    sdpa = torch.nn.functional.scaled_dot_product_attention
    qp, kp, vp = qkv(xp)
    qs, ks, vs = qkv(xs)
    c = xs.shape[0]
    keep = torch.ones(ls, lp + ls, dtype=torch.bool, device=xs.device)
    keep[:, lp:] = torch.ones(ls, ls, dtype=torch.bool, device=xs.device).tril()
    ap = sdpa(qp, kp, vp, is_causal=True)
    as_ = sdpa(qs, torch.cat([kp.expand(c, -1, -1, -1), ks], 2), torch.cat([vp.expand(c, -1, -1, -1), vs], 2),
               attn_mask=keep)
    xp = xp + block.ls_1(out(ap))
    xs = xs + block.ls_1(out(as_))
    xp = xp + block.ls_2(block.mlp(block.ln_2(xp)))
    xs = xs + block.ls_2(block.mlp(block.ln_2(xs)))
    return xp, xs


def encode_text_shared_prefix(enc: "Encoder", prefix_embeds: torch.Tensor, suffix_embeds: torch.Tensor,
                              eot: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """:func:`encode_text_embeddings` of the prompts ``cat([prefix_embeds, suffix_embeds[i]])`` when all ``C``
    prompts share their first ``Lp`` embeddings ``prefix_embeds`` ``[Lp, W]`` (start token and a shared learned
    context); ``suffix_embeds`` ``[C, Ls, W]``; ``eot`` ``[C]`` the end positions in the *full* sequences (at
    least ``Lp``). Returns ``[C, D]``, differentiable with respect to both inputs.

    With causal attention the prefix positions are the same for every prompt, so the prefix runs once through each
    block and only the suffixes (trimmed to ``max(eot) + 1 - Lp``) run per prompt, attending to the prefix's keys
    and values. Towers whose blocks are not open_clip's standard ones fall back to the concatenated forward.
    """
    t = _require(enc)
    tower = t["tower"]
    width, ctx = tower.token_embedding.weight.shape[1], tower.positional_embedding.shape[0]
    for name, x, nd in (("prefix_embeds", prefix_embeds, 2), ("suffix_embeds", suffix_embeds, 3)):
        if not isinstance(x, torch.Tensor) or x.ndim != nd or not x.is_floating_point() or x.shape[-1] != width:
            shape = "[Lp, W]" if nd == 2 else "[C, Ls, W]"
            raise InvalidInputError(f"{name} must be a float tensor {shape} with W={width} (the text width of "
                                    f"{enc.spec}), got " + (f"{x.dtype} {tuple(x.shape)}" if isinstance(
                                        x, torch.Tensor) else type(x).__name__))
    lp, (c, ls) = prefix_embeds.shape[0], suffix_embeds.shape[:2]
    if lp + ls > ctx:
        raise InvalidInputError(f"prompts of {lp} + {ls} positions exceed the text context of {enc.spec} ({ctx})")
    eot = _check_eot(eot, c, lp, lp + ls, f"the suffix, [{lp}, {lp + ls})")
    if c == 0:
        return torch.zeros(0, enc.embed_dim, device=enc.device)
    if not _standard_blocks(tower):
        full = torch.cat([prefix_embeds.to(suffix_embeds.dtype).unsqueeze(0).expand(c, -1, -1), suffix_embeds], 1)
        return _forward(enc, tower, full, eot)
    n = int(eot.max()) + 1 - lp
    eot = eot.to(enc.device).long() - lp
    with enc.autocast():
        cast = tower.transformer.get_cast_dtype()
        pos = tower.positional_embedding.to(cast)
        xp = prefix_embeds.to(device=enc.device, dtype=cast).unsqueeze(0) + pos[:lp]
        xs = suffix_embeds[:, :n].to(device=enc.device, dtype=cast) + pos[lp : lp + n]
        for block in tower.transformer.resblocks:
            xp, xs = _block_shared(block, xp, xs)
        x = tower.ln_final(xs)[torch.arange(c, device=enc.device), eot]
        proj = tower.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x if x.dtype == torch.float64 else x.float()
