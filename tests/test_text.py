"""Prompt sets, class ensembles and the disk cache (hits, corruption, concurrency, fp16)."""
import multiprocessing as mp
import warnings

import pytest
import torch
import torch.nn.functional as F

from vlmood.errors import InvalidInputError
from vlmood.text import (EmbeddingCache, builtin_names, class_embeddings, class_prompts, embed_texts, load_classes,
                         load_templates)
from vlmood.text.embed import cache_namespace


# ------------------------------------------------------------------ prompt data
def test_bundled_templates_and_classes():
    assert len(load_templates("imagenet80")) == 80
    assert load_templates("imagenet7")[0] == "itap of a {}."
    assert load_templates(None) == ["a photo of a {}"]
    assert load_templates("neglabel_noun") == ["the nice {}"]
    assert load_templates("neglabel_adj") == ["This is a {} photo"]
    inet = load_classes("imagenet1k")
    assert len(inet) == 1000 and inet[0] == "tench" and inet[744] == "projectile"
    assert len(load_classes("cifar10")) == 10 and len(load_classes("cifar100")) == 100
    assert {"imagenet1k", "cifar10", "cifar100"} <= set(builtin_names("classes"))


def test_class_sources(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("# my classes\ncat\n\n dog \n")
    assert load_classes(str(f)) == ["cat", "dog"]
    assert load_classes("cat, dog,bird") == ["cat", "dog", "bird"]
    assert load_classes(["cat"]) == ["cat"]
    t = tmp_path / "t.txt"
    t.write_text("a {} here\nart of the {}.\n")
    assert load_templates(str(t)) == ["a {} here", "art of the {}."]
    assert load_templates("itap of my {}") == ["itap of my {}"]
    assert class_prompts(["a", "b"], ["x {}", "{} y"]) == ["x a", "a y", "x b", "b y"]


@pytest.mark.parametrize("spec,match", [
    ([], "class list is empty"), ("", "class list is empty|not found"),
    (["cat", "dog", "cat", "bird", "dog"], "duplicate class names: 'cat', 'dog'"),
    (["cat", " "], "empty name"), ("missing/classes.txt", "not found"),
])
def test_bad_classes(spec, match):
    with pytest.raises(InvalidInputError, match=match):
        load_classes(spec)


def test_bad_templates():
    with pytest.raises(InvalidInputError, match="exactly one"):
        load_templates(["a {} {}"])
    with pytest.raises(InvalidInputError, match="unknown templates 'nonexistent'"):
        load_templates("nonexistent")


def test_class_embedding_is_normalised_mean_of_templates(tiny):
    classes, templates = ["cat", "dog", "sea urchin"], load_templates("imagenet7")
    got = class_embeddings(tiny, classes, templates, cache=None)
    with torch.inference_mode():
        expected = []
        for c in classes:
            e = F.normalize(tiny.model.encode_text(tiny.tokenizer([t.replace("{}", c) for t in templates])), dim=-1)
            expected.append(F.normalize(e.mean(0), dim=-1))
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)


# ------------------------------------------------------------------ cache
PROMPTS = [f"a photo of a {w}." for w in ["cat", "dog", "big red bus", "sea urchin", "tiny house", "x"]]


def test_cache_hit_returns_identical_values_without_encoding(tiny, tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path / "c")
    first = embed_texts(tiny, PROMPTS, cache=cache)
    calls = []
    monkeypatch.setattr(type(tiny), "_encode_token_batch", lambda self, *a: calls.append(1))
    second = embed_texts(tiny, PROMPTS + PROMPTS[:2], cache=EmbeddingCache(tmp_path / "c"))
    assert not calls
    assert torch.equal(second[: len(PROMPTS)], first) and torch.equal(second[-2:], first[:2])


def test_cache_only_computes_misses(tiny, tmp_path):
    cache = EmbeddingCache(tmp_path / "c")
    embed_texts(tiny, PROMPTS[:3], cache=cache)
    both = embed_texts(tiny, PROMPTS, cache=cache)
    assert torch.allclose(both, embed_texts(tiny, PROMPTS), atol=1e-6)
    assert len(list(cache.folder(cache_namespace(tiny)).glob("*.safetensors"))) == 2


