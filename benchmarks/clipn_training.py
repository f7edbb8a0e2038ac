"""CLIPN training throughput: vlmood's loop (frozen features encoded once, trimmed no tower) vs a reference-style loop.

Usage: python benchmarks/clipn_training.py [--device cpu|cuda] [--precision P] [--threads N] [--arch ViT-B-16]
       [--pairs 128] [--batch-size 32] [--epochs 2] [--ref-steps 2] [--toy-pairs 2048] [--toy-batch-size 256]
       [--toy-epochs 3] [--toy-ref-steps 8] [--seed 0] [--skip-arch] [--skip-toy]

Both loops train CLIPN's "no" side (:class:`vlmood.clipn.NoTower`: a copy of the text tower plus 16 zero prompts)
on the same image-caption pairs (toy-world images written as PNG files with their toy-world captions, read through
a ``path,caption`` manifest), on the same device, with the same batch size, pair order, per-caption prompt choices,
loss (:func:`vlmood.losses.clipn_loss`), AdamW (lr 3e-4, betas 0.9/0.98, eps 1e-6, wd 0.2 except gains and biases)
and cosine schedule, under the encoder's autocast (bf16 on CUDA, fp32 on CPU).

- vlmood: :meth:`vlmood.clipn.trainer.CLIPNTrainer.fit`. Every image and caption is encoded once (frozen image and
  yes towers; DataLoader decoding workers; the yes captions trimmed to their length), then each step only runs the
  no tower forward and backward over the batch's captions trimmed to the longest one. Its steps are timed from
  the training log (intervals between consecutive step records of one epoch: each epoch's first step, after the
  warm-up or the previous epoch's checkpoint, is left out); the one-time extraction (decoding in DataLoader
  workers, both frozen towers, tokenizing, hashing the images) is the log's ``features_s``, reported apart and
  amortised over a 10-epoch run.
- reference-style (written here, the way xmed-lab/CLIPN's ``src/training/train.py`` and ``model.forward`` do it):
  every step decodes and preprocesses the batch's images and tokenizes its captions (the reference's DataLoader),
  runs the frozen image tower and the frozen yes text tower over the full context (77 positions for CLIP), both
  under ``no_grad`` (the reference builds no graph there either: those weights are frozen), then the no tower
  over the full context with each caption's prompt added (with gradients), the loss, backward and AdamW. Its
  ``--ref-steps`` steps are timed after one warm-up step (they all cost the same). Decoding runs in the loop and
  is timed apart; the reference-style pairs/s are given for compute only (as if DataLoader workers hid decoding
  completely: this favours the reference), with the reference's 4 decoding workers (an estimate: a step takes the
  longer of its compute and a quarter of the decoding), and with decoding in the loop.

Validation: each step of both loops sees the same batch and prompt choices from the same initial no side, so
their losses must agree up to float rounding. The first step's loss alone proves little (the untrained no side
equals the yes tower, and the loss is then the constant 0.5 * (2 log 2 + 2 - 0.01) = 1.6881), so the script also
runs one step of both computations on identical inputs from a no side with random prompts
(:func:`identical_inputs_check`: vlmood's cached features and trimmed no tower vs the reference-style full-context
forward) and fails if the losses differ by more than 1e-4 (fp32) or 5e-2 (bf16/fp16 autocast).

CPU: ``OMP_NUM_THREADS=1 python benchmarks/clipn_training.py --device cpu --threads 1`` (167 s in all; torch
2.14.1, 1 thread, x86_64 Linux, on a 2-core machine SHARED with 4 other jobs running at the same time: timings are
noisy, about +-20% between runs (an earlier run: 10.4x / 6.0x for ViT-B-16), and on the busy machine 2 torch
threads were up to 5x slower than 1):

| run | caption tokens max / context | vlmood pairs/s: per epoch / over 10 epochs with the extraction | reference-style pairs/s: compute only / 4 decode workers (est.) / decoding in the loop | speed-up per epoch: vs compute only / vs 4 workers | speed-up over 10 epochs: same | vlmood extraction, once | identical inputs: loss diff, gradient diff (relative) |
|---|---|---|---|---|---|---|---|
| toy world (2048 pairs, batch 256, cpu fp32) | 11 / 20 | 1146.6 / 937.8 | 429.3 / 429.3 / 337.3 | 2.67x / 2.67x | 2.18x / 2.18x | 4.0 s | 2.4e-07, 3.1e-06 |
| ViT-B-16 random init (128 pairs, batch 32, cpu fp32) | 12 / 77 | 20.1 / 10.5 | 1.7 / 1.7 / 1.7 | 11.79x / 11.79x | 6.15x / 6.15x | 58.4 s | 0.0e+00, 1.1e-06 |

toy world: reference-style step = image tower 0.126 + yes tower (full context) 0.125 + no tower, loss, backward,
AdamW 0.345 s (+ decode 0.163 s on one core), mean of 8 steps; vlmood step = 0.223 s, mean of 21 steps; losses of
the first 9 steps agree to 1.2e-7 (1.688147, 1.532725, ..., 1.081011 in both loops).
ViT-B-16 random init: reference-style step = image tower 10.458 + yes tower (full context) 2.129 + no tower, loss,
backward, AdamW 6.191 s (+ decode 0.055 s on one core), mean of 2 steps; vlmood step = 1.592 s, mean of 6 steps;
losses of the first 3 steps agree to 1.3e-6 (1.688148, 1.462734, 2.505007 vs 1.688149, 1.462733, 2.505006).

GPU: ``python benchmarks/clipn_training.py --device cuda --pairs 4096 --batch-size 512 --epochs 3 --ref-steps 5
--toy-pairs 8192 --toy-batch-size 512`` (61 s) and ``... --skip-toy --pairs 1024 --batch-size 128 --epochs 3
--ref-steps 5`` (23 s); torch 2.11.0+cu130, one NVIDIA H200, 16 CPU cores, bf16 autocast (the encoder's default):

| run | caption tokens max / context | vlmood pairs/s: per epoch / over 10 epochs with the extraction | reference-style pairs/s: compute only / 4 decode workers (est.) / decoding in the loop | speed-up per epoch: vs compute only / vs 4 workers | speed-up over 10 epochs: same | vlmood extraction, once | identical inputs: loss diff, gradient diff (relative) |
|---|---|---|---|---|---|---|---|
| toy world (8192 pairs, batch 512, cuda bf16) | 11 / 20 | 31544.4 / 9694.7 | 24044 / 7301.9 / 1696.7 | 1.31x / 4.32x | 0.4x / 1.33x | 5.9 s | 1.2e-05, 1.6e-03 |
| ViT-B-16 random init (4096 pairs, batch 512, cuda bf16) | 12 / 77 | 8662.6 / 4462.7 | 3529.1 / 1853.8 / 409.6 | 2.45x / 4.67x | 1.26x / 2.41x | 4.5 s | 3.9e-06, 1.6e-03 |
| ViT-B-16 random init (1024 pairs, batch 128, cuda bf16) | 12 / 77 | 2267.8 / 1610.2 | 2070.5 / 2070.5 / 419.5 | 1.1x / 1.1x | 0.78x / 0.78x | 1.8 s | 3.7e-06, 2.9e-03 |

A rerun of the batch-512 ViT-B-16 line after the trainer kept the features on the GPU and stopped syncing on the
prompt indices (``--skip-toy --pairs 4096 --batch-size 512 --epochs 3 --ref-steps 5``, 40 s) measured the same
within noise: vlmood step 0.066 s, 7,733 vs 3,486 pairs/s, 2.22x per epoch (4.24x vs 4 workers), 1.09x over 10 epochs
with the extraction (2.08x).

ViT-B-16, batch 512: reference-style step = image tower 0.071 + yes tower (full context) 0.019 + no tower, loss,
backward, AdamW 0.056 s (+ decode 1.105 s on one core), mean of 5 steps; vlmood step = 0.059 s, mean of 21 steps.
Batch 128: 0.019 + 0.009 + 0.034 s (+ decode 0.243 s); vlmood step = 0.056 s. Toy world, batch 512: 0.004 + 0.003
+ 0.014 s (+ decode 0.280 s); vlmood step = 0.016 s. In bf16 the two loops' losses drift apart slowly (ViT-B-16,
batch 512: 4.5e-3 at step 2, 1.6e-2 at step 4 of a random-init model; toy world: under 1e-4 over 9 steps).

Reading: on a CPU the reference-style step is dominated by the image tower (10.5 of 18.8 s for 32 ViT-B-16 images),
which vlmood runs once per image, and by the text towers over 77 positions instead of the captions' 12: per epoch
vlmood trains 11.8x faster with ViT-B-16 (2.7x in the toy world, whose image tower is tiny and context only 20), and
a 10-epoch run including the one-time extraction is 6.2x faster (2.2x). On the H200 the frozen towers are cheap and
vlmood's step is not compute-bound: it takes about 0.057 s at batch 128 and at batch 512 alike (kernel launches and
synchronisations of a 12-layer tower over 12 positions; a bare forward, backward and AdamW step of the no tower
measured 0.038 s at batch 512, and the trainer's per-parameter gradient finiteness check costs 0.007 s: both
measured apart). So at the
reference's batch of 512 vlmood is 2.45x faster per epoch than the reference-style compute alone, 1.1x at batch 128,
and over 10 epochs, counting its extraction, 1.26x faster at batch 512 but 0.78x at batch 128 (the toy world: 0.4x).
The reference's real limit on a GPU is decoding: preprocessing 512 images to 224 px took 1.1 s on one core, so with
its 4 DataLoader workers it cannot exceed about 1850 pairs/s (an estimate assuming perfect parallel decoding),
which makes vlmood 4.7x faster per epoch and 2.4x over 10 epochs at batch 512. Large batches suit vlmood's loop on a
GPU. The identical-input check agrees to 1.2e-5 in the loss in bf16 (fp32 on the CPU: 2.4e-7).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import vlmood
from vlmood.clipn import NoTower
from vlmood.clipn.trainer import ORDER_STREAM, PROMPT_STREAM, CLIPNTrainer, decays, lr_at
from vlmood.data import load_image
from vlmood.encoders.text_forward import eot_positions, text_tower
from vlmood.losses import clipn_loss
from vlmood.toyworld import World

AMORTISE_EPOCHS = 10
REF_WORKERS = 4
"""DataLoader workers per GPU in the reference's recipe (``src/run.sh``: ``--workers 4``)."""
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 5e-2}


