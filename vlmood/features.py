"""Image features, computed once per (encoder, image) and cached on disk, then scored by any number of detectors."""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from ._io import printable
from ._progress import progress as _progress
from .data import ImageSource, as_source
from . import _signals
from ._signals import _signals_unwind, _Signalled
from .errors import ImageLoadError, InvalidInputError, WorkerKilledError
from .text.cache import EmbeddingCache, encoder_record
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


@dataclass
class Features:
    """Encoded images.

    Attributes:
        features: ``[N, D]`` L2-normalised global image features (float32, CPU).
        local: ``[N, P, D]`` L2-normalised patch features, or None.
        ids: ``N`` image ids (paths, or ``name[i]`` for in-memory / dataset images).
        labels: ``N`` raw labels (class names or indices) or None when the source has none.
        errors: ``(id, message)`` of each image skipped with ``on_error="skip"`` (not in ``features``).
        name: the source's name.
    """

    features: torch.Tensor
    local: torch.Tensor | None
    ids: list[str]
    labels: list[Any] | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)
    name: str = "images"

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __repr__(self) -> str:
        loc = f", local {tuple(self.local.shape)}" if self.local is not None else ""
        return f"Features({self.name!r}: {tuple(self.features.shape)}{loc}, {len(self.errors)} skipped)"


class _Decoded(Dataset):
    """Decodes and preprocesses the selected images of a source inside DataLoader workers."""

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
    return f"{encoder.fingerprint}|{encoder.precision}|{encoder.preprocess_key}|{'local' if local else 'global'}|" \
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


def extract_features(
    encoder: "Encoder",
    source: Any,
    local: bool = False,
    cache: CacheArg = True,
    batch_size: int | None = None,
    num_workers: int | None = None,
    on_error: str = "raise",
    progress: bool | None = None,
    **source_kwargs: Any,
) -> Features:
    """Encode every image of ``source`` once; cached features are read instead of recomputed.

    Args:
        encoder: the image encoder.
        source: anything :func:`vlmood.data.as_source` accepts (folder, glob, manifest, ``hf:NAME[:split]``,
            list of paths or PIL images, ``datasets.Dataset``).
        local: also compute per-patch features ``[N, P, D]`` (GL-MCM).
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

    Raises:
        ImageLoadError: an unreadable image or non-finite features, with ``on_error="raise"``.
        WorkerKilledError: a decoding worker was killed by the OS (out of memory); names the images in flight.
    """
    if on_error not in ("raise", "skip"):
        raise InvalidInputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if local:
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
    ns = feature_namespace(encoder, local)
    keys = src.identities() if store is not None else []
    vecs: dict[int, torch.Tensor] = store.get(ns, keys) if store is not None else {}
    missing = [i for i in range(n) if i not in vecs]
    errors: dict[int, str] = {}
    d = encoder.embed_dim

    if missing:
        try:
            with _signals_unwind():
                _encode_missing(encoder, src, missing, keys, vecs, errors, store, ns, local, batch_size,
                                num_workers, on_error, progress)
        except _Signalled as s:
            _signals._die_of(s.signum)

    order = [i for i in range(n) if i in vecs]
    if not order:
        raise InvalidInputError(f"no readable images in {src.name!r}: all {n} failed to load")
    rows = torch.stack([vecs[i] for i in order])
    g = rows[:, :d].contiguous()
    loc = rows[:, d:].reshape(len(order), -1, d).contiguous() if local else None
    return Features(
        features=g,
        local=loc,
        ids=[src.ids[i] for i in order],
        labels=[src.labels[i] for i in order] if src.labels is not None else None,
        errors=[(src.ids[i], errors[i]) for i in sorted(errors)],
        name=src.name,
    )


def _names(src: ImageSource, indices: Sequence[int]) -> str:
    shown = ", ".join(printable(src.ids[i]) for i in indices[:_MAX_NAMED])
    return shown + (f" and {len(indices) - _MAX_NAMED} more" if len(indices) > _MAX_NAMED else "")


