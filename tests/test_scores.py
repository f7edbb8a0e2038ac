"""Score kernels against direct numpy evaluations of their formulas."""
import numpy as np
import pytest
import torch

from vlmood import scores
from vlmood.errors import InvalidInputError


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture
def sims():
    return np.random.default_rng(0).uniform(-0.2, 0.4, size=(50, 7))


@pytest.mark.parametrize("T", [1.0, 0.5, 0.01])
def test_mcm_is_max_softmax(sims, T):
    expected = softmax(sims / T).max(axis=1)
    np.testing.assert_allclose(scores.mcm(sims, T), expected, rtol=1e-12)
    np.testing.assert_allclose(scores.mcm(torch.tensor(sims), T), expected, rtol=1e-12)


def test_mcm_hand_computed():
    # two classes with sims (0, ln 3): softmax = (1/4, 3/4)
    assert scores.mcm(np.array([[0.0, np.log(3.0)]]))[0] == pytest.approx(0.75)
    # extreme logits do not overflow
    assert scores.mcm(np.array([[1000.0, 0.0]]), 0.001)[0] == pytest.approx(1.0)


def test_max_logit(sims):
    np.testing.assert_allclose(scores.max_logit(sims, 50.0), 50.0 * sims.max(axis=1))


@pytest.mark.parametrize("scale,T", [(100.0, 1.0), (14.3, 2.0)])
def test_energy(sims, scale, T):
    z = scale * sims / T
    expected = T * np.log(np.exp(z).sum(axis=1))
    np.testing.assert_allclose(scores.energy(sims, scale, T), expected, rtol=1e-10)


def test_glmcm(sims):
    rng = np.random.default_rng(1)
    local = rng.uniform(-0.2, 0.4, size=(50, 9, 7))
    T, lam = 0.1, 0.7
    loc_expected = np.array([max(softmax(local[n, p] / T).max() for p in range(9)) for n in range(50)])
    expected = softmax(sims / T).max(axis=1) + lam * loc_expected
    np.testing.assert_allclose(scores.glmcm(sims, local, T, lam), expected, rtol=1e-12)
    np.testing.assert_allclose(scores.local_mcm(local, T), loc_expected, rtol=1e-12)


def test_kernel_input_errors(sims):
    with pytest.raises(ValueError, match="temperature"):
        scores.mcm(sims, 0.0)
    with pytest.raises(ValueError, match="2 dimensions"):
        scores.mcm(sims[0])
    with pytest.raises(ValueError, match="3 dimensions"):
        scores.glmcm(sims, sims)
    with pytest.raises(ValueError, match="rows"):
        scores.glmcm(sims, np.zeros((3, 2, 7)))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "100"])
def test_logit_scale_must_be_finite_positive(sims, bad):
    """A zero scale made every MaxLogit/Energy score 0 (a negative one inverts the ranking), silently."""
    if bad == "100":  # a number-like string is read as the number
        np.testing.assert_allclose(scores.max_logit(sims, bad), 100.0 * sims.max(axis=1))
        return
    for kernel in (scores.max_logit, scores.energy):
        with pytest.raises(InvalidInputError, match="logit_scale must be a finite number > 0"):
            kernel(sims, bad)


def test_nan_similarities_give_nan_scores(sims):
    """A row of non-finite features scores NaN (which every decision treats as OOD); the other rows are unchanged."""
    bad = sims.copy()
    bad[3] = np.nan
    local = np.repeat(sims[:, None, :], 2, axis=1)
    local_bad = np.repeat(bad[:, None, :], 2, axis=1)
    for got, ref in [(scores.mcm(bad), scores.mcm(sims)), (scores.max_logit(bad, 10.0), scores.max_logit(sims, 10.0)),
                     (scores.energy(bad, 10.0), scores.energy(sims, 10.0)),
                     (scores.glmcm(bad, local_bad), scores.glmcm(sims, local)),
                     (scores.neglabel(bad, bad, ngroups=1), scores.neglabel(sims, sims, ngroups=1))]:
        assert np.isnan(got[3]) and np.isfinite(np.delete(got, 3)).all()
        np.testing.assert_array_equal(np.delete(got, 3), np.delete(ref, 3))


def test_clipn_kernels_stay_probabilities_at_any_scale():
    y = np.full((2, 7), 1e32)
    y[1, 3] = 2e32
    n = np.zeros((2, 7))
    for f in (scores.atd, scores.ctw):
        out = f(y, n)
        assert np.all((out >= 0) & (out <= 1)), (f.__name__, out)
    np.testing.assert_allclose(scores.atd(y, n), [1.0, 1.0])


def test_non_finite_rows_score_nan_without_numpy_warnings():
    import warnings

    rng = np.random.default_rng(1)
    s = rng.uniform(-0.2, 0.4, size=(4, 5))
    s[1, 2] = np.nan
    s[2, :] = -np.inf
    s[3, 0] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = {f.__name__: f(s) for f in (scores.mcm, scores.max_logit, scores.energy)}
    ref = {"mcm": scores.mcm(torch.tensor(s[[0]]))[0]}
    assert out["mcm"][0] == ref["mcm"] and np.isnan(out["mcm"][1]) and np.isnan(out["energy"][1])
    assert out["energy"][2] == -np.inf and out["max_logit"][3] == np.inf  # as torch.logsumexp and max give them
