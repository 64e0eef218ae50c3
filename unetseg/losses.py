"""Segmentation losses and class weights.

:class:`SegmentationLoss` is cross-entropy (``"ce"``), soft Dice (``"dice"``) or their
sum (``"ce+dice"``), computed in float32 even under autocast, with ignored pixels
left out of both terms. A batch in which every pixel is ignored gives a loss of
exactly 0 that still depends on the logits (its gradient is all zeros), so the
backward pass reaches every parameter and DDP does not complain about unused ones.

:func:`class_weights` turns the per-class pixel counts of ``dataset.json``
(``SplitInfo.pixel_counts``, which already leave ignored pixels out) into
cross-entropy weights.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unetseg.errors import UnetsegError

__all__ = ["CLASS_WEIGHT_KINDS", "LOSS_KINDS", "SegmentationLoss", "class_weights", "dice_loss"]

LOSS_KINDS = ("ce", "dice", "ce+dice")
CLASS_WEIGHT_KINDS = ("none", "median_frequency", "inverse_log")
# ENet's constant: w_c = 1 / ln(c + p_c) bounds every weight by 1 / ln(1.02) ~ 50.5.
ENET_C = 1.02


def class_weights(
    kind: str | Sequence[float],
    pixel_counts: Sequence[int],
    ignore: int | Iterable[int] | None = None,
) -> torch.Tensor | None:
    """Per-class cross-entropy weights (float32, one per class) from pixel counts.

    Args:
        kind: one of

            - ``"none"``: no weighting; returns ``None``.
            - ``"median_frequency"``: SegNet's median frequency balancing,
              ``w_c = median(freq) / freq_c`` with ``freq_c = count_c / sum(counts)``;
              the median is taken over the classes that have pixels (for an even
              number of them, the mean of the two middle values). **Approximation:**
              the SegNet paper (Badrinarayanan et al., 2017, after Eigen & Fergus)
              defines ``freq_c`` as the pixels of ``c`` divided by the total pixels
              of *the images in which c is present*. ``dataset.json`` keeps only
              per-class totals, so the denominator here is the labelled pixels of
              the whole split. That equals the paper's value for classes present in
              every image; for a class present in few images the paper's
              frequency is larger, so its weight here is larger than the paper's.
              (With a common denominator the weight is just ``median(counts) / count_c``.)
            - ``"inverse_log"``: ENet's weighting ``w_c = 1 / ln(1.02 + p_c)`` with
              ``p_c = count_c / sum(counts)``; weights lie between ~1.4 (a class
              that covers everything) and ~50.5 (a vanishingly rare class).
            - an explicit list of floats, one per class, each finite and >= 0, not
              all 0; returned as a tensor as it is.

            Weights are not normalised: :func:`torch.nn.functional.cross_entropy`
            with mean reduction divides by the summed weight of the target pixels,
            so only their ratios matter.
        pixel_counts: labelled pixels per class (``SplitInfo.pixel_counts``); its
            length is the number of classes.
        ignore: class ids (an int or several) to leave out of the statistics and
            give weight 0, e.g. a "void" class kept as a real class id. Ids that
            are not class ids (such as an ``ignore_index`` of 255) have no entry in
            ``pixel_counts`` and are skipped, so passing ``ClassInfo.ignore_index``
            here is harmless.

    A class with no pixels (or listed in ``ignore``) gets weight 0 rather than an
    error, with a :class:`UserWarning` for those with no pixels: it never occurs as
    a target in the split the counts come from, so its weight would not change the
    loss there, and the model cannot learn it from that split anyway.

    Raises:
        UnetsegError: an unknown ``kind``, an explicit list of the wrong length or
            with negative / non-finite values, or counts with no labelled pixel.
    """
    counts = [int(c) for c in pixel_counts]
    num_classes = len(counts)
    if num_classes == 0:
        raise UnetsegError("class weights: pixel_counts is empty. Fix: compute weights from a split with at least one class")
    if any(c < 0 for c in counts):
        raise UnetsegError(f"class weights: pixel_counts {counts} has a negative count. Fix: regenerate dataset.json")

    if not isinstance(kind, str):
        return _explicit_weights(kind, num_classes)
    if kind not in CLASS_WEIGHT_KINDS:
        raise UnetsegError(
            f"class weights: unknown kind {kind!r}. Fix: use one of {', '.join(CLASS_WEIGHT_KINDS)}, "
            "or give one weight per class as a list of numbers"
        )
    if kind == "none":
        return None

    ignored = _ignored_ids(ignore, num_classes)
    used = [c if i not in ignored else 0 for i, c in enumerate(counts)]
    total = sum(used)
    if total == 0:
        raise UnetsegError(
            f"class weights {kind!r}: no labelled pixel in pixel_counts {counts}"
            + (f" outside the ignored classes {sorted(ignored)}" if ignored else "")
            + ". Fix: compute weights from a split that has labelled pixels, or use class weights 'none'"
        )
    empty = [i for i, c in enumerate(counts) if c == 0 and i not in ignored]
    if empty:
        warnings.warn(
            f"class weights {kind!r}: classes {empty} have no labelled pixels; they get weight 0 "
            "(the model cannot learn them from this split)",
            UserWarning,
            stacklevel=2,
        )
    freqs = [c / total for c in used]
    if kind == "median_frequency":
        median = statistics.median(f for f in freqs if f > 0)
        weights = [median / f if f > 0 else 0.0 for f in freqs]
    else:  # inverse_log
        weights = [1.0 / math.log(ENET_C + f) if f > 0 else 0.0 for f in freqs]
    return torch.tensor(weights, dtype=torch.float32)


def _ignored_ids(ignore: int | Iterable[int] | None, num_classes: int) -> set[int]:
    if ignore is None:
        return set()
    ids = [ignore] if isinstance(ignore, int) else list(ignore)
    return {int(i) for i in ids if 0 <= int(i) < num_classes}


def _explicit_weights(values: Sequence[float], num_classes: int) -> torch.Tensor:
    try:
        weights = [float(v) for v in values]
    except (TypeError, ValueError):
        raise UnetsegError(
            f"class weights: {values!r} is neither a kind nor a list of numbers. "
            f"Fix: use one of {', '.join(CLASS_WEIGHT_KINDS)}, or a list of {num_classes} numbers"
        ) from None
    if len(weights) != num_classes:
        raise UnetsegError(
            f"class weights: {len(weights)} weights {weights} for {num_classes} classes. "
            f"Fix: give exactly one weight per class ({num_classes}), in class order"
        )
    bad = [w for w in weights if not math.isfinite(w) or w < 0]
    if bad:
        raise UnetsegError(f"class weights: {bad} in {weights} are not finite numbers >= 0. Fix: use weights >= 0")
    if not any(w > 0 for w in weights):
        raise UnetsegError(f"class weights: every weight in {weights} is 0. Fix: give at least one class a weight > 0")
    return torch.tensor(weights, dtype=torch.float32)


def _no_autocast(device_type: str):
    """A context that turns autocast off on ``device_type`` (a no-op where there is none)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None, smooth: float = 1.0) -> torch.Tensor:
    """Soft multiclass Dice loss, ``1 - mean_c dice_c``, over the whole batch.

    ``dice_c = (2 * sum(p_c * t_c) + smooth) / (sum(p_c) + sum(t_c) + smooth)``, where
    ``p_c`` is the softmax probability of class ``c`` and ``t_c`` its one-hot target;
    the sums run over every valid pixel of the batch (a "batch Dice": images are not
    scored separately), and ignored pixels add nothing to either sum. The mean is
    over the classes *present*: those with at least one target pixel, or with at
    least one pixel's worth of predicted probability (``sum(p_c) >= 1``) over the
    valid pixels, so a class that is confidently predicted where it is absent counts
    (and scores ~0) while classes absent from both are left out rather than diluting
    the mean. Perfect confident predictions give ~0, confidently wrong ones ~1.

    With no valid pixel at all the loss is 0 (not NaN) and its gradient is zero.
    Computed in float32 whatever the logits' dtype or the autocast state.
    """
    with _no_autocast(logits.device.type):
        logits = logits.float()
        num_classes = logits.shape[1]
        if ignore_index is None:
            valid = torch.ones_like(target, dtype=torch.bool)
        else:
            valid = target != ignore_index
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        # (N, *spatial, C) -> (N, C, *spatial)
        one_hot = F.one_hot(safe_target, num_classes).movedim(-1, 1).float()
        mask = valid.unsqueeze(1).float()
        probs = logits.softmax(dim=1) * mask
        one_hot = one_hot * mask
        dims = [0, *range(2, logits.ndim)]
        intersection = (probs * one_hot).sum(dim=dims)
        pred_sum = probs.sum(dim=dims)
        target_sum = one_hot.sum(dim=dims)
        dice = (2.0 * intersection + smooth) / (pred_sum + target_sum + smooth)
        present = ((target_sum > 0) | (pred_sum.detach() >= 1.0)).float()
        # No present class (no valid pixel): 0 * (1 - dice) / 1 = 0, still a function of the logits.
        return ((1.0 - dice) * present).sum() / present.sum().clamp_min(1.0)