def sync(device: Any) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def write_pairs(folder: Path, n: int, seed: int) -> tuple[Path, list[str], list[str]]:
    """``n`` toy-world images as PNG files in ``folder`` and a ``path,caption`` manifest; returns the manifest, the
    image paths and the captions (both in manifest order)."""
    world = World(seed)
    from PIL import Image

    paths, captions = [], []
    for start in range(0, n, 512):
        arrays, caps, _ = world.batch(min(512, n - start))
        for k, (a, c) in enumerate(zip(arrays, caps)):
            p = folder / f"{start + k:06d}.png"
            Image.fromarray(a).save(p)
            paths.append(str(p))
            captions.append(c)
    manifest = folder / "pairs.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        w.writerows(zip(paths, captions))
    return manifest, paths, captions


def reference_no_features(enc: Any, no: NoTower, tokens: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """The reference's ``encode_text(text, mode="no")`` in training mode: token + positional embeddings + each
    caption's prompt over the FULL context, the no transformer with the full causal mask, ``ln_final_no``, the row at
    the end token, ``text_projection_no``. ``[B, L]`` ids, ``[B]`` prompt indices (``K`` = the mean) -> ``[B, D]``."""
    x = no.token_embedding_no(tokens) + no.positional_embedding_no + no.prompt_table()[prompt]
    x = no.transformer_no(x, attn_mask=no.attn_mask)
    x = no.ln_final_no(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot_positions(enc, tokens)]  # the reference: tokens.argmax(-1)
    proj = no.text_projection_no
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def reference_loop(enc: Any, paths: list[str], captions: list[str], batch_size: int, epochs: int, steps: int,
                   seed: int = 0) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """Run ``steps`` steps of the reference-style loop (see the module docstring) from a fresh no side; returns per
    step its seconds by phase and its loss, and the first step's inputs (``img``, ``yes``, ``tokens``, ``prompt``).
    Pair order and prompt choices come from the same streams as :class:`CLIPNTrainer` (seed ``seed``), so each step
    sees the trainer's batch of the same index."""
    dev = torch.device(enc.device)
    no = NoTower(text_tower(enc))
    named = list(no.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for k, p in named if not decays(k, p)], "weight_decay": 0.0},
                             {"params": [p for k, p in named if decays(k, p)], "weight_decay": 0.2}],
                            lr=3e-4, betas=(0.9, 0.98), eps=1e-6)
    n = len(captions)
    spe = n // batch_size
    total_steps = spe * epochs
    scale = float(enc.logit_scale)  # the frozen logit_scale.exp()
    out, first = [], {}
    for step in range(steps):
        epoch, s = divmod(step, spe)
        order = np.random.default_rng([seed, ORDER_STREAM, epoch]).permutation(n)
        prompt_of = np.random.default_rng([seed, PROMPT_STREAM, epoch]).integers(0, no.n_prompts + 1, size=n)
        rows = order[s * batch_size : (s + 1) * batch_size]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, 3e-4, total_steps)
        sync(dev)
        t0 = time.perf_counter()
        images = torch.stack([enc.preprocess(load_image(paths[i])) for i in rows]).to(dev)
        tokens = enc.tokenize([captions[i] for i in rows])[0].to(dev)
        prompt = torch.from_numpy(prompt_of[rows]).to(dev)
        sync(dev)
        t1 = time.perf_counter()
        with torch.no_grad(), enc.autocast():
            img = F.normalize(enc.model.encode_image(images).float(), dim=-1)
        sync(dev)
        t2 = time.perf_counter()
        with torch.no_grad(), enc.autocast():
            yes = F.normalize(enc.model.encode_text(tokens).float(), dim=-1)
        sync(dev)
        t3 = time.perf_counter()
        with enc.autocast():
            u = F.normalize(reference_no_features(enc, no, tokens, prompt).float(), dim=-1)
        total, _ = clipn_loss(img, yes, u, scale)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        loss = float(total.detach())
        sync(dev)
        t4 = time.perf_counter()
        out.append({"decode": t1 - t0, "image": t2 - t1, "yes": t3 - t2, "no": t4 - t3, "loss": loss})
        if step == 0:
            first = {"img": img, "yes": yes, "tokens": tokens, "prompt": prompt, "rows": torch.from_numpy(rows)}
    return out, first


