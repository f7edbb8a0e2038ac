"""NegLabel costs on CPU with a random-init ViT-B-32 (timings depend on shapes, not on training).

Usage: python benchmarks/neglabel.py [--arch ViT-B-32] [--classes imagenet1k] [--images 64]

Reports: encoding the ~70k-word lexicon cold vs from the cache; mining 1000 classes x 70k words (time and peak
memory); the number of negatives mined; NegLabel's scoring cost (10k+ negatives, 100 groups) as a fraction of
image encoding for the same batch.
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import torch

import vlmood
from vlmood import lexicons, scores
from vlmood.negatives import mine


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--classes", default="imagenet1k")
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args()
    os.environ["VLMOOD_CACHE"] = tempfile.mkdtemp(prefix="vlmood-bench-")

    enc = vlmood.load_encoder(f"open_clip:{args.arch}/none", device="cpu")
    _ = enc.fingerprint
    lex = lexicons.load("neglabel")
    print(f"lexicon 'neglabel': {len(lex)} words {lex.counts()}; {args.arch} random init; "
          f"{torch.get_num_threads()} CPU threads")

    t0 = time.perf_counter()
    det = vlmood.NegLabel(enc, args.classes)
    det.fit()
    t_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    vlmood.NegLabel(enc, args.classes).fit()
    t_warm = time.perf_counter() - t0
    print(f"fit (encode {len(lex)} words + {len(det.classes)} classes, mine): cold {t_cold:7.1f} s | "
          f"cached {t_warm:6.2f} s ({t_cold / t_warm:.0f}x faster)")

    cand = det._embed_labels(list(lex.words), list(lex.pos))  # from the cache
    before = rss_mb()
    t0 = time.perf_counter()
    idx = mine(det.text_features, cand, 0.95, 0.15, groups=lex.pos)
    t_mine = time.perf_counter() - t0
    print(f"mining {len(det.classes)} classes x {len(lex)} words: {t_mine:.2f} s, peak RSS grew by "
          f"{max(0.0, rss_mb() - before):.0f} MB (the full similarity matrix would be "
          f"{len(det.classes) * len(lex) * 4 / 2**20:.0f} MB)")
    counts = {p: sum(1 for _, q in det.negatives_ if q == p) for p in ("noun", "adj")}
    print(f"negatives mined for {args.classes} (ID names removed first): {len(det.negatives_)} {counts} "
          f"(mine() on the whole lexicon without removal: {len(idx)})")

    images = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    feats = enc.encode_images(images, batch_size=args.images)
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(5):
        id_s, neg_s = feats @ det.text_features.T, feats @ det.negative_features.T
        scores.neglabel(id_s, neg_s, 0.01, 100, 0)
    t_score = (time.perf_counter() - t0) / 5
    print(f"batch of {args.images} images: encoding {t_enc:.2f} s | NegLabel scoring ({len(det.negatives_)} "
          f"negatives, 100 groups) {1000 * t_score:.1f} ms = {100 * t_score / t_enc:.2f}% of encoding (target <= 10%)")


if __name__ == "__main__":
    main()
