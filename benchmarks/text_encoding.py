"""Text encoding: naive full-context ``encode_text`` vs vlmood's length-trimmed batches, and a cache hit.

Usage: python benchmarks/text_encoding.py [--n 5000] [--arch ViT-B-32] [--batch-size 256]

Random-init weights (``open_clip:ARCH/none``) on CPU: timings depend on shapes, not on training.
Prompts are WordNet-style lemmas of 1-3 words (drawn reproducibly from the CLIP BPE vocabulary)
in NegLabel's template ``the nice {}``.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import vlmood
from vlmood.text import EmbeddingCache, embed_texts


def wordnet_style_prompts(tokenizer, n: int, seed: int = 0) -> list[str]:
    words = sorted(w[:-4] for w in tokenizer.encoder if w.endswith("</w>") and w[:-4].isalpha() and len(w) >= 7)
    rng = np.random.default_rng(seed)
    lemmas: set[str] = set()
    while len(lemmas) < n:
        lemmas.add(" ".join(rng.choice(words, size=rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))))
    return [f"the nice {w}" for w in sorted(lemmas)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()

    enc = vlmood.load_encoder(f"open_clip:{args.arch}/none", device="cpu")
    prompts = wordnet_style_prompts(enc.tokenizer, args.n)
    _, lengths = enc.tokenize(prompts)
    print(f"{len(prompts)} prompts, token length min/median/max = {min(lengths)}/{int(np.median(lengths))}/{max(lengths)}"
          f" (context {enc.context_length}); {torch.get_num_threads()} CPU threads; {args.arch} random init")
    _ = enc.fingerprint  # hashed once per encoder, not part of the comparison

    t0 = time.perf_counter()
    naive = []
    with torch.inference_mode():
        for i in range(0, len(prompts), args.batch_size):
            naive.append(F.normalize(enc.model.encode_text(enc.tokenizer(prompts[i : i + args.batch_size])), dim=-1))
    naive_t = time.perf_counter() - t0
    naive_e = torch.cat(naive)

    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        ours = embed_texts(enc, prompts, batch_size=args.batch_size, cache=EmbeddingCache(root))  # cold: computes + stores
        ours_t = time.perf_counter() - t0
        t0 = time.perf_counter()
        hit = embed_texts(enc, prompts, batch_size=args.batch_size, cache=EmbeddingCache(root))  # fresh reader: disk hit
        hit_t = time.perf_counter() - t0

    diff = (ours - naive_e).abs().max().item()
    print(f"naive full-context encode_text : {naive_t:8.2f} s")
    print(f"vlmood (trimmed, cold cache)   : {ours_t:8.2f} s   speed-up {naive_t / ours_t:5.1f}x")
    print(f"vlmood cache hit               : {hit_t:8.3f} s   {ours_t / hit_t:7.0f}x faster than computing")
    print(f"max |vlmood - naive|           : {diff:.2e}   (cache hit identical: {torch.equal(hit, ours)})")


if __name__ == "__main__":
    main()