def vlmood_loop(enc: Any, manifest: Path, run: Path, batch_size: int, epochs: int) -> dict[str, Any]:
    """:meth:`CLIPNTrainer.fit` (seed 0) on the manifest, run folder ``run``; its one-time extraction seconds, mean
    step seconds (intervals between consecutive step records of one epoch: each epoch's first step, which follows
    the previous epoch's checkpoint, is left out), per-step losses and wall time."""
    trainer = CLIPNTrainer(enc, seed=0)
    sync(enc.device)
    t0 = time.perf_counter()
    trainer.fit(str(manifest), epochs=epochs, batch_size=batch_size, out=run, progress=False)
    sync(enc.device)
    wall = time.perf_counter() - t0
    log = trainer.log_
    data = next(r["data"] for r in log if "data" in r)
    steps = [r for r in log if "step" in r and "loss" in r and not r.get("summary")]
    gaps = [b["elapsed"] - a["elapsed"] for a, b in zip(steps, steps[1:]) if a["epoch"] == b["epoch"]]
    return {"features_s": data["features_s"], "step_s": float(np.mean(gaps)) if len(gaps) else float("nan"),
            "timed_steps": len(gaps), "losses": [r["loss"] for r in steps], "wall_s": wall, "pairs": data["pairs"]}


