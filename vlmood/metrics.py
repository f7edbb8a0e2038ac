"""OOD detection metrics. ID is the positive class; scores are higher for more in-distribution inputs.

``evaluate(id_scores, ood_scores)`` returns:

- ``auroc``: area under the ROC curve (ties count one half), higher is better;
- ``fpr95``: fraction of OOD inputs accepted at the highest threshold that keeps >= 95% of ID, lower is better;
- ``aupr_in``: average precision with ID as positive, higher is better;
- ``aupr_out``: average precision with OOD as positive (scores negated), higher is better;
- ``autc``: Area Under the Threshold Curve (Humblot-Renaux et al., "Beyond AUROC & co. for evaluating
  out-of-distribution detection performance", CVPRW 2023): with scores min-max normalised over ID and OOD
  together, ``AUTC = 1/2 (int_0^1 FPR(t) dt + int_0^1 FNR(t) dt)``, lower is better.

Scores must be finite: NaN or infinite scores raise :class:`~vlmood.errors.InvalidInputError` naming how many,
never a silently computed metric.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidInputError


def _scores(x: Any, name: str) -> np.ndarray:
    """``x`` as a 1-D float64 array; a one-line :class:`InvalidInputError` when it is empty, not 1-D
    (a single column or row is accepted) or holds NaN/inf, which would make every metric meaningless."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"{name} must be numbers: {e}") from None
    if sum(n > 1 for n in a.shape) > 1:
        raise InvalidInputError(f"{name} must be 1-D (one score per image), got shape {a.shape}")
    a = a.reshape(-1)
    if a.size == 0:
        raise InvalidInputError(f"{name} is empty")
    nan = int(np.count_nonzero(np.isnan(a)))
    inf = int(np.count_nonzero(np.isinf(a)))
    if nan or inf:
        parts = [f"{nan} NaN"] * bool(nan) + [f"{inf} infinite"] * bool(inf)
        raise InvalidInputError(
            f"{name} contains {' and '.join(parts)} value(s) among {a.size} (non-finite scores come from non-finite "
            "features, e.g. an fp16 overflow or a broken image); metrics and thresholds need finite scores")
    return a


def _counts_by_threshold(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each distinct score t (descending): #pos >= t and #neg >= t."""
    allv = np.concatenate([pos, neg])
    thresholds = np.unique(allv)[::-1]
    tp = len(pos) - np.searchsorted(np.sort(pos), thresholds, side="left")
    fp = len(neg) - np.searchsorted(np.sort(neg), thresholds, side="left")
    return tp.astype(np.float64), fp.astype(np.float64)


def roc_curve(id_scores: Any, ood_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr)`` from (0, 0) to (1, 1), one per distinct threshold, ID positive."""
    pos, neg = _scores(id_scores, "id_scores"), _scores(ood_scores, "ood_scores")
    tp, fp = _counts_by_threshold(pos, neg)
    return np.r_[0.0, fp / len(neg)], np.r_[0.0, tp / len(pos)]


def auroc(id_scores: Any, ood_scores: Any) -> float:
    """P(score_id > score_ood) + 1/2 P(score_id == score_ood)."""
    pos, neg = _scores(id_scores, "id_scores"), _scores(ood_scores, "ood_scores")
    allv = np.concatenate([pos, neg])
    uniq, inverse, counts = np.unique(allv, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    avg_rank = upper - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    rank_sum = avg_rank[inverse[: len(pos)]].sum()
    return float((rank_sum - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def threshold_at_tpr(id_scores: Any, tpr: float = 0.95) -> float:
    """The highest threshold ``t`` such that at least a ``tpr`` fraction of ID scores are ``>= t``."""
    if not 0 < tpr <= 1:
        raise InvalidInputError(f"tpr must be in (0, 1], got {tpr}")
    pos = np.sort(_scores(id_scores, "id_scores"))
    keep = int(np.ceil(len(pos) * tpr - 1e-9))  # how many ID scores must stay at or above t
    return float(pos[len(pos) - max(keep, 1)])


def fpr_at_tpr(id_scores: Any, ood_scores: Any, tpr: float = 0.95) -> float:
    """FPR (fraction of OOD with score >= t) at ``t = threshold_at_tpr(id_scores, tpr)``."""
    neg = _scores(ood_scores, "ood_scores")
    return float(np.mean(neg >= threshold_at_tpr(id_scores, tpr)))


def average_precision(pos_scores: Any, neg_scores: Any) -> float:
    """Average precision of ranking ``pos_scores`` above ``neg_scores``: sum_k (R_k - R_{k-1}) P_k."""
    pos, neg = _scores(pos_scores, "positive scores"), _scores(neg_scores, "negative scores")
    tp, fp = _counts_by_threshold(pos, neg)
    recall = tp / len(pos)
    precision = tp / (tp + fp)
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def autc(id_scores: Any, ood_scores: Any) -> float:
    """Area Under the Threshold Curve (lower is better).

    Scores are min-max normalised over ID and OOD together to ``s`` in [0, 1]. With
    ``FPR(t) = P(s_ood >= t)`` and ``FNR(t) = P(s_id < t)``, ``int_0^1 FPR = mean(s_ood)`` and
    ``int_0^1 FNR = 1 - mean(s_id)`` exactly, so ``AUTC = (mean(s_ood) + 1 - mean(s_id)) / 2``.
    """
    pos, neg = _scores(id_scores, "id_scores"), _scores(ood_scores, "ood_scores")
    lo = min(pos.min(), neg.min())
    span = max(pos.max(), neg.max()) - lo
    if span == 0:
        return 0.5  # every score equal: FPR = 1 and FNR = 0 for every threshold in (0, 1]
    return float((np.mean((neg - lo) / span) + 1.0 - np.mean((pos - lo) / span)) / 2.0)


def evaluate(id_scores: Any, ood_scores: Any) -> dict[str, float]:
    """All metrics for one ID/OOD pair: ``auroc``, ``fpr95``, ``aupr_in``, ``aupr_out``, ``autc``."""
    pos, neg = _scores(id_scores, "id_scores"), _scores(ood_scores, "ood_scores")
    return {
        "auroc": auroc(pos, neg),
        "fpr95": fpr_at_tpr(pos, neg, 0.95),
        "aupr_in": average_precision(pos, neg),
        "aupr_out": average_precision(-neg, -pos),
        "autc": autc(pos, neg),
    }
