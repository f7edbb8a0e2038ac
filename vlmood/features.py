"""Image features, computed once per (encoder, image) and cached on disk, then scored by any number of detectors."""
from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from ._io import printable
from ._lazy import as_array, is_tensor, torch
from ._progress import progress as _progress
from .data import ImageSource, as_source
from . import _signals
from ._signals import _signals_unwind, _Signalled
from .errors import ImageLoadError, InvalidInputError, WorkerKilledError
from .text.cache import EmbeddingCache, encoder_record, prompt_key
from .text.embed import CacheArg

if TYPE_CHECKING:
    from .encoders.base import Encoder

_FEATURE_ENGINE_VERSION = "feat-v1"
# Resumable runs: newly encoded features are written to the cache as a shard at least every _FLUSH_IMAGES images,
# every _FLUSH_SECONDS seconds or every _FLUSH_BYTES bytes, whichever comes first, and on every way out of the
# loop (an exception, Ctrl-C, SIGTERM). A SIGKILL (or power loss) loses at most the last interval.
_FLUSH_IMAGES = 2048
_FLUSH_SECONDS = 60.0
_FLUSH_BYTES = 128 << 20
_MAX_NAMED = 5  # images named in an error message, then a count


LocalReducer = Callable[[Any], Any]
"""A function from one batch's local (patch) features ``[B, P, D]`` (float32, L2-normalised, CPU) to ``B`` values
(``[B]``) or ``B`` rows of ``k`` values (``[B, k]``), e.g. :meth:`vlmood.detectors.GLMCM.local_reducer`. An optional
``cache_key`` attribute (a string naming exactly what it computes: the text embeddings and settings) lets the
feature cache keep its values, so a warm run neither encodes the images nor reads patch features."""


class Features:
    """Encoded images.

    Attributes:
        features: ``[N, D]`` L2-normalised global image features (a float32 CPU tensor).
        local: ``[N, P, D]`` L2-normalised patch features (a float32 CPU tensor), or None.
        ids: ``N`` image ids (paths, or ``name[i]`` for in-memory / dataset images).
        labels: ``N`` raw labels (class names or indices) or None when the source has none.
        errors: ``(id, message)`` of each image skipped with ``on_error="skip"`` (not in ``features``).
        name: the source's name.
        reduced: ``{label: [N] or [N, k] float64 numpy array}``, the values of each of ``extract_features``'s
            ``local_reducers`` (a reducer's ``[B, 1]`` comes back as ``[N]``), rows aligned with ``features``.
        reduced_keys: ``{label: cache_key}`` of the reducer that computed each ``reduced`` entry (None when it had
            none); :func:`score_detector` refuses values whose key is not the scoring detector's own.

    ``features`` and ``local`` may be given as tensors or numpy arrays; read, they are tensors (sharing memory with
    an array given). :meth:`global_array` reads the global features as a numpy array without importing torch:
    features read from the cache are kept as arrays, so that a fully cached run never needs torch.
    """

    def __init__(self, features: Any, local: Any, ids: list[str], labels: list[Any] | None = None,
                 errors: list[tuple[str, str]] | None = None, name: str = "images",
                 reduced: dict[str, Any] | None = None, reduced_keys: dict[str, str | None] | None = None):
        self.features = features
        self.local = local
        self.ids = ids
        self.labels = labels
        self.errors = [] if errors is None else errors
        self.name = name
        self.reduced = {} if reduced is None else reduced
        self.reduced_keys = {} if reduced_keys is None else reduced_keys

    @property
    def features(self) -> "torch.Tensor":
        if isinstance(self._features, np.ndarray):
            self._features = torch.from_numpy(self._features)
        return self._features

    @features.setter
    def features(self, value: Any) -> None:
        self._features = value

    @property
    def local(self) -> "torch.Tensor | None":
        if isinstance(self._local, np.ndarray):
            self._local = torch.from_numpy(self._local)
        return self._local

    @local.setter
    def local(self, value: Any) -> None:
        self._local = value

    def global_array(self) -> np.ndarray:
        """The global features ``[N, D]`` as a float32 numpy array (no copy; torch is not imported for it)."""
        return as_array(self._features, np.float32)

    @property
    def has_local(self) -> bool:
        """Whether the patch features are held (``local`` is not None), told without importing torch."""
        return self._local is not None

    def __len__(self) -> int:
        return int(self._features.shape[0])

    def __repr__(self) -> str:
        loc = f", local {tuple(self._local.shape)}" if self._local is not None else ""
        red = f", reduced {sorted(self.reduced)}" if self.reduced else ""
        return f"Features({self.name!r}: {tuple(self._features.shape)}{loc}{red}, {len(self.errors)} skipped)"


