"""Contrastive training of the toy world's tiny CLIP: ``python -m vlmood.toyworld train``.

A small ModifiedResNet image tower (attention pool, so GL-MCM has local features) and a 3-layer text
transformer over the world's word-level vocabulary, trained with the symmetric InfoNCE loss on generated
(image, caption) pairs. Reproducible from ``seed``; budgeted in steps.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .world import ID_SHAPES, SHAPES, World, vocabulary

ARCH = "vlmood-toyworld"
MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)  # open_clip's default normalisation
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, 64, 64, 3]`` -> normalised ``[N, 3, 64, 64]``, exactly what the encoder's preprocess gives."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN) / STD


def build_model(seed: int = 0):
    from ..encoders.open_clip_backend import _open_clip

    oc = _open_clip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return oc.create_model(ARCH, pretrained=None)


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, shapes=ID_SHAPES, n: int = 600, seed: int = 12345) -> float:
    """Accuracy of ``a photo of a {shape}.`` prompts on ``n`` fresh images of ``shapes`` (held-out seed)."""
    model.eval()
    world = World(seed, shapes=shapes, p_empty=0.0)
    images, _, scenes = world.batch(n)
    text = F.normalize(model.encode_text(tokenizer([f"a photo of a {s}." for s in shapes])), dim=-1)
    img = F.normalize(model.encode_image(to_tensor(images)), dim=-1)
    pred = (img @ text.T).argmax(dim=1).numpy()
    truth = np.array([shapes.index(s.shape) for s in scenes])
    model.train()
    return float((pred == truth).mean())


def train(out: str | os.PathLike, steps: int = 1200, batch_size: int = 256, lr: float = 2e-3, warmup: int = 100,
          seed: int = 0, log_every: int = 50) -> dict:
    """Train and write ``toyworld.safetensors`` and ``toyworld.json`` into ``out``; returns the metadata."""
    from safetensors.torch import save_file

    from .tokenizer import WorldTokenizer

    torch.manual_seed(seed)
    model = build_model(seed)
    cfg_vocab = model.vocab_size
    tokenizer = WorldTokenizer(vocabulary(), cfg_vocab, model.context_length)
    world = World(seed)
    scale = [p for n, p in model.named_parameters() if n == "logit_scale"]
    decay = [p for n, p in model.named_parameters() if n != "logit_scale" and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if n != "logit_scale" and p.ndim < 2]
    opt = torch.optim.AdamW([
        {"params": decay, "weight_decay": 0.1, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
        {"params": scale, "weight_decay": 0.0, "lr": 10 * lr},
    ], betas=(0.9, 0.98), eps=1e-6)
    base = [g["lr"] for g in opt.param_groups]
    model.train()
    t0, history = time.perf_counter(), []
    labels = torch.arange(batch_size)
    for step in range(1, steps + 1):
        f = step / warmup if step <= warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * f
        images, captions, _ = world.batch(batch_size)
        img = F.normalize(model.encode_image(to_tensor(images)), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        # captions can repeat inside a batch ("a red circle"); identical captions are all positives
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        target = same / same.sum(dim=1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % log_every == 0 or step == steps:
            acc = zero_shot_accuracy(model, tokenizer, n=300)
            history.append({"step": step, "loss": round(loss.item(), 4), "id_acc": acc,
                            "seconds": round(time.perf_counter() - t0, 1)})
            print(f"step {step:5d}  loss {loss.item():.3f}  6-way zero-shot {100 * acc:5.1f}%  "
                  f"scale {model.logit_scale.exp().item():5.1f}  {time.perf_counter() - t0:6.0f}s", flush=True)
    model.eval()
    meta = {
        "arch": ARCH, "vocab": tokenizer.vocab, "vocab_size": cfg_vocab, "context_length": tokenizer.context_length,
        "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "seed": seed,
                  "seconds": round(time.perf_counter() - t0, 1)},
        "zero_shot_accuracy": {"id_6way": zero_shot_accuracy(model, tokenizer, n=1200),
                               "all_12way": zero_shot_accuracy(model, tokenizer, SHAPES, n=1200)},
        "history": history,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = out / ".toyworld.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"vlmood_arch": ARCH})
    os.replace(tmp, out / "toyworld.safetensors")
    (out / "toyworld.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta
