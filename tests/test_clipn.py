"""CLIPN (issue 9): loss and score kernels against independent computations written the reference's way
(xmed-lab/CLIPN ``src/open_clip/loss.py``, ``src/zero_shot_infer.py``), the no tower's trimmed forward against a
hand-written full-context forward, save/load, the import of a synthesised official-format checkpoint (ViT-B-16),
and the detector (cache, registry, benchmark, errors)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vlmood
from vlmood import scores
from vlmood.clipn import MEAN_PROMPT, NUM_NO_PROMPTS, CLIPNModel
from vlmood.detectors import CLIPN, CLIPNATD, MCM, make_detector
from vlmood.encoders.base import hash_state_dict
from vlmood.errors import CheckpointMismatchError, InvalidInputError, VlmoodError
from vlmood.features import Features
from vlmood.losses import clipn_loss
from vlmood.testing import TINY_ARCH
from vlmood.text.embed import cache_namespace, default_cache, embed_texts

CLASSES = ["cat", "dog", "car"]
TEMPLATES = ["a photo of a {}.", "a blurry drawing of the {} on a very long and winding road."]
TEXTS = ["a photo of a cat.", "x", "a very long prompt about a small red bird sitting on a branch in the rain."]
TOY_TEXTS = ["a red circle.", "a photo of a big blue square on grass.", "circle"]


@pytest.fixture(scope="module")
def toy():
    return vlmood.load_encoder("toyworld", device="cpu")


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, VlmoodError), msg
    return msg


# ---------------------------------------------------------------------------------------------------- loss
def _reference_loss(x, t, u, s):
    """ClipLoss.forward of xmed-lab/CLIPN (one process): explicit softmax over the stacked [yes, no] logits, eye
    masks, -log, sums / N and / (N^2 - N); the L2-distance text semantic-opposite loss; total as train.py."""
    ly = s * x @ t.T
    ln = s * x @ u.T
    p = torch.softmax(torch.cat([ly.unsqueeze(-1), ln.unsqueeze(-1)], dim=-1), dim=-1)
    n = ly.shape[0]
    eyes = torch.eye(n, dtype=x.dtype)
    binary = eyes * p[:, :, 0] + (1 - eyes) * p[:, :, 1]
    loss_bin = -torch.log(binary)
    bin_yes = (eyes * loss_bin).view(-1).sum() / n
    bin_no = ((1 - eyes) * loss_bin).view(-1).sum() / (n ** 2 - n)
    tso = (2 - torch.sqrt(2 - 2 * (t * u).sum(-1) + 1e-4)).mean()
    return 0.5 * (bin_yes + bin_no + tso), bin_yes, bin_no, tso


def _unit(n, d, g, dtype=torch.float64):
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


@pytest.mark.parametrize("n,d,s", [(2, 4, 14.3), (3, 8, 100.0), (7, 16, 50.0), (16, 32, 100.0)])
def test_clipn_loss_matches_the_reference_computation(n, d, s):
    g = torch.Generator().manual_seed(n * 10 + d)
    x, t = _unit(n, d, g), _unit(n, d, g)
    u = F.normalize(-t + 0.7 * _unit(n, d, g), dim=-1)  # a "no" side pointing away from the yes side
    # the reference's gradients, by autograd through its own formula
    u_ref = u.clone().requires_grad_(True)
    ref = _reference_loss(x, t, u_ref, s)
    ref[0].backward()
    u_got = u.clone().requires_grad_(True)
    total, parts = clipn_loss(x, t, u_got, s)
    assert set(parts) == {"bin_yes", "bin_no", "tso"}
    assert total.dtype == torch.float64 and total.ndim == 0
    for got, want in zip((total, parts["bin_yes"], parts["bin_no"], parts["tso"]), ref):
        assert got.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)
    total.backward()
    grad = u_got.grad
    assert torch.isfinite(grad).all() and grad.abs().max() > 1e-6
    # (the reference loses digits in 1 - p for p near 1: agreement to ~1e-9 relative at logit scale 100)
    assert (grad - u_ref.grad).abs().max().item() <= 1e-8 * grad.abs().max().item()
    # a tensor logit scale (as a model's logit_scale.exp()) gives the same loss; float32 inputs stay float32
    assert clipn_loss(x, t, u, torch.tensor(s, dtype=torch.float64))[0].item() == pytest.approx(total.item(), rel=1e-12)
    t32 = clipn_loss(x.float(), t.float(), u.float(), s)[0]
    assert t32.dtype == torch.float32 and t32.item() == pytest.approx(total.item(), rel=1e-5)


def test_clipn_loss_gradients_reach_every_input():
    g = torch.Generator().manual_seed(3)
    x, t, u = (_unit(5, 8, g).requires_grad_(True) for _ in range(3))
    total, _ = clipn_loss(x, t, u, 30.0)
    total.backward()
    for v in (x, t, u):
        assert torch.isfinite(v.grad).all() and v.grad.abs().max() > 1e-6


def test_clipn_loss_with_one_pair_has_no_unmatched_term():
    """N = 1: the reference divides 0 by 0 (NaN); vlmood's bin_no is 0 by design and the rest is unchanged."""
    g = torch.Generator().manual_seed(4)
    x, t, u = _unit(1, 6, g), _unit(1, 6, g), _unit(1, 6, g)
    ref = _reference_loss(x, t, u, 20.0)
    assert math.isnan(ref[2].item())  # what the reference would give
    total, parts = clipn_loss(x, t, u, 20.0)
    assert parts["bin_no"].item() == 0.0
    assert parts["bin_yes"].item() == pytest.approx(ref[1].item(), rel=1e-12)
    assert parts["tso"].item() == pytest.approx(ref[3].item(), rel=1e-12)
    assert total.item() == pytest.approx(0.5 * (ref[1].item() + ref[3].item()), rel=1e-12)


