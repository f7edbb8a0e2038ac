"""Training-loss kernels for prompt learning: tensors in, scalar tensors (with gradients) out.

CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022) trains the prompt context with
the cross-entropy of the global logits::

    L_CoOp = CE(logits, y)

LoCoOp (Miyai et al., "LoCoOp: Few-Shot Out-of-Distribution Detection via Prompt Learning", NeurIPS 2023)
adds an entropy-maximisation term on the ID-irrelevant image regions. With ``p[b, j] = softmax(local_logits[b, j])``
over the ``C`` classes for patch ``j`` of image ``b``, a patch is ID-irrelevant when the image's label ``y[b]``
is not among the ``K`` most probable classes of that patch; over the set ``S`` of such patches::

    H(p)     = - sum_c p_c * log(p_c + 1e-5)
    L_en     = - mean_{(b, j) in S} H(p[b, j])        (0 when S is empty)
    L_LoCoOp = CE(logits, y) + lambda * L_en           (lambda = 0.25, K = 200 for 1000 classes)

as in the reference implementation (AtsuMiyai/LoCoOp, ``trainers/locoop.py``, ``entropy_select_topk``).

CLIPN (Wang et al., "CLIPN for Zero-Shot OOD Detection: Teaching CLIP to Say No", ICCV 2023) trains a "no" text
tower on image-text pairs. With L2-normalised image features ``x_i``, caption features ``t_j`` (the frozen "yes"
tower) and ``u_j`` (the "no" tower), ``s`` the exponentiated logit scale, and per pair ``(i, j)``::

    p_yes_ij, p_no_ij = softmax([s * x_i . t_j, s * x_i . u_j])
    L_bin_yes = - sum_i log p_yes_ii / N                       (matched pairs)
    L_bin_no  = - sum_{i != j} log p_no_ij / (N^2 - N)          (unmatched pairs)
    L_tso     = mean_j (2 - sqrt(2 - 2 * t_j . u_j + 1e-4))     (yes and no caption features pushed apart)
    L_CLIPN   = 0.5 * (L_bin_yes + L_bin_no + L_tso)

as in xmed-lab/CLIPN (``src/open_clip/loss.py`` ``ClipLoss``, ``src/training/train.py``). One deliberate
difference: ``log p`` is computed as ``log_softmax`` (``-softplus(a - b)``), not as ``log(softmax(...))``: equal
wherever the reference is finite, and finite where its softmax underflows to 0 (which gives it an infinite loss).
``logits`` ``[B, C]`` and ``local_logits`` ``[B, P, C]`` are already multiplied by the logit scale.

Two deliberate details:

- Top-K membership is decided by rank: the label is among the top ``K`` iff fewer than ``K`` classes have a
  strictly larger logit (softmax is monotone, so this is the top-K by probability). It equals the reference's
  ``torch.topk`` whenever there are no ties; in a tie ``torch.topk``'s choice is arbitrary (and softmax
  underflow to 0 creates ties), whereas here a tie counts in the label's favour, identically on every device.
  ``K`` is clipped to ``C``, so ``K >= C`` selects no patch.
- The kernels only compute: bad shapes, dtypes or labels outside ``[0, C)`` raise a one-line
  :class:`~vlmood.errors.InvalidInputError`, but non-finite logits simply give a non-finite loss. Checking the
  loss (and naming the epoch and step) is the trainer's job. Computation is in float32 (float64 for float64
  inputs) whatever the input dtype.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from .errors import InvalidInputError

ENTROPY_EPS = 1e-5
"""Added inside the logarithm of the entropy, as in the reference implementation."""


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 when it already is."""
    return x if x.dtype == torch.float64 else x.float()


