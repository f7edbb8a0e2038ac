"""Hugging Face backend on a tiny random CLIPModel saved by the test and loaded via ``hf:DIR``."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlmood
from vlmood.errors import EncoderLoadError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("hf-tiny-clip")
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(".,-'!?0123456789")
    vocab = {"<|startoftext|>": 0}
    vocab.update({c: len(vocab) + i for i, c in enumerate(chars)})
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(chars)})
    vocab["<|endoftext|>"] = len(vocab)
    eos = len(vocab) - 1
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(d)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=40, bos_token_id=0, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


def test_hf_clip_text_trimmed_equals_full(hf_dir):
    enc = vlmood.load_encoder(f"hf:{hf_dir}", device="cpu")
    assert enc.exact_text_trimming and enc.embed_dim == 16
    texts = ["a cat.", "a very long sentence about dogs", "x", "the nice jellyfish."]
    _, lengths = enc.tokenize(texts)
    assert max(lengths) < 40
    got = enc.encode_texts(texts, batch_size=2)
    batch = enc.tokenizer(texts, padding="max_length", max_length=40, return_tensors="pt")
    with torch.inference_mode():
        out = enc.model.get_text_features(**batch)
        full = F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
    assert (got - full).abs().max().item() <= 1e-5


def test_hf_images_and_detector(hf_dir):
    enc = vlmood.load_encoder(f"hf:{hf_dir}", device="cpu")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    feats = enc.encode_images([img])
    with torch.inference_mode():
        px = enc.image_processor(images=img, return_tensors="pt")["pixel_values"]
        out = enc.model.get_image_features(pixel_values=px)
        ref = F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
    assert torch.allclose(feats, ref, atol=1e-6)
    s = vlmood.MCM(enc, ["cat", "dog"]).score([img])
    assert s.shape == (1,) and 0.5 <= s[0] <= 1.0


def test_hf_has_no_local_features(hf_dir):
    from vlmood.errors import InvalidInputError

    enc = vlmood.load_encoder(f"hf:{hf_dir}", device="cpu")
    with pytest.raises(InvalidInputError, match="no local .per-patch. features"):
        vlmood.GLMCM(enc, ["cat", "dog"]).score([Image.new("RGB", (32, 32))])


def test_hf_missing_model_is_explained(tmp_path):
    with pytest.raises(EncoderLoadError, match="could not load the config of local folder"):
        vlmood.load_encoder(f"hf:{tmp_path}")


def test_hf_siglip_uses_full_length_text(hf_dir, tmp_path):
    """SigLIP's text tower is bidirectional and pools the last position: no trimming, max-length padding."""
    import shutil

    from transformers import SiglipConfig, SiglipModel

    d = tmp_path / "siglip"
    shutil.copytree(hf_dir, d)
    for f in ("config.json", "model.safetensors"):
        (d / f).unlink()
    vocab = len(vlmood.load_encoder(f"hf:{hf_dir}").tokenizer)
    cfg = SiglipConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=24),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
    )
    torch.manual_seed(0)
    SiglipModel(cfg).save_pretrained(d)
    enc = vlmood.load_encoder(f"hf:{d}", device="cpu")
    assert not enc.exact_text_trimming
    texts = ["a cat.", "two dogs"]
    _, lengths = enc.tokenize(texts)
    assert lengths == [24, 24]
    got = enc.encode_texts(texts)
    ids = enc.tokenizer(texts, padding="max_length", max_length=24, truncation=True, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = enc.model.get_text_features(input_ids=ids)
        ref = F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
    assert torch.allclose(got, ref, atol=1e-6)
