"""The differentiable, length-trimmed text forward over prompt embeddings (vlmood.encoders.text_forward)."""
import copy

import pytest
import torch

import vlmood
from vlmood.encoders.text_forward import (encode_text_embeddings, prompt_tokens, require_prompt_learning,
                                          supports_prompt_learning, text_context_length, text_width,
                                          token_embeddings)
from vlmood.errors import InvalidInputError

TEXTS = ["a photo of a cat.", "x", "a very long prompt about a small red bird sitting on a branch in the rain."]
TOY_TEXTS = ["a red circle.", "a photo of a big blue square on grass.", "circle"]


@pytest.fixture(scope="module")
def toy():
    return vlmood.load_encoder("toyworld", device="cpu")


def _tower(enc):
    return enc._text_tower()["tower"]


def _full_forward(enc, embeds, eot):
    """Independent full-context forward built by hand from the tower's modules: every position, a causal mask
    made here, each residual block called in turn (batch-first), ln_final, the row at eot, the projection."""
    tower = _tower(enc)
    length = embeds.shape[1]
    mask = torch.full((length, length), float("-inf"), dtype=embeds.dtype).triu(1)
    x = embeds + tower.positional_embedding[:length]
    if not tower.transformer.batch_first:
        x = x.transpose(0, 1)
    for block in tower.transformer.resblocks:
        x = block(x, attn_mask=mask)
    if not tower.transformer.batch_first:
        x = x.transpose(0, 1)
    x = tower.ln_final(x)[torch.arange(len(eot)), eot]
    return x @ tower.text_projection


def _trimmed_length(enc, fn):
    """Run ``fn`` and report the sequence length the text transformer saw."""
    seen = []
    h = _tower(enc).transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        out = fn()
    finally:
        h.remove()
    return out, seen


@pytest.mark.parametrize("which", ["tiny", "toy"])
def test_equals_full_encode_text_and_is_trimmed(which, tiny, toy):
    enc, texts = (tiny, TEXTS) if which == "tiny" else (toy, TOY_TEXTS)
    tokens, eot = prompt_tokens(enc, texts)
    assert tokens.shape == (3, text_context_length(enc)) and len(set(eot.tolist())) == 3
    embeds = token_embeddings(enc, tokens)
    assert embeds.shape == (3, tokens.shape[1], text_width(enc)) and not embeds.requires_grad
    got, seen = _trimmed_length(enc, lambda: encode_text_embeddings(enc, embeds, eot))
    assert seen == [int(eot.max()) + 1] and seen[0] < tokens.shape[1]  # one pass, trimmed to the longest prompt
    with torch.no_grad():
        full = enc.model.encode_text(tokens)
    assert got.dtype == torch.float32 and got.shape == (3, enc.embed_dim)
    assert (got - full).abs().max().item() <= 1e-5
    # a subset whose longest prompt is shorter runs even shorter, same values
    sub = encode_text_embeddings(enc, embeds[:2], eot[:2])
    assert (sub - full[:2]).abs().max().item() <= 1e-5