class _Decoded:
    """Decodes and preprocesses the selected images of a source inside DataLoader workers (a map-style dataset:
    ``__len__`` and ``__getitem__``)."""

    def __init__(self, source: ImageSource, indices: Sequence[int], transform: Any):
        self.source, self.indices, self.transform = source, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = self.indices[k]
        try:
            return i, self.transform(self.source.load(i)), None
        except ImageLoadError as e:
            return i, None, str(e)
        except Exception as e:  # a transform failing on a strange image: report it like a decode error
            return i, None, f"cannot preprocess image {self.source.ids[i]}: {type(e).__name__}: {e}"


def _collate(batch):
    ok = [(i, t) for i, t, _ in batch if t is not None]
    bad = [(i, e) for i, _, e in batch if e is not None]
    idx = [i for i, _ in ok]
    tensors = torch.stack([t for _, t in ok]) if ok else None
    return idx, tensors, bad


def feature_namespace(encoder: "Encoder", local: bool) -> str:
    """Cache namespace: weights, precision, preprocessing and whether patch features are stored."""
    return f"{encoder.fingerprint}|{getattr(encoder, 'cache_precision', encoder.precision)}|" \
           f"{encoder.preprocess_key}|{'local' if local else 'global'}|" \
           f"{_FEATURE_ENGINE_VERSION}"


_default_feature_caches: dict[str, EmbeddingCache] = {}


def _feature_cache(cache: CacheArg) -> EmbeddingCache | None:
    if cache is True:  # one instance per root, so verified shards are not re-hashed on every call
        from ._paths import cache_root

        root = str(cache_root())
        if root not in _default_feature_caches:
            _default_feature_caches[root] = EmbeddingCache(root, kind="features")
        return _default_feature_caches[root]
    if cache is None or cache is False:
        return None
    if isinstance(cache, EmbeddingCache):
        return cache
    raise TypeError(f"cache must be an EmbeddingCache, True, False or None, not {type(cache).__name__}")


def _default_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _check_reducers(local_reducers: Any) -> dict[str, LocalReducer]:
    if local_reducers is None:
        return {}
    if not isinstance(local_reducers, Mapping):
        raise InvalidInputError(f"local_reducers must be a dict {{label: function}}, got "
                                f"{type(local_reducers).__name__}")
    for label, fn in local_reducers.items():
        if not isinstance(label, str) or not label:
            raise InvalidInputError(f"local_reducers labels must be non-empty strings, got {label!r}")
        if not callable(fn):
            raise InvalidInputError(f"local reducer {label!r} is not a function: {type(fn).__name__}")
        key = getattr(fn, "cache_key", None)
        if key is not None and (not isinstance(key, str) or not key):
            raise InvalidInputError(f"local reducer {label!r}: cache_key must be a non-empty string, got {key!r}")
    return dict(local_reducers)


def _reduce(fn: LocalReducer, label: str, loc: Any) -> np.ndarray:
    """``fn(loc)`` checked and returned as a float64 numpy array ``[B, k]``."""
    out = as_array(fn(loc), np.float64)
    if out.ndim not in (1, 2) or out.shape[0] != loc.shape[0] or (out.ndim == 2 and out.shape[1] == 0):
        raise InvalidInputError(f"local reducer {label!r} must return [B] or [B, k] values for a batch of "
                                f"B={loc.shape[0]} images, got shape {tuple(out.shape)}")
    return out.reshape(loc.shape[0], -1)


