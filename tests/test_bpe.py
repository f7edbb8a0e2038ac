"""vlmood's front end for open_clip's CLIP tokenizer gives exactly open_clip's ids (vlmood.encoders.bpe)."""
import random
import types

import open_clip
import pytest
import torch

from vlmood import lexicons
from vlmood.encoders import bpe
from vlmood.encoders.bpe import FastCLIPTokenizer, fast_tokenizer, is_plain
from vlmood.text.prompts import fill, load_templates

ADVERSARIAL = [
    "", " ", "   \t  ", "a photo of a dog.", "A  Photo\tOF a DOG", "the nice café", "Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ",
    "naïve résumé", "cafÃ©", "Tom &amp; Jerry", "&lt;b&gt;bold&lt;/b&gt;", "a & b", "&", "&#39;quoted&#39;",
    "line\nbreak", "carriage\r\nreturn", "escape \x1b[31mred\x1b[0m", "bell\x07", "it's the dog's bone", "we'll've'd",
    "“curly” ‘quotes’", "ﬁne ligature", "emoji 🐶🐱", "中文 日本語 한국어", "Ελληνικά", "numbers 1234567890 3.14",
    "punct!!!??? ...---", "<start_of_text> inside", "<END_OF_TEXT>", "<|endoftext|>", "x" * 300,
    " ".join(["word"] * 100), "tab\tseparated\tvalues", "non-breaking\u00a0space", "zero\u200bwidth",
    "soft\u00adhyphen", "combining e\u0301", "back\\slash", "under_score",
]


@pytest.fixture(scope="module")
def toks():
    return open_clip.get_tokenizer("ViT-B-16"), fast_tokenizer(open_clip.get_tokenizer("ViT-B-16"))


def test_wraps_only_the_plain_clip_tokenizer(toks):
    ref, fast = toks
    assert isinstance(fast, FastCLIPTokenizer) and fast.inner is not ref
    assert fast.context_length == ref.context_length and fast.eot_token_id == ref.eot_token_id  # passed through
    from open_clip.tokenizer import SimpleTokenizer

    for other in (SimpleTokenizer(clean="whitespace"), SimpleTokenizer(reduction_mask="random"), object()):
        assert fast_tokenizer(other) is other


def test_whole_lexicon_under_neglabel_templates(toks):
    ref, fast = toks
    lex = lexicons.load("neglabel")
    noun, adj = load_templates("neglabel_noun")[0], load_templates("neglabel_adj")[0]
    prompts = [fill(noun if p == "noun" else adj, w) for w, p in zip(lex.words, lex.pos)]
    assert len(prompts) > 70_000
    assert torch.equal(fast(prompts), ref(prompts))


def test_csp_templates_and_a_lexicon_sample(toks):
    ref, fast = toks
    words = random.Random(1).sample(list(lexicons.load("neglabel").words), 1500)
    prompts = [fill(t, w) for t in load_templates("csp_noun") + load_templates("csp_adj") for w in words]
    assert torch.equal(fast(prompts), ref(prompts))


def test_adversarial_text(toks):
    ref, fast = toks
    got, want = fast(ADVERSARIAL), ref(ADVERSARIAL)
    for text, a, b in zip(ADVERSARIAL, got, want):
        assert torch.equal(a, b), repr(text)
    for text in ADVERSARIAL:
        assert fast.encode(text) == ref.encode(text), repr(text)
    assert torch.equal(fast(ADVERSARIAL, context_length=8), ref(ADVERSARIAL, context_length=8))  # truncation
    assert torch.equal(fast("one string"), ref("one string"))


def test_lone_surrogate_and_set_context_length(toks):
    ref, fast = toks
    text = "lone \ud800 surrogate"
    try:
        want = ref([text])
    except Exception as e:  # whatever open_clip does with it, the front end does the same
        with pytest.raises(type(e)):
            fast([text])
    else:
        assert torch.equal(fast([text]), want)
    fresh_ref, fresh = open_clip.get_tokenizer("ViT-B-16"), fast_tokenizer(open_clip.get_tokenizer("ViT-B-16"))
    fresh.context_length = fresh_ref.context_length = 16
    assert fresh.inner.context_length == 16
    assert torch.equal(fresh(ADVERSARIAL), fresh_ref(ADVERSARIAL)) and fresh("x").shape == (1, 16)


def test_copies_keep_their_own_settings(toks):
    import copy

    _, fast = toks
    for dup in (copy.copy(fast), copy.deepcopy(fast)):
        dup.context_length = 16
        assert fast.context_length == 77 and dup("x").shape == (1, 16) and fast("x").shape == (1, 77)


def test_random_ascii_and_the_plain_rule(toks):
    ref, fast = toks
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x7F)] + ["&", "&amp;", "&lt;", "\t", "\n", "é"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    assert torch.equal(fast(texts), ref(texts))
    assert is_plain("a photo of a dog.") and not is_plain("Tom &amp; Jerry") and not is_plain("café")
    assert not is_plain("tab\there") and not is_plain("\x1b[0m")


def test_without_the_rust_bpe_the_same_ids(toks, monkeypatch):
    ref, _ = toks
    monkeypatch.setattr(bpe, "_rust_bpe", lambda tok: None)
    slow = fast_tokenizer(open_clip.get_tokenizer("ViT-B-16"))
    texts = ADVERSARIAL + [f"a photo of a {w}" for w in ("dog", "aardvark", "zygomorphic", "xylophone")]
    assert torch.equal(slow(texts), ref(texts)) and slow._rust is None


def test_rust_bpe_refused_for_merges_out_of_order():
    enc = {"a": 0, "b": 1, "a</w>": 2, "b</w>": 3, "ab": 4, "abb</w>": 5}
    fake = types.SimpleNamespace(byte_encoder={97: "a", 98: "b"}, encoder=enc,
                                 bpe_ranks={("ab", "b</w>"): 0, ("a", "b"): 1})  # uses "ab" before it is made
    assert bpe._rust_bpe(fake) is None
    fake.bpe_ranks = {("a", "b"): 0, ("ab", "b</w>"): 1}
    assert bpe._rust_bpe(fake) is not None


def test_encoders_use_it_and_embed_the_same(tiny):
    assert isinstance(tiny.tokenizer, FastCLIPTokenizer)
    texts = ["a photo of a dog.", "Tom &amp; Jerry", "naïve résumé"]
    ids, lengths = tiny.tokenize(texts)
    assert torch.equal(ids, tiny.tokenizer.inner(texts))
    assert lengths == [int((row == tiny.tokenizer.eot_token_id).nonzero()[0]) + 1 for row in ids]
