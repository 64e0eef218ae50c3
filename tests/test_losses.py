"""Segmentation losses and the loss registry (class weights: test_class_weights.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unetseg.errors import UnetsegError
from unetseg import losses
from unetseg.losses import (
    LossSpec,
    SegmentationLoss,
    dice_loss,
    format_loss,
    loss_names,
    parse_loss,
    register_loss,
)

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


@pytest.mark.parametrize("kind", ["ce", "dice", "ce+dice", "lovasz", "ohem", "ce+lovasz+ohem"])
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
        ({"ohem_threshold": 0}, "ohem_threshold 0"),
        ({"ohem_min_kept": 1.5}, "ohem_min_kept 1.5"),
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


@pytest.mark.parametrize("kind", ["ce", "dice", "ce+dice", "lovasz", "ohem"])
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


# --------------------------------------------------------------------------- the registry


@pytest.fixture
def registry():
    """The loss registry, restored afterwards so a test's losses do not leak into others."""
    saved = dict(losses._LOSSES)
    yield losses._LOSSES
    losses._LOSSES.clear()
    losses._LOSSES.update(saved)


def toy_l1(logits, target, ignore_index):
    """Mean L1 distance between softmax and one-hot over valid pixels, as a hand reference."""
    valid = target != ignore_index
    one_hot = F.one_hot(torch.where(valid, target, 0), logits.shape[1]).movedim(-1, 1).float()
    diff = (logits.float().softmax(1) - one_hot).abs().sum(1)
    return (diff * valid).sum() / valid.sum().clamp_min(1)


@pytest.fixture
def toy(registry):
    seen = []

    @register_loss("toy")
    def make_toy(spec: LossSpec):
        seen.append(spec)
        return lambda logits, target: toy_l1(logits, target, spec.ignore_index)

    return seen


def test_builtin_losses_are_registered():
    assert loss_names() == ("ce", "dice", "lovasz", "ohem")


def test_registered_loss_is_usable_in_a_sum(toy):
    assert "toy" in loss_names()
    logits, target = random_batch(seed=6)
    logits.requires_grad_(True)
    loss_fn = SegmentationLoss("ce+0.3*toy", ignore_index=IGNORE, label_smoothing=0.1)
    loss = loss_fn(logits, target)
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE, label_smoothing=0.1)
    expected = ce + 0.3 * toy_l1(logits, target, IGNORE)
    assert toy_l1(logits, target, IGNORE).item() > 0
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # the factory got the settings it may need
    (spec,) = toy
    assert spec.ignore_index == IGNORE and spec.label_smoothing == 0.1
    assert "ce+0.3*toy" in repr(loss_fn)


def test_registered_loss_is_float32_under_autocast(toy):
    logits, target = random_batch(seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = SegmentationLoss("toy", ignore_index=IGNORE)(logits.bfloat16(), target)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, toy_l1(logits.bfloat16().float(), target, IGNORE))


def test_registry_fixture_unregisters(registry):
    register_loss("temporary")(lambda spec: None)
    assert "temporary" in loss_names()


def test_registry_is_restored_after_a_test():
    # runs after the tests above: their toy losses are gone
    assert "toy" not in loss_names() and "temporary" not in loss_names()
    with pytest.raises(UnetsegError, match="unknown loss 'toy'"):
        SegmentationLoss("ce+toy")


def test_register_loss_rejects_bad_and_taken_names(registry):
    with pytest.raises(ValueError, match="already registered"):
        register_loss("ce")(lambda spec: None)
    for name in ["", "a+b", "0.5", "two words", "a*b"]:
        with pytest.raises(ValueError, match="must be letters"):
            register_loss(name)
    assert loss_names() == ("ce", "dice", "lovasz", "ohem")


def test_term_must_return_a_scalar_float32(registry):
    register_loss("per_pixel")(lambda spec: lambda logits, target: logits.sum(1))
    logits, target = random_batch()
    with pytest.raises(TypeError, match="'per_pixel' returned torch.float32 \\(2, 8, 8\\)"):
        SegmentationLoss("per_pixel")(logits, target)


