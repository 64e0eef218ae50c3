"""Segmentation losses and the registry of loss terms.

This module owns what a training loss is: :class:`SegmentationLoss` is a weighted
sum of registered terms written as text (``"ce"``, ``"dice"``, ``"ce+0.5*dice"``, see
:func:`parse_loss`), computed in float32 even under autocast, with ignored pixels
left out of every term. A batch in which every pixel is ignored gives a loss of
exactly 0 that still depends on the logits (its gradient is all zeros), so the
backward pass reaches every parameter and DDP does not complain about unused ones.

Adding a loss is one factory and one registration; the module that defines it
must be imported before the loss text is parsed (by the config or by
:class:`SegmentationLoss`)::

    from unetseg.losses import LossSpec, register_loss

    @register_loss("focal")
    def focal(spec: LossSpec):
        return lambda logits, target: my_focal_loss(logits, target, spec.ignore_index)

after which ``loss: ce+0.5*focal`` works. A term gets float32 logits with autocast
off, and must give 0 (not NaN) with a gradient when every pixel is ignored.

Class weights for the ``ce`` term are computed from ``dataset.json`` in
:mod:`unetseg.class_weights`; this module only checks and applies them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unetseg.class_weights import explicit_weights
from unetseg.errors import UnetsegError

__all__ = [
    "LossSpec",
    "SegmentationLoss",
    "dice_loss",
    "format_loss",
    "loss_names",
    "masked_cross_entropy",
    "parse_loss",
    "register_loss",
]


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


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensor fields gives no single bool
class LossSpec:
    """What a loss term may depend on besides the logits and targets, fixed for a run.

    Terms take what they need and ignore the rest, so a new term needs no new
    argument threaded through :class:`SegmentationLoss` unless it adds a setting.
    """

    ignore_index: int | None = None
    class_weights: torch.Tensor | None = None
    label_smoothing: float = 0.0
    dice_smooth: float = 1.0
    ohem_threshold: float = 0.7
    ohem_min_kept: float = 0.1


LossTerm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LossFactory = Callable[[LossSpec], LossTerm]

_LOSSES: dict[str, LossFactory] = {}
# So that parse_loss can read every name back: no "+", "*" or spaces.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FIX = "Fix: use e.g. ce, dice or ce+0.5*dice"


def register_loss(name: str) -> Callable[[LossFactory], LossFactory]:
    """Register ``factory(spec) -> term`` as the loss ``name``, usable in loss text.

    ``term(logits (N, C, H, W), target (N, H, W) long)`` returns a scalar float32
    tensor. A factory returning an :class:`torch.nn.Module` gets it registered as a
    submodule of :class:`SegmentationLoss`, so its tensors follow ``.to(device)``
    instead of being copied to the device on every step.

    Raises:
        ValueError: a name that loss text could not spell, or one already taken.
            Not a :class:`UnetsegError`: it is a bug in code, not in user input.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"register_loss: name {name!r} must be letters, digits and _ (not starting with a digit)")

    def register(factory: LossFactory) -> LossFactory:
        if name in _LOSSES:
            raise ValueError(f"register_loss: a loss named {name!r} is already registered ({_LOSSES[name]!r})")
        _LOSSES[name] = factory
        return factory

    return register


def loss_names() -> tuple[str, ...]:
    """The registered loss names, in registration order (the built-ins first)."""
    return tuple(_LOSSES)


