"""Text embedding engine: unique prompts, cache lookup, length-sorted trimmed batches, class ensembles."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Sequence, Union

import numpy as np

from .._io import printable
from .._lazy import F, torch
from .._progress import progress as _progress
from .._paths import cache_root
from ..errors import InvalidInputError, NonFiniteEmbeddingError
from .cache import EmbeddingCache, encoder_record
from .prompts import class_prompts, load_classes, load_templates

if TYPE_CHECKING:
    from ..encoders.base import Encoder

CacheArg = Union[EmbeddingCache, bool, None]
_TEXT_ENGINE_VERSION = "text-v1"
_default_caches: dict[str, EmbeddingCache] = {}
_MAX_NAMED = 5  # prompts named in an error message, then a count
# Resumable runs: new embeddings are stored as a cache shard at least every _STORE_PROMPTS prompts or
# _STORE_SECONDS seconds, and on every way out (an exception, Ctrl-C, SIGTERM): a large prompt pool (CSP's
# ~420k prompts) interrupted near its end resumes there. A SIGKILL loses at most the last interval.
_STORE_PROMPTS = 8192
_STORE_SECONDS = 60.0


def _check_finite(texts: Sequence[str], emb: torch.Tensor) -> None:
    """Raise :class:`NonFiniteEmbeddingError` naming the prompts whose embedding row is not finite."""
    bad = torch.nonzero(~torch.isfinite(emb).all(dim=1)).flatten().tolist()
    if bad:
        shown = ", ".join(repr(printable(texts[i])) for i in bad[:_MAX_NAMED])
        more = f" and {len(bad) - _MAX_NAMED} more" if len(bad) > _MAX_NAMED else ""
        raise NonFiniteEmbeddingError(
            f"non-finite text embeddings (NaN/Inf) for {len(bad)} prompt(s): {shown}{more}; the text encoder "
            "overflowed (fp16? use fp32 precision) or its weights are broken")


def as_texts(texts: Sequence[str]) -> list[str]:
    """``texts`` as a list of strings; a single string or a non-string item is a one-line error."""
    if isinstance(texts, str):
        raise InvalidInputError("texts must be a sequence of strings, not a single string")
    texts = list(texts)
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise InvalidInputError(f"texts must be strings; got {type(bad[0]).__name__} {bad[0]!r}")
    return texts


def default_cache() -> EmbeddingCache:
    """The process-wide cache at :func:`vlmood._paths.cache_root` (re-read when ``$VLMOOD_CACHE`` changes)."""
    root = str(cache_root())
    if root not in _default_caches:
        _default_caches[root] = EmbeddingCache(root)
    return _default_caches[root]


def _resolve_cache(cache: CacheArg) -> EmbeddingCache | None:
    if cache is True:
        return default_cache()
    if cache is None or cache is False:
        return None
    if isinstance(cache, EmbeddingCache):
        return cache
    raise TypeError(f"cache must be an EmbeddingCache, True, False or None, not {type(cache).__name__}")


def cache_namespace(encoder: "Encoder") -> str:
    """The cache namespace of an encoder: its weights fingerprint, precision (:attr:`Encoder.cache_precision`) and
    engine version."""
    return f"{encoder.fingerprint}|{getattr(encoder, 'cache_precision', encoder.precision)}|{_TEXT_ENGINE_VERSION}"


def compute_text_embeddings(
    encoder: "Encoder", texts: Sequence[str], batch_size: int | None = None, progress: bool | None = None,
    what: str = "prompts",
) -> torch.Tensor:
    """Embed ``texts`` (no cache): ``[M, D]`` float32, L2-normalised, in input order.

    Prompts are sorted by token length and each batch runs only over its longest prompt's positions
    when the encoder's text tower makes that exact (causal attention, end-token pooling).
    ``progress``: see :mod:`vlmood._progress` (``None``: shown only for long jobs; ``what`` names the texts there).
    Raises :class:`NonFiniteEmbeddingError` naming the prompts whose embedding is NaN/Inf.
    """
    out = _compute(encoder, texts, batch_size, progress, start=_start_line(encoder, len(texts), what, False),
                   unit=what.split(" (", 1)[0])
    _check_finite(texts, out)
    return out


def _start_line(encoder: "Encoder", n: int, what: str, cached: bool, hits: int = 0) -> str:
    """The progress start line: how many texts are encoded, with which model, and whether they are cached."""
    line = f"encoding {n:,} {what} with {encoder.spec}"
    if hits:
        line += f" ({hits:,} already cached)"
    return line + (" — first time only, cached afterwards" if cached else "")


def _compute(
    encoder: "Encoder", texts: Sequence[str], batch_size: int | None = None, progress: bool | None = None,
    on_rows: Callable[[list[int], torch.Tensor], None] | None = None, start: str | None = None,
    unit: str = "prompts",
) -> torch.Tensor:
    """:func:`compute_text_embeddings` without the finiteness check (rows may be NaN/Inf).

    ``on_rows(positions, rows)`` receives the rows computed so far (positions in ``texts``) at least every
    :data:`_STORE_PROMPTS` prompts or :data:`_STORE_SECONDS` seconds, and once more however the loop ends
    (an exception or Ctrl-C included), so that completed work can be stored. ``start``, ``unit``: the progress start
    line and what the texts are called (plural).
    """
    if len(texts) == 0:
        return torch.empty(0, encoder.embed_dim)
    bs = batch_size or encoder.text_batch_size
    tokens, lengths = encoder.tokenize(texts)
    lengths_t = torch.tensor(lengths)
    order = torch.argsort(lengths_t, stable=True)
    out = torch.empty(len(texts), encoder.embed_dim)
    done: list[int] = []  # computed, not yet handed to on_rows
    last = time.monotonic()

    def hand_over() -> None:
        nonlocal last
        if on_rows is not None and done:
            on_rows(list(done), out[done])
        done.clear()
        last = time.monotonic()

    try:
        with _progress(len(texts), "text embeddings", unit, progress, start=start) as bar, \
                torch.inference_mode(), encoder.autocast():
            for i in range(0, len(texts), bs):
                idx = order[i : i + bs]
                length = int(lengths_t[idx].max())
                feats = encoder._encode_token_batch(tokens[idx].to(encoder.device), length)
                out[idx] = F.normalize(feats.float(), dim=-1).cpu()
                done.extend(idx.tolist())
                bar.update(len(idx))
                if len(done) >= _STORE_PROMPTS or time.monotonic() - last >= _STORE_SECONDS:
                    hand_over()
    finally:
        hand_over()
    return out


def embed_texts(
    encoder: "Encoder",
    texts: Sequence[str],
    batch_size: int | None = None,
    cache: CacheArg = None,
    progress: bool | None = None,
    *,
    what: str = "prompts",
) -> torch.Tensor:
    """Embed prompts through the cache: ``[M, D]`` float32, L2-normalised, in input order.

    Duplicate prompts are encoded once. With a cache, hits are read from disk and only misses are
    computed, then stored as they are computed (every 8,192 prompts or 60 seconds, and when the run stops on an
    exception, Ctrl-C or SIGTERM, so an interrupted run resumes where it stopped). A read-only or full cache
    folder gives one warning and no caching. ``cache``: an :class:`EmbeddingCache`, ``True`` (default cache),
    or ``None``. ``progress``: see :mod:`vlmood._progress` (``None``: shown only for long jobs, ``False``: never);
    its start line says how many texts are encoded (``what``, e.g. ``"lexicon words"``), with which model, and
    that they are cached.
    Raises :class:`NonFiniteEmbeddingError` naming the prompts whose embedding is NaN/Inf (never cached).
    """
    return torch.from_numpy(_embed_array(encoder, texts, batch_size, cache, progress, what=what))


def _embed_array(encoder: "Encoder", texts: Sequence[str], batch_size: int | None, cache: CacheArg,
                 progress: bool | None, *, what: str) -> np.ndarray:
    """:func:`embed_texts` as a float32 numpy array ``[M, D]``; when every prompt is cached, torch is not needed
    (nor imported)."""
    texts = as_texts(texts)
    uniq = list(dict.fromkeys(texts))
    store = _resolve_cache(cache)
    ns = cache_namespace(encoder) if store is not None else ""
    hits = store.get_arrays(ns, uniq) if store is not None else {}
    missing = [i for i in range(len(uniq)) if i not in hits]
    vecs = np.empty((len(uniq), encoder.embed_dim), dtype=np.float32)
    for i, v in hits.items():
        vecs[i] = v
    if missing:
        todo = [uniq[i] for i in missing]
        writable = store is not None
        record = encoder_record(encoder) if writable else None

        def keep(positions: list[int], rows: torch.Tensor) -> None:  # the finite ones, even when others are not
            nonlocal writable
            finite = torch.isfinite(rows).all(dim=1).tolist()
            good = [k for k, ok in enumerate(finite) if ok]
            if writable and good:
                writable = store.put(ns, [todo[positions[k]] for k in good], rows[good], record) is not None

        from .. import _signals
        from .._signals import _signals_unwind, _Signalled

        try:
            with _signals_unwind():
                new = _compute(encoder, todo, batch_size, progress, on_rows=keep if writable else None,
                               start=_start_line(encoder, len(todo), what, writable, hits=len(hits)),
                               unit=what.split(" (", 1)[0])
        except _Signalled as s:
            _signals._die_of(s.signum)
        _check_finite(todo, new)
        vecs[missing] = new.numpy()
    pos = {t: i for i, t in enumerate(uniq)}
    return vecs[[pos[t] for t in texts]]


def class_embeddings(
    encoder: "Encoder",
    classes: str | Sequence[str],
    templates: str | Sequence[str] | None = None,
    cache: CacheArg = True,
    batch_size: int | None = None,
    progress: bool | None = None,
    check: bool = True,
    *,
    what: str = "class names",
) -> torch.Tensor:
    """Prompt-ensemble class embeddings ``[C, D]``: the normalised mean of each class's normalised template embeddings.

    ``check=False`` skips class-list validation (used for lexicon words, which are already unique).
    ``what`` names the classes in the progress start line (e.g. ``"lexicon words"``: ``encoding 70,794 lexicon
    words with ...``; with several templates, ``encoding 212,382 prompts (70,794 lexicon words x 3 templates)``).
    """
    return torch.from_numpy(class_embedding_array(encoder, classes, templates, cache, batch_size, progress, check,
                                                  what=what))


def class_embedding_array(
    encoder: "Encoder",
    classes: str | Sequence[str],
    templates: str | Sequence[str] | None = None,
    cache: CacheArg = True,
    batch_size: int | None = None,
    progress: bool | None = None,
    check: bool = True,
    *,
    what: str = "class names",
) -> np.ndarray:
    """:func:`class_embeddings` as a float32 numpy array ``[C, D]`` (what detectors hold). The ensemble is computed in
    numpy, so a run whose prompts are all cached needs no torch: each class's template embeddings are averaged (in
    float64) and the mean divided by its norm (at least 1e-12, as ``torch.nn.functional.normalize``)."""
    names = load_classes(classes) if check else list(classes)
    tmpl = load_templates(templates)
    label = what if len(tmpl) == 1 else f"prompts ({len(names):,} {what} x {len(tmpl)} templates)"
    prompts = class_prompts(names, tmpl)
    store = _resolve_cache(cache) if len(prompts) >= ENSEMBLE_CACHE_MIN else None
    if store is not None:  # a large text side (a lexicon): its ensemble is cached whole, read as C rows
        ns, rows = _ensemble_namespace(encoder, prompts, len(names)), [str(i) for i in range(len(names))]
        hit = store.get_arrays(ns, rows)
        if len(hit) == len(names):
            return np.stack([hit[i] for i in range(len(names))])
    emb = _embed_array(encoder, prompts, batch_size, cache, progress, what=label)
    mean = emb.reshape(len(names), len(tmpl), -1).astype(np.float64).mean(axis=1)
    norm = np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
    out = (mean / norm).astype(np.float32)
    if store is not None:
        store.put(ns, rows, torch.from_numpy(out), encoder_record(encoder))  # best effort: None if not writable
    return out


ENSEMBLE_CACHE_MIN = 10_000
"""Text sides of at least this many prompts (lexicons: NegLabel's ~210k, CSP's ~420k) keep their class ensemble in the
text cache as well, so that a warm run reads ``C`` rows instead of ``C x T`` prompt embeddings."""


def _ensemble_namespace(encoder: "Encoder", prompts: Sequence[str], n_classes: int) -> str:
    """The cache namespace of the ensemble of exactly these prompts (class-major, ``n_classes`` classes) on
    ``encoder``: its text namespace, the ensemble rule's version and a hash of every prompt (length-prefixed)."""
    import hashlib

    h = hashlib.sha256(f"ensemble-v1|{n_classes}|{len(prompts)}|".encode())
    for t in prompts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little") + b)
    return f"{cache_namespace(encoder)}|ensemble|{h.hexdigest()}"
