"""Reduced precision: images/s and score deviation of bf16 weights (cast once) vs fp32 vs bf16 autocast (the old way).

Usage: python benchmarks/precision.py [--arch ViT-B-32] [--images 64] [--batch-size 32] [--rounds 3]

One random-init open_clip model (``open_clip:ARCH/none``), the same images (toy-world scenes, preprocessed once)
in three modes on each device:

- ``fp32``: float32 weights (the CPU default);
- ``bf16 weights``: ``precision="bf16"``, the weights cast to bf16 once at load (what vlmood does now, as
  open_clip's own ``precision="bf16"``: LayerNorms and embeddings stay float32);
- ``bf16 autocast``: float32 weights with every forward under ``torch.autocast(bfloat16)`` (what vlmood did before:
  the weights are re-cast on every forward), reproduced here by a subclass.

Prints images/s of the image tower (global features; rounds interleaved, the median reported, after one warm-up
batch per mode since oneDNN builds its kernels per shape), and for MCM, GL-MCM, Energy, MaxLogit and NegLabel (a
small lexicon) the largest score difference to fp32 on the same device (also relative to the spread of the fp32
scores), with the share of images whose predicted class is the same. Without CUDA the GPU section is skipped with a
message. Timings on a shared machine are noisy: compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch

import vlmood
from vlmood.encoders.open_clip_backend import OpenCLIPEncoder
from vlmood.text import EmbeddingCache
from vlmood.toyworld.bench import load_images

DETECTORS = ("mcm", "glmcm", "energy", "maxlogit", "neglabel")
LEXICON = ["noun.shape", "noun.feeling"]  # ~740 words: NegLabel's rule on a small lexicon
MODES = ("fp32", "bf16 weights", "bf16 autocast")


class AutocastBF16(OpenCLIPEncoder):
    """The old way: float32 weights, every forward of the encoder under bf16 autocast."""

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32

    def _own_forward(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


def load(spec: str, device: str, mode: str) -> vlmood.Encoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "bf16 on CPU" notice
        enc = vlmood.load_encoder(spec, device=device, precision="bf16" if mode == "bf16 weights" else "fp32")
    if mode == "bf16 autocast":
        enc.__class__ = AutocastBF16
        enc.precision = "bf16"
    return enc


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def throughput(encs: dict[str, vlmood.Encoder], x: torch.Tensor, bs: int, rounds: int, device: str) -> dict[str, float]:
    for enc in encs.values():  # warm-up: one batch of the timed shape
        enc.encode_images(x[:bs], batch_size=bs)
    times: dict[str, list[float]] = {m: [] for m in encs}
    for _ in range(rounds):  # interleaved, so that load from other processes hits every mode alike
        for m, enc in encs.items():
            sync(device)
            t0 = time.perf_counter()
            enc.encode_images(x, batch_size=bs)
            sync(device)
            times[m].append(time.perf_counter() - t0)
    return {m: len(x) / statistics.median(t) for m, t in times.items()}


def scores(enc: vlmood.Encoder, x: torch.Tensor, bs: int, mode: str) -> dict[str, np.ndarray]:
    g, loc = enc.encode_images(x, local=True, batch_size=bs)
    out: dict[str, np.ndarray] = {}
    # a text cache per mode: both bf16 modes have the same fingerprint and precision, so they must not share one
    cache = EmbeddingCache(os.path.join(os.environ["VLMOOD_CACHE"], "text-" + mode.replace(" ", "-")))
    for name in DETECTORS:
        kw = {"lexicon": LEXICON, "ngroups": 10} if name == "neglabel" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            det = vlmood.make_detector(name, enc, "cifar10", cache=cache, **kw).fit()
        out[name] = np.asarray(det.score_features(g, loc), dtype=np.float64)
        if name == "mcm":
            out["class"] = np.asarray(det.classify_features(g))
    return out


def run_device(device: str, spec: str, x: torch.Tensor, args: argparse.Namespace) -> None:
    encs = {m: load(spec, device, m) for m in MODES}
    dtypes = {m: sorted({str(p.dtype).replace("torch.", "") for p in e.model.parameters()}) for m, e in encs.items()}
    print(f"\n== {device}: {spec}, {len(x)} images, batch {args.batch_size}"
          + (f", {torch.get_num_threads()} CPU threads" if device == "cpu" else f", {torch.cuda.get_device_name()}"))
    print("parameter dtypes: " + "; ".join(f"{m}: {'/'.join(d)}" for m, d in dtypes.items()))
    ips = throughput(encs, x, args.batch_size, args.rounds, device)
    print(f"\n{'mode':<15}{'images/s':>10}{'vs fp32':>9}")
    for m in MODES:
        print(f"{m:<15}{ips[m]:>10.1f}{ips[m] / ips['fp32']:>8.2f}x")
    s = {m: scores(e, x, args.batch_size, m) for m, e in encs.items()}
    print(f"\nscore deviation from fp32 on {device} (max |delta|, and max |delta| / std of the fp32 scores)")
    print(f"{'detector':<12}" + "".join(f"{m + ' |d|':>22}{'/std':>8}" for m in MODES[1:]))
    for name in DETECTORS:
        ref = s["fp32"][name]
        sd = float(np.std(ref)) or float("nan")
        row = f"{name:<12}"
        for m in MODES[1:]:
            d = float(np.max(np.abs(s[m][name] - ref)))
            row += f"{d:>22.3g}{d / sd:>8.3f}"
        print(row)
    agree = "".join(f"{100 * float(np.mean(s[m]['class'] == s['fp32']['class'])):>29.1f}% " for m in MODES[1:])
    print(f"{'same class':<12}{agree}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.environ["VLMOOD_CACHE"] = tempfile.mkdtemp(prefix="vlmood-bench-")  # nothing cached across modes or runs
    spec = f"open_clip:{args.arch}/none"
    pil, _ = load_images(seed=7, n=args.images)
    pre = load(spec, "cpu", "fp32").preprocess
    x = torch.stack([pre(im) for im in pil])  # the same preprocessed images for every mode and device
    print(f"torch {torch.__version__}; CPU native bf16 (oneDNN): {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    run_device("cpu", spec, x, args)
    if torch.cuda.is_available():
        run_device("cuda", spec, x, args)
    else:
        print("\nGPU: skipped (no CUDA device on this machine). On a GPU machine run the same command: "
              "python benchmarks/precision.py --images 1024 --batch-size 256")


if __name__ == "__main__":
    main()