def identical_inputs_check(enc: Any, manifest: Path, first: dict[str, torch.Tensor], seed: int = 0) -> dict[str, float]:
    """Both computations of one step on identical inputs (the first batch, its prompt choices), from a no side whose
    prompts are random (seeded ``N(0, 0.02)``), so that its features differ from the yes tower's: at the start of
    training they are equal and the loss is the constant ``0.5 * (2 log 2 + 2 - 0.01) = 1.6881`` whatever the
    features. vlmood's side reads the image and caption features its trainer extracted (the feature and text
    caches) and runs the trimmed no tower, as :class:`CLIPNTrainer` does; the reference-style side takes the image
    and full-context yes features its loop computed on its first step (``first``) and runs the full no tower
    (:func:`reference_no_features`). Returns both losses, their difference, the largest gradient difference
    relative to the largest gradient, and the largest feature differences."""
    import copy

    from vlmood.clipn import CLIPNModel
    from vlmood.clipn.pairs import as_pairs
    from vlmood.features import extract_features

    dev = torch.device(enc.device)
    rows, tok, prompt = first["rows"].tolist(), first["tokens"], first["prompt"]
    model = CLIPNModel(enc)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        model.no.prompt_no.copy_(0.02 * torch.randn(model.no.prompt_no.shape, generator=g))
    ref_no = copy.deepcopy(model.no)
    scale = float(enc.logit_scale)
    src = as_pairs(str(manifest))
    feats = extract_features(enc, src.images, progress=False)  # from the cache the trainer filled
    row_of = {i: k for k, i in enumerate(feats.ids)}
    img = feats.features[[row_of[src.images.ids[int(src.image_index[r])]] for r in rows]].to(dev)
    yes = vlmood.embed_texts(enc, [src.captions[r] for r in rows], cache=True, progress=False).to(dev)
    with torch.enable_grad():
        u = F.normalize(model.encode_no_tokens(tok, prompt).float(), dim=-1)  # trimmed, as the trainer
        ours, _ = clipn_loss(img, yes, u, scale)
        ours.backward()
        with enc.autocast():
            u_r = F.normalize(reference_no_features(enc, ref_no, tok, prompt).float(), dim=-1)
        theirs, _ = clipn_loss(first["img"], first["yes"], u_r, scale)
        theirs.backward()
    grads = [(a.grad, b.grad) for a, b in zip(model.no.parameters(), ref_no.parameters()) if b.grad is not None]
    top = max(float(b.abs().max()) for _, b in grads)
    ours, theirs = float(ours.detach()), float(theirs.detach())
    return {"check_loss_vlmood": ours, "check_loss_reference": theirs, "check_loss_abs_diff": abs(ours - theirs),
            "check_grad_rel_diff": max(float((a - b).abs().max()) for a, b in grads) / top,
            "check_image_feature_max_diff": float((img - first["img"]).abs().max()),
            "check_yes_feature_max_diff": float((yes - first["yes"]).abs().max()),
            "check_no_feature_max_diff": float((u - u_r).detach().abs().max())}


