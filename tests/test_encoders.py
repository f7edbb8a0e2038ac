"""Encoders: spec grammar, save/load round trip, clear load errors, exact trimmed text, GL-MCM local features."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vlmood
from vlmood.encoders import parse_spec, resolve_precision
from vlmood.errors import CheckpointMismatchError, EncoderLoadError, InvalidInputError
from vlmood.testing import TINY_ARCH, tiny_encoder


def test_parse_spec():
    s = parse_spec("open_clip:ViT-B-16/openai")
    assert (s.backend, s.name, s.pretrained, s.checkpoint) == ("open_clip", "ViT-B-16", "openai", None)
    assert parse_spec("open_clip:ViT-B-32/none").pretrained is None
    s = parse_spec("open_clip:ViT-B-32@/tmp/w.safetensors")
    assert s.name == "ViT-B-32" and str(s.checkpoint) == "/tmp/w.safetensors"
    assert parse_spec("open_clip:hf-hub:timm/ViT-B-16-SigLIP").name == "hf-hub:timm/ViT-B-16-SigLIP"
    assert parse_spec("hf:openai/clip-vit-base-patch16").name == "openai/clip-vit-base-patch16"
    for spec in ["open_clip:ViT-B-16/openai", "open_clip:ViT-B-32/none", "hf:some/model", "open_clip:ViT-B-32/none:seed=3"]:
        assert str(parse_spec(spec)) == spec and parse_spec(str(parse_spec(spec))) == parse_spec(spec)
    assert parse_spec("open_clip:ViT-B-32/none").seed == 0 and parse_spec("open_clip:ViT-B-32/None:seed=7").seed == 7
    assert parse_spec("open_clip:ViT-B-32/none:seed=0") == parse_spec("open_clip:ViT-B-32/none")


@pytest.mark.parametrize("bad,match", [
    ("", "empty"), ("ViT-B-16", "must start with"), ("clip:ViT-B-16/openai", "must start with"),
    ("open_clip:ViT-B-16", "names no weights"), ("open_clip:", "names no model"), ("open_clip:@x", "ARCH@"),
    ("open_clip:ViT-B-32/none:seed=x", "none:seed=N' with N a non-negative integer"),
    ("open_clip:ViT-B-32/none:sed=3", "none:seed=N"), ("open_clip:ViT-B-32/none:seed=-1", "non-negative"),
    ("open_clip:ViT-B-32/openai:seed=3", "a seed applies only to random initialisation"),
    ("toyworl", "did you mean 'toyworld'"),
])
def test_parse_spec_errors(bad, match):
    with pytest.raises(InvalidInputError, match=match):
        parse_spec(bad)


def test_precision_defaults():
    assert resolve_precision(None, torch.device("cpu")) == "fp32"
    with pytest.warns(UserWarning, match="bf16 on CPU"):  # the message depends on the CPU: tests/test_precision.py
        assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(InvalidInputError, match="fp8"):
        resolve_precision("fp8", torch.device("cpu"))


def test_tiny_encoder_is_deterministic_and_seeded():
    a, b, c = tiny_encoder(0), tiny_encoder(0), tiny_encoder(1)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.fingerprint.startswith(f"open_clip:{TINY_ARCH}:")


def test_save_load_round_trip(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    tiny.save(path)
    loaded = vlmood.load_encoder(f"open_clip:{TINY_ARCH}@{path}", device="cpu")
    assert loaded.fingerprint == tiny.fingerprint
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = ["a photo of a cat.", "a dog", "an origami crane in a video game."]
    assert torch.equal(loaded.encode_images(images), tiny.encode_images(images))
    assert torch.equal(loaded.encode_texts(texts), tiny.encode_texts(texts))
    assert loaded.logit_scale == tiny.logit_scale


def test_load_torch_checkpoint_with_module_prefix(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny.model.state_dict().items()}}, path)
    loaded = vlmood.load_encoder(f"open_clip:{TINY_ARCH}@{path}", device="cpu")
    assert loaded.fingerprint == tiny.fingerprint


def test_checkpoint_mismatch_names_keys(tiny, tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    del sd["logit_scale"]
    sd["visual.extra_head.weight"] = torch.zeros(2)
    sd["visual.proj"] = torch.zeros(3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointMismatchError) as e:
        vlmood.load_encoder(f"open_clip:{TINY_ARCH}@{path}")
    msg = str(e.value)
    assert "missing keys: logit_scale" in msg
    assert "unexpected keys: visual.extra_head.weight" in msg
    assert "visual.proj (checkpoint (3, 3) vs model (64, 64))" in msg


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(EncoderLoadError, match="checkpoint file not found: .*nope.safetensors"):
        vlmood.load_encoder(f"open_clip:{TINY_ARCH}@{tmp_path / 'nope.safetensors'}")


def test_unknown_architecture_suggests_close_names():
    with pytest.raises(EncoderLoadError, match=r"unknown open_clip architecture 'ViT-B-3'.*did you mean.*ViT-B-32"):
        vlmood.load_encoder("open_clip:ViT-B-3/openai")


def test_unknown_pretrained_tag_lists_tags():
    with pytest.raises(EncoderLoadError, match=r"no pretrained weights 'opneai' for 'ViT-B-32'.*openai.*laion2b"):
        vlmood.load_encoder("open_clip:ViT-B-32/opneai")


def test_download_failure_explains_cache_and_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderLoadError) as e:
        vlmood.load_encoder("open_clip:RN50/openai")
    msg = str(e.value)
    assert "could not obtain the weights of open_clip:RN50/openai" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "open_clip:RN50@/path/to/checkpoint" in msg


# ------------------------------------------------------------------ exact length-trimmed text encoding
def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["cat", "a photo of", "the nice", "jellyfish", "very", "small", "red", "origami", "x-ray", "car"]
    return [" ".join(rng.choice(words, size=rng.integers(1, 12))) + "." for _ in range(n)]


def test_trimmed_text_equals_full_context(tiny, monkeypatch):
    texts = _prompts(100)
    seen = []
    real = type(tiny)._encode_trimmed

    def spy(self, tokens, length):
        seen.append(length)
        return real(self, tokens, length)

    monkeypatch.setattr(type(tiny), "_encode_trimmed", spy)
    ours = tiny.encode_texts(texts, batch_size=16)
    with torch.inference_mode():
        full = F.normalize(tiny.model.encode_text(tiny.tokenizer(texts)), dim=-1)
    assert tiny.exact_text_trimming
    assert seen and max(seen) < 77  # batches really ran over trimmed lengths
    assert (ours - full).abs().max().item() <= 1e-5


def test_long_prompt_is_truncated_with_warning(tiny):
    long = "a photo of " + "very " * 100 + "big cat."
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) longer than the text context of 77 tokens.*a photo of very"):
        out = tiny.encode_texts([long, "short"])
    with torch.inference_mode():
        full = F.normalize(tiny.model.encode_text(tiny.tokenizer([long])), dim=-1)
    assert (out[0] - full[0]).abs().max() <= 1e-5


def test_inexact_trimming_is_caught_and_never_kept(monkeypatch, tmp_path):
    """If a tower variant made trimming inexact, the first batch is recomputed in full and nothing wrong is cached."""
    from vlmood.text import EmbeddingCache

    enc = tiny_encoder(0)
    real = type(enc)._encode_trimmed
    monkeypatch.setattr(type(enc), "_encode_trimmed", lambda self, t, n: real(self, t, n) + 0.5)
    texts = ["a cat.", "a big red bus.", "x"]
    cache = EmbeddingCache(tmp_path / "c")
    with pytest.warns(UserWarning, match="falling back to full-context encoding"):
        got = enc.encode_texts(texts, cache=cache)
    with torch.inference_mode():
        full = F.normalize(enc.model.encode_text(enc.tokenizer(texts)), dim=-1)
    assert not enc.exact_text_trimming
    assert (got - full).abs().max() <= 1e-5
    assert (enc.encode_texts(texts, cache=cache) - full).abs().max() <= 1e-5  # the cached copy is exact too


def test_device_errors():
    from vlmood.encoders import resolve_device

    with pytest.raises(InvalidInputError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="CUDA is not available"):
            resolve_device("cuda")
    # meta loaded a model of empty tensors and failed deep inside the first forward, after all the set-up
    with pytest.raises(InvalidInputError, match="device 'meta' is not a compute device"):
        resolve_device("meta")
    if not torch.backends.mps.is_available():  # was accepted here, then a traceback when the model moved
        with pytest.raises(InvalidInputError, match="device 'mps' is not available on this machine"):
            resolve_device("mps")
    for dev in ("xla", "hpu", "vulkan"):
        with pytest.raises(InvalidInputError, match=f"device '{dev}' is not available"):
            resolve_device(dev)
    assert resolve_device("cpu") == torch.device("cpu")


def test_fp16_on_cpu_computes_in_fp16_with_a_speed_warning():
    """torch 2.14 runs fp16 autocast on CPU: allowed, close to fp32, really fp16 (not silently fp32), and warned
    about being slower than fp32 there."""
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match="fp16 on CPU is emulated and usually several times slower than fp32"):
        half = tiny_encoder(0, precision="fp16")
    assert half.precision == "fp16"
    full = tiny_encoder(0)
    got, ref = half.encode_images(images), full.encode_images(images)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):
        independent = F.normalize(half.model.encode_image(images).float(), dim=-1)
    assert torch.allclose(got, independent, atol=1e-6)
    assert 0 < (got - ref).abs().max() < 2e-3
    texts = ["a cat", "a red bus"]
    assert (half.encode_texts(texts) - full.encode_texts(texts)).abs().max() < 2e-3


def test_fp16_on_cpu_is_refused_where_torch_would_silently_run_fp32(monkeypatch):
    from vlmood.encoders import base

    monkeypatch.setattr(base, "_cpu_fp16_autocast_works", lambda: False)  # torch < 2.4 disables it with a warning
    with pytest.raises(InvalidInputError, match=r"cannot compute in fp16 on CPU; use precision fp32 .* or bf16"):
        resolve_precision("fp16", torch.device("cpu"))


def test_non_finite_features_warn_and_stay_nan(tiny, monkeypatch):
    real = type(tiny)._encode_image_batch

    def overflow(self, batch, local):
        out = real(self, batch, local)
        out[1] = float("inf")  # what an fp16 overflow gives
        return out

    monkeypatch.setattr(type(tiny), "_encode_image_batch", overflow)
    with pytest.warns(UserWarning, match=r"1 of 3 image\(s\) gave non-finite features .* scores will be NaN"):
        g = tiny.encode_images(torch.randn(3, 3, 32, 32))
    assert torch.isnan(g[1]).all() and torch.isfinite(g[[0, 2]]).all()


def test_random_init_is_the_same_in_every_process():
    """open_clip:ARCH/none drew its weights from the process's random seed: a new fingerprint (cache miss) each run."""
    import subprocess
    import sys

    code = ("import vlmood\nfor s in ('open_clip:vlmood-tiny-vit/none', 'open_clip:vlmood-tiny-vit/none:seed=3'):\n"
            "    print(vlmood.load_encoder(s, device='cpu').fingerprint)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    none0 = out.stdout.split()[0]
    assert none0 == tiny_encoder(0).fingerprint  # another process, the same weights
    assert out.returncode == 0, out.stderr[-2000:]
    none3 = out.stdout.split()[1]
    assert none3 == tiny_encoder(3).fingerprint and none0 != none3
    assert str(tiny_encoder(3).spec) == f"open_clip:{TINY_ARCH}/none:seed=3"
    before = torch.random.get_rng_state()
    vlmood.load_encoder(f"open_clip:{TINY_ARCH}/none")
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random stream is left alone


def test_non_causal_tower_falls_back_to_full_length(tiny):
    enc = tiny_encoder(0)
    enc.model.attn_mask = None  # a bidirectional tower: trimming would not be exact
    enc._tower = enc._text_tower()
    assert not enc.exact_text_trimming
    _, lengths = enc.tokenize(["a cat"])
    assert lengths == [77]


# ------------------------------------------------------------------ GL-MCM local features
def test_local_features_are_the_value_path(tiny):
    """Independent route: the value path is the ordinary last block with each token attending only to itself."""
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    g, loc = tiny.encode_images(images, local=True)
    visual = tiny.model.visual
    with torch.inference_mode():
        assert torch.allclose(g, F.normalize(tiny.model.encode_image(images), dim=-1), atol=1e-6)
        x = visual._embeds(images)
        for blk in visual.transformer.resblocks[:-1]:
            x = blk(x)
        n = x.shape[1]
        self_only = torch.full((n, n), float("-inf"))
        self_only.fill_diagonal_(0.0)
        y = visual.transformer.resblocks[-1](x, attn_mask=self_only)
        expected = F.normalize(visual.ln_post(y[:, 1:]) @ visual.proj, dim=-1)
    assert loc.shape == (4, 16, 64)  # 32 px / patch 8 = 4x4 patches
    assert torch.allclose(loc, expected, atol=1e-5)


def test_encode_images_from_pil_and_paths(tiny, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    pil = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    pil.save(tmp_path / "a.png")
    a = tiny.encode_images([pil])
    b = tiny.encode_images([tmp_path / "a.png"])
    c = tiny.encode_images(tiny.preprocess(pil)[None])
    assert torch.allclose(a, b) and torch.allclose(a, c)
    assert a.shape == (1, 64)
    # one path, one folder, one PIL image (a string was iterated character by character)
    for single in (str(tmp_path / "a.png"), tmp_path / "a.png", str(tmp_path), tmp_path, pil):
        assert torch.allclose(tiny.encode_images(single), a), single