def parse_loss(text: str, dice_weight: float = 1.0) -> list[tuple[float, str]]:
    """The ``(weight, name)`` terms of loss text such as ``"ce"`` or ``"ce+0.5*dice"``.

    A loss is a ``+``-joined sum of terms, each ``name`` or ``weight*name``, with
    spaces allowed around the tokens. A term without a weight has weight 1, except
    that ``dice_weight`` weights an unweighted ``dice`` in a sum of several terms:
    that is the old ``ce+dice`` / ``dice_weight`` setting, kept so existing configs
    train the same. A lone term is never rescaled by it (scaling the whole loss
    would only change the effective learning rate), nor is an explicit weight.

    Raises:
        UnetsegError: unknown or repeated names, empty terms, weights that are not
            finite numbers >= 0 (or all 0), or a bad ``dice_weight``; the message
            names the value, the registered losses and a fix.
    """

    def fail(what: str) -> UnetsegError:
        return UnetsegError(f"loss {text!r}: {what} (registered losses: {', '.join(_LOSSES)}). {_FIX}")

    if not isinstance(text, str):
        raise fail("is not text")
    if not text.strip():
        raise fail("is empty")
    parsed: list[tuple[float | None, str]] = []
    for part in text.split("+"):
        part = part.strip()
        if not part:
            raise fail("has an empty term")
        weight_text, star, name = (s.strip() for s in part.rpartition("*"))
        if not name:
            raise fail(f"term {part!r} has no loss name")
        if name not in _LOSSES:
            raise fail(f"unknown loss {name!r}")
        if name in (n for _, n in parsed):
            raise fail(f"{name!r} appears twice; give it one weight instead")
        weight = None
        if star:
            try:
                weight = float(weight_text)
            except ValueError:
                raise fail(f"weight {weight_text!r} of {name!r} is not a number") from None
            if not math.isfinite(weight) or weight < 0:
                raise fail(f"weight {weight_text} of {name!r} must be a finite number >= 0")
        parsed.append((weight, name))
    if not (isinstance(dice_weight, (int, float)) and math.isfinite(dice_weight) and dice_weight >= 0):
        raise UnetsegError(f"loss: dice_weight {dice_weight!r} must be a finite number >= 0. Fix: use e.g. 1.0")
    terms = [
        (w if w is not None else float(dice_weight) if name == "dice" and len(parsed) > 1 else 1.0, name)
        for w, name in parsed
    ]
    if all(w == 0 for w, _ in terms):
        raise fail(f"every term has weight 0 ({format_loss(terms)}), so nothing would be learned")
    return terms


def format_loss(terms: Iterable[tuple[float, str]]) -> str:
    """Loss text for ``(weight, name)`` terms, which :func:`parse_loss` (with its default
    ``dice_weight``) reads back to the same terms; for logs and reprs."""
    return "+".join(name if weight == 1 else f"{weight!r}*{name}" for weight, name in terms)


# --------------------------------------------------------------------------- built-in terms