def test_clipn_loss_is_finite_where_the_reference_softmax_underflows():
    """Matched pairs the no side claims strongly and unmatched pairs the yes side claims strongly: the
    reference's softmax underflows to 0 and its loss is not finite; log_softmax gives the exact finite value."""
    x = torch.eye(2, dtype=torch.float32)
    t = -x  # yes: matched cos -1, unmatched cos 0
    u = torch.stack([-x[1], -x[0]])  # no: matched cos 0, unmatched cos -1
    s = 200.0
    ref = _reference_loss(x, t, u, s)
    assert not math.isfinite(ref[0].item())  # -log(0) = inf, and 0 * inf = NaN under the reference's eye masks
    u_g = u.clone().requires_grad_(True)
    total, parts = clipn_loss(x, t, u_g, s)
    assert torch.isfinite(total)
    # matched: -log p_yes = softplus(no - yes) = softplus(200 * (0 - (-1))) = 200 (+ e^-200)
    assert parts["bin_yes"].item() == pytest.approx(200.0, rel=1e-6)
    # unmatched: yes cos 0, no cos -1 -> -log p_no = softplus(200) = 200
    assert parts["bin_no"].item() == pytest.approx(200.0, rel=1e-6)
    total.backward()
    assert torch.isfinite(u_g.grad).all() and u_g.grad.abs().max() > 1.0


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(3, 4), 10.0), r"text_features has shape \(3, 5\)"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(2, 4), 10.0), r"text_features_no has shape \(2, 4\)"),
    ((torch.zeros(4), torch.zeros(4), torch.zeros(4), 10.0), r"image_features must be a float tensor \[N, D\]"),
    ((torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4), torch.zeros(3, 4), 10.0),
     r"image_features must be a float tensor \[N, D\], got torch.int64"),
    ((torch.zeros(3, 4), np.zeros((3, 4)), torch.zeros(3, 4), 10.0), r"text_features must be a float tensor"),
    ((torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4), 10.0), r"at least one image-caption pair"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4), 0.0), r"logit_scale must be a finite number > 0"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4), -2.0), r"logit_scale must be a finite number > 0"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4), float("nan")), r"logit_scale must be a finite"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4), float("inf")), r"logit_scale must be a finite"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4), True), r"logit_scale must be a finite"),
    ((torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 4), "100"), r"logit_scale must be a finite"),
])
def test_clipn_loss_bad_input_is_a_one_line_error(args, match):
    with pytest.raises(InvalidInputError, match=match) as e:
        clipn_loss(*args)
    _one_line(e)


@pytest.mark.parametrize("scale", [torch.tensor([1.0, 2.0, 3.0]), torch.tensor(-1.0), torch.tensor(0.0),
                                   torch.tensor(float("nan"))], ids=["shape-D", "negative", "zero", "nan"])
def test_clipn_loss_refuses_a_bad_tensor_logit_scale(scale):
    g = torch.Generator().manual_seed(5)
    x, t, u = _unit(3, 3, g), _unit(3, 3, g), _unit(3, 3, g)  # D = 3: a [3] scale silently broadcasts
    with pytest.raises(InvalidInputError, match="logit_scale"):
        clipn_loss(x, t, u, scale)


# ---------------------------------------------------------------------------------------------------- scores
def _np_softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _reference_scores(ly, ln):
    """zero_shot_infer.py's CTW and ATD in numpy: softmax over stacked [yes, no], gather at argmax of the yes
    logits; sum of yes-probabilities weighted by the softmax of the yes logits."""
    yesno = _np_softmax(np.stack([ly, ln], axis=-1), axis=-1)[:, :, 0]
    idx = np.argmax(ly, axis=-1)[:, None]
    ctw = np.take_along_axis(yesno, idx, axis=1)[:, 0]
    atd = (yesno * _np_softmax(ly, axis=-1)).sum(axis=1)
    return yesno, ctw, atd


@pytest.mark.parametrize("n,c,s", [(1, 1, 100.0), (5, 2, 14.3), (9, 10, 100.0), (4, 1000, 100.0)])
def test_ctw_atd_p_yes_match_zero_shot_infer(n, c, s):
    rng = np.random.default_rng(n + c)
    ly = s * rng.uniform(-0.3, 0.4, (n, c))
    ln = s * rng.uniform(-0.3, 0.4, (n, c))
    yesno, ctw, atd = _reference_scores(ly, ln)
    for got, want in ((scores.p_yes(ly, ln), yesno), (scores.ctw(ly, ln), ctw), (scores.atd(ly, ln), atd)):
        assert got.shape == want.shape and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # torch float32 inputs give the same (computed in float64)
    got = scores.ctw(torch.from_numpy(ly).float(), torch.from_numpy(ln).float())
    np.testing.assert_allclose(got, _reference_scores(ly.astype(np.float32).astype(np.float64),
                                                      ln.astype(np.float32).astype(np.float64))[1], atol=1e-12)
    assert np.all((ctw >= 0) & (ctw <= 1)) and np.all((atd >= 0) & (atd <= 1))


