"""Score kernels: cosine-similarity arrays in, one ID score per image out.

Convention everywhere: **a higher score means more in-distribution**.
Inputs may be numpy arrays or torch tensors; the kernels compute in float64 numpy (torch is imported only by
NegLabel's seeded grouping, which draws ``torch.randperm``); outputs are float64 numpy arrays of shape ``[N]``.
``sims`` are cosine similarities ``[N, C]`` between L2-normalised image and class embeddings;
``local_sims`` are per-patch similarities ``[N, P, C]``.
NaN similarities (from non-finite features) give NaN scores, which every decision treats as OOD.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._lazy import as_array, torch
from .errors import InvalidInputError

_CHUNK = 256  # rows per chunk for [N, P, C] inputs, bounding temporary memory


def _as_f64(x: Any, ndim: int, name: str) -> np.ndarray:
    a = as_array(x, np.float64)
    if a.ndim != ndim:
        raise InvalidInputError(f"{name} must have {ndim} dimensions, got shape {tuple(a.shape)}")
    if a.shape[-1] == 0:
        raise InvalidInputError(f"{name} has no classes (last dimension is 0)")
    return a


def logsumexp(x: np.ndarray, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    """``log(sum(exp(x)))`` along ``axis``, stable (shifted by the maximum); ``+inf`` in a row gives ``+inf``, a row
    of ``-inf`` gives ``-inf``, NaN gives NaN (as ``torch.logsumexp``)."""
    m = np.max(x, axis=axis, keepdims=True)
    shift = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        out = np.log(np.sum(np.exp(x - shift), axis=axis, keepdims=True)) + shift
    return out if keepdims else np.squeeze(out, axis=axis)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))`` without overflow warnings (``exp`` of large magnitudes saturates to 0 or 1)."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def check_positive(value: Any, name: str) -> float:
    """``value`` as a float; a one-line :class:`InvalidInputError` unless it is a finite number > 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be a finite number > 0, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise InvalidInputError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _max_softmax(logits: np.ndarray) -> np.ndarray:
    """max_c softmax(logits)_c along the last axis, computed stably as exp(-logsumexp(logits - max))."""
    m = np.max(logits, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, as a non-finite row should give
        return np.exp(-logsumexp(logits - m, axis=-1))


def mcm(sims: Any, temperature: float = 1.0) -> np.ndarray:
    """Maximum Concept Matching (Ming et al., NeurIPS 2022): ``max_c softmax(sims / T)_c``. Shape ``[N, C] -> [N]``."""
    check_positive(temperature, "temperature")
    s = _as_f64(sims, 2, "sims")
    return _max_softmax(s / temperature)


def max_logit(sims: Any, logit_scale: float = 100.0) -> np.ndarray:
    """Maximum logit: ``logit_scale * max_c sims_c``. Shape ``[N, C] -> [N]``."""
    logit_scale = check_positive(logit_scale, "logit_scale")
    s = _as_f64(sims, 2, "sims")
    return logit_scale * np.max(s, axis=-1)


def energy(sims: Any, logit_scale: float = 100.0, temperature: float = 1.0) -> np.ndarray:
    """Negative free energy (Liu et al., NeurIPS 2020): ``T * logsumexp(logit_scale * sims / T)``. ``[N, C] -> [N]``."""
    check_positive(temperature, "temperature")
    logit_scale = check_positive(logit_scale, "logit_scale")
    s = _as_f64(sims, 2, "sims")
    return temperature * logsumexp(logit_scale * s / temperature, axis=-1)


def local_mcm(local_sims: Any, temperature: float = 1.0) -> np.ndarray:
    """Local MCM: ``max over patches p and classes c of softmax_c(local_sims[n, p] / T)``. ``[N, P, C] -> [N]``."""
    check_positive(temperature, "temperature")
    loc = local_sims
    if loc.ndim != 3:
        raise InvalidInputError(f"local_sims must have 3 dimensions [N, P, C], got shape {tuple(loc.shape)}")
    out = np.empty(loc.shape[0], dtype=np.float64)
    for i in range(0, loc.shape[0], _CHUNK):
        chunk = _as_f64(loc[i : i + _CHUNK], 3, "local_sims")
        out[i : i + _CHUNK] = np.max(_max_softmax(chunk / temperature), axis=-1)
    return out


def glmcm(global_sims: Any, local_sims: Any, temperature: float = 1.0, lam: float = 1.0) -> np.ndarray:
    """Global-Local MCM (Miyai et al., 2023): ``mcm(global_sims, T) + lam * local_mcm(local_sims, T)``.

    ``global_sims`` ``[N, C]``, ``local_sims`` ``[N, P, C]`` -> ``[N]``.
    """
    g = mcm(global_sims, temperature)
    loc = local_mcm(local_sims, temperature)
    if g.shape[0] != loc.shape[0]:
        raise InvalidInputError(f"global_sims has {g.shape[0]} rows but local_sims has {loc.shape[0]}")
    return g + lam * loc


def neglabel(id_sims: Any, neg_sims: Any, temperature: float = 0.01, ngroups: int = 100,
             seed: int | None = 0) -> np.ndarray:
    """NegLabel score (Jiang et al., ICLR 2024): softmax mass on the ID labels against negative labels.

    ``logits = sims / temperature``. The ``M`` negatives are permuted with ``torch.Generator().manual_seed(seed)``
    (``seed=None``: kept in order), split into ``ngroups`` equal groups of ``M // ngroups`` (the remainder of
    the permuted order is dropped), and for each group the softmax over ``[ID labels, group]`` is summed over
    the ID labels; the score is the mean over groups. ``ngroups=1`` is the plain softmax over all labels.

    ``id_sims`` ``[N, C]``, ``neg_sims`` ``[N, M]`` -> ``[N]`` in (0, 1], higher = more ID.
    """
    check_positive(temperature, "temperature")
    ids = id_sims if hasattr(id_sims, "ndim") else np.asarray(id_sims)
    neg = neg_sims if hasattr(neg_sims, "ndim") else np.asarray(neg_sims)
    if ids.ndim != 2 or neg.ndim != 2:
        raise InvalidInputError(f"id_sims and neg_sims must be 2-D, got {tuple(ids.shape)} and {tuple(neg.shape)}")
    if ids.shape[0] != neg.shape[0]:
        raise InvalidInputError(f"id_sims has {ids.shape[0]} rows but neg_sims has {neg.shape[0]}")
    m = neg.shape[1]
    if not isinstance(ngroups, int) or ngroups < 1:
        raise InvalidInputError(f"ngroups must be a positive integer, got {ngroups!r}")
    if ngroups > m:
        raise InvalidInputError(f"ngroups={ngroups} is larger than the number of negative labels ({m})")
    # the reference grouping draws torch's permutation: the same seed gives the same groups as NegLabel's code
    order = (torch.randperm(m, generator=torch.Generator().manual_seed(seed)).numpy() if seed is not None
             else np.arange(m))
    size = m // ngroups
    groups = order[: size * ngroups].reshape(ngroups, size)
    out = np.empty(ids.shape[0], dtype=np.float64)
    for i in range(0, ids.shape[0], _CHUNK):  # bounded memory: float64 copies of 256 rows at a time
        id_c = _as_f64(ids[i : i + _CHUNK], 2, "id_sims")
        neg_c = _as_f64(neg[i : i + _CHUNK], 2, "neg_sims")
        lse_id = logsumexp(id_c / temperature, axis=1, keepdims=True)  # [n, 1]
        lse_neg = logsumexp((neg_c / temperature)[:, groups], axis=2)  # [n, ngroups]
        # sum of ID softmax mass within a group = e^lse_id / (e^lse_id + e^lse_neg) = sigmoid(lse_id - lse_neg)
        with np.errstate(invalid="ignore"):
            out[i : i + _CHUNK] = sigmoid(lse_id - lse_neg).mean(axis=1)
    return out


def _yes_no(logits_yes: Any, logits_no: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both ``[N, C]`` logit arrays as float64, checked to have the same shape."""
    y = _as_f64(logits_yes, 2, "logits_yes")
    n = _as_f64(logits_no, 2, "logits_no")
    if y.shape != n.shape:
        raise InvalidInputError(f"logits_yes {tuple(y.shape)} and logits_no {tuple(n.shape)} must have the same "
                                "shape [N, C]")
    return y, n


def _nan_rows(out: np.ndarray, y: np.ndarray, n: np.ndarray) -> np.ndarray:
    bad = ~(np.isfinite(y).all(axis=1) & np.isfinite(n).all(axis=1))
    out[bad] = np.nan
    return out


def p_yes(logits_yes: Any, logits_no: Any) -> np.ndarray:
    """CLIPN's per-class "yes" probability ``softmax([logits_yes_c, logits_no_c])[0] = sigmoid(yes_c - no_c)``.
    ``[N, C]`` scaled logits (``logit_scale * cos``) of both towers -> ``[N, C]``."""
    y, n = _yes_no(logits_yes, logits_no)
    with np.errstate(invalid="ignore"):
        return sigmoid(y - n)


def ctw(logits_yes: Any, logits_no: Any) -> np.ndarray:
    """CLIPN's Competing-to-Win score (Wang et al., ICCV 2023): ``p_yes`` of the predicted class
    ``argmax_c logits_yes``. ``[N, C]`` scaled logits of the yes and no towers -> ``[N]`` in [0, 1], higher = ID.

    As ``zero_shot_infer.py`` of xmed-lab/CLIPN (the reference scores ``p_yes`` directly; its paper's CTW rule
    thresholds it at 0.5, which this continuous score ranks the same way). A row with any NaN logit scores NaN."""
    y, n = _yes_no(logits_yes, logits_no)
    pred = np.argmax(y, axis=-1)[:, None]
    with np.errstate(invalid="ignore"):
        out = sigmoid(np.take_along_axis(y, pred, 1) - np.take_along_axis(n, pred, 1))[:, 0]
    return _nan_rows(out, y, n)


def atd(logits_yes: Any, logits_no: Any) -> np.ndarray:
    """CLIPN's Agreeing-to-Differ score as its reference code computes it: ``sum_c softmax(logits_yes)_c * p_yes_c``
    (the ID probability mass left after each class's "no" probability is taken out). ``[N, C]`` scaled logits ->
    ``[N]`` in [0, 1], higher = ID. A row with any NaN logit scores NaN."""
    y, n = _yes_no(logits_yes, logits_no)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(y - np.max(y, axis=-1, keepdims=True))  # softmax as exp(y - max) / sum: in [0, 1] at any scale
        out = (e / e.sum(axis=-1, keepdims=True) * sigmoid(y - n)).sum(axis=-1)
    return _nan_rows(out, y, n)