def compare(name: str, spec: str, device: str, precision: str | None, n: int, batch_size: int, epochs: int,
            ref_steps: int, seed: int) -> dict[str, Any]:
    """Both loops on ``n`` pairs of toy-world data with encoder ``spec``; a result record (also printed)."""
    enc = vlmood.load_encoder(spec, device=device, precision=precision)
    _ = enc.fingerprint  # hashed once, outside the timings
    with tempfile.TemporaryDirectory() as tmp:
        old = os.environ.get("VLMOOD_CACHE")
        os.environ["VLMOOD_CACHE"] = str(Path(tmp) / "cache")  # cold caches: the extraction is measured
        try:
            folder = Path(tmp) / "pairs"
            folder.mkdir()
            manifest, paths, captions = write_pairs(folder, n, seed)
            ours = vlmood_loop(enc, manifest, Path(tmp) / "run", batch_size, epochs)
            ref, first = reference_loop(enc, paths, captions, batch_size, epochs, 1 + ref_steps)
            check = identical_inputs_check(enc, manifest, first)
        finally:
            if old is None:
                os.environ.pop("VLMOOD_CACHE", None)
            else:
                os.environ["VLMOOD_CACHE"] = old
    timed = ref[1:] or ref
    phase = {k: float(np.mean([s[k] for s in timed])) for k in ("decode", "image", "yes", "no")}
    ref_step = phase["image"] + phase["yes"] + phase["no"]
    tokens, lengths = enc.tokenize(captions)
    spe = n // batch_size
    ours_pps = batch_size / ours["step_s"]
    ref_pps = batch_size / ref_step
    # the reference decodes in REF_WORKERS DataLoader workers beside the GPU: a step takes the longer of the two
    # (an estimate: perfect overlap and parallel decoding; on a CPU device decoding would compete for the cores)
    ref_pps_workers = batch_size / max(ref_step, phase["decode"] / REF_WORKERS)
    # a 10-epoch run: vlmood = extraction once + 10 epochs of steps; reference-style = 10 epochs of its steps
    ours_10 = AMORTISE_EPOCHS * spe * batch_size / (ours["features_s"] + AMORTISE_EPOCHS * spe * ours["step_s"])
    both = min(len(ref), len(ours["losses"]))
    rec = {
        "name": name, "model": spec, "device": str(enc.device), "precision": enc.precision, "pairs": n,
        "batch_size": batch_size, "steps_per_epoch": spe, "caption_tokens_max": max(lengths),
        "caption_tokens_mean": round(float(np.mean(lengths)), 1), "context": int(tokens.shape[1]),
        "vlmood_features_s": round(ours["features_s"], 3), "vlmood_step_s": round(ours["step_s"], 5),
        "vlmood_timed_steps": ours["timed_steps"], "vlmood_pairs_per_s": round(ours_pps, 1),
        "vlmood_pairs_per_s_10_epochs": round(ours_10, 1),
        "ref_decode_s": round(phase["decode"], 5), "ref_image_s": round(phase["image"], 5),
        "ref_yes_s": round(phase["yes"], 5), "ref_no_s": round(phase["no"], 5), "ref_step_s": round(ref_step, 5),
        "ref_timed_steps": len(timed), "ref_pairs_per_s": round(ref_pps, 1),
        "ref_pairs_per_s_4_workers": round(ref_pps_workers, 1),
        "ref_pairs_per_s_decode_in_loop": round(batch_size / (ref_step + phase["decode"]), 1),
        "speedup_per_epoch": round(ours_pps / ref_pps, 2), "speedup_10_epochs": round(ours_10 / ref_pps, 2),
        "speedup_per_epoch_4_workers": round(ours_pps / ref_pps_workers, 2),
        "speedup_10_epochs_4_workers": round(ours_10 / ref_pps_workers, 2),
        # the real loops, same pairs, prompts and updates: step 1's loss is a constant (see identical_inputs_check)
        "loss_per_step_vlmood": ours["losses"][:both], "loss_per_step_reference": [s["loss"] for s in ref[:both]],
        **check,
    }
    print(json.dumps(rec), flush=True)
    tol = TOLERANCE[enc.precision]
    if not check["check_loss_abs_diff"] <= tol:
        raise SystemExit(f"{name}: on identical inputs the losses differ by {check['check_loss_abs_diff']:.3g} "
                         f"(> {tol:g}): the reference-style loop does not compute what vlmood's does")
    return rec