def _check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise InvalidInputError(f"logits and labels must be torch tensors, got {type(logits).__name__} and "
                                f"{type(labels).__name__}")
    if logits.ndim != 2 or not logits.is_floating_point():
        raise InvalidInputError(f"logits must be a float tensor [B, C], got {logits.dtype} {tuple(logits.shape)}")
    b, c = logits.shape
    if b == 0 or c == 0:
        raise InvalidInputError(f"logits [B, C] must have at least one sample and one class, got shape {(b, c)}")
    if labels.ndim != 1 or labels.shape[0] != b:
        raise InvalidInputError(f"labels must be a 1-D tensor of {b} class indices (one per row of logits), "
                                f"got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InvalidInputError(f"labels must be integer class indices, got dtype {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= c:
        bad = lo if lo < 0 else hi
        raise InvalidInputError(f"label {bad} is outside the {c} classes (valid: 0..{c - 1})")


def coop_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CoOp's loss: the mean cross-entropy of ``logits`` ``[B, C]`` (scaled) against ``labels`` ``[B]``."""
    _check_logits(logits, labels)
    return F.cross_entropy(_upcast(logits), labels.to(logits.device).long())


def locoop_selection(local_logits: torch.Tensor, labels: torch.Tensor, top_k: int) -> torch.Tensor:
    """Which patches LoCoOp treats as ID-irrelevant: ``[B, P]`` bool, True where ``labels[b]`` is not among the
    ``top_k`` classes of patch ``(b, j)`` (fewer than ``top_k`` classes with a strictly larger logit is "among";
    ``top_k`` is clipped to ``C``). No gradient flows through the selection."""
    k = min(int(top_k), local_logits.shape[-1])
    lab = labels.to(local_logits.device).long()
    with torch.no_grad():
        own = local_logits.gather(-1, lab.view(-1, 1, 1).expand(-1, local_logits.shape[1], 1))  # [B, P, 1]
        above = (local_logits > own).sum(dim=-1)  # classes ranked strictly above the label
        return above >= k


def locoop_loss(
    logits: torch.Tensor,
    local_logits: torch.Tensor,
    labels: torch.Tensor,
    top_k: int = 200,
    lam: float = 0.25,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LoCoOp's loss ``CE(logits, y) + lam * L_en`` (see the module docstring for the formula).

    Args:
        logits: global logits ``[B, C]``, already multiplied by the logit scale.
        local_logits: per-patch logits ``[B, P, C]``, likewise scaled; ``P`` may be 0.
        labels: class indices ``[B]`` in ``[0, C)``.
        top_k: ``K``; a patch is ID-irrelevant when its label is not among its top ``K`` classes (clipped to C).
        lam: weight ``lambda`` of the entropy term.

    Returns:
        ``(total, {"ce": ce, "entropy": L_en})``: float32 (float64 for float64 inputs) scalar tensors on the
        logits' device, with gradients.
        ``L_en`` is the regulariser's value, minus the mean entropy of the selected patches (``<= 1e-5``), and a
        zero tensor (still part of the graph, with zero gradient) when no patch is selected.
    """
    _check_logits(logits, labels)
    b, c = logits.shape
    if not isinstance(local_logits, torch.Tensor) or local_logits.ndim != 3 or not local_logits.is_floating_point():
        raise InvalidInputError("local_logits must be a float tensor [B, P, C], got "
                                + (f"{local_logits.dtype} {tuple(local_logits.shape)}"
                                   if isinstance(local_logits, torch.Tensor) else type(local_logits).__name__))
    if local_logits.shape[0] != b or local_logits.shape[2] != c:
        raise InvalidInputError(f"local_logits {tuple(local_logits.shape)} does not match logits {(b, c)}: "
                                "expected [B, P, C] with the same B and C")
    if local_logits.device != logits.device:
        raise InvalidInputError(f"local_logits are on {local_logits.device} but logits on {logits.device}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise InvalidInputError(f"top_k must be a positive integer, got {top_k!r}")
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(float(lam)):
        raise InvalidInputError(f"lam must be a finite number, got {lam!r}")

    ce = F.cross_entropy(_upcast(logits), labels.to(logits.device).long())
    local = _upcast(local_logits)
    selected = locoop_selection(local, labels, int(top_k))  # [B, P]
    p = local.softmax(dim=-1)
    entropy = -(p * torch.log(p + ENTROPY_EPS)).sum(dim=-1)  # [B, P]
    count = selected.sum()
    mean_entropy = torch.where(selected, entropy, torch.zeros_like(entropy)).sum() / count.clamp(min=1)
    l_en = -mean_entropy
    total = ce + float(lam) * l_en
    return total, {"ce": ce, "entropy": l_en}


TSO_EPS = 1e-4
"""Added under the square root of the text semantic-opposite loss, as in the reference (no infinite gradient)."""


def _check_features(name: str, x: torch.Tensor, n: int | None, d: int | None) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
        raise InvalidInputError(f"{name} must be a float tensor [N, D], got "
                                + (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__))
    if n is not None and (x.shape[0] != n or x.shape[1] != d):
        raise InvalidInputError(f"{name} has shape {tuple(x.shape)}; expected {(n, d)} like image_features")


def clipn_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_features_no: torch.Tensor,
    logit_scale: float | torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CLIPN's training loss over ``N`` matched image-caption pairs (see the module docstring for the formula).

    Args:
        image_features: ``[N, D]`` L2-normalised image features (row ``i`` is matched with caption ``i``).
        text_features: ``[N, D]`` L2-normalised caption features of the "yes" (original) text tower.
        text_features_no: ``[N, D]`` L2-normalised caption features of the "no" text tower.
        logit_scale: the exponentiated scale ``s`` (about 100 for CLIP), a number or a scalar tensor.

    Returns:
        ``(total, {"bin_yes": ..., "bin_no": ..., "tso": ...})``: float32 (float64 for float64 inputs) scalar
        tensors with gradients; ``total = 0.5 * (bin_yes + bin_no + tso)``. With ``N = 1`` there is no unmatched
        pair and ``bin_no`` is 0 (the reference divides 0 by 0).
    """
    _check_features("image_features", image_features, None, None)
    n, d = image_features.shape
    if n == 0:
        raise InvalidInputError("clipn_loss needs at least one image-caption pair, got N = 0")
    _check_features("text_features", text_features, n, d)
    _check_features("text_features_no", text_features_no, n, d)
    if not isinstance(logit_scale, torch.Tensor):
        if isinstance(logit_scale, bool) or not isinstance(logit_scale, numbers.Real) \
                or not math.isfinite(float(logit_scale)) or float(logit_scale) <= 0:
            raise InvalidInputError(f"logit_scale must be a finite number > 0 (the exponentiated scale), got "
                                    f"{logit_scale!r}")
    if isinstance(logit_scale, torch.Tensor) and (logit_scale.numel() != 1 or not logit_scale.is_floating_point()
                                                  or not bool(torch.isfinite(logit_scale).all())
                                                  or float(logit_scale.detach().reshape(())) <= 0):
        raise InvalidInputError(f"logit_scale must be a finite scalar > 0 (the exponentiated scale), got a "
                                f"{logit_scale.dtype} tensor of shape {tuple(logit_scale.shape)}"
                                + (f" = {float(logit_scale.detach().reshape(()))}" if logit_scale.numel() == 1 else ""))
    x, t, u = _upcast(image_features), _upcast(text_features), _upcast(text_features_no)
    scale = logit_scale if not isinstance(logit_scale, torch.Tensor) else _upcast(logit_scale.reshape(())).to(x.device)
    yes = scale * x @ t.T  # [N, N] logits of "this is <caption j>"
    no = scale * x @ u.T  # [N, N] logits of "this is not <caption j>"
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    log_p_yes = -F.softplus(no - yes)  # log softmax([yes, no])[0]
    log_p_no = -F.softplus(yes - no)
    bin_yes = -log_p_yes.diagonal().sum() / n
    bin_no = -log_p_no.masked_fill(eye, 0.0).sum() / max(n * n - n, 1)
    tso = (2.0 - torch.sqrt(2.0 - 2.0 * (t * u).sum(dim=-1) + TSO_EPS)).mean()
    total = 0.5 * (bin_yes + bin_no + tso)
    return total, {"bin_yes": bin_yes, "bin_no": bin_no, "tso": tso}
