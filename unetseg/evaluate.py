"""Evaluation: predictions over the exact-once eval stream into the distributed ConfusionMatrix.

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

from unetseg.metrics import ConfusionMatrix


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
) -> tuple[ConfusionMatrix, list[dict[str, torch.Tensor]]]:
    """This process's (not yet reduced) confusion matrix over ``batches``, and up to
    ``keep`` examples (normalised image, prediction, target) for pictures."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, class_names)
    examples: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        image = batch["image"].to(device, non_blocking=True)
        with autocast():
            logits = model(image)
        pred = logits.argmax(1)
        target = batch["mask"].to(device, non_blocking=True)
        if "full_mask" in batch:
            for i, full_target in enumerate(batch["full_mask"]):
                full_target = full_target.to(device, non_blocking=True)
                full = F.interpolate(logits[i : i + 1].float(), size=full_target.shape[-2:], mode="bilinear", align_corners=False)
                cm.update(full.argmax(1), full_target.unsqueeze(0))
        else:
            cm.update(pred, target)  # batch padding carries the ignore label
        for i in range(min(keep - len(examples), len(pred))):
            h, w = pred.shape[-2:] if "full_mask" in batch else batch["sizes"][i]
            examples.append({"image": image[i, :, :h, :w].cpu(), "pred": pred[i, :h, :w].cpu(), "target": target[i, :h, :w].cpu()})
    model.train(was_training)
    return cm, examples