def table(recs: list[dict[str, Any]]) -> str:
    head = ("| run | caption tokens max / context | vlmood pairs/s: per epoch / over 10 epochs with the extraction | "
            "reference-style pairs/s: compute only / 4 decode workers (est.) / decoding in the loop | speed-up per "
            "epoch: vs compute only / vs 4 workers | speed-up over 10 epochs: same | vlmood extraction, once | "
            "identical inputs: loss diff, gradient diff (relative) |\n|---|---|---|---|---|---|---|---|")
    rows = [f"| {r['name']} ({r['pairs']} pairs, batch {r['batch_size']}, {r['device']} {r['precision']}) | "
            f"{r['caption_tokens_max']} / {r['context']} | {r['vlmood_pairs_per_s']:g} / "
            f"{r['vlmood_pairs_per_s_10_epochs']:g} | {r['ref_pairs_per_s']:g} / {r['ref_pairs_per_s_4_workers']:g} / "
            f"{r['ref_pairs_per_s_decode_in_loop']:g} | {r['speedup_per_epoch']:g}x / "
            f"{r['speedup_per_epoch_4_workers']:g}x | {r['speedup_10_epochs']:g}x / "
            f"{r['speedup_10_epochs_4_workers']:g}x | {r['vlmood_features_s']:.1f} s | "
            f"{r['check_loss_abs_diff']:.1e}, {r['check_grad_rel_diff']:.1e} |" for r in recs]
    steps = [f"{r['name']}: reference-style step = image tower {r['ref_image_s']:.3f} + yes tower (full context) "
             f"{r['ref_yes_s']:.3f} + no tower, loss, backward, AdamW {r['ref_no_s']:.3f} s (+ decode "
             f"{r['ref_decode_s']:.3f} s on one core), mean of {r['ref_timed_steps']} steps; vlmood step = "
             f"{r['vlmood_step_s']:.3f} s, mean of {r['vlmood_timed_steps']} steps; losses of the first steps, vlmood "
             f"{', '.join(f'{x:.6f}' for x in r['loss_per_step_vlmood'])} vs reference-style "
             f"{', '.join(f'{x:.6f}' for x in r['loss_per_step_reference'])}" for r in recs]
    return "\n".join([head, *rows, "", *steps])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                    help="the encoder's autocast (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--arch", default="ViT-B-16", help="open_clip architecture, random init (the reference's)")
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2, help="vlmood epochs run (its steps after the first are timed)")
    ap.add_argument("--ref-steps", type=int, default=2, help="reference-style steps timed after one warm-up step")
    ap.add_argument("--toy-pairs", type=int, default=2048)
    ap.add_argument("--toy-batch-size", type=int, default=256)
    ap.add_argument("--toy-epochs", type=int, default=3)
    ap.add_argument("--toy-ref-steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="toy-world data seed")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--skip-arch", action="store_true")
    ap.add_argument("--skip-toy", action="store_true")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    recs = []
    if not args.skip_toy:
        recs.append(compare("toy world", "toyworld", args.device, args.precision, args.toy_pairs, args.toy_batch_size,
                            args.toy_epochs, args.toy_ref_steps, args.seed))
    if not args.skip_arch:
        recs.append(compare(f"{args.arch} random init", f"open_clip:{args.arch}/none", args.device, args.precision,
                            args.pairs,
                            args.batch_size, args.epochs, args.ref_steps, args.seed))
    print()
    print(table(recs))
    gpu = f", {torch.cuda.get_device_name()}" if torch.device(args.device).type == "cuda" else ""
    print(f"\n{time.perf_counter() - t0:.0f} s in all; torch {torch.__version__}, {torch.get_num_threads()} threads"
          f"{gpu}; {platform.platform()}")


if __name__ == "__main__":
    main()