def test_ctw_uses_the_yes_argmax_not_the_best_yes_probability():
    ly = np.array([[10.0, 9.0]])
    ln = np.array([[12.0, 0.0]])  # class 0 wins on yes, but its "no" is stronger; class 1 would say yes
    assert scores.ctw(ly, ln)[0] == pytest.approx(1 / (1 + math.exp(2.0)), abs=1e-15)
    # ATD weights both classes by softmax(yes)
    w = _np_softmax(ly[0])
    assert scores.atd(ly, ln)[0] == pytest.approx(w[0] / (1 + math.exp(2.0)) + w[1] / (1 + math.exp(-9.0)), abs=1e-15)


def test_non_finite_rows_score_nan_and_others_are_unchanged():
    rng = np.random.default_rng(0)
    ly, ln = 100 * rng.uniform(-0.3, 0.3, (4, 5)), 100 * rng.uniform(-0.3, 0.3, (4, 5))
    _, ctw, atd = _reference_scores(ly, ln)
    ly[1, 3] = np.nan
    ln[2, 0] = np.nan
    ly[3, 1] = np.inf
    for got, want in ((scores.ctw(ly, ln), ctw), (scores.atd(ly, ln), atd)):
        assert np.isnan(got[1:]).all()
        assert got[0] == pytest.approx(want[0], abs=1e-12)


@pytest.mark.parametrize("ly,ln,match", [
    (np.zeros((2, 3)), np.zeros((2, 4)), r"logits_yes \(2, 3\) and logits_no \(2, 4\) must have the same shape"),
    (np.zeros((2, 3)), np.zeros((3, 3)), r"logits_yes \(2, 3\) and logits_no \(3, 3\)"),
    (np.zeros(3), np.zeros(3), r"logits_yes must have 2 dimensions"),
    (np.zeros((2, 0)), np.zeros((2, 0)), r"logits_yes has no classes"),
])
@pytest.mark.parametrize("fn", [scores.ctw, scores.atd, scores.p_yes])
def test_score_shape_errors(fn, ly, ln, match):
    with pytest.raises(InvalidInputError, match=match) as e:
        fn(ly, ln)
    _one_line(e)


# ---------------------------------------------------------------------------------------------------- no tower
def _perturbed(enc, seed, prompt_std=0.3):
    """A CLIPN model on ``enc`` whose no tower differs from the yes tower and whose 16 prompts are random."""
    m = CLIPNModel(enc)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.no.named_parameters():
            if name == "prompt_no":
                p.copy_(prompt_std * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.1 * (p.abs().mean() + 1e-2) * torch.randn(p.shape, generator=g))
    m.invalidate()
    return m


def _causal(n, dtype=torch.float32):
    return torch.full((n, n), float("-inf"), dtype=dtype).triu(1)


