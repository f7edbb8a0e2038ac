"""The training loop shared by CoOp and LoCoOp: few-shot sampling, frozen view features, SGD on the context.

Reference facts matched (KaiyangZhou/CoOp ``configs/trainers/CoOp/vit_b16_ep50.yaml`` and Dassl.pytorch
``dassl/config/defaults.py``, ``dassl/optim/optimizer.py``, ``dassl/optim/lr_scheduler.py``,
``dassl/data/data_manager.py``; AtsuMiyai/LoCoOp ``trainers/locoop.py``, ``scripts/locoop/train.sh``):

- SGD, lr 0.002, momentum 0.9, weight decay 5e-4, no dampening, no Nesterov; only the context is optimised.
- Learning rate per epoch (the scheduler steps once per epoch, after its last batch): 1 warmup epoch at the constant
  lr 1e-5, then cosine annealing restarted at the warmup's end (``WARMUP_RECOUNT=True``) with ``T_max = epochs``::

      lr(e) = warmup_lr                                          for e < warmup_epochs
      lr(e) = lr * (1 + cos(pi * (e - warmup_epochs) / epochs)) / 2   otherwise      (e counted from 0)

- Batch size 32, random order each epoch; the last incomplete batch is dropped when there are at least
  ``batch_size`` images (Dassl: ``drop_last = len(data) >= batch_size``).
- Few-shot sampling: ``shots`` images per class drawn without replacement; Dassl silently takes all images of a
  class that has fewer (here: an error naming the classes, or ``on_missing="use_all"`` with a warning).
- Logits: ``logit_scale * cos(image feature, class text feature)``, globally and per patch.

vlmood's differences, by design: the image tower runs once per augmented view before training
(:mod:`vlmood.tuning.views`), not every step; the text tower runs over the prompts trimmed to their longest
length. Every random choice derives from ``seed``: the few-shot sample (numpy generator ``(seed, 1)``), the context
initialisation (a torch generator), the views' augmentations (``(seed, 3, image, view)``) and, per epoch ``e``, the
image order and the view each image uses (``(seed, 2, e)``). Each stream has its own tag because numpy's
``SeedSequence`` ignores trailing zeros (``(seed, k, 0)`` would equal ``(seed, k)``, and ``seed`` ``(seed, 0)``).
The random state of epoch ``e`` is therefore ``(seed, 2, e)`` itself, which is why a resumed run, restored from the
context and optimiser state saved after each epoch, equals an uninterrupted one exactly.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from .._io import printable
from .._progress import progress as _progress
from ..data import as_source, map_labels
from ..encoders.text_forward import require_prompt_learning
from ..errors import InvalidInputError, VlmoodError
from ..text.prompts import load_classes
from .learner import build_prompts, init_context
from .prompts import LearnedPrompts
from .views import DEFAULT_VIEWS, extract_views

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
PROMPTS = "prompts.safetensors"
SAMPLE = "sample.json"
ON_MISSING = ("error", "use_all")
SAMPLE_STREAM, EPOCH_STREAM = 1, 2
"""Tags of the random streams: ``default_rng([seed, SAMPLE_STREAM])`` draws the few-shot sample,
``default_rng([seed, EPOCH_STREAM, e])`` epoch ``e``'s order and views (the views' augmentations use tag 3, see
:data:`vlmood.tuning.views.VIEW_STREAM`)."""
_CHECKPOINT_KEYS = ("ctx", "optimizer", "epoch", "elapsed", "signature")


class NonFiniteLossError(VlmoodError, FloatingPointError):
    """Training produced a NaN or infinite loss or gradient; the message names the epoch and step."""


def lr_at(epoch: int, lr: float, epochs: int, warmup_epochs: int = 1, warmup_lr: float = 1e-5) -> float:
    """Learning rate of epoch ``epoch`` (from 0): constant warmup, then cosine (see the module docstring)."""
    if epoch < warmup_epochs:
        return warmup_lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _positive_float(name: str, value: Any, allow_zero: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)) and \
        (float(value) > 0 or (allow_zero and float(value) == 0))
    if not ok:
        raise InvalidInputError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def sample_few_shot(labels: np.ndarray, classes: Sequence[str], shots: int, seed: int, on_missing: str,
                    source: str) -> np.ndarray:
    """Indices of ``shots`` images per class (without replacement, seeded), class by class, each class sorted.

    Classes with fewer images raise :class:`InvalidInputError` naming them, or with ``on_missing="use_all"``
    contribute all their images (with a warning).
    """
    rng = np.random.default_rng([seed, SAMPLE_STREAM])
    picked, short = [], []
    for c in range(len(classes)):
        idx = np.flatnonzero(labels == c)
        if len(idx) < shots:
            short.append((classes[c], len(idx)))
            picked.append(idx)
        else:
            picked.append(np.sort(rng.choice(idx, size=shots, replace=False)))
    if short:
        shown = ", ".join(f"{c!r} ({n})" for c, n in short[:8]) + (f" and {len(short) - 8} more"
                                                                    if len(short) > 8 else "")
        msg = f"{source} has fewer than {shots} images for {len(short)} of {len(classes)} classes: {shown}"
        if on_missing == "error":
            raise InvalidInputError(f"{msg}; pass on_missing='use_all' to train on the images there are, or "
                                    "lower shots")
        warnings.warn(f"{msg}; training on all of them (on_missing='use_all')", stacklevel=3)
    out = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    if len(out) == 0:
        raise InvalidInputError(f"{source} has no image of any of the {len(classes)} classes")
    return out.astype(np.int64)


class PromptTrainer:
    """Base of the prompt-learning trainers (scikit-learn style: hyper-parameters here, data in :meth:`fit`).

    Args:
        encoder: an open_clip encoder with a causal text tower (see
            :func:`vlmood.encoders.text_forward.require_prompt_learning`).
        classes: the ID class names (a list, or anything :func:`vlmood.load_classes` accepts).
        n_ctx: context length (default 16; with ``init``, the phrase's token count).
        init: an init phrase such as ``"a photo of a"``, or None for random ``N(0, 0.02)`` context.
        csc: class-specific context (one context per class) instead of one shared context.
        seed: seeds everything random (sampling, initialisation, augmentation, order).
        warmup_epochs, warmup_lr: constant-lr warmup (reference: 1 epoch at 1e-5).
        momentum, weight_decay: SGD's (reference: 0.9 and 5e-4).

    After :meth:`fit`: ``prompts_`` (the :class:`LearnedPrompts`), ``samples_`` (the sampled image ids and
    classes) and ``log_`` (the training log records).
    """

    method = "prompt"
    uses_local = False

    def __init__(self, encoder: Any, classes: Any, n_ctx: int | None = None, init: str | None = None,
                 csc: bool = False, seed: int = 0, warmup_epochs: int = 1, warmup_lr: float = 1e-5,
                 momentum: float = 0.9, weight_decay: float = 5e-4):
        require_prompt_learning(encoder)
        self.encoder = encoder
        self.classes = load_classes(classes)
        self.n_ctx = None if n_ctx is None else _positive_int("n_ctx", n_ctx)
        if init is not None and (not isinstance(init, str) or not init.strip()):
            raise InvalidInputError(f"init must be a non-empty phrase such as 'a photo of a', got {init!r}")
        self.init = init
        if init is not None:  # refuse an unusable phrase now (unknown words, too long, n_ctx mismatch), not in fit
            init_context(encoder, 1, self.n_ctx, init, csc=False, seed=0)
        self.csc = bool(csc)
        self.seed = _positive_int("seed", seed, minimum=0)
        self.warmup_epochs = _positive_int("warmup_epochs", warmup_epochs, minimum=0)
        self.warmup_lr = _positive_float("warmup_lr", warmup_lr)
        self.momentum = _positive_float("momentum", momentum, allow_zero=True)
        self.weight_decay = _positive_float("weight_decay", weight_decay, allow_zero=True)

    # ------------------------------------------------------------------ method-specific
    def hyperparameters(self) -> dict[str, Any]:
        """The constructor's hyper-parameters (JSON-serialisable)."""
        return {"n_ctx": self.n_ctx, "init": self.init, "csc": self.csc, "seed": self.seed,
                "warmup_epochs": self.warmup_epochs, "warmup_lr": self.warmup_lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay}

    def _loss(self, logits: torch.Tensor, local_logits: torch.Tensor | None,
              labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    def fit(self, train_source: Any, shots: int = 16, epochs: int = 50, batch_size: int = 32, lr: float = 0.002,
            views: int = DEFAULT_VIEWS, out: str | os.PathLike | None = None, resume: bool = False,
            progress: bool | None = None, on_missing: str = "error") -> LearnedPrompts:
        """Learn the context from ``shots`` labelled images per class of ``train_source``.

        Args:
            train_source: labelled images, anything :func:`vlmood.data.as_source` accepts (an ImageFolder
                folder, a manifest with a label column, a labelled ``datasets.Dataset``, a ``MemorySource``).
            shots: images per class, sampled with ``seed``.
            epochs, batch_size, lr: reference values 50, 32, 0.002.
            views: augmented views per image, each encoded once (see :mod:`vlmood.tuning.views`).
            out: a run folder: ``checkpoint.pt`` (context, optimiser state, epoch, after every epoch),
                ``log.jsonl`` (one record per step and per epoch), ``sample.json`` (the sampled images) and
                ``prompts.safetensors`` (the result). None keeps nothing on disk but the view features.
            resume: continue the run in ``out`` from its last checkpoint (same arguments required); the result
                equals an uninterrupted run's.
            progress: progress with an ETA (:mod:`vlmood._progress`; None: shown only for long runs, False: never).
            on_missing: ``"error"`` when a class has fewer than ``shots`` images, or ``"use_all"``.

        Raises:
            InvalidInputError: unlabelled source, labels outside the class list, too few images, bad arguments,
                a mismatched checkpoint.
            NonFiniteLossError: the loss or gradient became NaN/infinite (epoch and step named; the last good
                checkpoint is kept).
            ViewStorageError: the view features fit neither where they are stored nor in memory (see
                :mod:`vlmood.tuning.views`).
        """
        # Training needs autograd: also when fit is called under torch.no_grad() or torch.inference_mode() (whose
        # tensors cannot enter a graph), so everything fit creates is made with both switched off.
        with torch.inference_mode(False), torch.enable_grad():
            return self._fit(train_source, shots, epochs, batch_size, lr, views, out, resume, progress, on_missing)

    def _fit(self, train_source: Any, shots: int, epochs: int, batch_size: int, lr: float, views: int,
             out: str | os.PathLike | None, resume: bool, progress: bool | None, on_missing: str) -> LearnedPrompts:
        """:meth:`fit`'s work, with autograd on."""
        shots = _positive_int("shots", shots)
        epochs = _positive_int("epochs", epochs)
        batch_size = _positive_int("batch_size", batch_size)
        lr = _positive_float("lr", lr)
        views = _positive_int("views", views)
        if on_missing not in ON_MISSING:
            raise InvalidInputError(f"on_missing must be one of {ON_MISSING}, got {on_missing!r}")
        if resume and out is None:
            raise InvalidInputError("resume=True needs the run folder out= of the run to continue")
        enc = self.encoder
        ctx0 = init_context(enc, len(self.classes), self.n_ctx, self.init, self.csc, self.seed)
        n_ctx = int(ctx0.shape[-2])
        pieces = build_prompts(enc, self.classes, n_ctx)

        src = as_source(train_source)
        if not src.labels:
            raise InvalidInputError(f"training set {printable(src.name)!r} has no labels: prompt learning needs a "
                                    "class per image (ImageFolder subfolders, a manifest label column, or labels=)")
        y_all = map_labels(src.labels, self.classes, source=f"training set {printable(src.name)!r}")
        sel = sample_few_shot(y_all, self.classes, shots, self.seed, on_missing,
                              f"training set {printable(src.name)!r}")
        ids = [src.ids[i] for i in sel]
        identities = [src.identity(int(i)) for i in sel]
        y = y_all[sel]
        self.samples_ = [{"id": printable(i), "class": self.classes[int(c)]} for i, c in zip(ids, y)]
        images_hash = hashlib.sha256(json.dumps([identities, y.tolist()]).encode("utf-8", "surrogateescape"))
        signature = {
            "method": self.method, "classes": self.classes, "n_ctx": n_ctx, "hyperparameters": self.hyperparameters(),
            "shots": shots, "epochs": epochs, "batch_size": batch_size, "lr": lr, "views": views,
            "on_missing": on_missing, "encoder": {"spec": str(enc.spec), "fingerprint": enc.fingerprint,
                                                  "precision": str(enc.precision),
                                                  "device": torch.device(enc.device).type},
            "images": {"count": len(sel), "sha256": images_hash.hexdigest()},
        }

        run = Path(out) if out is not None else None
        start_epoch, elapsed0, state = 0, 0.0, None
        if run is not None:
            state = self._open_run(run, signature, resume)
            if state is not None:
                start_epoch, elapsed0 = int(state["epoch"]), float(state["elapsed"])

        t_views = time.perf_counter()
        store = extract_views(enc, src, sel, identities, views, self.seed, self.uses_local, progress=progress)
        views_s = time.perf_counter() - t_views

        device = pieces.prefix.device
        ctx = torch.nn.Parameter(ctx0.to(device))
        opt = torch.optim.SGD([ctx], lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if state is not None:
            ck = printable(str(Path(out) / CHECKPOINT))  # type: ignore[arg-type]
            if tuple(state["ctx"].shape) != tuple(ctx.shape):
                raise InvalidInputError(f"the checkpoint {ck} holds a context of shape {tuple(state['ctx'].shape)}, "
                                        f"this run needs {tuple(ctx.shape)}; delete the run folder to start afresh")
            with torch.no_grad():
                ctx.copy_(state["ctx"].to(device))
            try:
                opt.load_state_dict(state["optimizer"])
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
                raise InvalidInputError(f"the checkpoint {ck} holds an unusable optimiser state ({type(e).__name__}: "
                                        f"{printable(first[:200])}); delete the run folder to start afresh") from e
        labels = torch.as_tensor(y, dtype=torch.long, device=device)
        n_steps = max(1, len(sel) // batch_size)
        log = self._read_log(run, start_epoch) if run is not None else []
        log_file = open(run / LOG, "a", encoding="utf-8") if run is not None else None
        loop = _Loop(pieces=pieces, store=store, labels=labels, ctx=ctx, opt=opt, batch_size=batch_size,
                     n_steps=n_steps, views=views, log=log, log_file=log_file, run=run, elapsed0=elapsed0,
                     bar=_progress((epochs - start_epoch) * n_steps, f"{self.method} training", "steps", progress,
                                   start=f"training {self.method} on {len(sel)} images with {enc.spec}: epochs "
                                         f"{start_epoch + 1}-{epochs}, {n_steps} steps each"))
        try:
            with loop.bar:
                for epoch in range(start_epoch, epochs):
                    summary = self._epoch(loop, epoch, epochs, lr)
                    if run is not None:
                        self._save_checkpoint(run, ctx, opt, epoch + 1, summary["elapsed"], signature)
        finally:
            if log_file is not None:
                log_file.close()

        from .. import __version__

        epochs_done = [r for r in log if r.get("summary")]
        last = epochs_done[-1] if epochs_done else {}
        meta = {
            "method": self.method, "init": self.init, "seed": self.seed, "shots": shots,
            "encoder": signature["encoder"], "hyperparameters": {**self.hyperparameters(), "epochs": epochs,
                                                                 "batch_size": batch_size, "lr": lr, "views": views,
                                                                 "on_missing": on_missing},
            "images": signature["images"], "vlmood_version": __version__,
            "log": {"epochs": len(epochs_done), "steps_per_epoch": n_steps, "final_loss": last.get("loss"),
                    "final_acc": last.get("acc"), "elapsed_s": last.get("elapsed"), "views_s": round(views_s, 4)},
        }
        self.log_ = log
        self.prompts_ = LearnedPrompts(self.classes, ctx.detach().cpu().clone(), meta=meta)
        if run is not None:
            (run / SAMPLE).write_text(json.dumps(self.samples_, ensure_ascii=False, indent=0), encoding="utf-8")
            self.prompts_.save(run / PROMPTS)
        return self.prompts_

    def _epoch(self, loop: "_Loop", epoch: int, epochs: int, lr: float) -> dict[str, Any]:
        """One epoch (from 0): set its lr, draw its order and views from ``(seed, 2, epoch)``, step through them."""
        enc, ctx, opt = self.encoder, loop.ctx, loop.opt
        t_epoch = time.perf_counter()
        cur_lr = lr_at(epoch, lr, epochs, self.warmup_epochs, self.warmup_lr)
        for group in opt.param_groups:
            group["lr"] = cur_lr
        n = len(loop.labels)
        rng = np.random.default_rng([self.seed, EPOCH_STREAM, epoch])
        order = rng.permutation(n)
        view_of = rng.integers(0, loop.views, size=n)
        bs = loop.batch_size
        batches = [order[s * bs : (s + 1) * bs] for s in range(loop.n_steps)]
        scale = float(enc.logit_scale)
        device = loop.labels.device
        sums: dict[str, float] = {}
        correct = seen = 0
        for step, b in enumerate(batches):
            y = loop.labels[b]
            g, loc = loop.store.batch(b, view_of[b])
            text = F.normalize(loop.pieces.text_features(enc, ctx).float(), dim=-1)
            logits = scale * g.to(device) @ text.t()
            local_logits = scale * loc.to(device) @ text.t() if self.uses_local and loc is not None else None
            total, parts = self._loss(logits, local_logits, y)
            vals = {"loss": float(total.detach())} | {k: float(v.detach()) for k, v in parts.items()}
            if not math.isfinite(vals["loss"]):
                self._diverged(loop, epoch, step, vals, "loss")
            opt.zero_grad(set_to_none=True)
            total.backward()
            if not bool(torch.isfinite(ctx.grad).all()):
                self._diverged(loop, epoch, step, vals, "gradient")
            opt.step()
            hits = int((logits.detach().argmax(dim=-1) == y).sum())
            correct, seen = correct + hits, seen + len(b)
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + v
            self._log(loop, {"epoch": epoch + 1, "step": step + 1, **vals, "lr": cur_lr, "acc": hits / len(b),
                             "elapsed": loop.elapsed()})
            loop.bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{vals['loss']:.4f}", acc=f"{correct / seen:.3f}")
            loop.bar.update(1)
        summary = {"epoch": epoch + 1, "summary": True, **{k: v / loop.n_steps for k, v in sums.items()},
                   "lr": cur_lr, "acc": correct / seen, "steps": loop.n_steps,
                   "epoch_s": round(time.perf_counter() - t_epoch, 4), "elapsed": loop.elapsed()}
        self._log(loop, summary)
        return summary

    # ------------------------------------------------------------------ run folder
    def _open_run(self, run: Path, signature: dict[str, Any], resume: bool) -> dict[str, Any] | None:
        """The checkpoint to resume from (None: start afresh); refuses to overwrite or to resume another run."""
        ck = run / CHECKPOINT
        if run.exists() and not run.is_dir():
            raise InvalidInputError(f"run folder {printable(str(run))} is a file; out= must be a folder")
        if not ck.is_file():
            if resume:
                warnings.warn(f"no checkpoint in {printable(str(run))}: starting a new run", stacklevel=3)
            try:
                run.mkdir(parents=True, exist_ok=True)
                (run / LOG).write_text("", encoding="utf-8")
            except OSError as e:
                raise InvalidInputError(f"cannot write the run folder {printable(str(run))}: {e.strerror or e}") \
                    from e
            return None
        try:
            state = torch.load(ck, map_location="cpu", weights_only=True)
            missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
            if missing:
                raise ValueError(f"it lacks {', '.join(missing)}")
            old = json.loads(state["signature"])
            if not isinstance(old, dict) or not isinstance(state["ctx"], torch.Tensor):
                raise ValueError("its signature or context is malformed")
        except Exception as e:  # torch explains weights_only failures over many lines: keep the first
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
            raise InvalidInputError(f"cannot read the checkpoint {printable(str(ck))} ({type(e).__name__}: "
                                    f"{printable(first[:200])}); delete the run folder {printable(str(run))} to "
                                    "start afresh") from e
        if not resume:
            raise InvalidInputError(f"{printable(str(run))} already holds a run (checkpoint after epoch "
                                    f"{state['epoch']}); pass resume=True to continue it, or choose another out")
        if old != signature:
            diff = _differing(old, signature)
            raise InvalidInputError(f"cannot resume {printable(str(run))}: its run differs in {', '.join(diff)}; "
                                    "resume with the same arguments, or choose another run folder (out=, --run-dir)")
        return state

    @staticmethod
    def _save_checkpoint(run: Path, ctx: torch.Tensor, opt: torch.optim.Optimizer, epoch: int, elapsed: float,
                         signature: dict[str, Any]) -> None:
        state = {"ctx": ctx.detach().cpu().clone(), "optimizer": opt.state_dict(), "epoch": epoch,
                 "elapsed": elapsed, "signature": json.dumps(signature)}
        tmp = run / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, run / CHECKPOINT)

    @staticmethod
    def _read_log(run: Path, epochs_done: int) -> list[dict[str, Any]]:
        """The log records of the epochs the checkpoint holds; the file is rewritten with only those."""
        return rewrite_log(run / LOG, lambda rec: isinstance(rec.get("epoch"), int) and rec["epoch"] <= epochs_done)

    @staticmethod
    def _log(loop: "_Loop", rec: dict[str, Any]) -> None:
        rec = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()}  # strict JSON
        loop.log.append(rec)
        if loop.log_file is not None:
            loop.log_file.write(json.dumps(rec) + "\n")
            loop.log_file.flush()

    def _diverged(self, loop: "_Loop", epoch: int, step: int, vals: dict[str, float], what: str) -> None:
        parts = ", ".join(f"{k}={v:.4g}" for k, v in vals.items())
        self._log(loop, {"epoch": epoch + 1, "step": step + 1, "error": f"non-finite {what}", **vals})
        if loop.run is None:
            kept = "no checkpoint is kept (out=None)"
        elif epoch > 0:
            kept = f"the last good checkpoint (after epoch {epoch}) is kept in {printable(str(loop.run / CHECKPOINT))}"
        else:
            kept = "no epoch had completed, so there is no checkpoint"
        raise NonFiniteLossError(f"{self.method} training stopped: non-finite {what} at epoch {epoch + 1}, step "
                                 f"{step + 1} of {loop.n_steps} ({parts}); {kept}; lower lr or check the training "
                                 "images")


def rewrite_log(path: Path, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """The records of a JSON-lines training log that ``keep`` accepts (lines cut by an interruption and error
    records are dropped); the file is rewritten with only those, atomically (an interruption never truncates it)."""
    from .._io import atomic_write_bytes

    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by an interruption
            if isinstance(rec, dict) and "error" not in rec and keep(rec):
                records.append(rec)
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
    return records


def _differing(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The fields in which two run signatures differ, sorted; inside a dict field by sub-field
    (``encoder.precision``, ``hyperparameters.seed``)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{sub}" for sub in sorted(set(a) | set(b)) if a.get(sub) != b.get(sub)]
        else:
            out.append(k)
    return out


@dataclass
class _Loop:
    """What the epochs of one :meth:`PromptTrainer.fit` share."""

    pieces: Any
    store: Any
    labels: torch.Tensor
    ctx: torch.nn.Parameter
    opt: torch.optim.Optimizer
    batch_size: int
    n_steps: int
    views: int
    log: list[dict[str, Any]]
    log_file: Any
    run: Path | None
    elapsed0: float
    bar: Any  # a vlmood._progress.progress over the run's steps
    t0: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        """Training seconds so far, including those of the epochs a resumed run restored."""
        return round(self.elapsed0 + time.perf_counter() - self.t0, 4)
