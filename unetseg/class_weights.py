"""Cross-entropy class weights from the per-class pixel counts of ``dataset.json``.

This module owns turning ``SplitInfo.pixel_counts`` (which already leave ignored
pixels out) into one cross-entropy weight per class, and checking weights given
by hand. Segmentation datasets are heavily imbalanced (road and sky cover most of
a street scene, poles and signs almost nothing), so an unweighted cross-entropy
is dominated by the common classes and the rare ones are learned last or never.
Two standard remedies are offered, both computed from counts alone so they need
no extra pass over the data:

- ``median_frequency`` (SegNet): a class's weight is the median frequency over
  its frequency, so a class of median frequency weighs 1, rarer ones more, and
  the weights grow without bound as a class gets rarer.
- ``inverse_log`` (ENet): ``1 / ln(1.02 + p_c)``, which also favours rare classes
  but is bounded (~50.5 at most), so a handful of pixels of a nearly absent class
  cannot swamp the loss.

:class:`unetseg.losses.SegmentationLoss` takes the result as its ``class_weights``.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Iterable, Sequence

import torch

from unetseg.errors import UnetsegError

__all__ = ["CLASS_WEIGHT_KINDS", "ENET_C", "class_weights", "explicit_weights"]

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
    counts = _checked_counts(pixel_counts)
    if not isinstance(kind, str):
        return explicit_weights(kind, len(counts))
    if kind not in CLASS_WEIGHT_KINDS:
        raise UnetsegError(
            f"class weights: unknown kind {kind!r}. Fix: use one of {', '.join(CLASS_WEIGHT_KINDS)}, "
            "or give one weight per class as a list of numbers"
        )
    if kind == "none":
        return None
    freqs = _frequencies(kind, counts, _ignored_ids(ignore, len(counts)))
    weights = _median_frequency(freqs) if kind == "median_frequency" else _inverse_log(freqs)
    return torch.tensor(weights, dtype=torch.float32)


def _checked_counts(pixel_counts: Sequence[int]) -> list[int]:
    counts = [int(c) for c in pixel_counts]
    if not counts:
        raise UnetsegError("class weights: pixel_counts is empty. Fix: compute weights from a split with at least one class")
    if any(c < 0 for c in counts):
        raise UnetsegError(f"class weights: pixel_counts {counts} has a negative count. Fix: regenerate dataset.json")
    return counts


def _frequencies(kind: str, counts: list[int], ignored: set[int]) -> list[float]:
    """Each class's share of the labelled pixels, 0 for ignored classes.

    Ignored classes are left out of the total too, so that a big "void" class does
    not shrink every other class's frequency (which would change ``inverse_log``).
    """
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
            stacklevel=3,  # the caller of class_weights, as when this was inline there
        )
    return [c / total for c in used]


def _median_frequency(freqs: list[float]) -> list[float]:
    # The median over present classes only: absent ones would drag it towards 0.
    median = statistics.median(f for f in freqs if f > 0)
    return [median / f if f > 0 else 0.0 for f in freqs]


def _inverse_log(freqs: list[float]) -> list[float]:
    return [1.0 / math.log(ENET_C + f) if f > 0 else 0.0 for f in freqs]


def _ignored_ids(ignore: int | Iterable[int] | None, num_classes: int) -> set[int]:
    if ignore is None:
        return set()
    ids = [ignore] if isinstance(ignore, int) else list(ignore)
    return {int(i) for i in ids if 0 <= int(i) < num_classes}


def explicit_weights(values: Sequence[float], num_classes: int) -> torch.Tensor:
    """``values`` as a float32 weight tensor, after the checks a hand-written list needs.

    Shared with :class:`unetseg.losses.SegmentationLoss`, so that weights given
    directly to the loss fail with the same messages as those from the config.

    Raises:
        UnetsegError: values that are not numbers, not ``num_classes`` of them,
            negative or non-finite ones, or all 0 (nothing would be learned).
    """
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