def _hand_full_no(model, tokens, idx):
    """The reference's encode_text(text, "no") written out: token_embedding_no + positional_embedding_no + the
    chosen prompt (index K = the mean) over ALL context positions, every residual block with the full causal mask
    made here, ln_final_no, the row at argmax(token id), text_projection_no; L2-normalised."""
    no = model.no
    table = torch.cat([no.prompt_no, no.prompt_no.mean(dim=0, keepdim=True)], dim=0)
    length = tokens.shape[1]
    assert length == no.positional_embedding_no.shape[0]  # the full context
    x = no.token_embedding_no(tokens) + no.positional_embedding_no + table[idx]
    tr = no.transformer_no
    if not tr.batch_first:
        x = x.transpose(0, 1)
    for block in tr.resblocks:
        x = block(x, attn_mask=_causal(length))
    if not tr.batch_first:
        x = x.transpose(0, 1)
    x = no.ln_final_no(x)[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ no.text_projection_no
    return F.normalize(x, dim=-1)


@pytest.fixture
def encoders(tiny, toy):
    return {"tiny": (tiny, TEXTS), "toy": (toy, TOY_TEXTS)}


@pytest.mark.parametrize("which", ["tiny", "toy"])
def test_trimmed_no_forward_equals_the_full_context_forward(which, encoders):
    enc, texts = encoders[which]
    model = _perturbed(enc, seed=1)
    tokens = enc.tokenizer(texts)
    eot = tokens.argmax(dim=-1)
    assert len(set(eot.tolist())) == 3 and int(eot.max()) + 1 < tokens.shape[1]
    seen = []
    hook = model.no.transformer_no.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            mean = F.normalize(model.encode_no_tokens(tokens, MEAN_PROMPT), dim=-1)
            per_text = F.normalize(model.encode_no_tokens(tokens, torch.tensor([0, NUM_NO_PROMPTS, 7])), dim=-1)
            single = F.normalize(model.encode_no_tokens(tokens, 5), dim=-1)
    finally:
        hook.remove()
    assert seen == [int(eot.max()) + 1] * 3  # trimmed: only up to the longest prompt's end
    with torch.no_grad():
        k = NUM_NO_PROMPTS
        want_mean = _hand_full_no(model, tokens, torch.full((3,), k))
        want_per = _hand_full_no(model, tokens, torch.tensor([0, k, 7]))
        want_single = _hand_full_no(model, tokens, torch.full((3,), 5))
        yes = F.normalize(enc.model.encode_text(tokens), dim=-1)
    assert (mean - want_mean).abs().max().item() <= 1e-5
    assert (per_text - want_per).abs().max().item() <= 1e-5
    assert (single - want_single).abs().max().item() <= 1e-5
    # the test can fail: prompts and the no tower's weights matter
    assert (want_single - want_mean).abs().max().item() > 1e-3
    assert (want_mean - yes).abs().max().item() > 1e-3
    # the mean prompt is index K as well
    with torch.no_grad():
        idx_k = F.normalize(model.encode_no_tokens(tokens, NUM_NO_PROMPTS), dim=-1)
    assert torch.equal(idx_k, mean)


def test_prompt_gradients_reach_only_the_prompt_used(tiny):
    model = _perturbed(tiny, seed=2)
    tokens = tiny.tokenizer(TEXTS)
    F.normalize(model.encode_no_tokens(tokens, torch.tensor([3, 3, 9])), dim=-1).sum().backward()
    grad = model.no.prompt_no.grad
    used = grad.flatten(1).abs().sum(dim=1) > 0
    assert used.tolist() == [i in (3, 9) for i in range(NUM_NO_PROMPTS)]
    assert model.no.transformer_no.resblocks[0].attn.in_proj_weight.grad.abs().max() > 0
    assert all(p.grad is None for p in tiny.model.parameters())  # the base CLIP is frozen
    model.no.zero_grad()
    F.normalize(model.encode_no_tokens(tokens, MEAN_PROMPT), dim=-1).sum().backward()
    assert (model.no.prompt_no.grad.flatten(1).abs().sum(dim=1) > 0).all()  # the mean uses every prompt


@pytest.mark.parametrize("prompt", [NUM_NO_PROMPTS + 1, -2, torch.tensor([0, 1]), torch.tensor([0, -1, 2]),
                                    torch.tensor([0, 1, 17])])
def test_bad_prompt_index_is_refused(tiny, prompt):
    model = CLIPNModel(tiny)
    with pytest.raises(InvalidInputError, match=r"prompt must be -1 \(mean\), an index in \[0, 16\]") as e:
        model.encode_no_tokens(tiny.tokenizer(TEXTS), prompt)
    _one_line(e)


@pytest.mark.parametrize("which", ["tiny", "toy"])
def test_untrained_clipn_says_what_the_yes_tower_says(which, encoders):
    enc, texts = encoders[which]
    before = hash_state_dict(enc.model.state_dict())
    model = CLIPNModel(enc)
    assert model.no.prompt_no.shape == (NUM_NO_PROMPTS, *model.no.positional_embedding_no.shape)
    assert not model.no.prompt_no.any()
    tokens = enc.tokenizer(texts)
    with torch.no_grad():
        no = F.normalize(model.encode_no_tokens(tokens), dim=-1)
        yes = F.normalize(enc.model.encode_text(tokens), dim=-1)
    assert (no - yes).abs().max().item() <= 1e-5
    # through the cached text engine too, under its own cache namespace
    got = model.text_features_no(texts)
    assert (got - embed_texts(enc, texts, cache=False)).abs().max().item() <= 1e-5
    assert model.fingerprint != enc.fingerprint and model.fingerprint.endswith("|" + enc.fingerprint)
    # the no tower is a copy: training it leaves the encoder untouched
    with torch.no_grad():
        model.no.ln_final_no.weight.add_(1.0)
    assert hash_state_dict(enc.model.state_dict()) == before
    assert all(p.requires_grad for p in model.no.parameters())
    assert not any(p.requires_grad for p in enc.model.parameters())


def test_no_side_of_another_encoder_is_refused(tiny, toy):
    with pytest.raises(CheckpointMismatchError, match="does not fit the text tower") as e:
        CLIPNModel(toy, no=CLIPNModel(tiny).no)
    _one_line(e)
    with pytest.raises(InvalidInputError, match="n_prompts must be a positive integer"):
        CLIPNModel(tiny, n_prompts=0)


# ---------------------------------------------------------------------------------------------------- files
def test_save_load_round_trip(tiny, tmp_path):
    from safetensors import safe_open

    model = _perturbed(tiny, seed=3)
    model.meta = {"epochs": 3, "lr": 3e-4}
    path = model.save(tmp_path / "clipn.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clipn.safetensors"]  # no temporary file left
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        keys = set(f.keys())
    assert header["format"] == "vlmood.clipn" and header["version"] == "1"
    meta = json.loads(header["meta"])
    assert meta["encoder"] == {"spec": str(tiny.spec), "fingerprint": tiny.fingerprint}
    assert meta["n_prompts"] == NUM_NO_PROMPTS and meta["epochs"] == 3
    assert keys == set(model.no.state_dict())  # only the no side, under the reference's names
    assert not any(k.startswith(("visual.", "transformer.")) for k in keys)
    for encoder in (tiny, None):  # None: the base CLIP is rebuilt from the recorded spec
        back = CLIPNModel.load(path, encoder=encoder)
        assert back.encoder.fingerprint == tiny.fingerprint
        a, b = model.state_dict_no(), back.state_dict_no()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert back.fingerprint == model.fingerprint
        assert back.meta["epochs"] == 3 and back.meta["lr"] == 3e-4
    tokens = tiny.tokenizer(TEXTS)
    with torch.no_grad():
        assert torch.equal(back.encode_no_tokens(tokens), model.encode_no_tokens(tokens))


def test_load_with_another_encoder_names_both_fingerprints(tiny, tmp_path):
    from vlmood.testing import tiny_encoder

    other = tiny_encoder(seed=1)
    path = _perturbed(tiny, seed=3).save(tmp_path / "clipn.safetensors")
    with pytest.raises(CheckpointMismatchError) as e:
        CLIPNModel.load(path, encoder=other)
    msg = _one_line(e)
    assert tiny.fingerprint in msg and other.fingerprint in msg


def _resave(src, dst, **metadata):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        header = dict(f.metadata())
    header.update(metadata)
    save_file(load_file(str(src)), str(dst), metadata=header)
    return dst


def test_metadata_format_and_version_are_checked(tiny, tmp_path):
    path = CLIPNModel(tiny).save(tmp_path / "clipn.safetensors")
    with pytest.raises(InvalidInputError, match=r"version '99'; this vlmood reads version 1") as e:
        CLIPNModel.load(_resave(path, tmp_path / "v99.safetensors", version="99"), encoder=tiny)
    _one_line(e)
    with pytest.raises(InvalidInputError, match="malformed metadata") as e:
        CLIPNModel.load(_resave(path, tmp_path / "bad.safetensors", meta="{not json"), encoder=tiny)
    _one_line(e)
    # a file of another format is not mistaken for a vlmood CLIPN file (it lacks the base CLIP: refused)
    with pytest.raises(VlmoodError) as e:
        CLIPNModel.load(_resave(path, tmp_path / "other.safetensors", format="something-else"), encoder=tiny)
    _one_line(e)


@pytest.mark.parametrize("name,data", [
    ("garbage.safetensors", b"garbage" * 10),
    ("empty.safetensors", b""),
    ("truncated.safetensors", None),
    ("truncated.pt", None),
    ("missing.safetensors", "missing"),
])
def test_corrupt_file_is_a_one_line_error(tiny, tmp_path, name, data):
    path = tmp_path / name
    if data is None:  # the first half of a real file
        good = CLIPNModel(tiny).save(tmp_path / "good.safetensors") if name.endswith(".safetensors") else None
        if good is None:
            good = tmp_path / "good.pt"
            torch.save({"state_dict": CLIPNModel(tiny).state_dict_no()}, good)
        blob = good.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    elif isinstance(data, bytes):
        path.write_bytes(data)
    with pytest.raises(VlmoodError, match=name.replace(".", r"\.")) as e:
        CLIPNModel.load(path, encoder=tiny)
    _one_line(e)


def test_corrupt_torch_file_is_a_one_line_error(tiny, tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(VlmoodError, match="garbage.pt") as e:
        CLIPNModel.load(path, encoder=tiny)
    _one_line(e)


def test_save_into_a_missing_folder_is_a_one_line_error(tiny, tmp_path):
    with pytest.raises(InvalidInputError, match="cannot write") as e:
        CLIPNModel(tiny).save(tmp_path / "no-such-folder" / "clipn.safetensors")
    _one_line(e)


def test_save_onto_a_folder_is_a_one_line_error_and_leaves_nothing(tiny, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(InvalidInputError, match="cannot write") as e:
        CLIPNModel(tiny).save(tmp_path / "out")
    _one_line(e)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------------------------------------------- official
_RENAME = {"token_embedding.weight": "token_embedding_no.weight", "positional_embedding": "positional_embedding_no",
           "ln_final.weight": "ln_final_no.weight", "ln_final.bias": "ln_final_no.bias",
           "text_projection": "text_projection_no"}


def _reference_state_dict(base, seed, n_prompts=16):
    """The base CLIP's keys plus the no side under xmed-lab/CLIPN's names (model.py): transformer_no.* (the text
    transformer copied, perturbed), token_embedding_no.weight, positional_embedding_no, ln_final_no.*,
    text_projection_no, and prompt_no [16, context, width] random."""
    g = torch.Generator().manual_seed(seed)
    sd = dict(base)
    for k, v in base.items():
        if k.startswith("transformer."):
            nk = "transformer_no." + k[len("transformer."):]
        elif k in _RENAME:
            nk = _RENAME[k]
        else:
            continue
        sd[nk] = v + 0.1 * (v.abs().mean() + 1e-2) * torch.randn(v.shape, generator=g)
    ctx, width = base["positional_embedding"].shape
    sd["prompt_no"] = 0.3 * torch.randn(n_prompts, ctx, width, generator=g)
    return sd


def _save_reference(sd, path):
    """As the reference's training saves epoch_N.pt (DDP-wrapped: 'module.' keys), with a small optimizer state."""
    opt = {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3)}},
           "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.2, "params": [0]}]}
    torch.save({"epoch": 10, "name": "clipn-run", "state_dict": {"module." + k: v for k, v in sd.items()},
                "optimizer": opt}, path)
    return path


@pytest.fixture(scope="module")
def b16(tmp_path_factory):
    """A random ViT-B-16 (CPU), its state dict with a synthesised reference no side, saved as epoch_10.pt."""
    enc = vlmood.load_encoder("open_clip:ViT-B-16/none", device="cpu")
    sd = _reference_state_dict(enc.model.state_dict(), seed=10)
    path = _save_reference(sd, tmp_path_factory.mktemp("clipn-b16") / "epoch_10.pt")
    return enc, sd, path


def _raw_class_embeddings(enc, sd, classes, templates):
    """Yes and no class embeddings straight from the raw state dict: open_clip's encode_text for yes; for no a
    hand-written full-context forward (77 positions, full causal mask) with the mean prompt, the text transformer
    run on the transformer_no.* tensors (torch.func.functional_call), layer norm and projection by hand."""
    prompts = [t.format(c) for c in classes for t in templates]
    tokens = enc.tokenizer(prompts)
    length = tokens.shape[1]
    with torch.no_grad():
        yes = F.normalize(enc.model.encode_text(tokens), dim=-1)
        x = F.embedding(tokens, sd["token_embedding_no.weight"]) + sd["positional_embedding_no"] \
            + sd["prompt_no"].mean(dim=0)
        params = {k[len("transformer_no."):]: v for k, v in sd.items() if k.startswith("transformer_no.")}
        x = torch.func.functional_call(enc.model.transformer, params, (x,), {"attn_mask": _causal(length)})
        x = F.layer_norm(x, (x.shape[-1],), sd["ln_final_no.weight"], sd["ln_final_no.bias"], eps=1e-5)
        no = F.normalize(x[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ sd["text_projection_no"], dim=-1)

    def ensemble(f):
        return F.normalize(f.view(len(classes), len(templates), -1).mean(dim=1), dim=-1)

    return ensemble(yes), ensemble(no)


def test_official_checkpoint_import_scores_and_round_trip(b16, tmp_path):
    enc, sd, path = b16
    classes, templates = ["cat", "dog"], ["a photo of a {}.", "a sketch of the {}."]
    det = CLIPN.load(path, classes, templates)  # encoder=None: the base CLIP built from the file
    assert det.score_rule == "ctw" and det.encoder.fingerprint == enc.fingerprint
    assert det.model.meta.get("imported_from") == str(path)
    got = det.model.state_dict_no()
    want = {k: v for k, v in sd.items() if k.startswith(("transformer_no.", "prompt_no")) or k in _RENAME.values()}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(11))
    s_ctw = det.score(images)
    yes, no = _raw_class_embeddings(enc, sd, classes, templates)
    assert (det.text_features - yes).abs().max().item() <= 1e-5
    assert (det.text_features_no - no).abs().max().item() <= 1e-5
    with torch.no_grad():
        img = F.normalize(enc.model.encode_image(images), dim=-1)
    s = enc.model.logit_scale.exp().item()
    ly, ln = (s * img @ yes.T).double().numpy(), (s * img @ no.T).double().numpy()
    _, ctw, _ = _reference_scores(ly, ln)
    np.testing.assert_allclose(s_ctw, ctw, rtol=0, atol=1e-5)
    assert np.abs(ctw - 0.5).max() > 1e-3  # the no side is not the yes side
    # ATD with the reference's fixed scale 100, on Features
    feats = Features(features=img, local=None, ids=["a", "b"])
    atd_det = CLIPN(det.model, classes, templates, score="atd", logit_scale=100.0)
    _, _, atd = _reference_scores(100 * ly / s, 100 * ln / s)
    np.testing.assert_allclose(atd_det.score_features(feats), atd, rtol=0, atol=1e-4)

    # save the no side, load it back onto the random encoder (same weights, another object), same scores
    saved = det.model.save(tmp_path / "clipn-b16.safetensors")
    back = CLIPNModel.load(saved, encoder=enc)
    assert back.encoder is enc and back.fingerprint == det.model.fingerprint
    det2 = CLIPN(back, classes, templates, cache=False)  # recomputed from the loaded weights, not the cache
    np.testing.assert_array_equal(det2.score_features(feats), det.score_features(feats))
    assert torch.equal(det2.text_features_no, det.text_features_no)


def test_reference_checkpoint_for_the_base_encoder_alone(tiny, tmp_path):
    """open_clip:ARCH@file on a CLIPN checkpoint loads its base CLIP (the no keys dropped)."""
    path = _save_reference(_reference_state_dict(tiny.model.state_dict(), seed=1), tmp_path / "epoch_10.pt")
    assert vlmood.load_encoder(f"open_clip:{TINY_ARCH}@{path}", device="cpu").fingerprint == tiny.fingerprint


@pytest.fixture
def tiny_reference(tiny):
    return _reference_state_dict(tiny.model.state_dict(), seed=2)


def test_reference_checkpoint_import_on_the_tiny_clip(tiny, tiny_reference, tmp_path):
    path = _save_reference(tiny_reference, tmp_path / "epoch_10.pt")
    names = {k for k in tiny_reference if k not in tiny.model.state_dict()}
    assert names == set(CLIPNModel(tiny).no.state_dict())  # vlmood's no side uses the reference's names
    for encoder in (None, tiny):
        model = CLIPNModel.load(path, encoder=encoder, arch=TINY_ARCH)
        assert model.encoder.fingerprint == tiny.fingerprint
        got = model.state_dict_no()
        assert all(torch.equal(got[k], tiny_reference[k]) for k in names)
    tokens = tiny.tokenizer(TEXTS)
    with torch.no_grad():
        feats = F.normalize(model.encode_no_tokens(tokens), dim=-1)
    assert (feats - _hand_full_no(model, tokens, torch.full((3,), NUM_NO_PROMPTS))).abs().max() <= 1e-5


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("ln_final_no.bias"), r"missing keys: ln_final_no\.bias"),
    (lambda sd: sd.__setitem__("transformer_no.extra", torch.zeros(2)), r"unexpected keys: transformer_no\.extra"),
    (lambda sd: sd.__setitem__("prompt_no", torch.zeros(16, 10, 64)),
     r"shape mismatches: prompt_no \(checkpoint \(16, 10, 64\) vs model \(16, 77, 64\)\)"),
    (lambda sd: sd.pop("prompt_no"), r"is not a CLIPN checkpoint: it has no 'prompt_no'"),
    (lambda sd: [sd.pop(k) for k in list(sd) if "_no" in k], r"is not a CLIPN checkpoint"),
], ids=["missing", "extra", "shape", "no-prompt_no", "plain-clip"])
def test_reference_checkpoint_key_errors(tiny, tiny_reference, tmp_path, edit, match):
    edit(tiny_reference)
    path = _save_reference(tiny_reference, tmp_path / "epoch_10.pt")
    for encoder in (None, tiny):
        with pytest.raises(CheckpointMismatchError, match=match) as e:
            CLIPNModel.load(path, encoder=encoder, arch=TINY_ARCH)
        _one_line(e)
    with pytest.raises(CheckpointMismatchError, match=match):
        CLIPN.load(path, CLASSES, encoder=tiny, arch=TINY_ARCH)