def _pack_f64(v: np.ndarray) -> np.ndarray:
    """``[B, k]`` float64 values as ``[B, 3k]`` float32 whole numbers below 2**22 (each value's 64 bits in parts of
    22, 21 and 21 bits), so the float32 feature cache keeps them bit for bit."""
    u = np.ascontiguousarray(v, dtype=np.float64).view(np.uint64)
    parts = np.stack([u >> np.uint64(42), (u >> np.uint64(21)) & np.uint64(0x1FFFFF), u & np.uint64(0x1FFFFF)],
                     axis=-1)
    return parts.reshape(v.shape[0], -1).astype(np.float32)


def _unpack_f64(rows: np.ndarray) -> np.ndarray:
    """The ``[B, k]`` float64 values of rows ``[B, 3k]`` written by :func:`_pack_f64`."""
    p = np.asarray(rows).astype(np.uint64).reshape(len(rows), -1, 3)
    u = (p[..., 0] << np.uint64(42)) | (p[..., 1] << np.uint64(21)) | p[..., 2]
    return np.ascontiguousarray(u).view(np.float64).reshape(len(rows), -1)


def reduced_namespace(encoder: "Encoder", cache_key: str) -> str:
    """Cache namespace of a local reducer's values: the patch features' namespace and the reducer's ``cache_key``."""
    return f"{feature_namespace(encoder, True)}|reduced|{cache_key}"


def _patch_namespace(encoder: "Encoder") -> str:
    """Cache namespace of patch features kept alone (float16, ``cache_local=True``), without the global part."""
    return f"{encoder.fingerprint}|{getattr(encoder, 'cache_precision', encoder.precision)}|" \
           f"{encoder.preprocess_key}|patches|{_FEATURE_ENGINE_VERSION}"


_half_caches: dict[tuple[str, str], EmbeddingCache] = {}


def _half_cache(store: EmbeddingCache) -> EmbeddingCache:
    """The float16 cache beside ``store`` (same root and kind), where patch features are kept when asked."""
    if store.dtype == "float16":
        return store
    key = (str(store.root), store.kind)
    if key not in _half_caches:
        _half_caches[key] = EmbeddingCache(store.root, dtype="float16", kind=store.kind)
    return _half_caches[key]


class _Writer:
    """Rows waiting for the feature cache, per (cache, namespace), written together at least every
    ``_FLUSH_IMAGES`` images, ``_FLUSH_SECONDS`` seconds or ``_FLUSH_BYTES`` bytes and on every way out of the
    encoding loop. After a failed write (read-only folder, full disk: one warning from the cache) nothing more is
    written."""

    def __init__(self, encoder: "Encoder"):
        self.record = encoder_record(encoder)
        self.writable = True
        self.parts: dict[tuple[int, str], tuple[EmbeddingCache, str, list[str], list[Any]]] = {}
        self.images = 0
        self.bytes = 0
        self.last = time.monotonic()

    def add(self, store: EmbeddingCache, ns: str, keys: list[str], rows: Any) -> None:
        """Queue ``rows`` (a tensor or an array ``[len(keys), D]``) for ``store`` under ``ns``."""
        if not self.writable or not keys:
            return
        if not is_tensor(rows):
            rows = torch.from_numpy(np.ascontiguousarray(rows))
        if store.dtype == "float16":
            rows = rows.to(torch.float16)
        part = self.parts.setdefault((id(store), ns), (store, ns, [], []))
        part[2].extend(keys)
        part[3].append(rows)
        self.bytes += rows.numel() * rows.element_size()

    def done(self, images: int) -> None:
        """``images`` more images were added: write everything if an interval is over."""
        self.images += images
        if (self.images >= _FLUSH_IMAGES or self.bytes >= _FLUSH_BYTES
                or time.monotonic() - self.last >= _FLUSH_SECONDS):
            self.flush()

    def flush(self) -> None:
        if self.writable:
            for store, ns, keys, rows in self.parts.values():
                if store.put(ns, keys, torch.cat(rows), self.record) is None:
                    self.writable = False
                    break
        self.parts.clear()
        self.images = self.bytes = 0
        self.last = time.monotonic()