def masked_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy over valid pixels in float32; 0 (with a zero gradient) when there are none.

    Equals ``F.cross_entropy(logits, target, weight=..., ignore_index=..., label_smoothing=...)``
    with mean reduction (the sum over valid pixels divided by their number, or by
    their summed class weights) except where torch would divide 0 by 0 and give NaN.
    """
    with _no_autocast(logits.device.type):
        logits = logits.float()
        if weight is not None:
            weight = weight.to(device=logits.device, dtype=torch.float32)
        ignore_index = -100 if ignore_index is None else ignore_index
        total = F.cross_entropy(
            logits, target, weight=weight, ignore_index=ignore_index,
            label_smoothing=label_smoothing, reduction="sum",
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


@register_loss("ce")
class CrossEntropyTerm(nn.Module):
    """The ``ce`` term: a module so that its class weights move with ``.to(device)``."""

    def __init__(self, spec: LossSpec):
        super().__init__()
        self.ignore_index = spec.ignore_index
        self.label_smoothing = spec.label_smoothing
        # Not persistent: the weights come from the config and dataset.json, not from checkpoints.
        self.register_buffer("class_weights", spec.class_weights, persistent=False)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"weighted={self.class_weights is not None}")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return masked_cross_entropy(logits, target, self.class_weights, self.ignore_index, self.label_smoothing)


@register_loss("dice")
def _dice(spec: LossSpec) -> LossTerm:
    # Unweighted by design: Dice already averages over the classes present, so rare classes count fully.
    # A partial rather than a lambda, so that the loss module still pickles.
    return functools.partial(dice_loss, ignore_index=spec.ignore_index, smooth=spec.dice_smooth)


# --------------------------------------------------------------------------- the loss


class SegmentationLoss(nn.Module):
    """A weighted sum of registered loss terms, for logits ``(N, C, H, W)`` and targets ``(N, H, W)``.

    Args:
        kind: loss text, e.g. ``"ce"``, ``"dice"``, ``"ce+dice"`` or ``"ce+0.5*dice"``
            (see :func:`parse_loss`; ``"ce+dice"`` is ``ce + dice_weight * dice``).
        ignore_index: target value of pixels that count for nothing (``ClassInfo.ignore_index``),
            or ``None`` when no pixel is ignored.
        class_weights: per-class cross-entropy weights (see :func:`unetseg.class_weights.class_weights`), or
            ``None``. They weight the cross-entropy terms (``ce``, ``ohem``) only; Dice and
            Lovasz are unweighted means over classes.
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`, in ``[0, 1)``.
        dice_weight: weight of an unweighted ``dice`` in a sum of terms (>= 0).
        dice_smooth: the smoothing constant of :func:`dice_loss` (> 0).
        ohem_threshold, ohem_min_kept: the ``ohem`` term's settings
            (:func:`unetseg.loss_terms.ohem_cross_entropy`).

    Every term sees float32 logits with autocast off, so bf16/fp16 training does not
    lose the small differences a loss is made of. Cross-entropy is
    :func:`masked_cross_entropy`: ``F.cross_entropy`` except 0 instead of NaN when there
    is nothing to divide by (every pixel ignored, or every valid pixel of weight 0).
    """

    def __init__(
        self,
        kind: str = "ce",
        ignore_index: int | None = None,
        class_weights: torch.Tensor | Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        dice_weight: float = 1.0,
        dice_smooth: float = 1.0,
        ohem_threshold: float = 0.7,
        ohem_min_kept: float = 0.1,
    ):
        super().__init__()
        terms = parse_loss(kind, dice_weight)
        if not (isinstance(ohem_threshold, (int, float)) and 0 < ohem_threshold <= 1):
            raise UnetsegError(f"loss: ohem_threshold {ohem_threshold!r} is outside (0, 1]. Fix: use e.g. 0.7")
        if not (isinstance(ohem_min_kept, (int, float)) and 0 <= ohem_min_kept <= 1):
            raise UnetsegError(f"loss: ohem_min_kept {ohem_min_kept!r} is outside [0, 1]. Fix: use e.g. 0.1")
        if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 1.0):
            raise UnetsegError(f"loss: label_smoothing {label_smoothing!r} is outside [0, 1). Fix: use e.g. 0.1, or 0 for none")
        if not (isinstance(dice_smooth, (int, float)) and math.isfinite(dice_smooth) and dice_smooth > 0):
            raise UnetsegError(f"loss: dice_smooth {dice_smooth!r} must be a finite number > 0. Fix: use e.g. 1.0")
        if ignore_index is not None and not isinstance(ignore_index, int):
            raise UnetsegError(f"loss: ignore_index {ignore_index!r} must be an integer or None. Fix: use e.g. 255")
        self.kind = kind
        self.terms: tuple[tuple[float, str], ...] = tuple(terms)
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.dice_weight = float(dice_weight)
        self.dice_smooth = float(dice_smooth)
        if class_weights is not None:
            values = class_weights.detach().flatten().tolist() if isinstance(class_weights, torch.Tensor) else class_weights
            class_weights = explicit_weights(values, len(values))
        # Not persistent: the weights come from the config and dataset.json, not from checkpoints.
        self.register_buffer("class_weights", class_weights, persistent=False)
        spec = LossSpec(ignore_index, class_weights, self.label_smoothing, self.dice_smooth, float(ohem_threshold),
                        float(ohem_min_kept))
        self._fns = [(weight, name, _LOSSES[name](spec)) for weight, name in terms]
        # A list, not a dict by name: a ModuleDict refuses names such as "forward" or "keys".
        self.term_modules = nn.ModuleList([fn for _, _, fn in self._fns if isinstance(fn, nn.Module)])

    def extra_repr(self) -> str:
        return (
            f"loss={format_loss(self.terms)!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, "
            f"weighted={self.class_weights is not None}"
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
        total = None
        with _no_autocast(logits.device.type):
            logits = logits.float()
            for weight, name, fn in self._fns:
                value = fn(logits, target)
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"loss term {name!r} returned a {type(value).__name__}, not a tensor")
                if value.ndim != 0 or value.dtype != torch.float32:
                    got = f"{value.dtype} {tuple(value.shape)}"
                    raise TypeError(f"loss term {name!r} returned {got}; a term must return a scalar float32 tensor")
                # A weight of 1 is applied too: 1.0 * x == x exactly, and 0 * term keeps the term in the graph.
                value = weight * value
                total = value if total is None else total + value
        return total


# The other built-in terms (lovasz, ohem) register themselves on import.
from unetseg import loss_terms as _loss_terms  # noqa: E402, F401
