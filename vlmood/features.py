"""Image features, computed once per (encoder, image) and cached on disk, then scored by any number of detectors."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data import ImageSource, as_source
from .errors import ImageLoadError, InvalidInputError
from .text.cache import EmbeddingCache
from .text.embed import CacheArg

if TYPE_CHECKING:
    from .encoders.base import Encoder

_FEATURE_ENGINE_VERSION = "feat-v1"
_FLUSH_BYTES = 128 << 20  # write a cache shard at least every ~128 MB of new features (resumable runs)


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
            preprocessing, and image identity (path + size + mtime, or a content hash). Shards are written
            during the run, so an interrupted run resumes where it stopped.
        batch_size: images per forward pass (default ``encoder.image_batch_size``).
        num_workers: DataLoader decoding workers (default ``min(4, cpus - 1)``).
        on_error: ``"raise"`` stops at the first unreadable image; ``"skip"`` records it in ``errors``.
        progress: progress bar with ETA (``None``: on a terminal).
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
    keys = [src.identity(i) for i in range(n)] if store is not None else []
    vecs: dict[int, torch.Tensor] = store.get(ns, keys) if store is not None else {}
    missing = [i for i in range(n) if i not in vecs]
    errors: dict[int, str] = {}
    d = encoder.embed_dim

    if missing:
        bs = batch_size or encoder.image_batch_size
        workers = _default_workers() if num_workers is None else num_workers
        if len(missing) <= bs:
            workers = 0  # not worth starting processes
        loader = DataLoader(
            _Decoded(src, missing, encoder.preprocess), batch_size=bs, num_workers=workers, collate_fn=_collate,
            pin_memory=encoder.device.type == "cuda", persistent_workers=False,
        )
        pending_keys: list[str] = []
        pending: list[torch.Tensor] = []
        pending_bytes = 0

        def flush() -> None:
            nonlocal pending_bytes
            if store is not None and pending:
                rows = torch.cat(pending)
                store.put(ns, pending_keys, rows)
                if local:  # a later global-only run (MCM, Energy, ...) reuses these too
                    store.put(feature_namespace(encoder, False), pending_keys, rows[:, :d])
            pending_keys.clear()
            pending.clear()
            pending_bytes = 0

        disable = (not progress) if progress is not None else None
        with tqdm(total=len(missing), desc=f"encoding {src.name}", unit="img", disable=disable, leave=False,
                  file=sys.stderr) as bar:
            for idx, batch, bad in loader:
                for i, msg in bad:
                    if on_error == "raise":
                        flush()
                        raise ImageLoadError(msg)
                    errors[i] = msg
                if batch is not None:
                    out = encoder.encode_images(batch, local=local)
                    g, loc = out if local else (out, None)
                    rows = torch.cat([g, loc.flatten(1)], dim=1) if loc is not None else g
                    for k, i in enumerate(idx):
                        vecs[i] = rows[k]
                    if store is not None:
                        pending_keys.extend(keys[i] for i in idx)
                        pending.append(rows)
                        pending_bytes += rows.numel() * 4
                        if pending_bytes >= _FLUSH_BYTES:
                            flush()
                bar.update(len(idx) + len(bad))
        flush()

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
