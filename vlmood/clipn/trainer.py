"""CLIPN training on image-caption pairs: one device, or several processes through ``torchrun``.

Reference facts matched (xmed-lab/CLIPN ``src/training/main.py``, ``train.py``, ``scheduler.py``, ``params.py``,
``src/open_clip/loss.py``, ``model.py``, ``run.sh``):

- Trainable: the no side only (every parameter whose name contains ``_no``); image tower, yes tower and logit scale
  frozen; the loss is :func:`vlmood.losses.clipn_loss` with the frozen ``logit_scale.exp()``.
- Each caption uses one of the ``K`` no prompts or their mean, uniformly (``K + 1`` choices).
- AdamW, lr 3e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 except for parameters with fewer than 2 dimensions
  or whose name contains ``bn``, ``ln``, ``bias`` or ``logit_scale``; cosine schedule per step over all steps after
  ``warmup_steps`` linear warmup steps (reference: 0), ``lr_t = lr * (1 + cos(pi * t / T)) / 2``; no gradient clip.
- Batch 512 per process (the reference: 4 GPUs, global batch 2048), 10 epochs, mixed precision on GPU.
- With several processes the features of the whole global batch are all-gathered and every process computes the loss
  of the global batch (the reference's ``gather_features`` without gradient, the local chunk put back).

vlmood's differences, by design:

- The image tower and the yes text tower are frozen, so each image and each caption is encoded once, before
  training (through the feature and text caches: an interrupted extraction resumes), not every step. The
  reference's training crops (a random resized crop of 90-100% of the image) are therefore not applied: images go
  through the encoder's own preprocessing.
- The no tower runs over each batch trimmed to its longest caption (exact: causal attention).
- Gradients are summed over processes (the reference's DDP averages them): a step on ``W`` processes with ``B``
  pairs each equals a step of one process on the same ``W * B`` pairs (the reference's average scales the gradient
  by ``1/W``, which AdamW nearly cancels).
- Everything random derives from ``seed``: epoch ``e``'s order from ``default_rng([seed, 2, e])``, its prompt
  choices from ``default_rng([seed, 4, e])`` (one per pair, so they do not depend on how the
  global batch is split over processes). A run resumed from a checkpoint (written after every epoch and at least
  every ``checkpoint_seconds``) therefore equals an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from .._io import printable
from .._progress import progress as _progress
from ..data import ImageSource
from ..errors import InvalidInputError
from ..losses import clipn_loss
from ..tuning.trainer import NonFiniteLossError, _differing, _positive_float, _positive_int, rewrite_log
from .model import NUM_NO_PROMPTS, CLIPNModel

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
RESULT = "clipn.safetensors"
ORDER_STREAM, PROMPT_STREAM = 2, 4
"""Tags of the random streams: ``default_rng([seed, 2, e])`` orders epoch ``e``, ``default_rng([seed, 4, e])`` draws
its prompt choices."""
ON_ERROR = ("skip", "error")
_CHECKPOINT_KEYS = ("no", "optimizer", "step", "elapsed", "signature")
_TOKEN_CHUNK = 65536


def lr_at(step: int, lr: float, total: int, warmup: int = 0) -> float:
    """Learning rate of step ``step`` (from 0) of ``total``: linear warmup, then cosine (the reference's
    ``cosine_lr``)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * lr


def decays(name: str, p: torch.Tensor) -> bool:
    """Whether weight decay applies to parameter ``name`` (the reference's rule, on its parameter names)."""
    return not (p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name)