def _grads(enc, forward, base, eot, seed=0):
    """Outputs and d(loss)/d(embeds) for a random linear loss of the L2-normalised features (as training uses)."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(enc.embed_dim, 5, generator=g, dtype=torch.float64).to(base.dtype)
    weights = torch.randn(len(eot), 5, generator=g, dtype=torch.float64).to(base.dtype)
    e = base.clone().requires_grad_(True)
    out = forward(enc, e, eot)
    (torch.nn.functional.normalize(out.to(base.dtype), dim=-1) @ proj * weights).sum().backward()
    return out.detach(), e.grad


@pytest.mark.parametrize("which", ["tiny", "toy"])
def test_gradients_equal_full_length_forward(which, tiny, toy):
    enc, texts = (tiny, TEXTS) if which == "tiny" else (toy, TOY_TEXTS)
    tokens, eot = prompt_tokens(enc, texts)
    base = token_embeddings(enc, tokens)
    out1, g1 = _grads(enc, encode_text_embeddings, base, eot)
    out2, g2 = _grads(enc, _full_forward, base, eot)
    with torch.no_grad():
        assert (out2 - enc.model.encode_text(tokens)).abs().max().item() <= 1e-5  # the hand forward is right
    assert (out1 - out2).abs().max().item() <= 1e-5
    # float32: token-embedding gradients are large (ln_1 divides by the embeddings' ~0.02 scale), so the
    # comparison is relative to the largest gradient; float64 below makes it absolute
    scale = g2.abs().max().item()
    assert scale > 0 and (g1 - g2).abs().max().item() <= 1e-5 * scale
    beyond = torch.arange(tokens.shape[1])[None, :] > eot[:, None]
    assert g1[beyond].abs().max() == 0  # positions after a prompt's end never matter

    enc64 = copy.deepcopy(enc)
    enc64.model.double()
    base64 = token_embeddings(enc64, tokens).double()
    out1, g1 = _grads(enc64, encode_text_embeddings, base64, eot)
    out2, g2 = _grads(enc64, _full_forward, base64, eot)
    assert g1.dtype == torch.float64 and g2.abs().max() > 0
    assert (g1 - g2).abs().max().item() <= 1e-9


def test_learnable_context_rows_get_the_only_gradients(tiny):
    n_ctx, classes = 4, ["cat", "dog", "small red bird"]
    tokens, eot = prompt_tokens(tiny, [" ".join(["X"] * n_ctx) + f" {c}." for c in classes])
    base = token_embeddings(tiny, tokens)
    ctx = torch.nn.Parameter(0.02 * torch.randn(n_ctx, text_width(tiny), generator=torch.Generator().manual_seed(1)))
    embeds = torch.cat([base[:, :1], ctx.expand(len(classes), -1, -1), base[:, 1 + n_ctx:]], dim=1)
    feats = encode_text_embeddings(tiny, embeds, eot)
    loss = torch.nn.functional.normalize(feats, dim=-1)[:, 0].sum()
    loss.backward()
    assert ctx.grad is not None and torch.isfinite(ctx.grad).all() and (ctx.grad.abs().sum(dim=1) > 0).all()
    assert base.grad is None and not base.requires_grad
    assert all(p.grad is None for p in tiny.model.parameters())  # the tower stays frozen
    # the shared context's gradient is the sum over classes of the per-position gradients at its rows
    leaf = embeds.detach().clone().requires_grad_(True)
    torch.nn.functional.normalize(encode_text_embeddings(tiny, leaf, eot), dim=-1)[:, 0].sum().backward()
    assert (ctx.grad - leaf.grad[:, 1:1 + n_ctx].sum(0)).abs().max().item() <= 1e-6
    # with the context set to the placeholder's own embeddings, the features are those of the text itself
    with torch.no_grad():
        ctx.copy_(base[0, 1:1 + n_ctx])
        same = encode_text_embeddings(tiny, torch.cat([base[:, :1], ctx.expand(3, -1, -1), base[:, 1 + n_ctx:]], 1),
                                      eot)
        assert (same - tiny.model.encode_text(tokens)).abs().max().item() <= 1e-5


def test_linear_text_projection():
    from vlmood.testing import tiny_encoder

    enc = tiny_encoder(seed=3)
    tokens, eot = prompt_tokens(enc, TEXTS)
    embeds = token_embeddings(enc, tokens)
    before = encode_text_embeddings(enc, embeds, eot)
    tower = _tower(enc)
    mat = tower.text_projection.detach().clone()
    lin = torch.nn.Linear(mat.shape[0], mat.shape[1], bias=False)
    lin.weight.data.copy_(mat.T)
    del tower.text_projection
    tower.text_projection = lin
    after = encode_text_embeddings(enc, embeds, eot)
    assert (after - before).abs().max().item() <= 1e-6


def test_reduced_precision_returns_float32():
    from vlmood.testing import tiny_encoder

    with pytest.warns(UserWarning, match="bf16 on CPU"):
        enc = tiny_encoder(seed=0, precision="bf16")
    tokens, eot = prompt_tokens(enc, TEXTS)
    embeds = token_embeddings(enc, tokens).requires_grad_(True)
    out = encode_text_embeddings(enc, embeds, eot)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert embeds.grad.dtype == torch.float32 and torch.isfinite(embeds.grad).all()
    with torch.no_grad():
        full = torch.nn.functional.normalize(enc.model.encode_text(tokens), dim=-1)
    assert (torch.nn.functional.normalize(out.detach(), dim=-1) - full).abs().max().item() < 5e-2


def test_unsupported_encoders_raise_one_line(tiny, monkeypatch):
    assert supports_prompt_learning(tiny)
    monkeypatch.setattr(tiny, "_text_tower", lambda: None)
    assert not supports_prompt_learning(tiny)
    for call in (lambda: require_prompt_learning(tiny), lambda: text_width(tiny),
                 lambda: prompt_tokens(tiny, ["a"]),
                 lambda: encode_text_embeddings(tiny, torch.zeros(1, 3, 64), torch.tensor([2]))):
        with pytest.raises(InvalidInputError, match=r"^prompt learning needs an open_clip text tower with causal "
                                                    r"attention; open_clip:vlmood-tiny-vit/none has none$"):
            call()
    monkeypatch.undo()
    monkeypatch.setattr(tiny, "_tower", None)  # what a failed trimming check leaves behind
    with pytest.raises(InvalidInputError, match="trimmed text forward differed from the full one"):
        require_prompt_learning(tiny)


def test_hf_encoder_raises(tmp_path):
    pytest.importorskip("transformers")
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "a</w>": 1, "<|endoftext|>": 2}
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(tmp_path)
    cfg = CLIPConfig(text_config=dict(vocab_size=3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=8, bos_token_id=0,
                                      eos_token_id=2, pad_token_id=2),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8),
                     projection_dim=8)
    CLIPModel(cfg).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(tmp_path)
    enc = vlmood.load_encoder(f"hf:{tmp_path}", device="cpu")
    assert not supports_prompt_learning(enc)
    with pytest.raises(InvalidInputError, match=rf"^prompt learning needs an open_clip text tower with causal "
                                                rf"attention; hf:{tmp_path} has none$"):
        require_prompt_learning(enc)


def test_bad_inputs_are_one_line_errors(tiny):
    tokens, eot = prompt_tokens(tiny, TEXTS)
    embeds = token_embeddings(tiny, tokens)
    cases = [
        (lambda: encode_text_embeddings(tiny, embeds[..., :10], eot), "embeds have width 10; the text tower"),
        (lambda: encode_text_embeddings(tiny, torch.zeros(1, 78, 64), [3]), "embeds have 78 positions"),
        (lambda: encode_text_embeddings(tiny, embeds[0], eot), r"embeds must be a float tensor \[M, L, W\]"),
        (lambda: encode_text_embeddings(tiny, embeds, eot[:2]), "eot must be 3 integer end-of-text positions"),
        (lambda: encode_text_embeddings(tiny, embeds, eot.float()), "eot must be 3 integer"),
        (lambda: encode_text_embeddings(tiny, embeds[:, :5], eot), r"eot positions must lie in \[0, 5\)"),
        (lambda: encode_text_embeddings(tiny, embeds, torch.tensor([-1, 0, 1])), r"eot positions must lie"),
        (lambda: token_embeddings(tiny, tokens.float()), r"tokens must be an integer tensor \[M, L\]"),
        (lambda: token_embeddings(tiny, tokens + 49408), r"token ids must lie in \[0, 49408\)"),
        (lambda: prompt_tokens(tiny, "a cat"), "not a single string"),
        (lambda: prompt_tokens(tiny, ["a", 3]), "texts must be strings"),
    ]
    for call, match in cases:
        with pytest.raises(InvalidInputError, match=match):
            call()
    empty = encode_text_embeddings(tiny, embeds[:0], eot[:0])
    assert empty.shape == (0, tiny.embed_dim)


def test_prompt_learning_checks_trimming_once_per_encoder(monkeypatch):
    """The encoder's own trimming check guards only its cached text path; the prompt-learning path checks itself,
    once per encoder, against model.encode_text."""
    from vlmood.testing import tiny_encoder
    from vlmood.tuning import CoOp

    enc = tiny_encoder(seed=4)
    calls = []
    real = enc.model.encode_text
    monkeypatch.setattr(enc.model, "encode_text", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    require_prompt_learning(enc)
    assert supports_prompt_learning(enc) and text_width(enc) == 64
    assert len(calls) == 1 and calls[0][1] == 77  # one full-context forward, whatever the number of calls
    bad = tiny_encoder(seed=4)
    bad.model.attn_mask = torch.zeros_like(bad.model.attn_mask)  # no causal mask: the padding now matters
    assert bad._text_tower() is not None  # the structural test still passes; only the forward tells
    with pytest.raises(InvalidInputError, match=r"^prompt learning needs an exact length-trimmed text tower; on "
                                                r"open_clip:vlmood-tiny-vit/none:seed=4 the trimmed forward over "
                                                r"prompt embeddings differs from the full one \(model\.encode_text\) "
                                                r"by \d\.\d\de[+-]\d\d, more than 0\.0001$"):
        require_prompt_learning(bad)
    assert not supports_prompt_learning(bad)
    with pytest.raises(InvalidInputError, match="differs from the full one"):
        CoOp(bad, ["cat", "dog"])


def _shared_case(enc, names, n_ctx=4, seed=3):
    """Prompts "X X X X {name}." -> (ctx leaf [n_ctx, W], start embedding [1, W], suffixes [C, Ls, W], eot)."""
    tokens, eot = prompt_tokens(enc, [" ".join(["X"] * n_ctx) + f" {n}." for n in names])
    base = token_embeddings(enc, tokens[:, : int(eot.max()) + 1])
    g = torch.Generator().manual_seed(seed)
    ctx = torch.nn.Parameter(0.5 * torch.randn(n_ctx, text_width(enc), generator=g))
    return ctx, base[0, :1], base[:, 1 + n_ctx:], eot


@pytest.mark.parametrize("which", ["tiny", "toy"])
def test_shared_prefix_equals_full_forward_values_and_gradients(which, tiny, toy):
    from vlmood.encoders.text_forward import encode_text_shared_prefix

    enc = tiny if which == "tiny" else toy
    names = (["cat", "a very long name of a small red bird in the rain", "dog house"] if which == "tiny"
             else ["red circle", "big blue square on grass", "circle"])
    ctx, sos, suffix, eot = _shared_case(enc, names)
    assert len(set(eot.tolist())) == 3  # suffixes of different lengths in one batch
    suffix = suffix.clone().requires_grad_(True)
    # Reference: every prompt in full through the tower (the trimmed forward and the hand-built one).
    full = torch.cat([sos.expand(3, -1, -1), ctx.expand(3, -1, -1), suffix], 1)
    ref = encode_text_embeddings(enc, full, eot)
    with torch.no_grad():
        assert (ref - _full_forward(enc, full.detach(), eot)).abs().max().item() <= 1e-5
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7))
    g_ctx, g_suf = torch.autograd.grad((ref * w).sum(), [ctx, suffix])
    # Shared path: the prefix runs once (batch 1, 1 + n_ctx positions), the suffixes per prompt, trimmed.
    seen = []
    hook = _tower(enc).transformer.resblocks[0].mlp.register_forward_pre_hook(
        lambda mod, args: seen.append(tuple(args[0].shape[:2])))
    try:
        out = encode_text_shared_prefix(enc, torch.cat([sos, ctx]), suffix, eot)
    finally:
        hook.remove()
    assert seen == [(1, 5), (3, int(eot.max()) + 1 - 5)]
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    h_ctx, h_suf = torch.autograd.grad((out * w).sum(), [ctx, suffix])
    scale = g_ctx.abs().max().item()
    assert scale > 0 and (h_ctx - g_ctx).abs().max().item() <= 1e-5 * scale
    assert (h_suf - g_suf).abs().max().item() <= 1e-5 * g_suf.abs().max().item()


def test_shared_prefix_falls_back_for_nonstandard_blocks(tiny):
    from open_clip.transformer import ResidualAttentionBlock

    from vlmood.encoders import text_forward as tf

    class Custom(ResidualAttentionBlock):
        def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
            return super().forward(q_x, k_x, v_x, attn_mask) * 1.5  # a block the by-hand path would get wrong

    enc = copy.deepcopy(tiny)
    assert tf._standard_blocks(_tower(enc))
    _tower(enc).transformer.resblocks[1].__class__ = Custom
    assert not tf._standard_blocks(_tower(enc))
    ctx, sos, suffix, eot = _shared_case(enc, ["cat", "dog house"])
    with torch.no_grad():
        full = torch.cat([sos.expand(2, -1, -1), ctx.expand(2, -1, -1), suffix], 1)
        out = tf.encode_text_shared_prefix(enc, torch.cat([sos, ctx]), suffix, eot)
        assert (out - encode_text_embeddings(enc, full, eot)).abs().max().item() <= 1e-6
    mask = _tower(tiny).attn_mask.clone()
    mask[3, 1] = float("-inf")  # not the causal mask
    assert not tf._standard_blocks(type("T", (), {"transformer": _tower(tiny).transformer, "attn_mask": mask}))


def test_shared_prefix_bad_inputs_are_one_line_errors(tiny):
    from vlmood.encoders.text_forward import encode_text_shared_prefix

    ctx, sos, suffix, eot = _shared_case(tiny, ["cat", "dog house"])
    prefix = torch.cat([sos, ctx]).detach()
    for call, msg in [
        (lambda: encode_text_shared_prefix(tiny, prefix, suffix, torch.tensor([3, 6])),
         r"eot positions must lie in the suffix, \[5, "),
        (lambda: encode_text_shared_prefix(tiny, prefix[:, :10], suffix, eot), "prefix_embeds must be a float"),
        (lambda: encode_text_shared_prefix(tiny, prefix, suffix[0], eot), "suffix_embeds must be a float"),
        (lambda: encode_text_shared_prefix(tiny, prefix, suffix, eot[:1]), "eot must be 2 integer"),
        (lambda: encode_text_shared_prefix(tiny, prefix, torch.zeros(1, 73, 64), [6]), "exceed the text context"),
    ]:
        with pytest.raises(InvalidInputError, match=msg):
            call()
