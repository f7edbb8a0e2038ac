"""NegLabel costs on CPU with a random-init ViT-B-32 (timings depend on shapes, not on training).

Usage: python benchmarks/neglabel.py [--arch ViT-B-32] [--classes imagenet1k] [--images 64]
                                    [--lexicon-limit N] [--lexicon-only]

Reports: the lexicon's prompts tokenised by open_clip's tokenizer and by vlmood's exact front end (fresh ones, same
ids); the lexicon's prompts (70,794: nouns ``the nice {}``, adjectives ``This is a {} photo``) encoded alone, cold
(no cache, a fresh tokeniser, ``compute_text_embeddings`` at the encoder's text batch size), with the tokenisation's
share (``--lexicon-limit N``: a seeded random sample of N prompts, the full lexicon's time projected from it;
``--lexicon-only``: stop there); encoding the lexicon in ``NegLabel.fit`` cold vs from the cache; mining 1000 classes
x 70k words (time and peak memory); the number of negatives mined; NegLabel's scoring cost (10k+ negatives, 100
groups) as a fraction of image encoding for the same batch.
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import tempfile
import time

import torch

import vlmood
from vlmood import lexicons, scores
from vlmood.negatives import mine


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lexicon_encoding(enc, limit: int | None = None) -> dict:
    """The NegLabel lexicon's prompts (or a seeded sample of ``limit``) encoded cold: no cache, the tokeniser's BPE
    cache as a fresh process has it; then the tokenisation alone (warm) for its share. The tokeniser's cache is left
    as it was found, so the ``NegLabel.fit`` timing after this stays cold."""
    from vlmood.text.embed import compute_text_embeddings
    from vlmood.text.prompts import fill, load_templates

    lex = lexicons.load("neglabel")
    noun, adj = load_templates("neglabel_noun")[0], load_templates("neglabel_adj")[0]
    prompts = [fill(noun if p == "noun" else adj, w) for w, p in zip(lex.words, lex.pos)]
    full = len(prompts)
    if limit is not None and limit < full:
        prompts = random.Random(0).sample(prompts, limit)
    cache = getattr(enc.tokenizer, "cache", None)
    saved = dict(cache) if isinstance(cache, dict) else None
    memo = getattr(enc.tokenizer, "_ids", None)  # vlmood's front end (vlmood.encoders.bpe): its per-word ids
    saved_memo = dict(memo) if isinstance(memo, dict) else None
    t0, c0 = time.perf_counter(), time.process_time()
    emb = compute_text_embeddings(enc, prompts, progress=False)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    _, lengths = enc.tokenize(prompts)
    tok_warm = time.perf_counter() - t0
    if saved is not None:
        cache.clear()
        cache.update(saved)
    if saved_memo is not None:
        memo.clear()
        memo.update(saved_memo)
    return {"prompts": len(prompts), "full": full, "seconds": total, "cpu_seconds": cpu, "tokenize_warm_s": tok_warm,
            "mean_tokens": sum(lengths) / len(lengths), "batch_size": enc.text_batch_size,
            "finite": bool(torch.isfinite(emb).all()), "full_projected_s": total * full / len(prompts)}


def tokenisation(arch: str) -> dict:
    """The whole lexicon's prompts tokenised by fresh tokenisers: open_clip's own and vlmood's exact front end
    (:mod:`vlmood.encoders.bpe`); the ids must be equal."""
    import open_clip

    from vlmood.encoders.bpe import FastCLIPTokenizer, fast_tokenizer
    from vlmood.text.prompts import fill, load_templates

    lex = lexicons.load("neglabel")
    noun, adj = load_templates("neglabel_noun")[0], load_templates("neglabel_adj")[0]
    prompts = [fill(noun if p == "noun" else adj, w) for w, p in zip(lex.words, lex.pos)]
    t0 = time.perf_counter()
    ref = open_clip.get_tokenizer(arch)(prompts)
    t_ref = time.perf_counter() - t0
    fast = fast_tokenizer(open_clip.get_tokenizer(arch))
    t0 = time.perf_counter()
    ids = fast(prompts)
    t_fast = time.perf_counter() - t0
    return {"prompts": len(prompts), "open_clip_s": t_ref, "vlmood_s": t_fast,
            "wrapped": isinstance(fast, FastCLIPTokenizer), "equal": bool(torch.equal(ref, ids))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--classes", default="imagenet1k")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--lexicon-limit", type=int, default=None, help="encode a seeded random sample of this many "
                    "lexicon prompts in the first measurement (the full lexicon's time is projected)")
    ap.add_argument("--lexicon-only", action="store_true", help="stop after the lexicon encoding measurement")
    args = ap.parse_args()
    os.environ["VLMOOD_CACHE"] = tempfile.mkdtemp(prefix="vlmood-bench-")

    enc = vlmood.load_encoder(f"open_clip:{args.arch}/none", device="cpu")
    _ = enc.fingerprint
    lex = lexicons.load("neglabel")
    print(f"lexicon 'neglabel': {len(lex)} words {lex.counts()}; {args.arch} random init; "
          f"{torch.get_num_threads()} CPU threads")

    t = tokenisation(args.arch)
    print(f"tokenising the lexicon's {t['prompts']:,} prompts, fresh tokenisers: open_clip {t['open_clip_s']:.2f} s, "
          f"vlmood {t['vlmood_s']:.2f} s ({t['open_clip_s'] / t['vlmood_s']:.1f}x faster; ids equal: {t['equal']})",
          flush=True)
    r = lexicon_encoding(enc, args.lexicon_limit)
    sample = f" (a random sample of the {r['full']:,})" if r["prompts"] < r["full"] else ""
    print(f"lexicon encoding alone, cold (no cache, fresh tokeniser; trimmed {enc.precision}, batch {r['batch_size']},"
          f" {r['mean_tokens']:.1f} tokens per prompt): {r['prompts']:,} prompts{sample} in {r['seconds']:.1f} s = "
          f"{r['prompts'] / r['seconds']:,.0f} prompts/s ({r['cpu_seconds']:.1f} s of CPU time, all threads), of "
          f"which tokenisation ~{r['tokenize_warm_s']:.1f} s (warm BPE cache; cold is slower)"
          + (f"; full lexicon projected {r['full_projected_s']:.0f} s" if sample else ""),
          flush=True)
    if args.lexicon_only:
        return

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