def extract_features(
    encoder: "Encoder",
    source: Any,
    local: bool = False,
    cache: CacheArg = True,
    batch_size: int | None = None,
    num_workers: int | None = None,
    on_error: str = "raise",
    progress: bool | None = None,
    local_reducers: Mapping[str, LocalReducer] | None = None,
    cache_local: bool = False,
    **source_kwargs: Any,
) -> Features:
    """Encode every image of ``source`` once; cached features are read instead of recomputed.

    Args:
        encoder: the image encoder.
        source: anything :func:`vlmood.data.as_source` accepts (folder, glob, manifest, ``hf:NAME[:split]``,
            list of paths or PIL images, ``datasets.Dataset``).
        local: also return per-patch features ``[N, P, D]`` (all of them in memory: about 400 kB per image for a
            ViT-B/16; to score GL-MCM on large sets use ``local_reducers`` instead).
        cache: feature cache (``True``: ``$VLMOOD_CACHE/features``). Keys: encoder fingerprint, precision,
            preprocessing, and image identity (sha256 of the file's bytes, of an in-memory image's pixels, or
            of a dataset image's encoded bytes or of the file its path column names). Shards are written during
            the run (at least every 2,048 images or 60 seconds) and when it stops on an exception, Ctrl-C or
            SIGTERM, so an interrupted run resumes where it stopped; a killed one (SIGKILL) loses at most the
            last interval. A read-only or full cache folder gives one warning and no caching.
        batch_size: images per forward pass (default ``encoder.image_batch_size``).
        num_workers: DataLoader decoding workers (default ``min(4, cpus - 1)``).
        on_error: ``"raise"`` stops at the first unreadable image (or image whose features are NaN/Inf, which
            are never returned or cached); ``"skip"`` records it in ``errors``.
        progress: progress with an ETA (:mod:`vlmood._progress`: a bar on a terminal, plain lines elsewhere;
            ``None``: shown only when the encoding runs long, ``False``: never).
        local_reducers: ``{label: function}`` (:data:`LocalReducer`): each batch's patch features are handed to
            every function and then dropped, so memory does not grow with the number of images beyond the global
            features and the functions' values (``Features.reduced[label]``). With ``local=False`` (the bounded
            path, used by :meth:`vlmood.Benchmark.run`) patch features are never held for the whole set: the
            values of a reducer with a ``cache_key`` are cached (exactly; a warm run encodes nothing), patch
            features cached by an earlier ``local=True`` run are read back one shard at a time, and only the
            images still missing are encoded.
        cache_local: with ``local_reducers`` and ``local=False``, also keep the patch features in the cache as
            float16 (half the size of ``local=True``'s float32 ones), and read them back (only when this is True),
            so that other local reducers (another temperature, other classes) later run without encoding; values
            reduced from these float16 features differ from float32 ones by about 1e-3 and are not cached
            themselves. Off by default: a ViT-B/16 image takes about 200 kB on disk this way.

    Raises:
        ImageLoadError: an unreadable image or non-finite features, with ``on_error="raise"``.
        WorkerKilledError: a decoding worker was killed by the OS (out of memory); names the images in flight.
    """
    if on_error not in ("raise", "skip"):
        raise InvalidInputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    reducers = _check_reducers(local_reducers)
    if local or reducers:
        encoder.require_local()
    if batch_size is not None and batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers is not None and num_workers < 0:
        raise InvalidInputError(f"num_workers must be >= 0, got {num_workers}")
    src = as_source(source, **source_kwargs)
    n = len(src)
    if n == 0:
        raise InvalidInputError(f"image source {src.name!r} is empty")
    store = _feature_cache(cache)
    if reducers and not local:
        return _extract_reduced(encoder, src, reducers, store, cache_local, batch_size, num_workers, on_error,
                                progress)
    ns = feature_namespace(encoder, local)
    keys = src.identities() if store is not None else []
    vecs: dict[int, np.ndarray] = store.get_arrays(ns, keys) if store is not None else {}
    missing = [i for i in range(n) if i not in vecs]
    errors: dict[int, str] = {}
    d = encoder.embed_dim
    writer = _Writer(encoder) if store is not None else None

    def take(idx: list[int], g: torch.Tensor, loc: torch.Tensor | None) -> None:
        rows = torch.cat([g, loc.flatten(1)], dim=1) if loc is not None else g
        arr = rows.numpy()
        for k, i in enumerate(idx):
            vecs[i] = arr[k]
        if writer is not None:
            names = [keys[i] for i in idx]
            writer.add(store, ns, names, rows)
            if local:  # a later global-only run (MCM, Energy, ...) reuses these too
                writer.add(store, feature_namespace(encoder, False), names, g)

    if missing:
        _encode_or_die(encoder, src, missing, errors, local, batch_size, num_workers, on_error, progress, take, writer)

    order = [i for i in range(n) if i in vecs]
    if not order:
        raise InvalidInputError(f"no readable images in {src.name!r}: all {n} failed to load")
    rows = np.stack([vecs[i] for i in order]).astype(np.float32, copy=False)
    vecs.clear()
    g = np.ascontiguousarray(rows[:, :d])
    loc = np.ascontiguousarray(rows[:, d:].reshape(len(order), -1, d)) if local else None
    del rows
    feats = Features(
        features=g,
        local=loc,
        ids=[src.ids[i] for i in order],
        labels=[src.labels[i] for i in order] if src.labels is not None else None,
        errors=[(src.ids[i], errors[i]) for i in sorted(errors)],
        name=src.name,
    )
    if reducers and loc is not None:  # full local features asked for too: reduced batch by batch from them
        bs = batch_size or encoder.image_batch_size
        patches = feats.local  # the tensor reducers are given
        for label, fn in reducers.items():
            out = np.concatenate([_reduce(fn, label, patches[i : i + bs]) for i in range(0, len(order), bs)])
            feats.reduced[label] = np.ascontiguousarray(out[:, 0]) if out.shape[1] == 1 else out
            feats.reduced_keys[label] = getattr(fn, "cache_key", None)
    return feats


