"""Negative-label mining (NegLabel, Jiang et al., ICLR 2024) and the candidate pools it draws from.

Rule: for each candidate label, take the ``percentile`` quantile (linear interpolation) of its cosine
similarities to all ID class embeddings; within each group (part of speech) separately, keep the
``floor(ratio * n_group)`` candidates with the lowest values, in ascending order of that value.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._lazy import torch
from .errors import InvalidInputError
from .lexicons import Lexicon, file_pos, file_stem, load, load_files, selection_files

# CSP (Chen et al., "Conjugated Semantic Pool Improves OOD Detection with Pre-trained Vision-Language Models",
# NeurIPS 2024): superclass words that turn an adjective into a conjugated label ("striped creature").
CSP_SUPERCLASSES = ("environment", "space", "object", "scene", "place", "item", "area", "view", "thing", "pattern",
                    "structure", "landscape", "vista", "creature")
CSP_EXCLUDED_FILES = ("noun.person", "noun.quantity", "noun.group", "adj.pert")


def _as_float(x: Any, name: str) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{name} must be [n, D], got shape {tuple(t.shape)}")
    return t.to("cpu", torch.float32)


def percentile_similarity(id_features: Any, candidate_features: Any, percentile: float = 0.95,
                          chunk_size: int | None = None) -> np.ndarray:
    """``[M]``: the ``percentile`` quantile (linear) of each candidate's cosine similarities to the ``C`` ID classes.

    Computed in chunks of candidates so that memory stays near ``chunk_size * C`` floats (16 MB by default).
    """
    if not 0.0 <= percentile <= 1.0:  # also refuses NaN
        raise InvalidInputError(f"percentile must be in [0, 1], got {percentile}")
    ids = _as_float(id_features, "id_features")
    cands = _as_float(candidate_features, "candidate_features")
    if ids.shape[1] != cands.shape[1]:
        raise ValueError(f"feature dimensions differ: ID {ids.shape[1]} vs candidates {cands.shape[1]}")
    for t, what in ((ids, "ID class embeddings"), (cands, "candidate label embeddings")):
        bad = int((~torch.isfinite(t).all(dim=1)).sum())
        if bad:  # a NaN similarity would sort as an arbitrary rank: never mine from it
            raise InvalidInputError(f"{bad} of the {t.shape[0]} {what} contain NaN or infinite values")
    step = chunk_size or max(1, (1 << 22) // max(1, ids.shape[0]))  # torch.quantile takes <= 2**24 elements
    out = np.empty(cands.shape[0], dtype=np.float64)
    for i in range(0, cands.shape[0], step):
        sims = cands[i : i + step] @ ids.T
        out[i : i + step] = torch.quantile(sims, percentile, dim=1, interpolation="linear").numpy()
    return out


def mine(
    id_features: Any,
    candidate_features: Any,
    percentile: float = 0.95,
    ratio: float = 0.15,
    groups: Sequence[Any] | None = None,
    exclude: Sequence[bool] | None = None,
    push_above: float | None = None,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Indices of the selected negatives among the candidates.

    Args:
        id_features: ``[C, D]`` L2-normalised ID class embeddings.
        candidate_features: ``[M, D]`` L2-normalised candidate label embeddings.
        percentile: quantile of each candidate's similarities to the ID classes (0.95 in NegLabel).
        ratio: fraction of each group kept, ``floor(ratio * n_group)``; in (0, 1].
        groups: ``[M]`` group of each candidate (part of speech); None = one group. Groups are returned in
            order of first appearance, each sorted by ascending value.
        exclude: ``[M]`` bools; excluded candidates are dropped before anything else (e.g. ID class names).
        push_above: CSP's filter: candidates whose maximum similarity to an ID class exceeds it rank last.
    """
    if not 0.0 < ratio <= 1.0:  # also refuses NaN
        raise InvalidInputError(f"ratio must be in (0, 1], got {ratio}")
    if push_above is not None and not math.isfinite(push_above):
        raise InvalidInputError(f"push_above must be a finite similarity, got {push_above}")
    values = percentile_similarity(id_features, candidate_features, percentile, chunk_size)
    m = len(values)
    if push_above is not None:
        best = percentile_similarity(id_features, candidate_features, 1.0, chunk_size)
        values = np.where(best > push_above, np.inf, values)
    keep = np.ones(m, dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool)
    if groups is None:
        labels = np.zeros(m, dtype=np.int64)
    else:
        first_seen = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        labels = np.asarray([first_seen[g] for g in groups], dtype=np.int64)
    if len(labels) != m or len(keep) != m:
        raise ValueError(f"groups/exclude must have one entry per candidate ({m})")
    chosen = []
    for g in range(labels.max() + 1 if m else 0):
        idx = np.nonzero((labels == g) & keep)[0]
        k = int(np.floor(ratio * len(idx) + 1e-9))
        order = np.argsort(values[idx], kind="stable")[:k]
        chosen.append(idx[order])
    return np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class CandidatePool:
    """Candidate negative labels: ``labels`` [M] (the words or phrases), ``pos`` [M] (their group)."""

    labels: tuple[str, ...]
    pos: tuple[str, ...]
    name: str


