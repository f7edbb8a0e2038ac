"""The toy world, its tokenizer, and the shipped model: loading path, exactness, and end-to-end quality floors.

The floors sit a little below what the shipped checkpoint measured (see vlmood/toyworld/assets/toyworld.json and
the demo), so a regression in any detector, the text cache or the encoders fails here.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vlmood
from vlmood import toyworld
from vlmood.toyworld.tokenizer import WorldTokenizer
from vlmood.toyworld.world import SHAPES, World, shape_mask


def test_world_is_deterministic_and_captions_name_the_shape():
    a_img, a_cap, a_sc = World(7).batch(40)
    b_img, b_cap, _ = World(7).batch(40)
    c_img, _, _ = World(8).batch(40)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and not np.array_equal(a_img, c_img)
    assert a_img.shape == (40, 64, 64, 3) and a_img.dtype == np.uint8
    for cap, sc in zip(a_cap, a_sc):
        if sc.shape is None:
            assert "background" in cap
        else:
            assert sc.shape in cap or toyworld.world._PLURAL[sc.shape] in cap


def test_every_shape_has_a_distinct_mask():
    yy, xx = np.mgrid[-1.2:1.2:64j, -1.2:1.2:64j]
    masks = {s: shape_mask(s, xx, -yy) for s in SHAPES}
    for s, m in masks.items():
        assert 0.1 < m.mean() < 0.8, s
    for i, s in enumerate(SHAPES):
        for t in SHAPES[i + 1:]:
            assert (masks[s] != masks[t]).mean() > 0.03, (s, t)


def test_tokenizer_ids():
    tok = WorldTokenizer(["a", "red", "star"], vocab_size=16, context_length=6)
    ids = tok(["A red star.", "a zebra", "a red star a red star"])
    assert ids[0].tolist() == [1, 3, 4, 5, 15, 0]
    assert ids[1].tolist() == [1, 3, 2, 15, 0, 0]  # unknown word -> 2
    assert ids[2].tolist() == [1, 3, 4, 5, 3, 15]  # truncated, end token kept last
    assert (ids.argmax(dim=1) == torch.tensor([4, 3, 5])).all()  # argmax pooling finds the end token
    with pytest.raises(ValueError, match="do not fit"):
        WorldTokenizer(["w"] * 20, vocab_size=16)


@pytest.fixture(scope="module")
def toy():
    return vlmood.load_encoder("toyworld", device="cpu")


def test_shipped_model_loads_through_the_ordinary_path(toy, tmp_path):
    assert toy.spec.name == "vlmood-toyworld" and toy.supports_local and toy.exact_text_trimming
    same = vlmood.load_encoder(f"open_clip:vlmood-toyworld@{toyworld.CHECKPOINT}")
    assert same.fingerprint == toy.fingerprint
    texts = ["a photo of a star.", "two green hearts on a noisy background", "an empty gray background"]
    got = toy.encode_texts(texts)
    with torch.inference_mode():
        full = F.normalize(toy.model.encode_text(toy.tokenizer(texts)), dim=-1)
    assert (got - full).abs().max() <= 1e-5
    imgs, _ = toyworld.load_images(5, 3)
    g, loc = toy.encode_images(imgs, local=True)
    assert loc.shape == (3, 4, g.shape[1])  # 2x2 positions of the last ResNet feature map
    assert torch.allclose(g, toy.encode_images(imgs), atol=1e-5)


def test_resnet_local_features_are_the_value_path(toy):
    imgs, _ = toyworld.load_images(6, 2)
    x = torch.stack([toy.preprocess(i) for i in imgs])
    _, loc = toy.encode_images(x, local=True)
    v = toy.model.visual
    with torch.inference_mode():
        fmap = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))  # [N, C, 2, 2]
        ap = v.attnpool
        tokens = fmap.flatten(2).transpose(1, 2)
        expected = tokens @ ap.v_proj.weight.T + ap.v_proj.bias
        expected = expected @ ap.c_proj.weight.T + ap.c_proj.bias
    assert torch.allclose(loc, F.normalize(expected, dim=-1), atol=1e-5)


# ------------------------------------------------------------------ quality floors of the shipped model
# Measured with the shipped checkpoint on toyworld.benchmark(n=200, seed=777) (CPU, fp32); floors a little lower.
FLOORS = {  # method: (near AUROC, far AUROC); measured:
    "mcm": (0.93, 0.99),  # 0.958, 1.000
    "glmcm": (0.90, 0.99),  # 0.932, 1.000
    "energy": (0.92, 0.91),  # 0.952, 0.940
    "maxlogit": (0.92, 0.92),  # 0.955, 0.946
    "neglabel": (0.97, 0.97),  # 0.993, 0.990
    "neglabel (no shape nouns)": (0.94, 0.97),  # 0.971, 1.000
    "csp": (0.97, 0.97),  # 0.994, 0.985
}


@pytest.fixture(scope="module")
def world_report(toy):
    return toyworld.demo(toy, n=200, seed=777, progress=False)  # what `vlmood demo` runs, on held-out seeds


def test_every_demo_row_is_explained(world_report):
    """The demo's report says what each of its rows is (and why "neglabel (no shape nouns)" is there)."""
    methods = list(world_report.scores)
    assert methods == list(toyworld.demo_detectors())
    own = toyworld.demo_descriptions()
    assert set(own) == set(methods)
    assert all(world_report.descriptions[m] == own[m] for m in methods)
    assert "shape nouns (noun.shape.txt) removed" in world_report.descriptions["neglabel (no shape nouns)"]
    md = world_report.to_markdown()
    for m in methods:
        assert f"- `{m}`: {own[m]}" in md


@pytest.mark.parametrize("method", list(FLOORS))
def test_detector_quality_floor(world_report, method):
    near, far = FLOORS[method]
    assert world_report.metric(method, "other shapes", "auroc") >= near
    assert world_report.metric(method, "empty backgrounds", "auroc") >= far


def test_zero_shot_accuracy_floor(toy, world_report):
    imgs, labels = toyworld.load_images(4242, 600)
    pred = vlmood.MCM(toy, list(toyworld.ID_SHAPES)).classify(imgs)
    acc = float(np.mean([toyworld.ID_SHAPES[p] == lb for p, lb in zip(pred, labels)]))
    assert acc >= 0.96  # measured 0.983
    assert world_report.id_accuracy["mcm"] >= 0.96  # measured 0.995
    twelve, labels12 = toyworld.load_images(4243, 600, shapes=SHAPES)
    pred12 = vlmood.MCM(toy, list(SHAPES)).classify(twelve)
    assert float(np.mean([SHAPES[p] == lb for p, lb in zip(pred12, labels12)])) >= 0.90  # measured 0.937
