"""Detectors: each rule equals its kernel on independently computed similarities; calibration and prediction."""
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


def independent_sims(enc, images, classes, local=False):
    """Similarities from open_clip's own forward passes, not vlmood's text engine."""
    with torch.inference_mode():
        text = F.normalize(enc.model.encode_text(enc.tokenizer([f"a photo of a {c}." for c in classes])), dim=-1)
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
                               2.0 * np.log(np.exp(100.0 * sims / 2.0).sum(1)), rtol=1e-5)


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
    assert set(vlmood.DETECTORS) == {"mcm", "glmcm", "energy", "maxlogit", "neglabel", "csp"}
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