def distributed() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised ``torch.distributed`` group, or ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` as ``torchrun`` sets them in the environment (``(0, 1, 0)`` without it);
    a malformed value is a one-line :class:`InvalidInputError`."""
    out = []
    for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        raw = os.environ.get(name, default) or default
        if not raw.strip().isdigit():
            raise InvalidInputError(f"{name} must be a non-negative integer (torchrun sets it), got {raw!r}")
        out.append(int(raw))
    rank, world, local = out
    if world < 1 or rank >= world:
        raise InvalidInputError(f"RANK={rank} and WORLD_SIZE={world} do not fit (0 <= RANK < WORLD_SIZE)")
    return rank, world, local


def init_distributed(device: str | None = None) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment): NCCL on CUDA, else
    gloo. Returns ``(rank, world_size)``; without torchrun, or with one process, nothing is initialised
    (``(0, 1)``). Each process uses GPU ``LOCAL_RANK`` when there are GPUs. A malformed environment or a failed
    rendezvous is a one-line :class:`InvalidInputError`."""
    import torch.distributed as dist

    _, world, local = env_world()
    if world <= 1:
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    try:
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    except (ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InvalidInputError(f"cannot join the torchrun process group (WORLD_SIZE={world}): {first}; start "
                                "several processes with torchrun, which sets MASTER_ADDR and MASTER_PORT") from e
    return dist.get_rank(), dist.get_world_size()


class CLIPNTrainer:
    """Train CLIPN's no side on image-caption pairs (scikit-learn style: hyper-parameters here, data in :meth:`fit`).

    Args:
        encoder: the base CLIP (open_clip, causal text tower); it stays frozen.
        n_prompts: learnable no prompts (reference: 16).
        lr, betas, eps, weight_decay, warmup_steps: AdamW and schedule (reference: 3e-4, (0.9, 0.98), 1e-6, 0.2, 0).
        grad_clip: clip the gradient norm to this value (None: no clipping, as the reference's default).
        grad_checkpointing: recompute the no tower's activations in the backward pass (less memory, slower).
        seed: seeds the order and the prompt choices.

    After :meth:`fit`: ``model_`` (the :class:`CLIPNModel`), ``log_`` (the training log records) and ``skipped_``
    (pairs left out, by reason).
    """

    method = "clipn"

    def __init__(self, encoder: Any, n_prompts: int = NUM_NO_PROMPTS, lr: float = 3e-4,
                 betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6, weight_decay: float = 0.2,
                 warmup_steps: int = 0, grad_clip: float | None = None, grad_checkpointing: bool = False,
                 seed: int = 0):
        from ..encoders.text_forward import require_prompt_learning

        require_prompt_learning(encoder)
        self.encoder = encoder
        self.n_prompts = _positive_int("n_prompts", n_prompts)
        self.lr = _positive_float("lr", lr)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            raise InvalidInputError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = _positive_float("eps", eps)
        self.weight_decay = _positive_float("weight_decay", weight_decay, allow_zero=True)
        self.warmup_steps = _positive_int("warmup_steps", warmup_steps, minimum=0)
        self.grad_clip = None if grad_clip is None else _positive_float("grad_clip", grad_clip)
        self.grad_checkpointing = bool(grad_checkpointing)
        self.seed = _positive_int("seed", seed, minimum=0)

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor's hyper-parameters (JSON-serialisable)."""
        return {"n_prompts": self.n_prompts, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "warmup_steps": self.warmup_steps, "grad_clip": self.grad_clip,
                "grad_checkpointing": self.grad_checkpointing, "seed": self.seed}

    # ------------------------------------------------------------------ training
    def fit(self, pairs: Any, epochs: int = 10, batch_size: int = 512, out: str | os.PathLike | None = None,
            resume: bool = False, progress: bool | None = None, on_error: str = "skip",
            checkpoint_seconds: float = 300.0, caption_column: str = "caption", image_column: str | None = None,
            split: str | None = None) -> CLIPNModel:
        """Train on ``pairs`` (anything :func:`vlmood.clipn.pairs.as_pairs` accepts).

        Args:
            pairs: image-caption pairs: a Hugging Face dataset (or ``hf:NAME[:split]``), a CSV/TSV manifest of
                image paths and captions, webdataset-style tar shards, or a :class:`~vlmood.clipn.pairs.PairSource`.
            epochs, batch_size: passes over the data and pairs per step *per process* (reference: 10 and 512).
            out: a run folder: ``checkpoint.pt`` (the no side, optimiser state, step; after every epoch and at least
                every ``checkpoint_seconds``), ``log.jsonl`` (one record per step and per epoch) and
                ``clipn.safetensors`` (the result). None keeps nothing on disk but the feature caches.
            resume: continue the run in ``out`` from its checkpoint (same arguments required); the result equals an
                uninterrupted run's.
            progress: progress with an ETA (:mod:`vlmood._progress`; None: shown only for long runs, False: never).
            on_error: unreadable images: ``"skip"`` their pairs (counted in the log and ``skipped_``) or ``"error"``.
            caption_column, image_column, split: for datasets and manifests.

        Raises:
            InvalidInputError: bad arguments or data, a mismatched checkpoint.
            NonFiniteLossError: the loss or gradient became NaN/infinite (epoch and step named; the last good
                checkpoint is kept).
        """
        with torch.inference_mode(False), torch.enable_grad():
            return self._fit(pairs, epochs, batch_size, out, resume, progress, on_error, checkpoint_seconds,
                             caption_column, image_column, split)

    def _fit(self, pairs: Any, epochs: int, batch_size: int, out: Any, resume: bool, progress: bool | None,
             on_error: str, checkpoint_seconds: float, caption_column: str, image_column: str | None,
             split: str | None) -> CLIPNModel:
        from .pairs import as_pairs

        epochs = _positive_int("epochs", epochs)
        batch_size = _positive_int("batch_size", batch_size)
        checkpoint_seconds = _positive_float("checkpoint_seconds", checkpoint_seconds)
        if on_error not in ON_ERROR:
            raise InvalidInputError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if resume and out is None:
            raise InvalidInputError("resume=True needs the run folder out= of the run to continue")
        rank, world = distributed()
        _, env_size, _ = env_world()
        if env_size > 1 and world == 1:
            raise InvalidInputError(f"WORLD_SIZE={env_size} (torchrun) but this process has not joined the process "
                                    "group: call vlmood.clipn.trainer.init_distributed() before fit (vlmood train "
                                    "clipn does), or every process would train alone on all the data")
        if world > 1 and out is None:
            raise InvalidInputError("training with several processes needs a run folder (out=, --run-dir)")
        enc = self.encoder
        src = as_pairs(pairs, caption_column=caption_column, image_column=image_column, split=split)
        run = Path(out) if out is not None else None

        data = _prepare(enc, src, on_error, progress if rank == 0 else False, rank, world)
        data.to_device(torch.device(enc.device))
        n = data.n
        global_batch = batch_size * world
        if n < global_batch:
            if world > 1:
                raise InvalidInputError(f"{n} usable pairs are fewer than one global batch ({world} processes x "
                                        f"{batch_size}); lower --batch-size")
            warnings.warn(f"{n} usable pairs are fewer than batch_size={batch_size}: training on batches of {n}",
                          stacklevel=3)
            global_batch = batch_size = n
        steps_per_epoch = n // global_batch  # the last incomplete batch is dropped
        total = steps_per_epoch * epochs
        signature = {
            "method": self.method, "hyperparameters": self.hyperparameters(), "epochs": epochs,
            "batch_size": batch_size, "world_size": world, "on_error": on_error,
            "encoder": {"spec": str(enc.spec), "fingerprint": enc.fingerprint, "precision": str(enc.precision),
                        "device": torch.device(enc.device).type},
            "data": {"name": printable(src.name), "pairs": n, "sha256": data.digest},
        }
        state = self._open_run(run, signature, resume, rank) if run is not None else None

        model = CLIPNModel(enc, n_prompts=self.n_prompts)
        no = model.no
        no.transformer_no.grad_checkpointing = self.grad_checkpointing
        named = list(no.named_parameters())
        opt = torch.optim.AdamW(
            [{"params": [p for k, p in named if not decays(k, p)], "weight_decay": 0.0},
             {"params": [p for k, p in named if decays(k, p)], "weight_decay": self.weight_decay}],
            lr=self.lr, betas=self.betas, eps=self.eps)
        fp16 = str(enc.precision) == "fp16" and torch.device(enc.device).type == "cuda"
        scaler = torch.amp.GradScaler("cuda") if fp16 else None
        start, elapsed0 = 0, 0.0
        if state is not None:
            no.load_state_dict(state["no"])
            opt.load_state_dict(state["optimizer"])
            if scaler is not None and "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            start, elapsed0 = int(state["step"]), float(state["elapsed"])
        log = self._read_log(run, start, steps_per_epoch) if (run is not None and state is not None and rank == 0) else []
        log_file = open(run / LOG, "a", encoding="utf-8") if (run is not None and rank == 0) else None
        if rank == 0 and start == 0:
            self._log(log, log_file, {"data": {"pairs": n, "skipped": data.skipped, "truncated": data.truncated,
                                                "features_s": round(data.seconds, 3)}})
        loop = _Loop(model=model, opt=opt, scaler=scaler, data=data, batch_size=batch_size, world=world, rank=rank,
                     steps_per_epoch=steps_per_epoch, total=total, epochs=epochs, log=log, log_file=log_file,
                     run=run, signature=signature, elapsed0=elapsed0, checkpoint_seconds=checkpoint_seconds,
                     bar=_progress(total - start, "clipn training", "steps", progress if rank == 0 else False,
                                   start=f"training clipn on {n} pairs with {enc.spec}: steps {start + 1}-{total} "
                                         f"({epochs} epochs of {steps_per_epoch} steps)"))
        try:
            step = start
            with loop.bar:
                for epoch in range(start // steps_per_epoch, epochs):
                    step = self._epoch(loop, epoch, step)
        finally:
            if log_file is not None:
                log_file.close()
        last = next((r for r in reversed(log) if r.get("summary")), {})
        model.meta = {"method": self.method, "hyperparameters": self.hyperparameters(), "epochs": epochs,
                      "batch_size": batch_size, "world_size": world, "steps": total,
                      "data": signature["data"] | {"skipped": data.skipped, "truncated": data.truncated},
                      "final": {k: last.get(k) for k in ("loss", "bin_yes", "bin_no", "tso", "elapsed")}}
        model.invalidate()
        self.model_, self.log_, self.skipped_ = model, log, dict(data.skipped)
        if run is not None and rank == 0:
            model.save(run / RESULT)
        return model

    def _epoch(self, loop: "_Loop", epoch: int, step: int) -> int:
        """Epoch ``epoch`` (from 0) from global step ``step``; returns the global step after it."""
        model, opt, data = loop.model, loop.opt, loop.data
        n, spe = data.n, loop.steps_per_epoch
        order = np.random.default_rng([self.seed, ORDER_STREAM, epoch]).permutation(n)
        prompt_of = np.random.default_rng([self.seed, PROMPT_STREAM, epoch]).integers(0, self.n_prompts + 1, size=n)
        g, b = loop.batch_size * loop.world, loop.batch_size
        dev = torch.device(self.encoder.device)
        scale = float(self.encoder.logit_scale)
        params = [p for p in model.no.parameters()]
        first = step - epoch * spe
        t_epoch = time.perf_counter()
        for s in range(first, spe):
            rows = order[s * g : (s + 1) * g]
            mine = rows[loop.rank * b : (loop.rank + 1) * b]
            lr = lr_at(step, self.lr, loop.total, self.warmup_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = torch.from_numpy(mine)
            img = data.image[idx.to(data.image.device)].to(dev, non_blocking=True)
            yes = data.text[idx.to(data.text.device)].to(dev, non_blocking=True)
            u = F.normalize(model.encode_no_tokens(data.tokens[idx].long(), torch.from_numpy(prompt_of[mine]),
                                                   data.eot[idx].long()).float(), dim=-1)
            if loop.world > 1:
                img, yes, u = _gather(img, loop), _gather(yes, loop), _gather(u, loop)
            total, parts = clipn_loss(img, yes, u, scale)
            vals = {"loss": float(total.detach())} | {k: float(v.detach()) for k, v in parts.items()}
            if not math.isfinite(vals["loss"]):
                self._diverged(loop, epoch, s, vals, "loss")
            opt.zero_grad(set_to_none=True)
            (loop.scaler.scale(total) if loop.scaler is not None else total).backward()
            if loop.world > 1:
                import torch.distributed as dist

                for p in params:
                    if p.grad is not None:
                        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            if loop.scaler is not None:
                loop.scaler.unscale_(opt)
            if not all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None):
                if loop.scaler is None:
                    self._diverged(loop, epoch, s, vals, "gradient")
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            if loop.scaler is not None:
                loop.scaler.step(opt)
                loop.scaler.update()
            else:
                opt.step()
            step += 1
            self._log(loop.log, loop.log_file, {"epoch": epoch + 1, "step": step, **vals, "lr": lr,
                                                "elapsed": loop.elapsed()})
            loop.bar.set_postfix(epoch=f"{epoch + 1}/{loop.epochs}", loss=f"{vals['loss']:.4f}")
            loop.bar.update(1)
            if loop.run is not None and time.monotonic() - loop.last_save >= loop.checkpoint_seconds and s + 1 < spe:
                self._save(loop, step)
        recs = [r for r in loop.log if r.get("epoch") == epoch + 1 and not r.get("summary") and "loss" in r]
        means = {k: sum(r[k] for r in recs) / len(recs) for k in ("loss", "bin_yes", "bin_no", "tso")} if recs else {}
        summary = {"epoch": epoch + 1, "summary": True, **means, "steps": spe,
                   "epoch_s": round(time.perf_counter() - t_epoch, 4), "elapsed": loop.elapsed()}
        self._log(loop.log, loop.log_file, summary)
        if loop.run is not None:
            self._save(loop, step)
        return step

    # ------------------------------------------------------------------ run folder
    def _open_run(self, run: Path, signature: dict[str, Any], resume: bool, rank: int) -> dict[str, Any] | None:
        """The checkpoint to resume from (None: start afresh); refuses to overwrite or to resume another run."""
        ck = run / CHECKPOINT
        if run.exists() and not run.is_dir():
            raise InvalidInputError(f"run folder {printable(str(run))} is a file; out= must be a folder")
        if not ck.is_file():
            if resume and rank == 0:
                warnings.warn(f"no checkpoint in {printable(str(run))}: starting a new run", stacklevel=4)
            if rank == 0:
                try:
                    run.mkdir(parents=True, exist_ok=True)
                    (run / LOG).write_text("", encoding="utf-8")
                except OSError as e:
                    raise InvalidInputError(f"cannot write the run folder {printable(str(run))}: "
                                            f"{e.strerror or e}") from e
            return None
        try:
            state = torch.load(ck, map_location="cpu", weights_only=True)
            missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
            if missing:
                raise ValueError(f"it lacks {', '.join(missing)}")
            old = json.loads(state["signature"])
            if not isinstance(old, dict) or not isinstance(state["no"], dict):
                raise ValueError("its signature or weights are malformed")
        except Exception as e:
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
            raise InvalidInputError(f"cannot read the checkpoint {printable(str(ck))} ({type(e).__name__}: "
                                    f"{printable(first[:200])}); delete the run folder {printable(str(run))} to "
                                    "start afresh") from e
        if not resume:
            raise InvalidInputError(f"{printable(str(run))} already holds a run (checkpoint after step "
                                    f"{state['step']}); pass resume=True (--resume) to continue it, or choose "
                                    "another run folder")
        if old != signature:
            raise InvalidInputError(f"cannot resume {printable(str(run))}: its run differs in "
                                    f"{', '.join(_differing(old, signature))}; resume with the same arguments, or "
                                    "choose another run folder")
        return state

    def _save(self, loop: "_Loop", step: int) -> None:
        """Write the checkpoint after global step ``step`` (rank 0; temporary file, then renamed)."""
        loop.last_save = time.monotonic()
        if loop.rank != 0 or loop.run is None:
            return
        state = {"no": {k: v.detach().cpu().clone() for k, v in loop.model.no.state_dict().items()},
                 "optimizer": loop.opt.state_dict(), "step": step, "elapsed": loop.elapsed(),
                 "signature": json.dumps(loop.signature)}
        if loop.scaler is not None:
            state["scaler"] = loop.scaler.state_dict()
        tmp = loop.run / (CHECKPOINT + ".tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, loop.run / CHECKPOINT)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _read_log(run: Path, steps_done: int, steps_per_epoch: int) -> list[dict[str, Any]]:
        """The log records up to the checkpoint's step; the file is rewritten with only those."""
        def keep(rec: dict[str, Any]) -> bool:
            step, epoch = rec.get("step"), rec.get("epoch")
            if rec.get("summary"):
                return isinstance(epoch, int) and epoch * steps_per_epoch <= steps_done
            return "data" in rec or (isinstance(step, int) and step <= steps_done)

        return rewrite_log(run / LOG, keep)

    @staticmethod
    def _log(log: list[dict[str, Any]], log_file: Any, rec: dict[str, Any]) -> None:
        rec = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()}
        log.append(rec)
        if log_file is not None:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()

    def _diverged(self, loop: "_Loop", epoch: int, s: int, vals: dict[str, float], what: str) -> None:
        parts = ", ".join(f"{k}={v:.4g}" for k, v in vals.items())
        self._log(loop.log, loop.log_file, {"epoch": epoch + 1, "step": epoch * loop.steps_per_epoch + s + 1,
                                            "error": f"non-finite {what}", **vals})
        ck = loop.run / CHECKPOINT if loop.run is not None else None
        kept = (f"the last good checkpoint is kept in {printable(str(ck))}" if ck is not None and ck.is_file()
                else "there is no checkpoint")
        raise NonFiniteLossError(f"clipn training stopped: non-finite {what} at epoch {epoch + 1}, step {s + 1} of "
                                 f"{loop.steps_per_epoch} ({parts}); {kept}; lower lr or check the training data")


def _gather(x: torch.Tensor, loop: "_Loop") -> torch.Tensor:
    """All processes' ``x`` concatenated in rank order; only this process's chunk keeps its gradient."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(loop.world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[loop.rank] = x
    return torch.cat(parts)


@dataclass
class _Data:
    """Training pairs, encoded once: image and yes-caption features ``[n, D]``, caption tokens and end positions."""

    image: torch.Tensor
    text: torch.Tensor
    tokens: torch.Tensor
    eot: torch.Tensor
    skipped: dict[str, int]
    truncated: int
    digest: str
    seconds: float

    @property
    def n(self) -> int:
        return int(self.image.shape[0])

    def to_device(self, device: torch.device) -> None:
        """Keep the features on a CUDA device when they take at most a quarter of its free memory (no copy per
        step), else in pinned host memory; tokens and end positions stay on the CPU (their batch maximum decides
        the trimmed length without a device sync)."""
        if device.type != "cuda":
            return
        need = (self.image.numel() + self.text.numel()) * self.image.element_size()
        free = torch.cuda.mem_get_info(device)[0]
        if need <= free // 4:
            self.image, self.text = self.image.to(device), self.text.to(device)
        else:
            self.image, self.text = self.image.pin_memory(), self.text.pin_memory()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _prepare(enc: Any, src: Any, on_error: str, progress: bool | None, rank: int, world: int) -> _Data:
    """Encode every image and caption of ``src`` once (through the feature and text caches), tokenize the captions.

    With several processes each encodes its share into the shared cache first, then every process reads all.
    """
    from ..encoders.text_forward import eot_positions
    from ..features import extract_features
    from ..text.embed import embed_texts

    t0 = time.perf_counter()
    image_index = np.asarray(getattr(src, "image_index", None) if getattr(src, "image_index", None) is not None
                             else np.arange(len(src.captions)))
    used = np.unique(image_index).tolist()  # only images some pair uses (a subset() may leave others behind)
    images = _Subset(src.images, used)
    if world > 1:  # fill the shared caches in parallel, then read them
        share = list(range(rank, len(images), world))
        if share:
            extract_features(enc, _Subset(images, share), on_error="skip", progress=False)
        caps = list(dict.fromkeys(src.captions))[rank::world]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            embed_texts(enc, caps, cache=True, progress=False)
        _barrier(world)
    feats = extract_features(enc, images, on_error="skip" if on_error == "skip" else "raise", progress=progress)
    row = {i: k for k, i in enumerate(feats.ids)}
    keep = [p for p in range(len(src.captions)) if src.images.ids[int(image_index[p])] in row]
    skipped = dict(src.skipped)
    lost = len(src.captions) - len(keep)
    if lost:
        skipped["unreadable image"] = skipped.get("unreadable image", 0) + lost
        shown = "; ".join(f"{printable(i)}: {m}" for i, m in feats.errors[:3])
        warnings.warn(f"skipped {lost} pair(s) whose image could not be read ({len(feats.errors)} image(s)): {shown}",
                      stacklevel=4)
    if not keep:
        raise InvalidInputError(f"no usable image-caption pair in {printable(src.name)}")
    captions = [src.captions[p] for p in keep]
    image = feats.features[[row[src.images.ids[int(image_index[p])]] for p in keep]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation is counted below, once
        text = embed_texts(enc, captions, cache=True, progress=progress)
        tokens, eots, truncated = [], [], 0
        for i in range(0, len(captions), _TOKEN_CHUNK):
            chunk = captions[i : i + _TOKEN_CHUNK]
            tok, _ = enc.tokenize(chunk)
            truncated += len(_truncated(enc, chunk, tok))
            tokens.append(tok.to(torch.int32))
            eots.append(eot_positions(enc, tok).to(torch.int32))
    if truncated:
        warnings.warn(f"{truncated} of {len(captions)} captions are longer than the text context of "
                      f"{tokens[0].shape[1]} tokens and were truncated", stacklevel=4)
    identity = dict(zip(used, images.identities()))  # once per image (cached hashes where the source has them)
    digest = hashlib.sha256()
    for p in keep:
        digest.update(identity[int(image_index[p])].encode("utf-8", "surrogatepass") + b"\0")
        digest.update(src.captions[p].encode("utf-8", "surrogatepass") + b"\0")
    return _Data(image=image, text=text, tokens=torch.cat(tokens), eot=torch.cat(eots), skipped=skipped,
                 truncated=truncated, digest=digest.hexdigest(), seconds=time.perf_counter() - t0)


def _truncated(enc: Any, texts: Sequence[str], tokens: torch.Tensor) -> list[int]:
    """Rows of ``texts`` that were cut to the context length."""
    fn = getattr(enc, "_truncated_rows", None)
    return fn(texts, tokens) if callable(fn) else []


class _Subset(ImageSource):
    """Images ``indices`` of an image source (to split feature extraction over processes)."""

    def __init__(self, source: Any, indices: Sequence[int]):
        self.source, self.indices = source, list(indices)
        self.ids = [source.ids[i] for i in self.indices]
        self.labels = None
        self.name = f"{source.name} (part)"

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> Any:
        return self.source.load(self.indices[i])

    def identity(self, i: int) -> str:
        return self.source.identity(self.indices[i])

    def identities(self) -> list[str]:
        return [self.identity(i) for i in range(len(self))]


@dataclass
class _Loop:
    """What the epochs of one :meth:`CLIPNTrainer.fit` share."""

    model: CLIPNModel
    opt: torch.optim.Optimizer
    scaler: Any
    data: _Data
    batch_size: int
    world: int
    rank: int
    steps_per_epoch: int
    total: int
    epochs: int
    log: list[dict[str, Any]]
    log_file: Any
    run: Path | None
    signature: dict[str, Any]
    elapsed0: float
    checkpoint_seconds: float
    bar: Any  # a vlmood._progress.progress over the run's remaining steps (silent on ranks other than 0)
    t0: float = field(default_factory=time.perf_counter)
    last_save: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        """Training seconds so far, including those of the steps a resumed run restored."""
        return round(self.elapsed0 + time.perf_counter() - self.t0, 4)