def _extract_reduced(encoder: "Encoder", src: ImageSource, reducers: dict[str, LocalReducer],
                     store: EmbeddingCache | None, cache_local: bool, batch_size: int | None,
                     num_workers: int | None, on_error: str, progress: bool | None) -> Features:
    """:func:`extract_features` with ``local_reducers`` and ``local=False``: global features and reduced values,
    never the patch features of more than one batch (or one cache shard) at a time."""
    n, d = len(src), encoder.embed_dim
    bs = batch_size or encoder.image_batch_size
    keys = src.identities() if store is not None else []
    g_ns = feature_namespace(encoder, False)
    red_ns = {label: reduced_namespace(encoder, fn.cache_key) for label, fn in reducers.items()
              if getattr(fn, "cache_key", None) is not None}
    # one block per output, filled as images come: no tensor per image, nothing between a batch's temporaries
    gbuf = np.empty((n, d), dtype=np.float32)
    have_g: set[int] = set()
    rbuf: dict[str, np.ndarray] = {}
    have_r: dict[str, set[int]] = {label: set() for label in reducers}
    writer = _Writer(encoder) if store is not None else None

    def put_values(label: str, idx: list[int], v: np.ndarray) -> None:
        if label not in rbuf:
            rbuf[label] = np.full((n, v.shape[1]), np.nan, dtype=np.float64)
        elif rbuf[label].shape[1] != v.shape[1]:
            raise InvalidInputError(f"local reducer {label!r} returned {v.shape[1]} value(s) per image, and "
                                    f"{rbuf[label].shape[1]} before (or in the cache under its cache_key)")
        rbuf[label][idx] = v
        have_r[label].update(idx)

    if store is not None:  # numpy arrays: a fully cached run needs no torch
        cached = store.get_arrays(g_ns, keys)
        if cached:
            gbuf[list(cached)] = np.stack(list(cached.values()))
            have_g.update(cached)
        for label, ns in red_ns.items():
            cached = store.get_arrays(ns, keys)
            if cached:
                put_values(label, list(cached), _unpack_f64(np.stack(list(cached.values()))))
        del cached

    def complete(i: int) -> bool:
        return i in have_g and all(i in h for h in have_r.values())

    def take_reduced(idx: list[int], loc: torch.Tensor, exact: bool) -> None:  # loc: a tensor, as reducers get
        for label, fn in reducers.items():
            fresh = [k for k, i in enumerate(idx) if i not in have_r[label]]
            if not fresh:  # cached already (another reducer's values were missing)
                continue
            v = _reduce(fn, label, loc)
            put_values(label, [idx[k] for k in fresh], v[fresh])
            # never values of float16 patch features, and only into a float32 store: the packed float64 parts
            # (integers up to 2^22) would overflow or round in a float16 one
            if writer is not None and exact and label in red_ns and store.dtype == "float32":
                ok = [k for k in fresh if bool(np.isfinite(v[k]).all())]
                if ok:
                    writer.add(store, red_ns[label], [keys[idx[k]] for k in ok], _pack_f64(v[ok]))

    def take_global(idx: list[int], g: Any) -> list[int]:
        new = [k for k, i in enumerate(idx) if i not in have_g]
        if new:
            gbuf[[idx[k] for k in new]] = as_array(g, np.float32)[new]
            have_g.update(idx[k] for k in new)
        return new

    def take(idx: list[int], g: torch.Tensor, loc: torch.Tensor | None) -> None:  # a freshly encoded batch
        new = take_global(idx, g)
        take_reduced(idx, loc, exact=True)
        if writer is not None:
            writer.add(store, g_ns, [keys[idx[k]] for k in new], g[new])
            if cache_local:
                writer.add(_half_cache(store), _patch_namespace(encoder), [keys[i] for i in idx], loc.flatten(1))

    errors: dict[int, str] = {}
    try:
        todo = [i for i in range(n) if not complete(i)]
        if todo and store is not None:  # patch features cached by earlier runs, read back shard by shard
            exact = store.dtype == "float32"

            def from_full(idx: list[int], rows: np.ndarray) -> None:  # rows [b, D + P*D] of a local=True run
                take_global(idx, rows[:, :d])
                take_reduced(idx, torch.from_numpy(np.ascontiguousarray(rows[:, d:]).reshape(len(idx), -1, d)),
                             exact)

            _read_cached(store, feature_namespace(encoder, True), keys, todo, bs, from_full)
            todo = [i for i in todo if not complete(i)]
            # float16 patches (no global part: the exact one is cached) only for a caller who keeps them
            # (cache_local=True): a default run never gets scores ~1e-3 away from a cold run's without asking
            half = [i for i in todo if i in have_g] if cache_local else []
            _read_cached(_half_cache(store), _patch_namespace(encoder), keys, half, bs,
                         lambda idx, rows: take_reduced(idx, torch.from_numpy(rows.reshape(len(idx), -1, d)), False))
            todo = [i for i in todo if not complete(i)]
        if todo:
            _encode_or_die(encoder, src, todo, errors, True, batch_size, num_workers, on_error, progress, take,
                           writer)
    finally:
        if writer is not None:
            writer.flush()  # values reduced from cached patch features

    order = [i for i in range(n) if complete(i)]
    if not order:
        raise InvalidInputError(f"no readable images in {src.name!r}: all {n} failed to load")
    pick = (lambda t: t) if len(order) == n else (lambda t: t[order])
    return Features(
        features=pick(gbuf),
        local=None,
        ids=[src.ids[i] for i in order],
        labels=[src.labels[i] for i in order] if src.labels is not None else None,
        errors=[(src.ids[i], errors[i]) for i in sorted(errors)],
        name=src.name,
        reduced={label: np.ascontiguousarray(pick(rbuf[label][:, 0] if rbuf[label].shape[1] == 1 else rbuf[label]))
                 for label in reducers},
        reduced_keys={label: getattr(fn, "cache_key", None) for label, fn in reducers.items()},
    )


