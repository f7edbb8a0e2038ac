"""Peak memory of ``Benchmark.run`` (GL-MCM + MCM + NegLabel) at 2,000 and 8,000 images: before (every patch
feature of a set held in memory) and after (patch features reduced to GL-MCM's local scores batch by batch).

Each (path, size) runs in a fresh Python process, which reports its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and its peak after the model was built and the detectors fitted
(``setup``); ``growth`` is the difference, the memory the images themselves cost. Decoding runs in the main process
(``num_workers=0``), so the peak includes all of it.

- **before**: ``Benchmark.extract(encoder, local=True)`` then ``Benchmark.run(..., features=...)``, which is what
  ``Benchmark.run`` did before the bounded path: ``[N, P, D]`` float32 patch features per set.
- **after**: ``Benchmark.run(encoder, detectors)``, which now reduces patch features per batch
  (``extract_features(local_reducers=...)``); ``after+cache`` the same with a (cold) feature cache, which also
  writes the global features and GL-MCM's local scores.

Model, honestly: the default ``--model b16-shape`` is an open_clip ViT registered by this script with ViT-B/16's
image size, patch size and embedding width (224 px, 16 px patches, so 196 patches of 512 floats per image, the
same 401 kB of patch features per image as ``open_clip:ViT-B-16/none``) but a 1-layer, 64-wide tower, so that
20,000 images encode in minutes on 2 shared CPU cores (the real random ViT-B-16 ran at 0.6 images/s on this
machine under load: 8,000 images would take hours). Patch-feature memory depends only on the number of patches and
the width, which are ViT-B/16's, and the code path is the same; model weights are a constant (the real ViT-B/16's
~600 MB would shift every row by the same amount). Pass ``--model open_clip:ViT-B-16/none`` on a faster machine to
measure the real one. Images: random 32x32 PNGs in a temporary folder (upscaled to 224 px by the model's
preprocessing), half ID (two class folders), half OOD. NegLabel mines its negatives from WordNet's
``noun.shape`` file (330 nouns; ratio 0.5, 10 groups) so the text side stays small.

Measured on this machine (2 cores), growth at 2,000 / 8,000 images: ``b16-shape``: before 1,538 / 6,458 MB, after
202 / 195 MB; the real ``--model open_clip:ViT-B-16/none --precision bf16 --threads 2`` (bf16 weights only to run
10,000 images in about an hour; feature sizes are the same at every precision): before 1,330 / 6,709 MB, after
212 / 190 MB.

Usage::

    python benchmarks/memory.py                 # sizes 2000 8000, before / after / after+cache
    python benchmarks/memory.py --sizes 500 2000 --paths after
    python benchmarks/memory.py --paths after after+cache --repeats 3   # the noise of the bounded path
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
B16_SHAPE = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
CLASSES = ["cat", "dog", "car", "tree", "house", "boat", "bird", "flower", "chair", "lamp"]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def make_images(folder: Path, n: int, seed: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")


def child(args: argparse.Namespace) -> None:
    import warnings

    warnings.simplefilter("ignore")
    import torch

    import vlmood

    torch.set_num_threads(args.threads)
    from vlmood.encoders import load_encoder

    model = args.model
    if model == "b16-shape":
        import open_clip

        cfg = Path(args.data) / "configs"
        cfg.mkdir(exist_ok=True)
        (cfg / "bench-b16-shape.json").write_text(json.dumps(B16_SHAPE))
        open_clip.add_model_config(cfg)
        model = "open_clip:bench-b16-shape/none"
    enc = load_encoder(model, device="cpu", precision=args.precision)
    data = Path(args.data) / str(args.size)
    bench = vlmood.Benchmark(id=data / "id", ood={"far": {"noise": data / "ood"}}, classes=CLASSES)
    lexicon = ROOT / "lexicons" / "wordnet-3.0" / "noun.shape.txt"
    dets = bench.build_detectors(enc, {"glmcm": "glmcm", "mcm": "mcm", "neglabel": {
        "method": "neglabel", "lexicon": str(lexicon), "ratio": 0.5, "ngroups": 10}})
    for det in dets.values():
        det.fit()
    bench.open_sources()
    setup = _peak_mb()
    cache = args.path == "after+cache"
    t0 = time.perf_counter()
    kw = dict(cache=cache, batch_size=args.batch_size, num_workers=0, progress=False)
    if args.path == "before":
        feats = bench.extract(enc, local=True, **kw)
        report = bench.run(enc, dets, features=feats, **kw)
    else:
        report = bench.run(enc, dets, **kw)
    seconds = time.perf_counter() - t0
    n = sum(report.counts.values())
    auroc = {r["method"]: round(r["auroc"], 4) for r in report.rows if r["dataset"] == "noise"}
    print(json.dumps({"path": args.path, "images": n, "peak_mb": _peak_mb(), "setup_mb": setup,
                      "seconds": seconds, "model": model, "auroc": auroc}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000], help="images per run (half ID, half OOD)")
    p.add_argument("--paths", nargs="+", default=["before", "after", "after+cache"],
                   choices=["before", "after", "after+cache"])
    p.add_argument("--model", default="b16-shape", help="encoder spec, or b16-shape (see the docstring)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="weights' precision (bf16: about 3x faster on a CPU with native bf16, same feature sizes)")
    p.add_argument("--repeats", type=int, default=1, help="runs per (path, size), to show the noise")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1: on 2 shared cores, 2 "
                   "threads ran 6x slower; memory does not depend on it)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory(prefix="vlmood-memory-") as tmp:
        t0 = time.perf_counter()
        for size in args.sizes:
            make_images(Path(tmp) / str(size) / "id" / "cat", size // 4, seed=size)
            make_images(Path(tmp) / str(size) / "id" / "dog", size // 4, seed=size + 1)
            make_images(Path(tmp) / str(size) / "ood", size - 2 * (size // 4), seed=size + 2)
        print(f"made {sum(args.sizes):,} random 32x32 PNGs in {time.perf_counter() - t0:.0f} s; model {args.model}, "
              f"batch {args.batch_size}, {args.threads} torch thread(s), decoding in the main process", flush=True)
        print(f"{'path':<12} {'images':>7} {'peak MB':>9} {'setup MB':>9} {'growth MB':>10} {'images/s':>9}")
        results = []
        for path, size, rep in [(p, s, r) for p in args.paths for s in args.sizes for r in range(args.repeats)]:
            env = dict(os.environ, VLMOOD_CACHE=str(Path(tmp) / f"cache-{path}-{size}-{rep}"))  # cold, private
            cmd = [sys.executable, __file__, "--child", "--data", tmp, "--size", str(size), "--path", path,
                   "--model", args.model, "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                   "--precision", args.precision]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{path:<12} {size:>7} failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{path:<12} {r['images']:>7} {r['peak_mb']:>9.0f} {r['setup_mb']:>9.0f} "
                  f"{r['peak_mb'] - r['setup_mb']:>10.0f} {r['images'] / r['seconds']:>9.0f}", flush=True)
        by: dict[tuple[str, int], list[float]] = {}
        for r in results:
            by.setdefault((r["path"], r["images"]), []).append(r["peak_mb"] - r["setup_mb"])
        lo, hi = min(args.sizes), max(args.sizes)

        def show(v: list[float]) -> str:
            return f"{sum(v) / len(v):.0f} MB" + (f" (runs {min(v):.0f}-{max(v):.0f})" if len(v) > 1 else "")

        for path in args.paths:
            a, b = by.get((path, lo)), by.get((path, hi))
            if a and b:
                print(f"{path}: growth {show(a)} at {lo:,} images, {show(b)} at {hi:,}: "
                      f"{sum(b) / len(b) - sum(a) / len(a):+.0f} MB for {hi - lo:,} more images")


if __name__ == "__main__":
    main()
