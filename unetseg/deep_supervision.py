"""Deep supervision: auxiliary classifiers on the decoder's inner stages, for training only.

``loss.deep_supervision: W`` (0: off) wraps the model for training in
:class:`DeepSupervision`, which adds a 1x1 convolution to ``num_classes`` on every
decoder stage but the last (the model's own head is on the last), upsamples each to the
input size, and :class:`DeepSupervisionLoss` adds ``W`` times the mean of their losses to
the main loss. The heads live in the wrapper, not in the model: validation, saved models
(``best/``, ``final/``), evaluate, predict and export see the model alone, exactly as
without deep supervision. Training checkpoints hold the wrapper, heads included, so a
resume continues them.

A model supports it by a ``forward_stages(x) -> (logits, stages)`` method, ``stages``
being the inner decoder stages' features, deepest first, at the resolution of the input
padded to ``pad_multiple``, and a ``stage_channels()`` giving their channel counts
(:class:`unetseg.models.unet.UNet` has both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unetseg.errors import UnetsegError


class DeepSupervision(nn.Module):
    """``net`` and one auxiliary head per inner decoder stage. In training mode it returns
    ``(logits, [aux_logits, ...])`` (all at the input size), in eval mode the logits alone."""

    def __init__(self, net: nn.Module, num_classes: int):
        super().__init__()
        if not (hasattr(net, "forward_stages") and hasattr(net, "stage_channels")):
            raise UnetsegError(f"loss.deep_supervision needs a model with decoder stages; {type(net).__name__} has no "
                               "forward_stages/stage_channels. Fix: set loss.deep_supervision to 0, or use model unet")
        channels = net.stage_channels()
        if not channels:
            raise UnetsegError("loss.deep_supervision: the model has no inner decoder stage (depth 1). "
                               "Fix: use --model-depth 2 or more, or set loss.deep_supervision to 0")
        self.net = net
        self.heads = nn.ModuleList([nn.Conv2d(c, num_classes, 1) for c in channels])

    def forward(self, x: torch.Tensor):
        if not self.training:
            return self.net(x)
        logits, stages = self.net.forward_stages(x)
        h, w = x.shape[-2:]
        m = getattr(self.net, "pad_multiple", 1)
        size = ((h + m - 1) // m * m, (w + m - 1) // m * m)
        aux = [F.interpolate(head(f), size=size, mode="bilinear", align_corners=False)[:, :, :h, :w]
               for head, f in zip(self.heads, stages)]
        return logits, aux


def supervised(net: nn.Module, weight: float, num_classes: int) -> nn.Module:
    """What training trains: ``net`` itself, or with deep supervision's heads (``weight > 0``)."""
    return DeepSupervision(net, num_classes) if weight > 0 else net


class DeepSupervisionLoss(nn.Module):
    """``loss(logits) + weight * mean(loss(aux) for aux in aux_logits)`` for the outputs of
    :class:`DeepSupervision`; plain logits get ``loss(logits)``."""

    def __init__(self, loss: nn.Module, weight: float):
        super().__init__()
        self.loss, self.weight = loss, float(weight)

    def forward(self, outputs, target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        logits, aux = outputs
        main = self.loss(logits, target)
        return main + self.weight * torch.stack([self.loss(a, target) for a in aux]).mean()
