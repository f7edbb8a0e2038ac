"""The toy world's CLIPN "no" side: the recipe that makes the shipped ``assets/toyworld-clipn.safetensors``.

CLIPN (:mod:`vlmood.clipn`) is trained from the shipped toy-world CLIP (``vlmood.load_encoder("toyworld")``) on
freshly generated toy-world image-caption pairs, as the reference trains on CC3M: ``World([DATA_TAG, data_seed])``
draws ``pairs`` scenes over all 12 shapes (5% empty backgrounds, 12% pairs of objects) with their captions. The
tagged seed keeps these pairs apart from every other toy-world set (the CLIP was trained on ``World(0)``, the
benchmark draws from 2024..2026, the few-shot splits from ``[8, ...]``). Everything else is the reference's
(:class:`vlmood.clipn.trainer.CLIPNTrainer` defaults: AdamW lr 3e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2,
cosine without warmup, 16 no prompts), at a toy scale: 4096 pairs, 10 epochs, batch 256 (160 steps).
``benchmarks/toyworld_clipn.py`` measures the result and records the small sweep (pairs, epochs, lr) behind it.

Rebuild the shipped file (one to two minutes on one CPU core)::

    VLMOOD_CACHE=$(mktemp -d) python -m vlmood.toyworld.clipn   # writes assets/toyworld-clipn.safetensors (+ .json)
    python -m vlmood.toyworld.clipn --out my.safetensors --seed 1

or from Python: ``train_clipn(out=CLIPN_CHECKPOINT)``. The file records the recipe (``meta["recipe"]``) and the base
CLIP's fingerprint. The result is deterministic in ``seed`` and ``data_seed`` (CPU, fp32): the shipped file was
written from an empty feature/text cache (``VLMOOD_CACHE``) and a rebuild from an empty cache gives the same
tensors, bit for bit. A cache that already holds some of the captions' embeddings, computed in other batches, can
move the weights by about 1e-6 (float round-off of other batch shapes), which changes no reported metric.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import printable
from ..errors import InvalidInputError, VlmoodError
from ..tuning.trainer import _positive_float, _positive_int
from .model import CLIPN_CHECKPOINT

if TYPE_CHECKING:
    from ..clipn.model import CLIPNModel

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

    n, data_seed = _positive_int("pairs", n), _positive_int("data_seed", data_seed, minimum=0)

    arrays, captions, _ = World([DATA_TAG, data_seed]).batch(n)  # type: ignore[arg-type]
    return PairSource.from_memory([Image.fromarray(a) for a in arrays], captions,
                                  name=f"toyworld-clipn-pairs-{DATA_TAG}-{data_seed}-{n}")


def train_clipn(seed: int = RECIPE["seed"], pairs: int = RECIPE["pairs"], epochs: int = RECIPE["epochs"],
                batch_size: int = RECIPE["batch_size"], lr: float = RECIPE["lr"], out: str | os.PathLike | None = None,
                data_seed: int = RECIPE["data_seed"], encoder: Any = None,
                progress: bool | None = False) -> "CLIPNModel":
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
                       progress: bool | None = False) -> tuple["CLIPNModel", list[dict[str, Any]]]:
    """:func:`train_clipn` (same arguments), returning ``(model, log)``: ``log`` is the trainer's ``log_``, one
    record per step (``epoch``, ``step``, ``loss``, ``bin_yes``, ``bin_no``, ``tso``, ``lr``, ``elapsed``) plus one
    ``summary`` record per epoch."""
    from ..clipn.trainer import CLIPNTrainer
    from ..encoders import load_encoder

    # refuse bad arguments and an unwritable destination before loading and training, not after
    for name, v, least in (("seed", seed, 0), ("pairs", pairs, 1), ("epochs", epochs, 1),
                           ("batch_size", batch_size, 1), ("data_seed", data_seed, 0)):
        _positive_int(name, v, minimum=least)
    _positive_float("lr", lr)
    if out is not None:
        folder = Path(out).expanduser().parent
        if not folder.is_dir():
            raise InvalidInputError(f"cannot write {printable(str(out))}: folder {printable(str(folder))} does not "
                                    "exist")
    enc = encoder if encoder is not None else load_encoder("toyworld")
    t0 = time.perf_counter()
    src = training_pairs(pairs, data_seed)
    trainer = CLIPNTrainer(enc, seed=seed, lr=lr)
    model = trainer.fit(src, epochs=epochs, batch_size=batch_size, progress=progress)
    recipe = {"function": "vlmood.toyworld.clipn.train_clipn", "seed": seed, "pairs": pairs, "epochs": epochs,
              "batch_size": batch_size, "lr": lr, "data_seed": data_seed, "data_tag": DATA_TAG}
    model.meta["recipe"] = recipe
    if out is not None:
        spec = "toyworld" if encoder is None else str(enc.spec)  # not the asset's absolute path
        path = model.save(out, encoder_spec=spec)
        summary = {"recipe": recipe, "command": "python -m vlmood.toyworld.clipn" + _args_of(recipe),
                   "encoder": {"spec": spec, "fingerprint": enc.fingerprint},
                   "seconds": round(time.perf_counter() - t0, 1),
                   "epochs": [{k: r[k] for k in ("epoch", "loss", "bin_yes", "bin_no", "tso") if k in r}
                              for r in trainer.log_ if r.get("summary")]}
        tmp = path.with_name(f".{path.stem}.json.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, path.with_suffix(".json"))
        except OSError as e:
            raise InvalidInputError(f"cannot write {printable(str(path.with_suffix('.json')))}: "
                                    f"{e.strerror or e}") from e
        finally:
            tmp.unlink(missing_ok=True)
    return model, trainer.log_


def _args_of(recipe: dict[str, Any]) -> str:
    """The command-line flags that differ from the shipped recipe."""
    return "".join(f" --{k.replace('_', '-')} {recipe[k]}" for k in RECIPE if recipe[k] != RECIPE[k])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlmood.toyworld.clipn",
                                 description="Train the toy world's CLIPN no side (the shipped recipe by default).")
    helps = {"seed": "trainer seed: order of the pairs and prompt choices", "pairs": "training pairs",
             "epochs": "passes over the pairs", "batch_size": "pairs per step", "lr": "AdamW learning rate",
             "data_seed": f"the pairs come from World([{DATA_TAG}, DATA_SEED])"}
    for k, v in RECIPE.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v, help=f"{helps[k]} (default {v})")
    ap.add_argument("--out", default=str(CLIPN_CHECKPOINT),
                    help=f"output file (default: the shipped asset, {CLIPN_CHECKPOINT})")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        model = train_clipn(**{k: getattr(args, k) for k in RECIPE}, out=args.out, progress=None)
    except VlmoodError as e:  # a user error: one line, exit status 2 (as the vlmood command)
        print(f"error: {e}", file=sys.stderr)
        return 2
    f = {k: model.meta.get("final", {}).get(k) or 0.0 for k in ("loss", "bin_yes", "bin_no", "tso")}
    print(f"trained CLIPN's no side in {time.perf_counter() - t0:.0f} s: last-epoch loss {f['loss']:.4f} (bin_yes "
          f"{f['bin_yes']:.4f}, bin_no {f['bin_no']:.4f}, tso {f['tso']:.4f}); wrote {printable(str(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
