"""Metrics against scikit-learn (test-only reference) and direct integration."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from vlmood import metrics
from vlmood.errors import InvalidInputError


def sk_fpr95(id_s, ood_s):
    y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    fpr, tpr, _ = roc_curve(y, np.r_[id_s, ood_s])
    return fpr[np.argmax(tpr >= 0.95)]


def cases():
    rng = np.random.default_rng(0)
    yield rng.normal(1, 1, 300), rng.normal(0, 1, 500)  # continuous
    yield rng.integers(0, 5, 200).astype(float), rng.integers(0, 4, 333).astype(float)  # heavy ties
    yield rng.normal(0, 1, 40), rng.normal(0, 1, 1000)  # imbalanced, overlapping
    yield np.array([0.5] * 10), np.array([0.5] * 7)  # everything tied


@pytest.mark.parametrize("id_s,ood_s", list(cases()))
def test_against_sklearn(id_s, ood_s):
    y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    s = np.r_[id_s, ood_s]
    m = metrics.evaluate(id_s, ood_s)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["aupr_in"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert m["aupr_out"] == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
    assert m["fpr95"] == pytest.approx(sk_fpr95(id_s, ood_s), abs=1e-12)


@pytest.mark.parametrize("id_s,ood_s", list(cases())[:3])
def test_autc_matches_numerical_integration(id_s, ood_s):
    lo, hi = min(id_s.min(), ood_s.min()), max(id_s.max(), ood_s.max())
    a, b = (id_s - lo) / (hi - lo), (ood_s - lo) / (hi - lo)
    t = np.linspace(0, 1, 200_001)
    fpr = (b[None, :] >= t[:, None]).mean(axis=1)
    fnr = (a[None, :] < t[:, None]).mean(axis=1)
    expected = 0.5 * (np.trapezoid(fpr, t) + np.trapezoid(fnr, t))
    assert metrics.autc(id_s, ood_s) == pytest.approx(expected, abs=1e-4)


def test_hand_computed():
    # ID {3, 2}, OOD {1, 2}: pairs (3>1, 3>2, 2>1, 2=2) -> AUROC = 3.5/4
    assert metrics.auroc([3, 2], [1, 2]) == pytest.approx(0.875)
    # perfect separation
    m = metrics.evaluate([2, 3, 4], [0, 1])
    assert (m["auroc"], m["fpr95"], m["aupr_in"], m["aupr_out"]) == (1.0, 0.0, 1.0, 1.0)
    # normalised ID = {0.5, 0.75, 1}, OOD = {0, 0.25}: AUTC = (0.125 + 1 - 0.75) / 2
    assert m["autc"] == pytest.approx(0.1875)


def test_threshold_keeps_tpr():
    rng = np.random.default_rng(3)
    for n in (1, 19, 20, 100, 1001):
        s = rng.normal(size=n)
        t = metrics.threshold_at_tpr(s, 0.95)
        assert (s >= t).mean() >= 0.95
        assert (s > t).mean() < 0.95  # the highest such threshold


def test_bad_inputs():
    with pytest.raises(ValueError, match="ood_scores is empty"):
        metrics.evaluate([1.0], [])
    with pytest.raises(ValueError, match="tpr"):
        metrics.threshold_at_tpr([1.0], 1.5)


def test_non_finite_scores_are_one_line_errors_naming_how_many():
    """NaN scores never give a silent AUROC; the message says how many, and which list."""
    with pytest.raises(InvalidInputError, match=r"^id_scores contains 2 NaN value\(s\) among 3 ") as e:
        metrics.evaluate([1.0, np.nan, np.nan], [0.0, 0.5])
    assert "\n" not in str(e.value)
    with pytest.raises(InvalidInputError, match=r"ood_scores contains 1 NaN and 1 infinite value\(s\) among 3"):
        metrics.evaluate([1.0], [0.0, np.nan, -np.inf])
    with pytest.raises(InvalidInputError, match=r"id_scores contains 1 NaN"):
        metrics.threshold_at_tpr([0.2, np.nan, 0.4], 0.95)
    for f in (metrics.auroc, metrics.autc, metrics.fpr_at_tpr, metrics.average_precision):
        with pytest.raises(InvalidInputError, match="NaN"):
            f([1.0, 2.0], [np.nan])


def test_scores_must_be_one_dimensional():
    """A [N, C] matrix was flattened into N*C 'scores' silently; a single column is still one score per image."""
    with pytest.raises(InvalidInputError, match=r"id_scores must be 1-D \(one score per image\), got shape \(3, 2\)"):
        metrics.evaluate(np.zeros((3, 2)), [0.0])
    col = np.array([[3.0], [2.0]])
    assert metrics.evaluate(col, [1.0, 2.0]) == metrics.evaluate([3.0, 2.0], [1.0, 2.0])
    assert metrics.auroc(col, [1.0, 2.0]) == pytest.approx(0.875)  # hand-computed in test_hand_computed
