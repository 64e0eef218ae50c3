"""Segmentation losses and class weights."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from unetseg.errors import UnetsegError
from unetseg.losses import SegmentationLoss, class_weights, dice_loss

IGNORE = 255


def random_batch(seed=0, n=2, c=5, h=8, w=8, ignore_fraction=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g)
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < ignore_fraction] = IGNORE
    assert (target == IGNORE).any() and (target != IGNORE).any()
    return logits, target


def confident(labels: torch.Tensor, num_classes: int, scale: float = 30.0) -> torch.Tensor:
    """Logits that put (almost) all probability on ``labels``."""
    return F.one_hot(labels, num_classes).movedim(-1, 1).float() * scale


# --------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize(
    "weight, smoothing",
    [(None, 0.0), (None, 0.1), ([0.5, 2.0, 1.0, 0.0, 3.0], 0.0), ([0.5, 2.0, 1.0, 0.0, 3.0], 0.2)],
)
def test_ce_matches_torch_cross_entropy(weight, smoothing):
    logits, target = random_batch()
    logits.requires_grad_(True)
    loss = SegmentationLoss("ce", ignore_index=IGNORE, class_weights=weight, label_smoothing=smoothing)(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    ref_logits = logits.detach().clone().requires_grad_(True)
    w = None if weight is None else torch.tensor(weight)
    ref = F.cross_entropy(ref_logits, target, weight=w, ignore_index=IGNORE, label_smoothing=smoothing)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_logits.grad)


def test_label_smoothing_changes_ce_like_torch():
    logits, target = random_batch(seed=1)
    plain = SegmentationLoss("ce", ignore_index=IGNORE)(logits, target)
    smooth = SegmentationLoss("ce", ignore_index=IGNORE, label_smoothing=0.3)(logits, target)
    assert not torch.isclose(plain, smooth)
    torch.testing.assert_close(smooth, F.cross_entropy(logits, target, ignore_index=IGNORE, label_smoothing=0.3))


def test_ce_without_ignore_index():
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    loss = SegmentationLoss("ce", ignore_index=None)(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))


@pytest.mark.parametrize("kind", ["ce", "dice", "ce+dice"])
@pytest.mark.parametrize("weight", [None, [1.0, 2.0, 3.0]])
def test_all_ignored_batch_gives_zero_and_zero_grads(kind, weight):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), IGNORE)
    # The trap this guards against: torch's mean reduction divides 0 by 0.
    assert torch.isnan(F.cross_entropy(logits, target, ignore_index=IGNORE))
    loss = SegmentationLoss(kind, ignore_index=IGNORE, class_weights=weight, label_smoothing=0.1)(logits, target)
    assert loss.item() == 0.0
    assert loss.requires_grad  # still a function of the logits: DDP sees every parameter used
    loss.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad == 0).all()


def test_all_valid_pixels_of_zero_weight_give_zero_not_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0, 0] = IGNORE
    loss = SegmentationLoss("ce", ignore_index=IGNORE, class_weights=[0.0, 1.0, 1.0])(logits, target)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


# --------------------------------------------------------------------------- dice


def test_dice_perfect_prediction_is_zero():
    _, target = random_batch(seed=2)
    labels = torch.where(target == IGNORE, 0, target)
    # ignored pixels get confident predictions of class 1, whatever: they must not count
    logits = torch.where((target == IGNORE).unsqueeze(1), confident(torch.ones_like(labels), 5), confident(labels, 5))
    assert dice_loss(logits, target, IGNORE).item() < 1e-4
    assert SegmentationLoss("dice", ignore_index=IGNORE)(logits, target).item() < 1e-4


def test_dice_totally_wrong_prediction_is_about_one():
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[0, :2] = IGNORE
    logits = confident(torch.ones_like(target), 4)  # predicts class 1 everywhere, truth is class 0
    loss = dice_loss(logits, target, IGNORE)
    assert 0.99 < loss.item() <= 1.0


def test_dice_hand_computed():
    # Truth [0, 0, 1, 1] (one image, 1x4), prediction class 0 everywhere, smooth 1:
    # class 0: I = 2, sum(p) = 4, sum(t) = 2 -> (2*2 + 1) / (4 + 2 + 1) = 5/7
    # class 1: I = 0, sum(p) = 0, sum(t) = 2 -> (0 + 1) / (0 + 2 + 1) = 1/3
    # class 2: absent from truth and prediction -> left out of the mean
    # loss = 1 - (5/7 + 1/3) / 2 = 10/21
    target = torch.tensor([[[0, 0, 1, 1]]])
    logits = confident(torch.zeros_like(target), 3, scale=40.0)
    assert dice_loss(logits, target) == pytest.approx(10 / 21, abs=1e-6)
    # a fifth, ignored pixel changes nothing
    target5 = torch.tensor([[[0, 0, 1, 1, IGNORE]]])
    logits5 = torch.cat([logits, confident(torch.full((1, 1, 1), 2), 3)], dim=3)
    assert dice_loss(logits5, target5, IGNORE) == pytest.approx(10 / 21, abs=1e-6)


def test_dice_ignores_logits_at_ignored_pixels():
    logits, target = random_batch(seed=3)
    changed = logits.clone()
    changed[(target == IGNORE).unsqueeze(1).expand_as(logits)] = 100.0
    torch.testing.assert_close(dice_loss(logits, target, IGNORE), dice_loss(changed, target, IGNORE))
    assert not torch.equal(logits, changed)


def test_dice_is_float32_under_autocast():
    logits, target = random_batch(seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = SegmentationLoss("ce+dice", ignore_index=IGNORE)(logits.bfloat16(), target)
    assert low.dtype == torch.float32
    full = SegmentationLoss("ce+dice", ignore_index=IGNORE)(logits.bfloat16().float(), target)
    torch.testing.assert_close(low, full)


def test_ce_plus_dice_is_ce_plus_weighted_dice():
    logits, target = random_batch(seed=5)
    weights = [1.0, 2.0, 0.5, 1.0, 1.5]
    ce = SegmentationLoss("ce", ignore_index=IGNORE, class_weights=weights)(logits, target)
    dice = SegmentationLoss("dice", ignore_index=IGNORE)(logits, target)
    both = SegmentationLoss("ce+dice", ignore_index=IGNORE, class_weights=weights, dice_weight=0.4)(logits, target)
    assert ce.item() > 0 and dice.item() > 0
    torch.testing.assert_close(both, ce + 0.4 * dice)


# --------------------------------------------------------------------------- loss validation


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"kind": "focal"}, "'focal'"),
        ({"label_smoothing": 1.0}, "label_smoothing 1.0"),
        ({"dice_weight": -1}, "dice_weight -1"),
        ({"class_weights": [1.0, -1.0]}, "[-1.0]"),
    ],
)
def test_loss_validation_names_value_and_fix(kwargs, needle):
    with pytest.raises(UnetsegError, match="Fix:") as info:
        SegmentationLoss(**kwargs)
    assert needle in str(info.value)


def test_class_weight_count_must_match_model():
    logits, target = random_batch()
    with pytest.raises(UnetsegError, match="3 class weights for a model with 5 classes"):
        SegmentationLoss("ce", ignore_index=IGNORE, class_weights=[1.0, 1.0, 1.0])(logits, target)


# --------------------------------------------------------------------------- class weights


def test_class_weights_none():
    assert class_weights("none", [1, 2, 3]) is None


def test_median_frequency_odd_number_of_classes():
    # counts 10, 30, 60 of 100 -> freq 0.1, 0.3, 0.6, median 0.3 -> 0.3/0.1, 0.3/0.3, 0.3/0.6
    w = class_weights("median_frequency", [10, 30, 60])
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx([3.0, 1.0, 0.5])


def test_median_frequency_even_number_of_classes():
    # freq 0.1, 0.2, 0.3, 0.4; median = (0.2 + 0.3) / 2 = 0.25 -> 2.5, 1.25, 0.8333, 0.625
    w = class_weights("median_frequency", [10, 20, 30, 40])
    assert w.tolist() == pytest.approx([2.5, 1.25, 0.25 / 0.3, 0.625])


def test_inverse_log():
    # p = 0.25, 0.75 -> 1/ln(1.27) = 4.18380, 1/ln(1.77) = 1.75138
    w = class_weights("inverse_log", [25, 75])
    assert w.tolist() == pytest.approx([4.1838045679, 1.7513762200])
    assert w.tolist() == pytest.approx([1 / math.log(1.02 + 0.25), 1 / math.log(1.02 + 0.75)])


@pytest.mark.parametrize("kind", ["median_frequency", "inverse_log"])
def test_zero_count_class_gets_weight_zero_with_a_warning(kind):
    with pytest.warns(UserWarning, match=r"classes \[1\] have no labelled pixels"):
        w = class_weights(kind, [10, 0, 30, 60])
    assert w[1].item() == 0.0
    # the other weights are those of the classes that have pixels (median over 10, 30, 60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = class_weights(kind, [10, 30, 60])
    assert w[[0, 2, 3]].tolist() == pytest.approx(expected.tolist())


def test_ignored_classes_get_weight_zero():
    w = class_weights("median_frequency", [10, 30, 60, 1000], ignore=3)
    assert w.tolist() == pytest.approx([3.0, 1.0, 0.5, 0.0])
    # an ignore_index that is no class id (255) changes nothing
    assert class_weights("median_frequency", [10, 30, 60], ignore=IGNORE).tolist() == pytest.approx([3.0, 1.0, 0.5])


def test_class_weights_with_no_pixels_is_an_error():
    with pytest.raises(UnetsegError, match="no labelled pixel"):
        class_weights("inverse_log", [0, 0])


def test_explicit_weights():
    w = class_weights([1, 0.5, 2.0], [10, 20, 30])
    assert w.dtype == torch.float32 and w.tolist() == [1.0, 0.5, 2.0]


@pytest.mark.parametrize(
    "kind, needle",
    [
        ([1.0, 2.0], "2 weights [1.0, 2.0] for 3 classes"),
        ([1.0, -2.0, 1.0], "[-2.0]"),
        ([1.0, float("nan"), 1.0], "[nan]"),
        ([0.0, 0.0, 0.0], "every weight"),
        (["a", "b", "c"], "neither a kind nor a list of numbers"),
        ("median", "unknown kind 'median'"),
    ],
)
def test_class_weights_validation(kind, needle):
    with pytest.raises(UnetsegError, match="Fix:") as info:
        class_weights(kind, [10, 20, 30])
    assert needle in str(info.value)


@pytest.mark.parametrize("kind", ["ce", "dice", "ce+dice"])
def test_padding_is_ignored_when_the_dataset_has_no_ignore_index(kind):
    """Crops and batches pad masks with ClassInfo.ignore_label (255 when the dataset has no
    ignore_index): the loss over a padded batch equals the loss over the real pixels."""
    from unetseg.dataset import ClassInfo

    classes = ClassInfo(names=["a", "b", "c"], palette=[[0, 0, 0], [1, 1, 1], [2, 2, 2]])
    assert classes.ignore_index is None and classes.ignore_label == 255
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 6, 8))
    padded = target.clone()
    padded[:, 4:, :] = classes.ignore_label
    loss_fn = SegmentationLoss(kind, classes.ignore_label)
    expected = SegmentationLoss(kind, None)(logits[:, :, :4, :], target[:, :4, :])
    got = loss_fn(logits, padded)
    assert torch.allclose(got, expected, atol=1e-6)
    got.backward()
    assert torch.count_nonzero(logits.grad[:, :, 4:, :]) == 0  # padded pixels get no gradient