def test_cache_is_per_encoder(tmp_path):
    from vlmood.testing import tiny_encoder

    a, b = tiny_encoder(0), tiny_encoder(1)
    cache = EmbeddingCache(tmp_path / "c")
    ea = embed_texts(a, PROMPTS, cache=cache)
    eb = embed_texts(b, PROMPTS, cache=cache)
    assert not torch.allclose(ea, eb)
    assert torch.allclose(eb, embed_texts(b, PROMPTS), atol=1e-6)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_shard_is_detected_and_recomputed(tiny, tmp_path, damage):
    cache = EmbeddingCache(tmp_path / "c")
    good = embed_texts(tiny, PROMPTS, cache=cache)
    (shard,) = cache.folder(cache_namespace(tiny)).glob("*.safetensors")
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    else:
        data[-10] ^= 0xFF  # inside the embedding tensor
    shard.write_bytes(bytes(data))
    fresh = EmbeddingCache(tmp_path / "c")
    with pytest.warns(UserWarning, match="corrupted"):
        again = embed_texts(tiny, PROMPTS, cache=fresh)
    assert torch.allclose(again, good, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recomputed shard is clean
        embed_texts(tiny, PROMPTS, cache=EmbeddingCache(tmp_path / "c"))


def test_fp16_and_fp32_entries_never_mix(tiny, tmp_path):
    embed_texts(tiny, PROMPTS, cache=EmbeddingCache(tmp_path / "c", dtype="float16"))
    exact = embed_texts(tiny, PROMPTS, cache=EmbeddingCache(tmp_path / "c"))  # float32: computed, not fp16 hits
    assert torch.equal(exact, embed_texts(tiny, PROMPTS))


def test_fp16_storage(tiny, tmp_path):
    cache = EmbeddingCache(tmp_path / "c", dtype="float16")
    exact = embed_texts(tiny, PROMPTS, cache=cache)
    stored = embed_texts(tiny, PROMPTS, cache=cache)
    assert stored.dtype == torch.float32
    assert (stored - exact).abs().max() < 1e-3 and not torch.equal(stored, exact)


def _fill(root, seed, prompts, q):
    from vlmood.testing import tiny_encoder

    enc = tiny_encoder(0)
    for i in range(0, len(prompts), 7):
        embed_texts(enc, prompts[i : i + 7], cache=EmbeddingCache(root))
    q.put(seed)


def test_two_processes_fill_the_same_cache(tiny, tmp_path):
    root = tmp_path / "shared"
    prompts = [f"the nice thing number {i}." for i in range(60)]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_fill, args=(str(root), s, prompts[s * 10 :] + prompts[: s * 10], q)) for s in (0, 3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached = EmbeddingCache(root).get(cache_namespace(tiny), prompts)
    assert len(cached) == len(prompts)
    direct = embed_texts(tiny, prompts)
    assert torch.allclose(torch.stack([cached[i] for i in range(len(prompts))]), direct, atol=1e-6)
    import json

    folder = EmbeddingCache(root).folder(cache_namespace(tiny))
    index = json.loads((folder / "index.json").read_text())["shards"]
    assert set(index) == {p.name for p in folder.glob("*.safetensors")}  # no lost index update
    assert not list(folder.glob("*.tmp"))


def test_texts_must_be_strings(tiny):
    with pytest.raises(InvalidInputError, match="single string"):
        embed_texts(tiny, "a cat")
    with pytest.raises(InvalidInputError, match="must be strings"):
        embed_texts(tiny, ["a", 3])


def test_non_finite_text_embeddings_raise_naming_the_prompts(tiny, tmp_path, monkeypatch):
    from vlmood.errors import VlmoodError

    bad_tokens = tiny.tokenize(["a photo of a sea urchin."])[0][0]
    real = type(tiny)._encode_token_batch

    def overflow(self, tokens, length):  # fp16 overflow on one prompt
        out = real(self, tokens, length).clone()
        out[(tokens.cpu() == bad_tokens).all(dim=1)] = float("inf")
        return out

    monkeypatch.setattr(type(tiny), "_encode_token_batch", overflow)
    cache = EmbeddingCache(tmp_path / "c")
    with pytest.raises(VlmoodError, match=r"non-finite text embeddings .*1 prompt.*'a photo of a sea urchin\.'"):
        embed_texts(tiny, PROMPTS, cache=cache)
    with pytest.raises(VlmoodError, match="sea urchin"):
        class_embeddings(tiny, ["cat", "sea urchin"], ["a photo of a {}."], cache=None)
    monkeypatch.setattr(type(tiny), "_encode_token_batch", real)
    cached = cache.get(cache_namespace(tiny), PROMPTS)
    assert sorted(cached) == [0, 1, 2, 4, 5]  # the finite ones were kept, the Inf one never cached
    assert torch.allclose(embed_texts(tiny, PROMPTS, cache=cache), embed_texts(tiny, PROMPTS), atol=1e-6)


def test_cache_refuses_and_never_serves_non_finite_rows(tiny, tmp_path):
    from safetensors.torch import save

    from vlmood.text.cache import _checksum, prompt_key

    cache = EmbeddingCache(tmp_path / "c")
    emb = F.normalize(torch.randn(3, 8), dim=-1)
    emb[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*'b'"):
        cache.put("ns", ["a", "b", "c"], emb)
    assert not list((tmp_path / "c").rglob("*.safetensors"))
    # a shard written by an older version with a NaN row: the row is a miss, the others are hits
    folder = cache.folder("ns")
    folder.mkdir(parents=True)
    keys = torch.tensor([list(prompt_key(t)) for t in "abc"], dtype=torch.uint8)
    (folder / "old.safetensors").write_bytes(
        save({"keys": keys, "emb": emb}, metadata={"checksum": _checksum(keys, emb), "count": "3"}))
    got = EmbeddingCache(tmp_path / "c").get("ns", ["a", "b", "c"])
    assert sorted(got) == [0, 2] and torch.equal(got[2], emb[2])


def test_keys_with_undecodable_file_name_bytes(tmp_path):
    name = b"caf\xe9.png".decode("utf-8", "surrogateescape")  # a Latin-1 file name as os.listdir returns it
    cache = EmbeddingCache(tmp_path / "c")
    emb = F.normalize(torch.randn(2, 8), dim=-1)
    cache.put("ns", [name, "café.png"], emb)
    got = cache.get("ns", ["café.png", name])
    assert torch.equal(got[0], emb[1]) and torch.equal(got[1], emb[0])


def test_printable_never_raises_on_lone_surrogates():
    from vlmood._io import printable

    assert printable("a\ud800b") == "a\\ud800b"  # a surrogate that is no escaped byte (JSON "\ud800")
    assert printable(b"caf\xe9.png".decode("utf-8", "surrogateescape")) == "caf\\xe9.png"
    assert printable("x\udce9\udfff") == "x\\udce9\\udfff"  # mixed: escaped, never raising
    assert printable("plain café") == "plain café"
    for s in ("a\ud800b", "x\udce9\udfff"):
        printable(s).encode("utf-8")


def test_a_large_text_side_keeps_its_ensemble_and_never_serves_it_to_other_prompts(tiny, tmp_path, monkeypatch):
    """Lexicon-sized text sides cache their class ensemble whole: a warm call reads C rows, not C x T prompts, and
    gets the same bits; another class order, class list or template set has another key."""
    import numpy as np

    from vlmood.text import embed

    monkeypatch.setattr(embed, "ENSEMBLE_CACHE_MIN", 4)
    cache = EmbeddingCache(tmp_path / "c")
    words, tmpl = ["cat", "dog", "bird"], ["a photo of a {}.", "a {}."]
    first = embed.class_embedding_array(tiny, words, tmpl, cache=cache)
    ref = F.normalize(embed_texts(tiny, class_prompts(words, tmpl)).view(3, 2, -1).mean(1), dim=-1)
    np.testing.assert_allclose(first, ref.numpy(), rtol=0, atol=1e-6)
    real = embed._embed_array
    calls = []
    monkeypatch.setattr(embed, "_embed_array", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    again = embed.class_embedding_array(tiny, words, tmpl, cache=cache)
    assert calls == [] and np.array_equal(again, first)  # the ensemble, read whole
    swapped = embed.class_embedding_array(tiny, ["dog", "cat", "bird"], tmpl, cache=cache)
    assert len(calls) == 1 and np.array_equal(swapped, first[[1, 0, 2]])
    other = embed.class_embedding_array(tiny, words, tmpl[:1] + ["{}"], cache=cache)
    assert len(calls) == 2 and not np.array_equal(other, first)
    small = embed.class_embedding_array(tiny, words[:1], tmpl, cache=cache)  # 2 prompts: below the threshold
    assert len(calls) == 3 and np.array_equal(small, first[:1])
    assert embed.class_embedding_array(tiny, words[:1], tmpl, cache=cache).shape == (1, first.shape[1])
    assert len(calls) == 4  # never kept for small text sides
    assert np.array_equal(embed.class_embedding_array(tiny, words, tmpl, cache=False), first)  # same rule, no cache
