"""Two more built-in loss terms, registered in :mod:`unetseg.losses`' registry: ``lovasz``
(the Lovasz-softmax loss, a smooth surrogate of 1 - IoU) and ``ohem`` (cross-entropy
over the hardest pixels only). Both work for thin and small classes, which a plain
pixel average drowns in road and sky.

Neither synchronises with the device (no ``.item()``, no boolean indexing), so they
cost a GPU step no stall; both give 0 with a gradient when every pixel is ignored.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from unetseg.losses import LossSpec, LossTerm, _no_autocast, register_loss


def lovasz_softmax(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None) -> torch.Tensor:
    """The Lovasz-softmax loss (Berman et al., CVPR 2018) over the whole batch: for each
    class present in the target, the Lovasz extension of the Jaccard loss evaluated at
    the pixel errors ``|[target == c] - p_c|``, averaged over those classes.

    For confident (one-hot) predictions it equals ``1 - IoU`` averaged over the classes
    present, and between them it interpolates piecewise linearly, so its gradient pushes
    the pixels that most affect each class's IoU. Ignored pixels have error 0 and no
    target, which leaves every class's value unchanged."""
    with _no_autocast(logits.device.type):
        probs = logits.float().softmax(1)
        num_classes = probs.shape[1]
        probs = probs.movedim(1, -1).reshape(-1, num_classes)  # (P, C)
        target = target.reshape(-1)
        valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
        classes = torch.arange(num_classes, device=target.device)
        fg = ((target.unsqueeze(1) == classes) & valid.unsqueeze(1)).float()  # (P, C)
        errors = (fg - probs).abs() * valid.unsqueeze(1)
        errors, order = errors.sort(dim=0, descending=True)
        fg = fg.gather(0, order)
        # The Lovasz extension's gradient: the Jaccard loss of each prefix of the sorted
        # pixels, differenced. Its union is >= 1 from the first pixel on.
        total = fg.sum(0, keepdim=True)
        jaccard = 1 - (total - fg.cumsum(0)) / (total + (1 - fg).cumsum(0))
        weights = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
        per_class = (errors * weights).sum(0)
        present = (total.squeeze(0) > 0).float()
        return (per_class * present).sum() / present.sum().clamp_min(1.0)


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None,
                       ignore_index: int | None = None, threshold: float = 0.7, min_kept: float = 0.1,
                       label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the hard pixels: those whose true class gets a probability below
    ``threshold``, and at least the ``min_kept`` fraction of the valid pixels with the
    largest loss (so that a batch the model already gets right still teaches it
    something). A (class-)weighted mean over the kept pixels, like ``F.cross_entropy``."""
    with _no_autocast(logits.device.type):
        logits = logits.float()
        valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        pixel = F.cross_entropy(logits, safe, reduction="none", label_smoothing=label_smoothing)
        weight = valid.float()
        if class_weights is not None:
            weight = weight * class_weights.to(device=logits.device, dtype=torch.float32)[safe]
        with torch.no_grad():
            p_true = logits.softmax(1).gather(1, safe.unsqueeze(1)).squeeze(1)
            ranked = torch.where(valid, pixel, torch.full_like(pixel, -math.inf)).flatten().sort(descending=True).values
            k = (valid.sum() * min_kept).ceil().long().clamp(1, ranked.numel())
            kth = ranked.gather(0, (k - 1).view(1))  # the k-th largest loss, on the device
            kept = valid & ((p_true < threshold) | (pixel >= kth))
        weight = weight * kept
        denom = weight.sum()
        # No kept pixel: the sum is 0 too; dividing by 1 keeps value and gradient finite.
        return (pixel * weight).sum() / torch.where(denom > 0, denom, torch.ones_like(denom))


@register_loss("lovasz")
def _lovasz(spec: LossSpec) -> LossTerm:
    # Unweighted by design, as dice: it averages over the classes present.
    return functools.partial(lovasz_softmax, ignore_index=spec.ignore_index)


@register_loss("ohem")
class OhemTerm(nn.Module):
    """The ``ohem`` term: a module so that its class weights move with ``.to(device)``."""

    def __init__(self, spec: LossSpec):
        super().__init__()
        self.spec = spec
        self.register_buffer("class_weights", spec.class_weights, persistent=False)

    def extra_repr(self) -> str:
        return f"threshold={self.spec.ohem_threshold}, min_kept={self.spec.ohem_min_kept}"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        s = self.spec
        return ohem_cross_entropy(logits, target, self.class_weights, s.ignore_index, s.ohem_threshold, s.ohem_min_kept,
                                  s.label_smoothing)