def test_reference_checkpoint_with_another_encoder_names_both_fingerprints(tiny, toy, tiny_reference, tmp_path):
    path = _save_reference(tiny_reference, tmp_path / "epoch_10.pt")
    with pytest.raises(CheckpointMismatchError) as e:
        CLIPN.load(path, CLASSES, encoder=toy, arch=TINY_ARCH)
    msg = _one_line(e)
    assert tiny.fingerprint in msg and toy.fingerprint in msg
    # a plain CLIP checkpoint (no no side at all) is not a CLIPN checkpoint
    tiny.save(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointMismatchError, match="not a CLIPN checkpoint") as e:
        CLIPNModel.load(tmp_path / "plain.safetensors", encoder=tiny)
    _one_line(e)


# ---------------------------------------------------------------------------------------------------- detector
@pytest.fixture(scope="module")
def tiny_clipn(tiny):
    return _perturbed(tiny, seed=4)


def _hand_no_class_embeddings(model, classes, templates):
    tokens = model.encoder.tokenizer([t.format(c) for c in classes for t in templates])
    with torch.no_grad():
        f = _hand_full_no(model, tokens, torch.full((len(tokens),), model.no.n_prompts))
    return F.normalize(f.view(len(classes), len(templates), -1).mean(dim=1), dim=-1)


