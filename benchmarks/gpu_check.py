"""CUDA against CPU on the same images, and GPU throughput: the checks the CUDA paths need.

Usage: python benchmarks/gpu_check.py [--arch ViT-B-16] [--images 256] [--speed-images 4096] [--out FILE.json]

1. Agreement. Random-init ``open_clip:ARCH/none`` (identical weights on both devices) encodes the same toy-world
   images (``--images`` ID shapes and as many other shapes, upscaled by the encoder's preprocess) on the CPU (fp32)
   and on CUDA (the default autocast, bf16 on an H200). Every detector scores them on both: MCM, Energy, MaxLogit,
   GL-MCM, NegLabel (the toy world's lexicon, so the CPU side stays quick) and CLIPN (CTW and ATD, with a no side
   made by perturbing a copy of the text tower, seeded, identical on both devices). Reported per detector: the share
   of images given the same class, the largest score difference, and the difference of AUROC (ID shapes vs other
   shapes; random weights make the AUROC itself meaningless, its CPU/CUDA difference is not).
2. Throughput on CUDA: end-to-end image features/s (PIL decoding and preprocessing in DataLoader workers, bf16
   image tower) over ``--speed-images`` images; the 70k-word NegLabel lexicon encoded cold (no cache, trimmed, bf16);
   CLIPN training (``CLIPNTrainer``) on toy-world pairs: the one-time feature pass and the training steps in pairs/s,
   and the first-step loss on CUDA against the CPU's on the same pairs.

Without a GPU it runs the CPU side only and says what it skipped. Results go to stdout and ``--out`` (JSON).
``--device cpu`` runs every path against a second CPU encoder (a dry run of the script on a machine without a GPU).

Measured with ``python benchmarks/gpu_check.py --out benchmarks/gpu_check_h200.json`` on one NVIDIA H200 (torch
2.11.0+cu130, 16 CPU cores; the whole script 3 min), CPU fp32 vs CUDA bf16 autocast, 256 ID + 256 OOD images:

| detector | same class | max score difference (score range) | AUROC CPU / CUDA |
|---|---|---|---|
| MCM | 99.61% | 9.0e-05 (0.0028) | 0.4522 / 0.4472 |
| Energy | 99.61% | 0.023 (2.04) | 0.5284 / 0.5270 |
| MaxLogit | 99.61% | 0.023 (2.06) | 0.5265 / 0.5240 |
| GL-MCM | 99.61% | 1.7e-04 (0.0061) | 0.4992 / 0.4979 |
| NegLabel | 99.41% | 0.018 (0.64) | 0.5130 / 0.5128 |
| CLIPN-CTW | 99.61% | 0.0038 (0.023) | 0.5167 / 0.5159 |
| CLIPN-ATD | 99.61% | 0.0036 (0.019) | 0.5103 / 0.5130 |

The differences are bf16's rounding (a random-init model puts every image close to every class, so its scores span
a narrow range and one or two images near a tie change class); AUROC moves by at most 0.005. CLIPN's first training
step gives the same loss on both devices (1.6881473 CPU, 1.6881468 CUDA). Throughput on the H200: image features
777 images/s end to end (64 px PNG-like toy images decoded and resized to 224 px by 4 DataLoader workers: decoding
limits it); the 70,794-prompt NegLabel lexicon encoded cold in 10.2 s (issue 12 targets 2 s); CLIPN training, 4,096
pairs x 2 epochs at batch 512: features once in 5.4 s, then 2,565 pairs/s (checkpoint writes included; the steps
alone are measured by ``benchmarks/clipn_training.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import torch

import vlmood
from vlmood.data import MemorySource
from vlmood.features import extract_features
from vlmood.metrics import auroc


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _no_side(enc: Any, seed: int = 0) -> Any:
    from vlmood.clipn import CLIPNModel

    m = CLIPNModel(enc)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.no.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(p.device) * (p.detach().abs().mean() + 1e-3))
    m.invalidate()
    return m


def detectors(enc: Any, classes: list[str], clipn_file: str) -> dict[str, Any]:
    from vlmood.clipn import CLIPNModel
    from vlmood.detectors import CLIPN, GLMCM, MCM, Energy, MaxLogit, NegLabel
    from vlmood.toyworld import lexicon_dir

    model = CLIPNModel.load(clipn_file, encoder=enc)
    return {
        "mcm": MCM(enc, classes), "energy": Energy(enc, classes), "maxlogit": MaxLogit(enc, classes),
        "glmcm": GLMCM(enc, classes),
        "neglabel": NegLabel(enc, classes, lexicon=str(lexicon_dir()), ratio=0.5, ngroups=1),
        "clipn-ctw": CLIPN(model, classes, templates="simple"),
        "clipn-atd": CLIPN(model, classes, templates="simple", score="atd"),
    }


def score_all(enc: Any, id_src: Any, ood_src: Any, classes: list[str], clipn_file: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    fi = extract_features(enc, id_src, local=True, cache=False, progress=False)
    fo = extract_features(enc, ood_src, local=True, cache=False, progress=False)
    out: dict[str, Any] = {"features_s": time.perf_counter() - t0}
    for name, det in detectors(enc, classes, clipn_file).items():
        si, so = det.score_features(fi), det.score_features(fo)
        out[name] = {"id": si, "ood": so, "pred": np.concatenate([det.classify_features(fi), det.classify_features(fo)]),
                     "auroc": auroc(si, so)}
    return out


def agreement(cpu: dict[str, Any], gpu: dict[str, Any]) -> dict[str, Any]:
    rows = {}
    for name in cpu:
        if name == "features_s":
            continue
        a, b = cpu[name], gpu[name]
        sa, sb = np.concatenate([a["id"], a["ood"]]), np.concatenate([b["id"], b["ood"]])
        rows[name] = {"same_class": float(np.mean(a["pred"] == b["pred"])),
                      "max_score_diff": float(np.nanmax(np.abs(sa - sb))),
                      "score_range": float(np.nanmax(sa) - np.nanmin(sa)),
                      "auroc_cpu": a["auroc"], "auroc_cuda": b["auroc"], "auroc_diff": abs(a["auroc"] - b["auroc"])}
    return rows


def speed(arch: str, n: int, device: str = "cuda", lexicon_limit: int | None = None) -> dict[str, Any]:
    from PIL import Image

    from vlmood.clipn.pairs import PairSource
    from vlmood.clipn.trainer import CLIPNTrainer
    from vlmood.toyworld import World

    res: dict[str, Any] = {}
    enc = vlmood.load_encoder(f"open_clip:{arch}/none", device=device)
    arrs, caps, _ = World(5).batch(n)
    imgs = [Image.fromarray(a) for a in arrs]
    extract_features(enc, MemorySource(imgs[:256]), cache=False, progress=False)  # warm-up
    _sync()
    t0 = time.perf_counter()
    extract_features(enc, MemorySource(imgs), cache=False, batch_size=256, progress=False)
    _sync()
    res["image_features_per_s"] = n / (time.perf_counter() - t0)

    from vlmood import lexicons
    from vlmood.text.embed import compute_text_embeddings

    words = list(lexicons.load("neglabel").words)[:lexicon_limit]
    prompts = [f"the nice {w}" for w in words]
    compute_text_embeddings(enc, prompts[:2048], batch_size=2048)
    _sync()
    t0 = time.perf_counter()
    emb = compute_text_embeddings(enc, prompts, batch_size=4096)
    _sync()
    res["lexicon_prompts"] = len(prompts)
    res["lexicon_encode_s"] = time.perf_counter() - t0
    res["lexicon_finite"] = bool(torch.isfinite(emb).all())

    pairs = PairSource.from_memory(imgs, caps, name="toy")
    with tempfile.TemporaryDirectory() as run:
        tr = CLIPNTrainer(enc, seed=0)
        t0 = time.perf_counter()
        tr.fit(pairs, epochs=2, batch_size=min(512, n), out=run, progress=False)
        _sync()
        wall = time.perf_counter() - t0
    data = next(r["data"] for r in tr.log_ if "data" in r)
    steps = [r for r in tr.log_ if "loss" in r and not r.get("summary")]
    train_s = sum(r["epoch_s"] for r in tr.log_ if r.get("summary"))
    res["clipn"] = {"pairs": n, "features_s": data["features_s"], "train_s": train_s, "wall_s": wall,
                    "train_pairs_per_s": len(steps) * min(512, n) / train_s, "first_loss": steps[0]["loss"],
                    "last_loss": steps[-1]["loss"], "all_finite": all(np.isfinite(r["loss"]) for r in steps)}
    return res


def first_step_losses(arch: str, devices: list[str]) -> dict[str, float]:
    """The first training step's loss of the same 256 pairs on each device."""
    from PIL import Image

    from vlmood.clipn.pairs import PairSource
    from vlmood.clipn.trainer import CLIPNTrainer
    from vlmood.toyworld import World

    arrs, caps, _ = World(9).batch(256)
    pairs = PairSource.from_memory([Image.fromarray(a) for a in arrs], caps, name="toy")
    out = {}
    for dev in devices:
        enc = vlmood.load_encoder(f"open_clip:{arch}/none", device=dev)
        tr = CLIPNTrainer(enc, seed=0)
        tr.fit(pairs, epochs=1, batch_size=256, progress=False)
        out[dev] = next(r["loss"] for r in tr.log_ if "loss" in r and not r.get("summary"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--speed-images", type=int, default=4096)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="the device checked against the CPU (cpu: a dry run of the "
                    "script's paths on a machine without a GPU)")
    ap.add_argument("--lexicon-limit", type=int, default=None, help="encode only this many lexicon words (dry runs)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    os.environ["VLMOOD_CACHE"] = tempfile.mkdtemp(prefix="vlmood-gpu-check-")
    from vlmood.toyworld import ID_SHAPES, OOD_SHAPES, load_images

    cuda = torch.cuda.is_available() or args.device == "cpu"
    result: dict[str, Any] = {"torch": torch.__version__, "cuda": cuda,
                              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "arch": args.arch,
                              "cpu_threads": torch.get_num_threads()}
    print(json.dumps(result), flush=True)
    id_imgs, _ = load_images(2024, args.images, ID_SHAPES)
    ood_imgs, _ = load_images(2025, args.images, OOD_SHAPES)
    id_src, ood_src = MemorySource(id_imgs, name="id"), MemorySource(ood_imgs, name="ood")
    classes = list(ID_SHAPES)
    cpu_enc = vlmood.load_encoder(f"open_clip:{args.arch}/none", device="cpu")
    clipn_file = os.path.join(os.environ["VLMOOD_CACHE"], "no-side.safetensors")
    _no_side(cpu_enc).save(clipn_file)
    t0 = time.perf_counter()
    cpu = score_all(cpu_enc, id_src, ood_src, classes, clipn_file)
    print(f"CPU scoring: {time.perf_counter() - t0:.1f} s", flush=True)
    if not cuda:
        result["skipped"] = "no CUDA device: agreement, GPU throughput and CUDA training were not run"
        print(result["skipped"])
    else:
        gpu_enc = vlmood.load_encoder(f"open_clip:{args.arch}/none", device=args.device)
        result["precision_cuda"] = gpu_enc.precision
        gpu = score_all(gpu_enc, id_src, ood_src, classes, clipn_file)
        result["agreement"] = agreement(cpu, gpu)
        for k, v in result["agreement"].items():
            print(f"{k:10s} same class {100 * v['same_class']:6.2f}%  max |score diff| {v['max_score_diff']:.3g} "
                  f"(range {v['score_range']:.3g})  AUROC cpu {v['auroc_cpu']:.4f} cuda {v['auroc_cuda']:.4f}",
                  flush=True)
        result["first_step_loss"] = first_step_losses(args.arch, ["cpu", args.device])
        print("first-step CLIPN loss", result["first_step_loss"], flush=True)
        result["speed"] = speed(args.arch, args.speed_images, args.device, args.lexicon_limit)
        print(json.dumps(result["speed"]), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    sys.exit(0)


if __name__ == "__main__":
    main()