def _encode_missing(encoder: "Encoder", src: ImageSource, missing: list[int], keys: list[str],
                    vecs: dict[int, torch.Tensor], errors: dict[int, str], store: EmbeddingCache | None, ns: str,
                    local: bool, batch_size: int | None, num_workers: int | None, on_error: str,
                    progress: bool | None) -> None:
    """Decode and encode the ``missing`` images into ``vecs``/``errors``, writing cache shards as it goes.

    Whatever stops the loop (an unreadable image with ``on_error="raise"``, an exception in the encoder,
    Ctrl-C, SIGTERM, a killed decoding worker), the features computed so far are flushed to the cache first.
    """
    d = encoder.embed_dim
    bs = batch_size or encoder.image_batch_size
    workers = _default_workers() if num_workers is None else num_workers
    if len(missing) <= bs:
        workers = 0  # not worth starting processes
    loader = DataLoader(
        _Decoded(src, missing, encoder.preprocess), batch_size=bs, num_workers=workers, collate_fn=_collate,
        pin_memory=encoder.device.type == "cuda", persistent_workers=False,
    )
    writable = store is not None  # False after a failed write (read-only folder, full disk: warned once)
    pending_keys: list[str] = []
    pending: list[torch.Tensor] = []
    pending_bytes = 0
    last_flush = time.monotonic()
    received = 0  # batches received from the loader (sequential sampler: batch b holds missing[b*bs:(b+1)*bs])

    def flush() -> None:
        nonlocal pending_bytes, last_flush, writable
        if writable and pending:
            rows = torch.cat(pending)
            record = encoder_record(encoder)
            ok = store.put(ns, pending_keys, rows, record) is not None
            if ok and local:  # a later global-only run (MCM, Energy, ...) reuses these too
                ok = store.put(feature_namespace(encoder, False), pending_keys, rows[:, :d], record) is not None
            writable = ok
        pending_keys.clear()
        pending.clear()
        pending_bytes = 0
        last_flush = time.monotonic()

    start = f"encoding {len(missing):,} images of {printable(src.name)} with {encoder.spec}"
    if len(missing) < len(src):
        start += f" ({len(src) - len(missing):,} already cached)"
    if store is not None:
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
                    rows = torch.cat([g, loc.flatten(1)], dim=1) if loc is not None else g
                    finite = torch.isfinite(rows).all(dim=1).tolist()
                    good = [k for k, ok in enumerate(finite) if ok]
                    for k in good:
                        vecs[idx[k]] = rows[k]
                    if writable and good:
                        pending_keys.extend(keys[idx[k]] for k in good)
                        pending.append(rows[good])
                        pending_bytes += len(good) * rows.shape[1] * 4
                        if (len(pending_keys) >= _FLUSH_IMAGES or pending_bytes >= _FLUSH_BYTES
                                or time.monotonic() - last_flush >= _FLUSH_SECONDS):
                            flush()
                    for k, ok in enumerate(finite):  # never a feature, never cached: like an unreadable image
                        if not ok:
                            msg = (f"non-finite features (NaN/Inf) for image {printable(src.ids[idx[k]])}: the "
                                   "encoder overflowed (fp16? use fp32 precision) or its weights are broken")
                            if on_error == "raise":
                                raise ImageLoadError(msg)
                            errors[idx[k]] = msg
                bar.update(len(idx) + len(bad))
    except RuntimeError as e:
        if isinstance(e.__context__, _Signalled):  # workers killed by the same SIGTERM (sent to the group)
            raise e.__context__ from None
        if workers == 0 or not str(e).startswith("DataLoader worker"):
            raise
        prefetch = loader.prefetch_factor or 2
        first, last = received * bs, min(len(missing), (received + workers * prefetch) * bs)
        in_flight = missing[first:last]
        saved = "the images encoded before it are cached, so a re-run resumes there" if writable else "re-run"
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
        flush()  # keep what was computed, whatever stopped the loop
