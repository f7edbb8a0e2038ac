"""Reduced precision holds reduced-precision weights (cast once, as open_clip's own ``precision`` option), returns
float32 features close to fp32, never changes the fingerprint, and keeps the caches of each precision apart.

Tolerances: bf16 keeps 8 significant bits (unit roundoff u = 2**-8 ~ 3.9e-3), fp16 11 bits (u = 2**-11 ~ 4.9e-4).
Every entry of an L2-normalised feature is at most 1, and the tiny towers have two blocks, so the features of a
reduced precision stay within a few u of fp32: we allow 5u (2e-2 for bf16, as the encoder's own trimming check
does; 2.5e-3 for fp16) and require a difference above zero (the model really ran in reduced precision).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import vlmood
from vlmood.encoders import base
from vlmood.errors import InvalidInputError
from vlmood.testing import TINY_ARCH, tiny_encoder

TOL = {"bf16": 5 * 2.0**-8, "fp16": 5 * 2.0**-11}
DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}
TEXTS = ["a cat", "a photo of a red bus", "x", "the nice jellyfish"]


def _load(precision, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "bf16/fp16 on CPU" notice
        return tiny_encoder(seed, precision=precision)


@pytest.fixture(scope="module")
def encoders():
    return {p: _load(p) for p in ("fp32", "bf16", "fp16")}


def _images(n=5, seed=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_weights_are_what_open_clips_own_precision_option_builds(encoders, precision):
    """The same tensors (values and dtypes) and module classes as ``open_clip.create_model(..., precision=...)``
    with the same seed, and the same image features as that model run on the same images in that dtype."""
    from vlmood.encoders.open_clip_backend import _open_clip

    enc, dtype = encoders[precision], DTYPE[precision]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = _open_clip().create_model(TINY_ARCH, pretrained=None, precision=precision).eval()
    mine, theirs = enc.model.state_dict(), ref.state_dict()
    assert set(mine) == set(theirs)
    for k in mine:
        assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]), k
    assert [type(m) for m in enc.model.modules()] == [type(m) for m in ref.modules()]
    params = dict(enc.model.named_parameters())
    assert enc.compute_dtype == dtype
    assert params["visual.transformer.resblocks.0.mlp.c_fc.weight"].dtype == dtype
    assert params["visual.conv1.weight"].dtype == params["visual.proj"].dtype == params["text_projection"].dtype == dtype
    assert params["visual.transformer.resblocks.0.attn.in_proj_weight"].dtype == dtype
    for name in ("logit_scale", "positional_embedding", "token_embedding.weight", "ln_final.weight",
                 "visual.ln_post.weight", "visual.class_embedding"):
        assert params[name].dtype == torch.float32, name
    assert enc.logit_scale == encoders["fp32"].logit_scale  # the temperature is not rounded
    x = _images()
    got = enc.encode_images(x)
    with torch.inference_mode():
        want = F.normalize(ref.encode_image(x.to(dtype)).float(), dim=-1)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    with enc.autocast():  # an enclosing autocast (training code) changes nothing for the encoder's own forwards
        assert torch.equal(enc.encode_images(x), got)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_features_are_float32_and_close_to_fp32(encoders, precision):
    enc, full, tol = encoders[precision], encoders["fp32"], TOL[precision]
    x = _images()
    g, loc = enc.encode_images(x, local=True)
    g32, loc32 = full.encode_images(x, local=True)
    t, t32 = enc.encode_texts(TEXTS), full.encode_texts(TEXTS)
    for a, b in ((g, g32), (loc, loc32), (t, t32)):
        assert a.dtype == torch.float32 and torch.allclose(a.norm(dim=-1), torch.ones(()), atol=1e-5)
        assert 0 < (a - b).abs().max().item() < tol
    assert torch.equal(g, enc.encode_images(x))  # the global path of local=True is the ordinary forward


def test_fingerprint_is_the_same_at_every_precision(encoders, tmp_path):
    fps = {p: e.fingerprint for p, e in encoders.items()}
    assert len(set(fps.values())) == 1, fps
    assert fps["fp32"] == tiny_encoder(0).fingerprint != tiny_encoder(1).fingerprint
    ckpt = tmp_path / "tiny.safetensors"
    encoders["fp32"].save(ckpt)  # a checkpoint file: fingerprinted from its float32 tensors at every precision
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = vlmood.load_encoder(f"open_clip:{TINY_ARCH}@{ckpt}", precision="bf16")
    assert loaded.fingerprint == fps["fp32"]
    assert loaded.model.visual.conv1.weight.dtype == torch.bfloat16
    with pytest.raises(InvalidInputError, match=r"loaded at bf16: its weights are rounded to bf16; load it with "
                                                r"precision='fp32' to save it$"):
        loaded.save(tmp_path / "rounded.safetensors")
    assert not (tmp_path / "rounded.safetensors").exists()


def test_text_cache_keeps_each_precision_apart(tmp_path, monkeypatch):
    """Same fingerprint, so only the precision in the namespace keeps fp32 and bf16 embeddings apart: each is
    computed once, then served from the cache, equal to an uncached computation at its own precision."""
    from vlmood.text import EmbeddingCache, cache_namespace

    full, half = _load("fp32"), _load("bf16")
    assert cache_namespace(full) != cache_namespace(half)
    calls = {"fp32": 0, "bf16": 0}
    real = type(full)._encode_token_batch

    def counted(self, tokens, length):
        calls[self.precision] += 1
        return real(self, tokens, length)

    want = {"fp32": full.encode_texts(TEXTS), "bf16": half.encode_texts(TEXTS)}  # no cache
    monkeypatch.setattr(type(full), "_encode_token_batch", counted)
    cache = EmbeddingCache(tmp_path / "cache")
    for enc in (full, half, full, half):
        got = enc.encode_texts(TEXTS, cache=cache)
        assert torch.equal(got, want[enc.precision])
    assert calls["fp32"] > 0 and calls["bf16"] > 0  # each computed its own (bf16 was not served fp32 entries)
    before = dict(calls)
    full.encode_texts(TEXTS, cache=cache), half.encode_texts(TEXTS, cache=cache)
    assert calls == before  # and both are now cache hits
    assert (want["fp32"] - want["bf16"]).abs().max() > 0


def test_cpu_precision_notice_says_what_this_cpu_does(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(base, "_cpu_has_native_bf16", lambda: True)
    with pytest.warns(UserWarning, match=r"^bf16 on CPU: weights held in bf16, usually several times faster than "
                                         r"fp32 on this CPU .* fp32 is the CPU default$"):
        assert base.resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(base, "_cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match=r"^bf16 on CPU is emulated and usually several times slower than fp32"):
        base.resolve_precision("bf16", cpu)
    with pytest.warns(UserWarning, match=r"^fp16 on CPU is emulated and usually several times slower than fp32"):
        base.resolve_precision("fp16", cpu)


def test_training_runs_float32_sides_through_bf16_weights(encoders):
    """CLIPN's no tower is a float32 copy of the bf16 text tower and trains under the encoder's autocast: its
    gradients are finite float32, and the frozen base keeps its bf16 weights."""
    from vlmood.clipn import CLIPNModel

    enc = encoders["bf16"]
    model = CLIPNModel(enc, n_prompts=2)
    assert {p.dtype for p in model.no.parameters()} == {torch.float32}
    tokens, _ = enc.tokenize(TEXTS)
    out = model.encode_no_tokens(tokens, torch.tensor([0, 1, 2, 0]))
    assert out.dtype == torch.float32
    out.float().pow(2).sum().backward()
    grads = [p.grad for p in model.no.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert enc.model.text_projection.dtype == torch.bfloat16 and enc.model.text_projection.grad is None


def test_hf_encoder_holds_bf16_weights_with_float32_norms_and_scale(tmp_path):
    pytest.importorskip("transformers")
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [" ", "."]
    vocab = {"<|startoftext|>": 0}
    vocab.update({c: len(vocab) + i for i, c in enumerate(chars)})
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(chars)})
    vocab["<|endoftext|>"] = eos = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(tmp_path)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=40, bos_token_id=0,
                                      eos_token_id=eos, pad_token_id=eos),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    full = vlmood.load_encoder(f"hf:{tmp_path}", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = vlmood.load_encoder(f"hf:{tmp_path}", device="cpu", precision="bf16")
    assert half.fingerprint == full.fingerprint and half.logit_scale == full.logit_scale
    norms = {f"{mn}.{pn}" for mn, m in full.model.named_modules() if isinstance(m, torch.nn.LayerNorm)
             for pn, _ in m.named_parameters(recurse=False)}
    assert len(norms) > 10
    for name, p in half.model.named_parameters():
        assert p.dtype == (torch.float32 if name in norms or name == "logit_scale" else torch.bfloat16), name
    x = _images()
    assert 0 < (half.encode_images(x) - full.encode_images(x)).abs().max().item() < TOL["bf16"]
    assert 0 < (half.encode_texts(TEXTS) - full.encode_texts(TEXTS)).abs().max().item() < TOL["bf16"]
