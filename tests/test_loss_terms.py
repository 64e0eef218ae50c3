"""The lovasz and ohem loss terms against hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unetseg.loss_terms import lovasz_softmax, ohem_cross_entropy
from unetseg.losses import SegmentationLoss

IGNORE = 255


def batch(seed=0, n=2, c=4, h=6, w=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g)
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < 0.2] = IGNORE
    return logits, target


def mean_iou_present(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    valid = target != IGNORE
    ious = []
    for c in range(num_classes):
        t, p = (target == c) & valid, (pred == c) & valid
        if t.any():
            ious.append(((t & p).sum() / (t | p).sum()).item())
    return sum(ious) / len(ious)


def test_lovasz_of_confident_predictions_is_one_minus_the_iou_of_the_classes_present():
    """At the vertices (one-hot probabilities) the Lovasz extension is the Jaccard loss."""
    for seed in range(4):
        logits, target = batch(seed)
        pred = logits.argmax(1)
        confident = F.one_hot(pred, 4).movedim(-1, 1).float() * 200  # softmax exactly one-hot in float32
        got = lovasz_softmax(confident, target, IGNORE)
        assert got.item() == pytest.approx(1 - mean_iou_present(pred, target, 4), abs=1e-6)
    logits, target = batch()
    perfect = F.one_hot(target.clamp(max=3), 4).movedim(-1, 1).float() * 200
    assert lovasz_softmax(perfect, target, IGNORE).item() == pytest.approx(0.0, abs=1e-6)


def test_lovasz_ignores_logits_at_ignored_pixels_and_has_a_gradient():
    logits, target = batch()
    changed = logits.clone()
    changed[(target == IGNORE).unsqueeze(1).expand_as(logits)] = 50.0
    assert torch.allclose(lovasz_softmax(logits, target, IGNORE), lovasz_softmax(changed, target, IGNORE))
    logits.requires_grad_(True)
    lovasz_softmax(logits, target, IGNORE).backward()
    assert logits.grad.abs().sum() > 0
    assert (logits.grad * (target == IGNORE).unsqueeze(1)).abs().sum() == 0


def test_ohem_is_cross_entropy_over_the_hard_pixels():
    logits, target = batch(1)
    valid = target != IGNORE
    safe = target.clamp(max=3)
    p_true = logits.softmax(1).gather(1, safe.unsqueeze(1)).squeeze(1)
    hard = valid & (p_true < 0.5)
    assert 0 < hard.sum() < valid.sum()
    pixel = F.cross_entropy(logits, safe, reduction="none")
    want = pixel[hard].mean()
    got = ohem_cross_entropy(logits, target, ignore_index=IGNORE, threshold=0.5, min_kept=0.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_ohem_keeps_at_least_the_hardest_fraction():
    logits, target = batch(2)
    valid = target != IGNORE
    pixel = F.cross_entropy(logits, target.clamp(max=3), reduction="none")[valid]
    k = int(torch.ceil(valid.sum() * torch.tensor(0.25)).item())
    want = pixel.sort(descending=True).values[:k].mean()
    # A threshold no pixel is below: only the min_kept fraction counts.
    got = ohem_cross_entropy(logits, target, ignore_index=IGNORE, threshold=1e-9, min_kept=0.25)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_ohem_keeping_everything_is_weighted_cross_entropy():
    logits, target = batch(3)
    weights = torch.tensor([0.5, 1.0, 2.0, 3.0])
    want = F.cross_entropy(logits, target, weight=weights, ignore_index=IGNORE)
    got = SegmentationLoss("ohem", IGNORE, class_weights=weights, ohem_threshold=1.0, ohem_min_kept=1.0)(logits, target)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
