"""Scoring a model: the loop that turns batches into a (per-process) confusion matrix, and
test-time augmentation around a model. Training's periodic evaluation and
``unetseg evaluate`` both score through :func:`confusion_matrix`, so they count the same
pixels the same way.

Metrics are computed at the original mask resolution: with full-resolution evaluation
the padded pixels of a batch carry the ignore label; with ``eval_resize`` the logits of
each sample are resized back to its original mask before the argmax.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unetseg.batch import BatchHook
from unetseg.errors import UnetsegError
from unetseg.metrics import ConfusionMatrix
from unetseg.transforms import resize_logits

TTA_MODES = ("none", "flip", "multiscale")
MULTISCALE = (0.75, 1.0, 1.25)


class TTA(nn.Module):
    """Test-time augmentation around a segmentation model: returns class probabilities
    averaged over the horizontal flip (``flip``), or over the flip at scales 0.75, 1 and
    1.25 (``multiscale``); ``none`` returns the model's logits unchanged."""

    def __init__(self, model: nn.Module, mode: str = "none"):
        super().__init__()
        if mode not in TTA_MODES:
            raise UnetsegError(f"--tta {mode!r}: unknown. Fix: use one of {', '.join(TTA_MODES)}")
        self.model, self.mode = model, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return self.model(x)
        size = x.shape[-2:]
        scales = MULTISCALE if self.mode == "multiscale" else (1.0,)
        total = None
        for scale in scales:
            xs = x if scale == 1.0 else F.interpolate(x, size=scaled_size(size, scale), mode="bilinear",
                                                      align_corners=False)
            for flip in (False, True):
                inp = xs.flip(-1) if flip else xs
                logits = self.model(inp).float()
                logits = logits.flip(-1) if flip else logits
                if scale != 1.0:
                    logits = resize_logits(logits, size)
                probs = logits.softmax(1)
                total = probs if total is None else total + probs
        return total / (2 * len(scales))


def scaled_size(size, scale: float) -> tuple[int, int]:
    """(H, W) times ``scale``, each at least one pixel: a side that would scale to nothing
    (a 1-pixel-high image at 0.75) stays one pixel, as the training augmentation sizes it."""
    return tuple(max(1, round(side * scale)) for side in size)


class FixedShape(nn.Module):
    """Runs ``model`` on every batch padded (zeros, bottom/right) to at least ``height`` x
    ``width``, H and W rounded up to a multiple of ``multiple``, and to ``batch``
    samples, then crops the logits back: a compiled ``model`` then compiles once for all
    the sizes that round to one shape, instead of once per image size or short last
    batch. With ``multiple`` the model's own padding multiple and no minimum size, every
    prediction is exactly the uncompiled model's (it pads so itself). Wrap the compiled
    model (the padding must stay outside the graph); the model must treat samples
    independently (eval-mode normalisation does)."""

    def __init__(self, model: nn.Module, batch: int, height: int = 0, width: int = 0, multiple: int = 1):
        super().__init__()
        self.model, self.batch, self.size, self.multiple = model, batch, (height, width), max(1, multiple)

    def shape(self, h: int, w: int) -> tuple[int, int]:
        """The padded H, W for an input of ``h`` x ``w``."""
        m = self.multiple
        return -(-max(self.size[0], h) // m) * m, -(-max(self.size[1], w) // m) * m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if n > self.batch:  # more than planned: run it as it is
            return self.model(x)
        height, width = self.shape(h, w)
        # One pad for the batch too: it keeps the memory format (channels_last), so the
        # short last batch has the same strides as the others and needs no graph of its own.
        padded = F.pad(x, (0, width - w, 0, height - h, 0, 0, 0, self.batch - n))
        return self.model(padded)[:n, :, :h, :w]


def compiled_model(net: nn.Module, batch: int, height: int = 0, width: int = 0) -> FixedShape:
    """``torch.compile(net)`` behind a :class:`FixedShape` at ``net``'s own padding multiple:
    for evaluation (``height`` x ``width``: the largest input, so every batch has one shape
    and compiles to one static graph) and prediction (no minimum: inputs of many sizes, for
    which torch makes the sizes symbolic once a second one comes)."""
    one_shape = height > 0 and width > 0
    return FixedShape(torch.compile(net, dynamic=False if one_shape else None), batch, height, width,
                      getattr(net, "pad_multiple", 32))


@torch.no_grad()
def confusion_matrix(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    num_classes: int,
    ignore_index: int | None,
    class_names: list[str] | None = None,
    device: torch.device | str = "cpu",
    autocast: Callable[[], Any] = contextlib.nullcontext,
    keep: int = 0,
    hook: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    each: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[ConfusionMatrix, list[dict[str, torch.Tensor]]]:
    """This process's (not yet reduced) confusion matrix over ``batches``, and up to
    ``keep`` examples (normalised image, prediction, target) for pictures.

    ``hook`` brings each batch to the device (default: a plain :class:`BatchHook` on
    ``device``); training passes its own, so evaluation sees batches as training does.
    ``each(key, prediction, target)`` is called for every sample with the two HxW label
    maps that were counted (at the mask's resolution, batch padding cut off)."""
    hook = hook or BatchHook(device)
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, class_names)
    examples: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        batch = hook(batch)
        image, target = batch["image"], batch["mask"]
        with autocast():
            logits = model(image)
        pred = logits.argmax(1)
        if "full_mask" in batch:
            for i, full_target in enumerate(batch["full_mask"]):
                full_target = full_target.to(image.device, non_blocking=True)
                full = resize_logits(logits[i : i + 1], full_target.shape[-2:]).argmax(1)
                cm.update(full, full_target.unsqueeze(0))
                if each is not None:
                    each(batch["keys"][i], full[0], full_target)
        else:
            cm.update(pred, target)  # batch padding carries the ignore label
            if each is not None:
                for i, (h, w) in enumerate(batch["sizes"]):
                    each(batch["keys"][i], pred[i, :h, :w], target[i, :h, :w])
        for i in range(min(keep - len(examples), len(pred))):
            h, w = pred.shape[-2:] if "full_mask" in batch else batch["sizes"][i]
            examples.append({"image": image[i, :, :h, :w].cpu(), "pred": pred[i, :h, :w].cpu(), "target": target[i, :h, :w].cpu()})
    model.train(was_training)
    return cm, examples
