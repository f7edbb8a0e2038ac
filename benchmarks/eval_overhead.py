"""Evaluation overhead, as ratios measured in one run on this machine (random-init ViT-B-32, CPU).

Usage: python benchmarks/eval_overhead.py [--n-id 192] [--n-ood 96] [--arch ViT-B-32]

1. Six detectors vs one on the same images (no feature cache): the images are encoded once either way.
2. ``extract_features`` throughput (decode + preprocess in DataLoader workers, overlapped with the model)
   vs a bare ``encode_images`` loop over already decoded and preprocessed tensors.
3. A re-run with a warm feature cache vs the cold run.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vlmood
from vlmood.data import list_images, load_image


def make_jpegs(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(0, 255, (1, 1, 3))
        img = np.clip(base + rng.normal(0, 40, (300, 400, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:04d}.jpg", quality=90)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-id", type=int, default=192)
    ap.add_argument("--n-ood", type=int, default=96)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["VLMOOD_CACHE"] = str(tmp / "cache")
        for c in ("cat", "dog"):
            make_jpegs(tmp / "id" / c, args.n_id // 2, seed=hash(c) % 1000)
        make_jpegs(tmp / "ood_a", args.n_ood, 7)
        make_jpegs(tmp / "ood_b", args.n_ood, 8)
        enc = vlmood.load_encoder(f"open_clip:{args.arch}/none", device="cpu")
        _ = enc.fingerprint
        bench = vlmood.Benchmark(id=tmp / "id", ood={"near": {"a": tmp / "ood_a"}, "far": {"b": tmp / "ood_b"}},
                                 classes=["cat", "dog"])
        n_total = args.n_id + 2 * args.n_ood
        six = {"mcm": "mcm", "glmcm": "glmcm", "energy": "energy", "maxlogit": "maxlogit",
               "mcm_T0.01": {"method": "mcm", "temperature": 0.01}, "energy_T10": {"method": "energy", "temperature": 10}}
        kw = dict(batch_size=args.batch_size, progress=False)
        # warm up text embeddings and the interpreter so that neither run pays for them
        bench.run(enc, six, cache=False, features=bench.extract(enc, local=True, cache=False, **kw), progress=False)

        t_one, _ = timed(lambda: bench.run(enc, ["glmcm"], cache=False, **kw))
        t_six, _ = timed(lambda: bench.run(enc, six, cache=False, **kw))
        t_mcm, _ = timed(lambda: bench.run(enc, ["mcm"], cache=False, **kw))
        print(f"{n_total} images ({args.arch} random init, {torch.get_num_threads()} threads, batch {args.batch_size})")
        print(f"1. 1 detector (GL-MCM): {t_one:7.2f} s | 6 detectors: {t_six:7.2f} s | ratio {t_six / t_one:.2f}x"
              " (target <= 1.3x)")
        print(f"   vs MCM alone (global features only, no patch features): {t_mcm:7.2f} s | ratio {t_six / t_mcm:.2f}x")

        paths = [it.path for it in list_images(tmp / "id")]
        decoded = torch.stack([enc.preprocess(load_image(p)) for p in paths])
        t_bare, _ = timed(lambda: enc.encode_images(decoded, batch_size=args.batch_size))
        t_ext, _ = timed(lambda: vlmood.extract_features(enc, tmp / "id", cache=False, **kw))
        print(f"2. bare encode_images on decoded tensors: {len(paths) / t_bare:6.1f} img/s | extract_features from JPEG "
              f"files: {len(paths) / t_ext:6.1f} img/s | throughput {100 * t_bare / t_ext:.0f}% (target >= 85%)")

        t_cold, _ = timed(lambda: bench.run(enc, six, cache=True, **kw))
        t_warm, _ = timed(lambda: bench.run(enc, six, cache=True, **kw))
        print(f"3. cold run with feature cache: {t_cold:7.2f} s | warm re-run: {t_warm:6.3f} s | "
              f"{100 * t_warm / t_cold:.1f}% of cold (target < 5%)")


if __name__ == "__main__":
    main()
