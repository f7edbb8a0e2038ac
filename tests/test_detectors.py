"""Detectors: each rule equals its kernel on independently computed similarities; calibration and prediction."""
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vlmood
from vlmood import GLMCM, MCM, Energy, MaxLogit, make_detector
from vlmood.errors import InvalidInputError

CLASSES = ["cat", "dog", "car", "tree"]


@pytest.fixture(scope="module")
def images():
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(2))


TEMPLATE = vlmood.load_templates(None)
assert len(TEMPLATE) == 1  # the default is a single template, so one forward pass per class reproduces it


def independent_sims(enc, images, classes, local=False):
    """Similarities from open_clip's own forward passes, not vlmood's text engine."""
    with torch.inference_mode():
        prompts = [TEMPLATE[0].format(c) for c in classes]
        text = F.normalize(enc.model.encode_text(enc.tokenizer(prompts)), dim=-1)
        img = F.normalize(enc.model.encode_image(images), dim=-1)
    return (img @ text.T).double().numpy(), text


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_mcm_maxlogit_energy_match_formulas(tiny, images):
    sims, _ = independent_sims(tiny, images, CLASSES)
    s = tiny.logit_scale
    np.testing.assert_allclose(MCM(tiny, CLASSES).score(images), softmax(sims).max(1), atol=1e-6)
    np.testing.assert_allclose(MCM(tiny, CLASSES, temperature=0.05).score(images), softmax(sims / 0.05).max(1), atol=1e-5)
    np.testing.assert_allclose(MaxLogit(tiny, CLASSES).score(images), s * sims.max(1), atol=1e-4)
    np.testing.assert_allclose(Energy(tiny, CLASSES, logit_scale=100.0, temperature=2.0).score(images),
                               2.0 * np.log(np.exp(100.0 * sims / 2.0).sum(1)), rtol=1e-5, atol=1e-4)


def test_glmcm_matches_formula(tiny, images):
    sims, text = independent_sims(tiny, images, CLASSES)
    _, loc = tiny.encode_images(images, local=True)
    local_sims = (loc.double() @ text.double().T).numpy()
    expected = softmax(sims / 0.5).max(1) + 0.3 * softmax(local_sims / 0.5).max(-1).max(-1)
    det = GLMCM(tiny, CLASSES, temperature=0.5, lam=0.3)
    np.testing.assert_allclose(det.score(images), expected, atol=1e-5)
    with pytest.raises(ValueError, match="needs local"):
        det.score_features(loc[:, 0])


def test_classify_and_predict(tiny, images):
    sims, _ = independent_sims(tiny, images, CLASSES)
    det = MCM(tiny, CLASSES)
    np.testing.assert_array_equal(det.classify(images), sims.argmax(1))
    with pytest.raises(ValueError, match="calibrate"):
        det.predict(images)
    id_scores = det.score(images)
    thr = det.calibrate(id_scores, tpr=0.75)
    assert (id_scores >= thr).mean() >= 0.75 and (id_scores > thr).mean() < 0.75
    assert det.calibrate(images, tpr=0.75) == thr  # images or scores give the same threshold
    pred = det.predict(images)
    np.testing.assert_array_equal(pred.is_ood, id_scores < thr)
    np.testing.assert_array_equal(pred.labels, sims.argmax(1))
    assert pred.class_names[0] == CLASSES[sims.argmax(1)[0]]


def test_templates_ensemble_used(tiny, images):
    a = MCM(tiny, CLASSES, templates="imagenet7").score(images)
    b = MCM(tiny, CLASSES).score(images)
    assert not np.allclose(a, b)


def test_make_detector_and_errors(tiny):
    assert isinstance(make_detector("GL-MCM", tiny, CLASSES), GLMCM)
    assert set(vlmood.DETECTORS) == {"mcm", "glmcm", "energy", "maxlogit", "neglabel", "csp", "clipn", "clipnctw",
                                     "clipnatd"}
    with pytest.raises(InvalidInputError, match="unknown method 'knn'"):
        make_detector("knn", tiny, CLASSES)
    with pytest.raises(InvalidInputError, match="duplicate class names: 'cat'"):
        MCM(tiny, ["cat", "cat"])
    with pytest.raises(InvalidInputError, match="empty"):
        MCM(tiny, [])
    with pytest.raises(InvalidInputError, match="MCM needs at least 2 ID classes"):
        MCM(tiny, "cat,")
    with pytest.raises(InvalidInputError, match="did you mean imagenet1k"):
        MCM(tiny, "imagenet")
    assert vlmood.Energy(tiny, "cat,").classes == ["cat"]  # one class is fine where it means something


def test_text_embeddings_come_from_cache(tiny, images, monkeypatch):
    first = MCM(tiny, CLASSES).score(images)
    monkeypatch.setattr(type(tiny), "_encode_token_batch", lambda *a: pytest.fail("text recomputed"))
    np.testing.assert_array_equal(MCM(tiny, CLASSES).score(images), first)