def _read_cached(store: EmbeddingCache, ns: str, keys: list[str], wanted: list[int], bs: int,
                 use: Callable[[list[int], np.ndarray], None]) -> None:
    """Hand the cached float32 rows (numpy) of the ``wanted`` images to ``use(indices, rows)``, at most ``bs`` rows at a
    time and one cache shard at a time (unlike :meth:`EmbeddingCache.get`, which returns every hit at once).
    Shards are checked as ``get`` checks them; non-finite rows are never handed over."""
    if not wanted:
        return
    folder = store.folder(ns)
    try:
        if not folder.is_dir():
            return
        shards = sorted(folder.glob("*.safetensors"))
        index = store._read_index(folder) or {}
    except OSError as e:
        store._warn_once("read", e)
        return
    want: dict[bytes, list[int]] = {}
    for i in wanted:
        want.setdefault(prompt_key(keys[i]), []).append(i)
    for shard in shards:
        if not want:
            break
        loaded = store._load_hits(shard, index.get(shard.name), want)  # one shard in memory, checksum verified
        if loaded is None:
            continue
        hits, emb = loaded
        pairs = [(i, r) for kb, r in hits.items() for i in want.pop(kb)]
        for s in range(0, len(pairs), bs):
            chunk = pairs[s : s + bs]
            rows = emb[[r for _, r in chunk]].astype(np.float32)
            finite = np.isfinite(rows).all(axis=1)
            if not bool(finite.all()):
                rows = rows[finite]
            idx = [i for (i, _), ok in zip(chunk, finite.tolist()) if ok]
            if idx:
                use(idx, rows)
        del hits, emb, loaded


