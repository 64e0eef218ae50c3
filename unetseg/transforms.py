"""Evaluation-time preprocessing, shared by evaluation and prediction.

:class:`EvalTransform` holds no random operation at all, so training augmentation at
evaluation cannot happen by mistake; the training augmentation is :mod:`unetseg.augment`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from unetseg.options import size_pair  # the one reading of an H,W size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvalTransformConfig:
    resize: int | tuple[int, int] | None = None
    """None: full resolution (batches are padded, the padding ignored). (H, W): the
    network sees the image resized to this, and metrics use the original mask."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def eval_input(image: torch.Tensor, resize: tuple[int, int] | None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """What the network sees at evaluation and prediction: uint8 RGB ``(..., 3, H, W)``,
    resized to ``resize`` when the model was trained so, scaled to [0, 1] and normalised.
    ``unetseg evaluate`` (in loader workers) and ``unetseg predict`` (on the device) both
    call this, so a prediction is made exactly as the model was scored."""
    if resize is not None:
        image = F.resize(image, list(resize), antialias=True)
    return F.normalize(F.to_dtype(image, torch.float32, scale=True), list(mean), list(std))


def resize_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """Logits ``(N, C, h, w)`` at another size, in float32, before the argmax: the metrics
    and the predictions of a model fed resized images are made at the original size."""
    return nnf.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


class EvalTransform:
    """Deterministic: :func:`eval_input` for the image; the mask keeps its labels (a
    nearest-resized copy when ``resize`` is set, for losses: the metrics use the mask at
    full resolution)."""

    def __init__(self, config: EvalTransformConfig):
        self.config = config
        self.resize = size_pair(config.resize, "eval resize")

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[torch.Tensor, torch.Tensor]:
        if self.resize is not None:
            mask = F.resize(mask, list(self.resize))
        return eval_input(image, self.resize, self.config.mean, self.config.std), mask.to(torch.int64)

    def __repr__(self) -> str:
        return f"EvalTransform(resize={self.resize})"
