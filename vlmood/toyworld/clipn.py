"""The toy world's CLIPN "no" side: the recipe that makes the shipped ``assets/toyworld-clipn.safetensors``.

CLIPN (:mod:`vlmood.clipn`) is trained from the shipped toy-world CLIP (``vlmood.load_encoder("toyworld")``) on
freshly generated toy-world image-caption pairs, as the reference trains on CC3M: ``World([DATA_TAG, data_seed])``
draws ``pairs`` scenes over all 12 shapes (5% empty backgrounds, 12% pairs of objects) with their captions. The
tagged seed keeps these pairs apart from every other toy-world set (the CLIP was trained on ``World(0)``, the
benchmark draws from 2024..2026, the few-shot splits from ``[8, ...]``). Everything else is the reference's
(:class:`vlmood.clipn.trainer.CLIPNTrainer` defaults: AdamW lr 3e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2,
cosine without warmup, 16 no prompts), at a toy scale: 4096 pairs, 10 epochs, batch 256 (160 steps).
``benchmarks/toyworld_clipn.py`` measures the result and records the small sweep that chose ``lr`` and ``epochs``.

Rebuild the shipped file (about a minute on one CPU core)::

    python -m vlmood.toyworld.clipn                 # writes vlmood/toyworld/assets/toyworld-clipn.safetensors (+ .json)
    python -m vlmood.toyworld.clipn --out my.safetensors --seed 1

or from Python: ``train_clipn(out=CLIPN_CHECKPOINT)``. The result is deterministic in ``seed`` and ``data_seed`` on
one machine (CPU, fp32); the file records the recipe (``meta["recipe"]``) and the base CLIP's fingerprint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .model import CLIPN_CHECKPOINT

DATA_TAG = 9
"""First element of the training pairs' seed, ``World([DATA_TAG, data_seed])`` (the few-shot splits use 8)."""
RECIPE = {"seed": 0, "pairs": 4096, "epochs": 10, "batch_size": 256, "lr": 3e-4, "data_seed": 0}
"""The shipped no side's recipe (the defaults of :func:`train_clipn`)."""


def training_pairs(n: int = RECIPE["pairs"], data_seed: int = RECIPE["data_seed"]):
    """``n`` toy-world image-caption pairs from ``World([DATA_TAG, data_seed])``, as a
    :class:`vlmood.clipn.pairs.PairSource` (PIL images in memory)."""
    from PIL import Image

    from ..clipn.pairs import PairSource
    from .world import World

    arrays, captions, _ = World([DATA_TAG, data_seed]).batch(n)  # type: ignore[arg-type]
    return PairSource.from_memory([Image.fromarray(a) for a in arrays], captions,
                                  name=f"toyworld-clipn-pairs-{DATA_TAG}-{data_seed}-{n}")


def train_clipn(seed: int = RECIPE["seed"], pairs: int = RECIPE["pairs"], epochs: int = RECIPE["epochs"],
                batch_size: int = RECIPE["batch_size"], lr: float = RECIPE["lr"], out: str | os.PathLike | None = None,
                data_seed: int = RECIPE["data_seed"], encoder: Any = None, progress: bool | None = False):
    """Train CLIPN's no side for the toy world's CLIP; returns the :class:`vlmood.clipn.CLIPNModel`.

    Args:
        seed: the trainer's seed (order of the pairs and the prompt choices).
        pairs, data_seed: how many training pairs, drawn from ``World([DATA_TAG, data_seed])``.
        epochs, batch_size, lr: training (other hyper-parameters: :class:`~vlmood.clipn.trainer.CLIPNTrainer`'s).
        out: write the result there (``CLIPNModel.save``) and a JSON summary beside it (same name, ``.json``).
        encoder: the base CLIP (default ``vlmood.load_encoder("toyworld")``).
        progress: progress bars (None: on a terminal).

    The model's ``meta["recipe"]`` holds these arguments (``CLIPNModel.save`` writes it into the file).
    :func:`train_clipn_logged` also returns the per-step training log.
    """
    return train_clipn_logged(seed, pairs, epochs, batch_size, lr, out, data_seed, encoder, progress)[0]


def train_clipn_logged(seed: int = RECIPE["seed"], pairs: int = RECIPE["pairs"], epochs: int = RECIPE["epochs"],
                       batch_size: int = RECIPE["batch_size"], lr: float = RECIPE["lr"],
                       out: str | os.PathLike | None = None, data_seed: int = RECIPE["data_seed"], encoder: Any = None,
                       progress: bool | None = False) -> tuple[Any, list[dict[str, Any]]]:
    """:func:`train_clipn` (same arguments), returning ``(model, log)``: ``log`` is the trainer's ``log_``, one
    record per step (``epoch``, ``step``, ``loss``, ``bin_yes``, ``bin_no``, ``tso``, ``lr``, ``elapsed``) plus one
    ``summary`` record per epoch."""
    from ..clipn.trainer import CLIPNTrainer
    from ..encoders import load_encoder

    enc = encoder if encoder is not None else load_encoder("toyworld")
    t0 = time.perf_counter()
    src = training_pairs(pairs, data_seed)
    trainer = CLIPNTrainer(enc, seed=seed, lr=lr)
    model = trainer.fit(src, epochs=epochs, batch_size=batch_size, progress=progress)
    recipe = {"function": "vlmood.toyworld.clipn.train_clipn", "seed": seed, "pairs": pairs, "epochs": epochs,
              "batch_size": batch_size, "lr": lr, "data_seed": data_seed, "data_tag": DATA_TAG}
    model.meta["recipe"] = recipe
    if out is not None:
        path = model.save(out)
        summary = {"recipe": recipe, "command": "python -m vlmood.toyworld.clipn" + _args_of(recipe),
                   "encoder": {"spec": "toyworld" if encoder is None else str(enc.spec), "fingerprint": enc.fingerprint},
                   "seconds": round(time.perf_counter() - t0, 1),
                   "epochs": [{k: r[k] for k in ("epoch", "loss", "bin_yes", "bin_no", "tso") if k in r}
                              for r in trainer.log_ if r.get("summary")]}
        tmp = path.with_name(f".{path.stem}.json.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, path.with_suffix(".json"))
        finally:
            tmp.unlink(missing_ok=True)
    return model, trainer.log_


def _args_of(recipe: dict[str, Any]) -> str:
    """The command-line flags that differ from the shipped recipe."""
    return "".join(f" --{k.replace('_', '-')} {recipe[k]}" for k in RECIPE if recipe[k] != RECIPE[k])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlmood.toyworld.clipn",
                                 description="Train the toy world's CLIPN no side (the shipped recipe by default).")
    for k, v in RECIPE.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    ap.add_argument("--out", default=str(CLIPN_CHECKPOINT),
                    help=f"output file (default: the shipped asset, {CLIPN_CHECKPOINT})")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    model = train_clipn(**{k: getattr(args, k) for k in RECIPE}, out=args.out, progress=None)
    final = model.meta.get("final", {})
    print(f"trained CLIPN's no side in {time.perf_counter() - t0:.0f} s: last-epoch loss {final.get('loss', 0):.4f} "
          f"(bin_yes {final.get('bin_yes', 0):.4f}, bin_no {final.get('bin_no', 0):.4f}, tso {final.get('tso', 0):.4f}); "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
