"""Throughput of the Ray Data engine (vlmood.scale.score_with_ray) vs the single process, same images, one run.

Usage: python benchmarks/ray_throughput.py [--n 1000] [--model toyworld] [--workers 2] [--size 256]

The same ``--n`` toy-world images (rendered, resized to ``--size`` px, saved as JPEG) are scored with MCM, GL-MCM
and NegLabel (the world's lexicon) by
  1. the single process: ``extract_features`` (DataLoader decoding workers, feature cache off) + ``score_features``,
     model load and text side included;
  2. ``score_with_ray`` with ``--workers`` scoring actors of 1 CPU each on a local Ray started beforehand with
     ``workers + 1`` logical CPUs (actors + one decoding task at a time); Ray's start is timed apart. Run twice:
     the first call also starts the Ray worker processes that decode (later calls reuse them); the actors are
     started by every call.
Prints images/s of each and the ratio, the CPU count and the load average (the machine may be shared), and the
largest score difference between the two paths (they must agree to 1e-6).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--model", default="toyworld")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=256, help="side of the saved JPEGs (the toy world renders 64 px)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    import ray
    from PIL import Image

    import vlmood
    from vlmood.features import extract_features
    from vlmood.scale import score_with_ray
    from vlmood.toyworld import ID_SHAPES, OOD_SHAPES, lexicon_dir, load_images

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["VLMOOD_CACHE"] = str(tmp / "cache")  # cold text cache for both paths alike
        folder = tmp / "images"
        folder.mkdir()
        half = args.n // 2
        imgs = load_images(1, half, ID_SHAPES)[0] + load_images(2, args.n - half, OOD_SHAPES)[0]
        for i, im in enumerate(imgs):
            im.resize((args.size, args.size), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
        classes = list(ID_SHAPES)
        neg = {"lexicon": str(lexicon_dir()), "ratio": 0.5, "ngroups": 1}
        methods = ["mcm", "glmcm", "neglabel"]

        # 1. the single process, end to end (model, text side, decoding, encoding, scoring)
        t0 = time.perf_counter()
        enc = vlmood.load_encoder(args.model, device="cpu")
        dets = {m: vlmood.make_detector(m, enc, classes, **(neg if m == "neglabel" else {})).fit() for m in methods}
        feats = extract_features(enc, folder, local=True, cache=False, batch_size=args.batch_size, progress=False)
        single = {m: dict(zip(feats.ids, d.score_features(feats))) for m, d in dets.items()}
        t_single = time.perf_counter() - t0

        # 2. Ray Data: a local cluster with one logical CPU per actor plus one for decoding
        t0 = time.perf_counter()
        ray.init(num_cpus=args.workers + 1, include_dashboard=False, log_to_driver=False)
        t_init = time.perf_counter() - t0
        runs = []
        try:
            for _ in range(2):
                os.environ["VLMOOD_CACHE"] = str(tmp / f"cache-{len(runs)}")  # cold text cache again
                t0 = time.perf_counter()
                df = score_with_ray(str(folder), args.model, methods, classes=classes, params={"neglabel": neg},
                                    num_workers=args.workers, num_cpus_per_worker=1, batch_size=args.batch_size,
                                    progress=False)
                runs.append((time.perf_counter() - t0, df))
        finally:
            ray.shutdown()

        df = runs[-1][1]
        assert len(df) == args.n and df["error"].isna().all() and list(df["row"]) == list(range(args.n))
        diff = max(float(np.max(np.abs(df[f"score_{m}"].to_numpy() - [single[m][i] for i in df["id"]])))
                   for m in methods)
        n = args.n
        print(f"{n} images of {args.size}x{args.size} px (JPEG), {args.model}, detectors {', '.join(methods)}; "
              f"{os.cpu_count()} CPUs, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print(f"single process (extract_features + score_features):  {t_single:6.1f} s  {n / t_single:7.1f} images/s")
        print(f"ray.init (local, {args.workers + 1} logical CPUs):           {t_init:6.1f} s  (not counted below)")
        for k, (t, _) in enumerate(runs):
            what = "first call " if k == 0 else "second call"
            print(f"score_with_ray, {args.workers} actors, {what}:           {t:6.1f} s  {n / t:7.1f} images/s  "
                  f"ratio to single process {t_single / t:.2f}x")
        print(f"largest score difference ray vs single process: {diff:.2e}")


if __name__ == "__main__":
    main()