def test_module_terms_follow_to(registry):
    loss_fn = SegmentationLoss("ce", ignore_index=IGNORE, class_weights=[1.0, 2.0, 0.5, 1.0, 1.5])
    loss_fn = loss_fn.to(torch.float64)  # stands in for .to(device): buffers of term modules move too
    (term,) = loss_fn.term_modules
    assert term.class_weights.dtype == torch.float64
    assert loss_fn.state_dict() == {}  # weights come from the config, not from checkpoints


# --------------------------------------------------------------------------- parse_loss


@pytest.mark.parametrize(
    "text, terms",
    [
        ("ce", [(1.0, "ce")]),
        ("dice", [(1.0, "dice")]),
        ("ce+dice", [(1.0, "ce"), (1.0, "dice")]),
        ("ce+0.5*dice", [(1.0, "ce"), (0.5, "dice")]),
        (" 2 * ce + 1e-1*dice ", [(2.0, "ce"), (0.1, "dice")]),
        ("0*ce+dice", [(0.0, "ce"), (1.0, "dice")]),
    ],
)
def test_parse_loss(text, terms):
    assert parse_loss(text) == terms
    assert parse_loss(format_loss(terms)) == terms


@pytest.mark.parametrize(
    "text, needle",
    [
        ("focal", "unknown loss 'focal'"),
        ("ce+Dice", "unknown loss 'Dice'"),
        ("ce+", "empty term"),
        ("ce++dice", "empty term"),
        ("", "is empty"),
        ("-0.5*dice", "weight -0.5 of 'dice'"),
        ("ce+nan*dice", "weight nan of 'dice'"),
        ("inf*ce", "weight inf of 'ce'"),
        ("half*dice", "weight 'half' of 'dice' is not a number"),
        ("ce+0.5*", "term '0.5*' has no loss name"),
        ("ce+dice+ce", "'ce' appears twice"),
        ("0*ce+0*dice", "every term has weight 0"),
    ],
)
def test_parse_loss_rejects_bad_text(text, needle):
    with pytest.raises(UnetsegError) as info:
        parse_loss(text)
    message = str(info.value)
    assert needle in message
    assert repr(text) in message  # names the value
    assert "registered losses: ce, dice" in message
    assert "Fix: use e.g. ce, dice or ce+0.5*dice" in message


def test_parse_loss_rejects_non_text():
    with pytest.raises(UnetsegError, match="loss None: is not text"):
        parse_loss(None)


def test_dice_weight_applies_only_to_an_unweighted_dice_among_several_terms():
    assert parse_loss("ce+dice", dice_weight=0.4) == [(1.0, "ce"), (0.4, "dice")]
    assert parse_loss("ce+0.5*dice", dice_weight=0.4) == [(1.0, "ce"), (0.5, "dice")]  # explicit wins
    assert parse_loss("dice", dice_weight=0.4) == [(1.0, "dice")]  # a lone term is not rescaled, as before
    with pytest.raises(UnetsegError, match="dice_weight -1"):
        parse_loss("ce+dice", dice_weight=-1)


def test_ce_plus_dice_with_dice_weight_equals_explicit_weight():
    logits, target = random_batch(seed=8)
    weights = [1.0, 2.0, 0.5, 1.0, 1.5]
    old = SegmentationLoss("ce+dice", ignore_index=IGNORE, class_weights=weights, dice_weight=0.4)(logits, target)
    new = SegmentationLoss("ce+0.4*dice", ignore_index=IGNORE, class_weights=weights)(logits, target)
    assert torch.equal(old, new)
    lone = SegmentationLoss("dice", ignore_index=IGNORE, dice_weight=0.4)(logits, target)
    assert torch.equal(lone, dice_loss(logits, target, IGNORE))