_libc: Any = None


def _trim() -> None:
    """Give the memory freed by a batch back to the operating system (glibc's ``malloc_trim``; elsewhere nothing).

    A batch's large tensors (images, patch features) are freed after it, but glibc keeps most of the freed heap
    between the small allocations that stay (each image's global features), so without this the resident size
    grows by tens of kB per image although nothing is held."""
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            with contextlib.suppress(Exception):
                import ctypes

                libc = ctypes.CDLL(None)
                _libc = libc if hasattr(libc, "malloc_trim") else False
    if _libc:
        _libc.malloc_trim(0)


def _names(src: ImageSource, indices: Sequence[int]) -> str:
    shown = ", ".join(printable(src.ids[i]) for i in indices[:_MAX_NAMED])
    return shown + (f" and {len(indices) - _MAX_NAMED} more" if len(indices) > _MAX_NAMED else "")


def _encode_or_die(*args: Any) -> None:
    """:func:`_encode_missing` with SIGTERM/SIGHUP unwinding it (so what was encoded is flushed to the cache first),
    then the process dies of that signal as it would have."""
    try:
        with _signals_unwind():
            _encode_missing(*args)
    except _Signalled as s:
        _signals._die_of(s.signum)


def _encode_missing(encoder: "Encoder", src: ImageSource, missing: list[int], errors: dict[int, str], local: bool,
                    batch_size: int | None, num_workers: int | None, on_error: str, progress: bool | None,
                    take: Callable[[list[int], torch.Tensor, torch.Tensor | None], None],
                    writer: _Writer | None) -> None:
    """Decode and encode the ``missing`` images; ``take(indices, global, local)`` receives the finite rows of each
    batch (and adds what is to be cached to ``writer``), ``errors`` the unreadable and non-finite images.

    Whatever stops the loop (an unreadable image with ``on_error="raise"``, an exception in the encoder,
    Ctrl-C, SIGTERM, a killed decoding worker), the features computed so far are flushed to the cache first.
    """
    bs = batch_size or encoder.image_batch_size
    workers = _default_workers() if num_workers is None else num_workers
    if len(missing) <= bs:
        workers = 0  # not worth starting processes
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _Decoded(src, missing, encoder.preprocess), batch_size=bs, num_workers=workers, collate_fn=_collate,
        pin_memory=encoder.device.type == "cuda", persistent_workers=False,
    )
    received = 0  # batches received from the loader (sequential sampler: batch b holds missing[b*bs:(b+1)*bs])

    start = f"encoding {len(missing):,} images of {printable(src.name)} with {encoder.spec}"
    if len(missing) < len(src):
        start += f" ({len(src) - len(missing):,} already cached)"
    if writer is not None:
        start += " — first time only, cached afterwards"
    it = iter(loader)  # held, so that its workers are shut down before the flush (see finally)
    try:
        with _progress(len(missing), f"encoding {printable(src.name)}", "images", progress, start=start) as bar:
            for idx, batch, bad in it:
                received += 1
                for i, msg in bad:
                    if on_error == "raise":
                        raise ImageLoadError(msg)
                    errors[i] = msg
                if batch is not None:
                    with warnings.catch_warnings():  # non-finite rows are reported below as image errors
                        warnings.filterwarnings("ignore", message=r".*gave non-finite features", category=UserWarning)
                        out = encoder.encode_images(batch, local=local)
                    g, loc = out if local else (out, None)
                    finite = torch.isfinite(g).all(dim=1)
                    if loc is not None:
                        finite &= torch.isfinite(loc).flatten(1).all(dim=1)
                    ok = finite.tolist()
                    good = [k for k, f in enumerate(ok) if f]
                    if good:
                        if len(good) < len(ok):
                            g, loc = g[good], (loc[good] if loc is not None else None)
                        take([idx[k] for k in good], g, loc)
                        if writer is not None:
                            writer.done(len(good))
                    del out, g, loc
                    for k, f in enumerate(ok):  # never a feature, never cached: like an unreadable image
                        if not f:
                            msg = (f"non-finite features (NaN/Inf) for image {printable(src.ids[idx[k]])}: the "
                                   "encoder overflowed (fp16? use fp32 precision) or its weights are broken")
                            if on_error == "raise":
                                raise ImageLoadError(msg)
                            errors[idx[k]] = msg
                del batch
                _trim()
                bar.update(len(idx) + len(bad))
    except RuntimeError as e:
        if isinstance(e.__context__, _Signalled):  # workers killed by the same SIGTERM (sent to the group)
            raise e.__context__ from None
        if workers == 0 or not str(e).startswith("DataLoader worker"):
            raise
        prefetch = loader.prefetch_factor or 2
        first, last = received * bs, min(len(missing), (received + workers * prefetch) * bs)
        in_flight = missing[first:last]
        cached = writer is not None and writer.writable
        saved = "the images encoded before it are cached, so a re-run resumes there" if cached else "re-run"
        raise WorkerKilledError(
            f"a decoding worker was killed by the operating system ({str(e).strip()}), most likely for lack of "
            f"memory, while decoding {len(in_flight)} image(s): {_names(src, in_flight)}; {saved} (if it "
            "happens again, decode in the main process with num_workers=0, CLI --workers 0, or use a smaller "
            "batch size)"
        ) from e
    finally:
        # Shut the workers down here: left to the iterator's __del__, workers killed by a signal sent to the whole
        # process group (SIGTERM, Ctrl-C) make it print "Exception ignored in ... DataLoader worker (pid N) is
        # killed by signal" and a traceback. Shutting down stops those reports (a RuntimeError raised meanwhile
        # is that same report).
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            with contextlib.suppress(Exception):
                shutdown()
        del it
        if writer is not None:
            writer.flush()  # keep what was computed, whatever stopped the loop