def test_detector_scores_match_the_reference_formulas(tiny, tiny_clipn):
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        img = F.normalize(tiny.model.encode_image(images), dim=-1)
        yes = F.normalize(tiny.model.encode_text(tiny.tokenizer([t.format(c) for c in CLASSES for t in TEMPLATES])),
                          dim=-1)
    yes = F.normalize(yes.view(3, 2, -1).mean(dim=1), dim=-1)  # normalised mean of normalised embeddings
    no = _hand_no_class_embeddings(tiny_clipn, CLASSES, TEMPLATES)
    s = 100.0
    ly, ln = (s * img @ yes.T).double().numpy(), (s * img @ no.T).double().numpy()
    yesno, ctw, atd = _reference_scores(ly, ln)
    ctw_det = make_detector("clipn", tiny, CLASSES, templates=TEMPLATES, no=tiny_clipn, logit_scale=s)
    atd_det = make_detector("clipn-atd", tiny, CLASSES, templates=TEMPLATES, no=tiny_clipn, logit_scale=s)
    assert type(ctw_det) is CLIPN and ctw_det.score_rule == "ctw"
    assert type(atd_det) is CLIPNATD and atd_det.score_rule == "atd" and atd_det.name == "clipnatd"
    assert type(make_detector("clipn-ctw", tiny, CLASSES, no=tiny_clipn)) is CLIPN
    assert (ctw_det.text_features_no - no).abs().max().item() <= 1e-5
    np.testing.assert_allclose(ctw_det.score(images), ctw, atol=1e-4)
    np.testing.assert_allclose(atd_det.score_features(img), atd, atol=1e-4)
    np.testing.assert_allclose(ctw_det.p_yes(img), yesno, atol=1e-4)
    assert np.ptp(ctw) > 1e-3 and np.ptp(atd) > 1e-3  # the scores vary: the comparison means something
    assert (ctw_det.classify_features(img) == ly.argmax(axis=1)).all()
    # the encoder's own logit scale by default
    np.testing.assert_allclose(CLIPN(tiny_clipn, CLASSES, TEMPLATES).score_features(img),
                               _reference_scores(ly * tiny.logit_scale / s, ln * tiny.logit_scale / s)[1], atol=1e-4)
    # a non-finite image feature row scores NaN (OOD), the others are unchanged
    bad = img.clone()
    bad[2, 0] = float("nan")
    out = atd_det.score_features(bad)
    assert np.isnan(out[2]) and np.allclose(np.delete(out, 2), np.delete(atd, 2), atol=1e-4)


