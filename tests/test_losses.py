"""LoCoOp / CoOp loss kernels against an independent computation (explicit loops, numpy/math)."""
import math

import numpy as np
import pytest
import torch

from vlmood.errors import InvalidInputError
from vlmood.losses import coop_loss, locoop_loss, locoop_selection


def _reference(logits: np.ndarray, local: np.ndarray, labels: np.ndarray, top_k: int, lam: float):
    """LoCoOp's loss by hand: loops over images and patches, top-K by sorting the softmax (no ties here)."""
    b, p, c = local.shape
    ce = 0.0
    for i in range(b):
        z = logits[i] - logits[i].max()
        ce += -(z[labels[i]] - math.log(np.exp(z).sum()))
    ce /= b
    ents, picked = [], np.zeros((b, p), bool)
    for i in range(b):
        for j in range(p):
            z = local[i, j] - local[i, j].max()
            prob = np.exp(z) / np.exp(z).sum()
            top = list(np.argsort(-prob, kind="stable")[: min(top_k, c)])
            if labels[i] not in top:
                picked[i, j] = True
                ents.append(-sum(q * math.log(q + 1e-5) for q in prob))
    l_en = -float(np.mean(ents)) if ents else 0.0
    return ce + lam * l_en, ce, l_en, picked


@pytest.mark.parametrize("b,p,c,top_k,lam", [(1, 1, 2, 1, 0.25), (3, 5, 4, 2, 0.25), (4, 7, 10, 3, 0.5),
                                             (2, 49, 30, 6, 0.25), (5, 3, 7, 1, 1.0)])
def test_locoop_loss_matches_independent_computation(b, p, c, top_k, lam):
    g = torch.Generator().manual_seed(b * 100 + p * 10 + c)
    logits = torch.randn(b, c, generator=g, dtype=torch.float64) * 5
    local = torch.randn(b, p, c, generator=g, dtype=torch.float64) * 5
    labels = torch.randint(0, c, (b,), generator=g)
    total, parts = locoop_loss(logits, local, labels, top_k=top_k, lam=lam)
    ref_total, ref_ce, ref_en, picked = _reference(logits.numpy(), local.numpy(), labels.numpy(), top_k, lam)
    assert picked.any()  # the entropy term is exercised
    assert total.dtype == torch.float64 and total.ndim == 0
    assert abs(parts["ce"].item() - ref_ce) <= 1e-10 * max(1.0, abs(ref_ce))
    assert abs(parts["entropy"].item() - ref_en) <= 1e-10
    assert abs(total.item() - ref_total) <= 1e-10 * max(1.0, abs(ref_total))
    t32, p32 = locoop_loss(logits.float(), local.float(), labels, top_k=top_k, lam=lam)
    assert t32.dtype == torch.float32 and abs(t32.item() - ref_total) <= 1e-5 * max(1.0, abs(ref_total))
    assert abs(p32["entropy"].item() - ref_en) <= 1e-5
    assert torch.equal(locoop_selection(local, labels, top_k), torch.from_numpy(picked))


def test_locoop_top_k_at_least_classes_selects_nothing():
    g = torch.Generator().manual_seed(1)
    logits, local = torch.randn(3, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    labels = torch.tensor([0, 4, 2])
    for k in (5, 200):
        total, parts = locoop_loss(logits, local, labels, top_k=k)
        assert parts["entropy"].item() == 0.0
        assert total.item() == coop_loss(logits, labels).item() == parts["ce"].item()
    # top_k = C - 1: only patches whose label ranks last qualify
    sel = locoop_selection(local, labels, 4)
    last = local.argmin(dim=-1) == labels[:, None]
    assert torch.equal(sel, last)


def test_locoop_without_patches():
    logits = torch.randn(2, 3)
    labels = torch.tensor([1, 2])
    total, parts = locoop_loss(logits, torch.empty(2, 0, 3), labels, top_k=1)
    assert parts["entropy"].item() == 0.0 and total.item() == pytest.approx(coop_loss(logits, labels).item())
    assert parts["entropy"].device == logits.device


def test_locoop_gradients_flow():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 6, generator=g, requires_grad=True)
    local = torch.randn(4, 9, 6, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 5])
    total, parts = locoop_loss(logits, local, labels, top_k=2)
    assert parts["entropy"].item() < 0
    total.backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(local.grad).all()
    sel = locoop_selection(local, labels, 2)
    assert local.grad[sel].abs().sum() > 0 and local.grad[~sel].abs().sum() == 0  # only selected patches
    # gradients equal those of the formula written with explicit loops over the selected patches (float64)
    x = local.detach().double().requires_grad_(True)
    z = logits.detach().double().requires_grad_(True)
    ents = []
    for i in range(4):
        for j in range(9):
            if bool(sel[i, j]):
                q = torch.softmax(x[i, j], dim=0)
                ents.append(-(q * torch.log(q + 1e-5)).sum())
    ref = torch.nn.functional.cross_entropy(z, labels) + 0.25 * -(torch.stack(ents).mean())
    ref.backward()
    assert (local.grad - x.grad).abs().max().item() <= 1e-6
    assert (logits.grad - z.grad).abs().max().item() <= 1e-6