def _csp_lexicon(lexicon: str | Sequence[str] | Lexicon) -> Lexicon:
    """The words CSP draws from: the lexicon's noun and adjective files without :data:`CSP_EXCLUDED_FILES`,
    dropped *before* de-duplicating (the reference's order of operations), so a word shared by an excluded
    file and a kept one stays."""
    if isinstance(lexicon, Lexicon) and not lexicon.files:  # built by hand: its de-duplication is all there is
        keep = [i for i, (p, src) in enumerate(zip(lexicon.pos, lexicon.source))
                if p in ("noun", "adj") and src not in CSP_EXCLUDED_FILES]
        return Lexicon(tuple(lexicon.words[i] for i in keep), tuple(lexicon.pos[i] for i in keep),
                       tuple(lexicon.source[i] for i in keep), lexicon.name)
    if isinstance(lexicon, Lexicon):
        files, name = [Path(f) for f in lexicon.files], lexicon.name
    else:
        files, name = selection_files(lexicon)
    kept = [f for f in files if file_pos(f) in ("noun", "adj") and file_stem(f) not in CSP_EXCLUDED_FILES]
    if not kept:
        raise InvalidInputError(f"the CSP pool built from lexicon {name!r} is empty: it has no noun or adjective "
                                f"files besides {', '.join(CSP_EXCLUDED_FILES)}")
    return load_files(kept, name)


def candidate_pool(pool: str = "neglabel", lexicon: str | Sequence[str] | Lexicon = "neglabel",
                   seed: int = 0) -> CandidatePool:
    """The candidate labels of a pool.

    ``pool="neglabel"``: the lexicon's words as they are (NegLabel's rule: every file, de-duplicated).

    ``pool="csp"``: the Conjugated Semantic Pool as the reference builds it (NeurIPS2024-CSP,
    ``mmcls/models/classifiers/multi_modal.py``): the lexicon's ``noun.*`` and ``adj.*`` files without
    ``noun.person``, ``noun.quantity``, ``noun.group`` and ``adj.pert`` are read and de-duplicated (first
    occurrence wins); each noun is a candidate, and each adjective becomes one conjugated label
    ``"<adjective> <superclass>"`` (``"striped object"``), the superclass drawn from :data:`CSP_SUPERCLASSES`
    with ``random.Random(seed).choice``, one draw per adjective in pool order — the same sequence as the
    reference's ``random.seed(seed)`` then ``random.choice`` per adjective (its configs use seed 0). Plain
    adjectives are not candidates; files of other parts of speech are skipped, as in the reference.

    Deliberate difference: the reference reads its word folder in ``os.listdir`` order, which depends on the
    file system and is not reproducible; vlmood reads nouns before adjectives (WordNet file-number order for
    the bundled selections, by name in a folder). The order decides the part of speech of a word listed both
    as a noun and as an adjective (841 words of the bundled files: nouns here; adjectives if ``adj.*`` were
    read first) and which adjective receives which superclass draw. (The reference also turns underscores into
    spaces; the bundled files have none, and words of user files are taken as written, as NegLabel takes them.)
    """
    if pool == "neglabel":
        lex = lexicon if isinstance(lexicon, Lexicon) else load(lexicon)
        return CandidatePool(lex.words, lex.pos, f"neglabel:{lex.name}")
    if pool != "csp":
        raise InvalidInputError(f"unknown candidate pool {pool!r}; choose 'neglabel' or 'csp'")
    lex = _csp_lexicon(lexicon)
    rng = random.Random(seed)
    labels = tuple(f"{w} {rng.choice(CSP_SUPERCLASSES)}" if p == "adj" else w for w, p in zip(lex.words, lex.pos))
    if not labels:
        raise InvalidInputError(f"the CSP pool built from lexicon {lex.name!r} is empty")
    return CandidatePool(labels, lex.pos, f"csp:{lex.name}")