def test_no_side_class_embeddings_are_cached_under_the_no_fingerprint(tiny, tmp_path, monkeypatch):
    model = _perturbed(tiny, seed=6)
    det = CLIPN(model, CLASSES, TEMPLATES).fit()
    store = default_cache()
    folder = store.folder(cache_namespace(model.no_text_encoder()))
    assert folder != store.folder(cache_namespace(tiny)) and folder.is_dir() and any(folder.iterdir())
    expected = det.text_features_no.clone()
    fresh = CLIPNModel.load(model.save(tmp_path / "clipn.safetensors"), encoder=tiny)  # another object, same weights

    def boom(*a, **k):
        raise RuntimeError("the no tower ran")

    monkeypatch.setattr(CLIPNModel, "encode_no_tokens", boom)
    det2 = CLIPN(fresh, CLASSES, TEMPLATES).fit()  # read from the cache: the no tower does not run
    assert torch.equal(det2.text_features_no, expected)
    with pytest.raises(RuntimeError, match="the no tower ran"):  # other templates: computed
        CLIPN(fresh, CLASSES, ["a {}."]).fit()


def test_changed_no_weights_change_the_fingerprint_and_the_cache_key(tiny):
    model = _perturbed(tiny, seed=7)
    fp0 = model.fingerprint
    before = CLIPN(model, CLASSES, TEMPLATES).text_features_no
    folder0 = default_cache().folder(cache_namespace(model.no_text_encoder()))
    with torch.no_grad():
        model.no.prompt_no[0].add_(1.0)  # a prompt only
    model.invalidate()
    fp1 = model.fingerprint
    assert fp1 != fp0 and fp1.startswith("clipn-no:") and fp1.endswith("|" + tiny.fingerprint)
    with torch.no_grad():
        model.no.transformer_no.resblocks[1].mlp.c_fc.bias.add_(0.5)  # the tower
    model.invalidate()
    fp2 = model.fingerprint
    assert fp2 not in (fp0, fp1)
    assert default_cache().folder(cache_namespace(model.no_text_encoder())) != folder0
    after = CLIPN(model, CLASSES, TEMPLATES).text_features_no  # not served from the old key
    assert (after - before).abs().max().item() > 1e-4
    assert (after - _hand_no_class_embeddings(model, CLASSES, TEMPLATES)).abs().max().item() <= 1e-5