def local_plan(detectors: Mapping[str, Any]) -> tuple[bool, dict[str, LocalReducer]]:
    """How to extract features for ``{label: detector}``: ``(full, reducers)``, where ``reducers`` maps the label
    of every detector that reduces patch features batch by batch (``detector.local_reducer()``, e.g. GL-MCM) to
    its function, and ``full`` says whether some other detector needs the whole ``[N, P, D]`` local features.
    Pass them as ``extract_features(..., local=full, local_reducers=reducers or None)``."""
    reducers: dict[str, LocalReducer] = {}
    full = False
    for label, det in detectors.items():
        if not getattr(det, "needs_local", False):
            continue
        make = getattr(det, "local_reducer", None)
        fn = make() if make is not None else None
        if fn is None:
            full = True
        else:
            reducers[label] = fn
    return full, reducers


def score_detector(detector: Any, features: Features, label: str) -> "np.ndarray":
    """``detector``'s scores of ``features``: from the values of its local reducer (``features.reduced[label]``,
    see :func:`local_plan`) when the patch features themselves were not kept, else ``score_features``."""
    if getattr(detector, "needs_local", False) and not features.has_local and label in features.reduced:
        stored = features.reduced_keys.get(label)
        if stored is not None:  # values of another detector's settings under the same label are never used
            make = getattr(detector, "local_reducer", None)
            fn = make() if make is not None else None
            if getattr(fn, "cache_key", None) != stored:
                raise InvalidInputError(
                    f"the {features.name!r} features' reduced values under {label!r} were computed by another "
                    f"detector's settings or text side (reducer {stored}, this detector's "
                    f"{getattr(fn, 'cache_key', None)}); extract the features again with this detector")
        return detector.score_reduced(features, features.reduced[label])
    return detector.score_features(features)