# ------------------------------------------------------------------ NaN, thresholds and calibration inputs
def _features(tiny, images):
    from vlmood.features import Features

    g, loc = tiny.encode_images(images, local=True)
    return Features(g, loc, [f"x[{i}]" for i in range(len(g))])


@pytest.mark.parametrize("method", ["mcm", "glmcm", "energy", "maxlogit"])
def test_non_finite_feature_rows_are_ood(tiny, images, method):
    """A NaN feature row scores NaN and is OOD (is_ood was False: NaN < thr is False); other rows decide as score < thr."""
    det = make_detector(method, tiny, CLASSES)
    feats = _features(tiny, images)
    thr = det.calibrate(det.score_features(feats), tpr=0.5)
    feats.features[2] = float("nan")
    feats.local[2] = float("nan")
    pred = det.predict_features(feats)
    assert np.isnan(pred.scores[2]) and pred.is_ood[2]
    ok = np.arange(len(images)) != 2
    np.testing.assert_array_equal(pred.is_ood[ok], pred.scores[ok] < thr)
    assert 0 < pred.is_ood[ok].sum() < ok.sum()  # a real mix of decisions around the threshold


@pytest.mark.parametrize("method", ["mcm", "glmcm", "energy", "maxlogit"])
def test_infinite_features_score_nan_quietly_from_tensors_or_arrays(tiny, images, method):
    """Rows holding +Inf and -Inf (the products then hold NaN): NaN scores (OOD), no numpy warning, and the same
    scores from tensors as from arrays (the detectors compute in numpy either way)."""
    import warnings

    det = make_detector(method, tiny, CLASSES)
    feats = _features(tiny, images)
    feats.features[1, :2] = torch.tensor([float("inf"), -float("inf")])
    feats.local[3, 0, :2] = torch.tensor([float("inf"), -float("inf")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = det.score_features(feats)
        arrays = det.score_features(feats.features.numpy(), feats.local.numpy())
    bad = [1, 3] if method == "glmcm" else [1]
    assert np.isnan(out[bad]).all() and np.isfinite(np.delete(out, bad)).all()
    np.testing.assert_array_equal(out, arrays)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "high"])
def test_threshold_must_be_finite(tiny, images, bad):
    """threshold=nan flagged nothing as OOD (every 'score < nan' is False); now a one-line error before any work."""
    det = MCM(tiny, CLASSES)
    with pytest.raises(InvalidInputError, match="threshold must be a finite number"):
        det.predict_features(_features(tiny, images), threshold=bad)
    det.threshold_ = bad
    with pytest.raises(InvalidInputError, match="threshold must be a finite number"):
        det.predict(["never-decoded.png"])  # refused before the images are read


def test_calibrate_refuses_nan_and_non_score_arrays(tiny, images):
    det = MCM(tiny, CLASSES)
    with pytest.raises(InvalidInputError, match=r"id_scores contains 1 NaN value\(s\) among 3"):
        det.calibrate([0.2, float("nan"), 0.4])
    feats = _features(tiny, images)
    with pytest.raises(InvalidInputError, match=r"1-D ID scores .* shape \(12, 64\); for image features use "
                                                r"calibrate\(det.score_features\(features\)\)"):
        det.calibrate(feats.features.numpy())  # was a TypeError traceback from decoding rows as file names
    scores = det.score_features(feats)
    with pytest.raises(InvalidInputError, match=r"shape \(12, 1\); flatten it with .ravel\(\)"):
        det.calibrate(scores[:, None])
    expected = np.sort(scores)[12 - 9]  # hand computation: the 9th highest keeps ceil(0.75 * 12) = 9 of 12
    assert det.calibrate(list(scores.astype(np.float32).astype(np.float64)), tpr=0.75) == pytest.approx(expected)
    assert det.calibrate(feats, tpr=0.75) == expected  # Features are scored, not read as images
    assert det.calibrate(torch.as_tensor(scores), tpr=0.75) == expected


def test_feature_width_mismatch_names_both_widths(tiny, images):
    """[N, 256] features against [C, 64] text was a matmul RuntimeError traceback."""
    det = GLMCM(tiny, CLASSES)
    g, loc = tiny.encode_images(images, local=True)
    with pytest.raises(InvalidInputError, match=r"image features have width 32 but the class text embeddings of "
                                                r"open_clip:vlmood-tiny-vit/none have width 64: .*different encoder"):
        det.score_features(torch.randn(3, 32), loc[:3])
    with pytest.raises(InvalidInputError, match=r"local \(per-patch\) features have width 32 .* width 64"):
        det.score_features(g, torch.randn(12, 16, 32))
    with pytest.raises(InvalidInputError, match=r"must be \[N, D\], got shape \(64,\) \(one image: add a batch axis"):
        MCM(tiny, CLASSES).score_features(g[0])


def test_glmcm_on_global_only_features_says_local_true(tiny, images):
    from vlmood.features import Features

    feats = Features(tiny.encode_images(images), None, [str(i) for i in range(12)])
    with pytest.raises(InvalidInputError, match="GLMCM needs local .*extracted without them: pass local=True "
                                                "to extract_features"):
        GLMCM(tiny, CLASSES).score(feats)
    with pytest.raises(InvalidInputError, match="needs local .*pass local_features"):
        GLMCM(tiny, CLASSES).score_features(feats.features)