def test_locoop_no_selection_still_backpropagates():
    logits = torch.randn(2, 3, requires_grad=True)
    local = torch.randn(2, 4, 3, requires_grad=True)
    total, _ = locoop_loss(logits, local, torch.tensor([0, 1]), top_k=3)
    total.backward()
    assert torch.isfinite(logits.grad).all() and local.grad.abs().sum() == 0


def test_locoop_half_precision_inputs_computed_in_float32():
    g = torch.Generator().manual_seed(3)
    logits, local = torch.randn(2, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    labels = torch.tensor([3, 1])
    t32, _ = locoop_loss(logits, local, labels, top_k=2)
    t16, _ = locoop_loss(logits.bfloat16(), local.bfloat16(), labels, top_k=2)
    assert t16.dtype == torch.float32 and abs(t16.item() - t32.item()) < 0.05


@pytest.mark.parametrize("labels,match", [
    (torch.tensor([0, 3]), r"label 3 is outside the 3 classes \(valid: 0..2\)"),
    (torch.tensor([-1, 0]), r"label -1 is outside the 3 classes"),
    (torch.tensor([0.0, 1.0]), "labels must be integer class indices"),
    (torch.tensor([0, 1, 2]), r"labels must be a 1-D tensor of 2 class indices"),
])
def test_bad_labels_are_one_line_errors(labels, match):
    logits, local = torch.randn(2, 3), torch.randn(2, 4, 3)
    with pytest.raises(InvalidInputError, match=match):
        locoop_loss(logits, local, labels)
    with pytest.raises(InvalidInputError, match=match):
        coop_loss(logits, labels)


def test_bad_shapes_and_hyper_parameters():
    logits, local, labels = torch.randn(2, 3), torch.randn(2, 4, 3), torch.tensor([0, 1])
    with pytest.raises(InvalidInputError, match="does not match logits"):
        locoop_loss(logits, torch.randn(2, 4, 5), labels)
    with pytest.raises(InvalidInputError, match=r"local_logits must be a float tensor \[B, P, C\]"):
        locoop_loss(logits, torch.randn(2, 3), labels)
    with pytest.raises(InvalidInputError, match=r"logits must be a float tensor \[B, C\]"):
        coop_loss(torch.randn(2, 3, 1), labels)
    with pytest.raises(InvalidInputError, match="at least one sample"):
        coop_loss(torch.randn(0, 3), torch.tensor([], dtype=torch.long))
    for k in (0, -1, 2.5, True):
        with pytest.raises(InvalidInputError, match="top_k must be a positive integer"):
            locoop_loss(logits, local, labels, top_k=k)
    with pytest.raises(InvalidInputError, match="lam must be a finite number"):
        locoop_loss(logits, local, labels, lam=float("nan"))


def test_non_finite_logits_give_non_finite_loss_not_an_error():
    """Documented: the kernel computes; the trainer checks the loss and stops naming the epoch and step."""
    logits = torch.tensor([[0.0, float("nan")], [1.0, 0.0]])
    total, parts = locoop_loss(logits, torch.zeros(2, 1, 2), torch.tensor([0, 1]), top_k=1)
    assert not math.isfinite(total.item()) and not math.isfinite(parts["ce"].item())