class SegmentationLoss(nn.Module):
    """Cross-entropy, soft Dice, or both, for logits ``(N, C, H, W)`` and targets ``(N, H, W)``.

    Args:
        kind: ``"ce"``, ``"dice"`` or ``"ce+dice"`` (``ce + dice_weight * dice``).
        ignore_index: target value of pixels that count for nothing (``ClassInfo.ignore_index``),
            or ``None`` when no pixel is ignored.
        class_weights: per-class cross-entropy weights (see :func:`class_weights`), or
            ``None``. They weight the cross-entropy term only; Dice is an unweighted
            mean over classes.
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`, in ``[0, 1)``.
        dice_weight: weight of the Dice term in ``"ce+dice"`` (>= 0).
        dice_smooth: the smoothing constant of :func:`dice_loss` (> 0).

    Cross-entropy equals ``F.cross_entropy(logits, target, weight=..., ignore_index=...,
    label_smoothing=...)`` with mean reduction — the sum over valid pixels divided by
    their number (or their summed class weights) — except that when there is nothing
    to divide by (every pixel ignored, or every valid pixel of weight 0) it is 0
    instead of NaN, with a zero gradient that still reaches the logits.
    """

    def __init__(
        self,
        kind: str = "ce",
        ignore_index: int | None = None,
        class_weights: torch.Tensor | Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        dice_weight: float = 1.0,
        dice_smooth: float = 1.0,
    ):
        super().__init__()
        if kind not in LOSS_KINDS:
            raise UnetsegError(f"loss: unknown kind {kind!r}. Fix: use one of {', '.join(LOSS_KINDS)}")
        if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 1.0):
            raise UnetsegError(f"loss: label_smoothing {label_smoothing!r} is outside [0, 1). Fix: use e.g. 0.1, or 0 for none")
        if not (isinstance(dice_weight, (int, float)) and math.isfinite(dice_weight) and dice_weight >= 0):
            raise UnetsegError(f"loss: dice_weight {dice_weight!r} must be a finite number >= 0. Fix: use e.g. 1.0")
        if not (isinstance(dice_smooth, (int, float)) and math.isfinite(dice_smooth) and dice_smooth > 0):
            raise UnetsegError(f"loss: dice_smooth {dice_smooth!r} must be a finite number > 0. Fix: use e.g. 1.0")
        if ignore_index is not None and not isinstance(ignore_index, int):
            raise UnetsegError(f"loss: ignore_index {ignore_index!r} must be an integer or None. Fix: use e.g. 255")
        self.kind = kind
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.dice_weight = float(dice_weight)
        self.dice_smooth = float(dice_smooth)
        if class_weights is not None:
            values = class_weights.detach().flatten().tolist() if isinstance(class_weights, torch.Tensor) else class_weights
            class_weights = _explicit_weights(values, len(values))
        # Not persistent: the weights come from the config and dataset.json, not from checkpoints.
        self.register_buffer("class_weights", class_weights, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
            f"dice_weight={self.dice_weight}, weighted={self.class_weights is not None}"
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim < 2 or target.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(
                f"SegmentationLoss: logits {tuple(logits.shape)} (N, C, H, W) and target {tuple(target.shape)} "
                "(N, H, W) do not match"
            )
        num_classes = logits.shape[1]
        if self.class_weights is not None and self.class_weights.numel() != num_classes:
            raise UnetsegError(
                f"loss: {self.class_weights.numel()} class weights for a model with {num_classes} classes. "
                "Fix: give exactly one class weight per class"
            )
        target = target.long()
        if self.kind == "dice":
            return dice_loss(logits, target, self.ignore_index, self.dice_smooth)
        loss = self.cross_entropy(logits, target)
        if self.kind == "ce+dice":
            loss = loss + self.dice_weight * dice_loss(logits, target, self.ignore_index, self.dice_smooth)
        return loss

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over valid pixels in float32; 0 (with a zero gradient) when there are none."""
        with _no_autocast(logits.device.type):
            logits = logits.float()
            weight = None
            if self.class_weights is not None:
                weight = self.class_weights.to(device=logits.device, dtype=torch.float32)
            ignore_index = -100 if self.ignore_index is None else self.ignore_index
            total = F.cross_entropy(
                logits, target, weight=weight, ignore_index=ignore_index,
                label_smoothing=self.label_smoothing, reduction="sum",
            )  # fmt: skip
            valid = target != ignore_index
            if weight is None:
                denom = valid.sum().to(torch.float32)
            else:
                # weight[target] with ignored targets (possibly >= C) replaced by class 0, then masked.
                safe_target = torch.where(valid, target, torch.zeros_like(target))
                denom = (weight[safe_target] * valid).sum()
            # When denom is 0 the sum is exactly 0 too; dividing by 1 keeps value and gradient finite
            # (a torch.where on the quotient would still backpropagate 0 * inf = NaN).
            denom = torch.where(denom > 0, denom, torch.ones_like(denom))
            return total / denom