# ------------------------------------------------------------------ image inputs: a path, a folder, a PIL image
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(5)
    for name in ("b.png", "a.png", "c.jpg"):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_score_accepts_a_path_a_folder_and_a_pil_image(tiny, image_folder):
    """det.score("img.png") iterated over characters ("image file not found: /")."""
    from PIL import Image

    files = sorted(image_folder.iterdir())  # a.png, b.png, c.jpg: a folder is read in sorted order
    det = MCM(tiny, CLASSES)
    close = functools.partial(np.testing.assert_allclose, rtol=0, atol=1e-6)  # batch sizes differ: float32 noise
    each = det.score(files)  # the list form, which always worked
    assert each.shape == (3,)
    close(det.score(str(files[1])), each[1:2])
    close(det.score(files[1]), each[1:2])
    close(det.score(str(image_folder) + "/"), each)
    close(det.score(image_folder), each)
    close(det.score(Image.open(files[0])), each[:1])
    close(det.score([image_folder, files[0]]), np.r_[each, each[:1]])  # folders expand in lists
    np.testing.assert_array_equal(det.classify(image_folder), det.classify(files))
    pred = det.predict(str(files[2]), threshold=float(each[2]) - 1e-6)  # margin: batch-size float32 noise
    assert pred.scores.shape == (1,) and not pred.is_ood[0]  # score >= threshold
    assert det.predict(str(files[2]), threshold=float(each[2]) + 1e-6).is_ood[0]
    assert det.calibrate(image_folder, tpr=1.0) == pytest.approx(each.min(), abs=1e-6)
    g = GLMCM(tiny, CLASSES)
    close(g.score(image_folder), g.score(files))


@pytest.mark.parametrize("bad,match", [
    (42, "cannot read images from a int"),
    ([0.5, "a.png"], "image 0 of the list is a float"),
    (np.zeros((2, 32, 32, 3), dtype=np.uint8), "preprocessed float batch .*decoded pixels: pass PIL images"),
    (torch.zeros(3, 32, 32), r"got torch.float32 \(3, 32, 32\) \(one image: add a batch axis"),
    ("no/such/image.png", "no/such/image.png"),
    (["a.png", ""], "image 1 of the list is an empty path"),  # not the current folder
])
def test_unreadable_image_inputs_are_one_line_errors(tiny, bad, match):
    with pytest.raises(InvalidInputError, match=match):
        MCM(tiny, CLASSES).score(bad)


# ------------------------------------------------------------------ identical class embeddings, typos, logit scale
@pytest.fixture(scope="module")
def toy():
    return vlmood.load_encoder("toyworld", device="cpu")


def test_identical_class_embeddings_warn(toy):
    """Names outside the toy model's vocabulary all become the unknown token: every score was 1/C, silently."""
    from vlmood.toyworld import ID_SHAPES

    det = MCM(toy, ["zorblat", "quuxify"])
    with pytest.warns(UserWarning, match=r"1 pair\(s\) of ID classes have \(near\) identical text embeddings .*"
                                         r"'zorblat' ~ 'quuxify'.*unknown to the model's tokenizer"), \
            pytest.warns(UserWarning, match=r"2 ID class name\(s\) contain words unknown to the tokenizer"):
        det.fit()
    cos = float(det.text_features[0] @ det.text_features[1])
    assert cos > vlmood.detectors.base.DUPLICATE_COSINE
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MCM(toy, list(ID_SHAPES)).fit()


def test_method_typo_suggests_the_closest():
    from vlmood.detectors import canonical_method

    with pytest.raises(InvalidInputError, match=r"^unknown method 'mcmm'; did you mean 'mcm'\?"):
        canonical_method("mcmm")
    with pytest.raises(InvalidInputError, match=r"unknown method 'GL-MCN'; did you mean 'glmcm'\?"):
        canonical_method("GL-MCN")
    assert canonical_method("Max_Logit") == "maxlogit"


def test_logit_scale_one_reproduces_the_reference_and_zero_is_refused(tiny, images):
    """The MCM reference scores raw cosines (T=1): logit_scale=1.0 gives max cos and logsumexp(cos).
    logit_scale=0.0 was silently replaced by the encoder's scale (``x or default``)."""
    sims, _ = independent_sims(tiny, images, CLASSES)
    np.testing.assert_allclose(MaxLogit(tiny, CLASSES, logit_scale=1.0).score(images), sims.max(1), atol=1e-6)
    np.testing.assert_allclose(Energy(tiny, CLASSES, logit_scale=1.0).score(images), np.log(np.exp(sims).sum(1)),
                               atol=1e-6)
    for cls in (MaxLogit, Energy):
        with pytest.raises(InvalidInputError, match=r"logit_scale must be a finite number > 0, got 0.0"):
            cls(tiny, CLASSES, logit_scale=0.0)