def _colour_images(folder, n, colour, seed):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(folder / f"{i:02d}.png")
    return sorted(folder.glob("*.png"))


def test_clipn_runs_beside_mcm_in_one_benchmark_pass(tiny, tiny_clipn, tmp_path, monkeypatch):
    from vlmood.evaluation import Benchmark
    from vlmood.metrics import evaluate

    _colour_images(tmp_path / "id" / "red", 5, (220, 30, 30), 0)
    _colour_images(tmp_path / "id" / "blue", 5, (30, 30, 220), 1)
    green = _colour_images(tmp_path / "green", 4, (30, 200, 30), 2)
    classes = ["red", "blue"]
    encoded = []
    real = type(tiny)._encode_image_batch

    def counting(self, batch, local):
        encoded.append(len(batch))
        return real(self, batch, local)

    monkeypatch.setattr(type(tiny), "_encode_image_batch", counting)
    det = CLIPN(tiny_clipn, classes, TEMPLATES)
    bench = Benchmark(id=tmp_path / "id", ood={"green": tmp_path / "green"}, classes=classes)
    report = bench.run(tiny, {"mcm": "mcm", "clipn": det,
                              "clipn-atd": {"method": "clipn-atd", "no": tiny_clipn, "templates": TEMPLATES}},
                       num_workers=0, progress=False)
    assert sum(encoded) == 14  # every image encoded once for all three detectors
    id_paths = sorted((tmp_path / "id").rglob("*.png"))
    atd = CLIPN(tiny_clipn, classes, TEMPLATES, score="atd")
    for label, d in (("mcm", MCM(tiny, classes)), ("clipn", det), ("clipn-atd", atd)):
        want = evaluate(d.score(id_paths), d.score(green))
        for k, v in want.items():
            assert report.metric(label, "green", k) == pytest.approx(v, abs=1e-6), (label, k)
        labels = np.array([0 if p.parent.name == "red" else 1 for p in id_paths])
        assert report.id_accuracy[label] == pytest.approx(np.mean(d.classify(id_paths) == labels))


def test_detector_errors(tiny, toy, tiny_clipn):
    for build in (lambda: CLIPN(tiny, CLASSES), lambda: make_detector("clipn-atd", tiny, CLASSES)):
        with pytest.raises(InvalidInputError, match="`vlmood train clipn`") as e:
            build()
        assert "CLIPN needs a trained 'no' text tower for open_clip:vlmood-tiny-vit" in _one_line(e)
    with pytest.raises(InvalidInputError, match=r"does not take learned prompts \(prompts=\)") as e:
        CLIPN(tiny_clipn, CLASSES, prompts="learned.safetensors")
    _one_line(e)
    with pytest.raises(InvalidInputError, match=r"CLIPN score must be one of \('ctw', 'atd'\), got 'msp'") as e:
        CLIPN(tiny_clipn, CLASSES, score="msp")
    _one_line(e)
    with pytest.raises(InvalidInputError, match="not both"):
        CLIPN(tiny_clipn, CLASSES, no=tiny_clipn)
    with pytest.raises(InvalidInputError, match="was trained on open_clip:vlmood-tiny-vit"):
        CLIPN(toy, ["red circle"], no=tiny_clipn)
    with pytest.raises(InvalidInputError, match="no= must be a CLIPNModel or the path of a CLIPN file, got int"):
        CLIPN(tiny, CLASSES, no=3)
    with pytest.raises(InvalidInputError, match="logit_scale must be a finite number > 0"):
        CLIPN(tiny_clipn, CLASSES, logit_scale=0)


def test_fingerprint_follows_in_place_weight_changes_without_invalidate(tiny):
    """A no side changed in place (an optimiser step, a hand edit) gets a new fingerprint, so cached class
    embeddings of the old weights are never served for the new ones; unchanged weights keep theirs."""
    m = CLIPNModel(tiny)
    f0 = m.fingerprint
    assert m.fingerprint == f0
    with torch.no_grad():
        m.no.prompt_no.add_(0.5)
    f1 = m.fingerprint
    assert f1 != f0
    with torch.no_grad():
        m.no.ln_final_no.weight.mul_(1.1)
    assert m.fingerprint not in (f0, f1)
