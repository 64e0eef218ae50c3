"""Joint image+mask augmentation: the train and the eval preset.

Both take and return an ``(image, mask)`` pair as ``tv_tensors.Image`` (uint8, 3xHxW) and
``tv_tensors.Mask`` (uint8 or int64, HxW), so one ``torchvision.transforms.v2`` call
transforms both: geometry lands identically on the two, and masks are only ever
resampled with nearest neighbour (v2 does that for ``Mask``), so no label appears that
was not in the input. Padding of a mask uses ``ignore_index``.

The presets are separate classes with separate options. :class:`EvalTransform` holds no
random operation at all, so train augmentation at evaluation cannot happen by mistake.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as nnf
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from unetseg.dataset import MAX_LABEL
from unetseg.errors import UnetsegError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def size_pair(value: int | tuple[int, int] | list[int] | None, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) == 1:
        pair = pair * 2
    if len(pair) != 2 or min(pair) < 1:
        raise UnetsegError(f"{name} {value!r}: expected H,W (or one number) of positive sizes. Fix: use e.g. 256 or 360,480")
    return int(pair[0]), int(pair[1])


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale_range`` (aspect ratio kept)."""

    def __init__(self, scale_range: tuple[float, float]):
        super().__init__()
        self.scale_range = scale_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = F.get_size(next(x for x in flat_inputs if isinstance(x, (tv_tensors.Image, tv_tensors.Mask))))
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * torch.rand(()).item()
        return {"size": [max(1, round(height * scale)), max(1, round(width * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        # For a Mask, v2 resizes with nearest neighbour whatever interpolation says.
        return F.resize(inpt, params["size"], antialias=True)


def _to_float_normalized(mean, std) -> list[v2.Transform]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


@dataclass(frozen=True)
class TrainTransformConfig:
    crop_size: int | tuple[int, int] | None = 256
    """Random crop (H, W) after scaling; the mask is padded with ``ignore_index`` where the
    scaled image is smaller. ``None`` keeps the whole (scaled) image."""
    resize: int | tuple[int, int] | None = None
    """Resize every image to this (H, W) instead of scale + crop."""
    scale_range: tuple[float, float] = (0.5, 2.0)
    """Random scale factors, relative to the stored image size."""
    hflip: bool = True
    """Random horizontal flip with probability 0.5."""
    jitter: float = 0.0
    """Colour jitter strength: brightness, contrast and saturation vary by up to this
    fraction. 0 turns it off."""
    hue: float = 0.0
    """Hue jitter (0..0.5), applied with ``jitter``; off by default because it is the
    costliest augmentation here (about 40 ms per 256x256 crop on one CPU core)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class TrainTransform:
    """Random scale, random crop (mask padded with ``ignore_index``), horizontal flip,
    optional colour jitter, normalisation."""

    def __init__(self, config: TrainTransformConfig, ignore_index: int | None):
        crop = size_pair(config.crop_size, "crop size")
        resize = size_pair(config.resize, "resize")
        lo, hi = config.scale_range
        if not 0 < lo <= hi:
            raise UnetsegError(f"scale range {config.scale_range}: need 0 < min <= max. Fix: use e.g. 0.5,2.0")
        if config.jitter < 0:
            raise UnetsegError(f"jitter {config.jitter}: must be >= 0. Fix: use 0 (off) to 0.4")
        # Padding a mask needs a label no loss or metric counts.
        fill = {tv_tensors.Image: 0, tv_tensors.Mask: MAX_LABEL if ignore_index is None else ignore_index}
        ops: list[v2.Transform] = []
        if resize is not None:
            ops.append(v2.Resize(list(resize), antialias=True))
        else:
            if (lo, hi) != (1.0, 1.0):
                ops.append(RandomScale((lo, hi)))
            if crop is not None:
                ops.append(v2.RandomCrop(list(crop), pad_if_needed=True, fill=fill))
        if config.hflip:
            ops.append(v2.RandomHorizontalFlip(p=0.5))
        if config.jitter > 0:
            j = config.jitter
            ops.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=config.hue))
        ops += _to_float_normalized(config.mean, config.std)
        self.config = config
        self.pipeline = v2.Compose(ops)

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pipeline(image, mask)

    def __repr__(self) -> str:
        return f"TrainTransform({self.pipeline})"


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

    def __init__(self, config: EvalTransformConfig, ignore_index: int | None = None):
        self.config = config
        self.resize = size_pair(config.resize, "eval resize")

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[torch.Tensor, torch.Tensor]:
        if self.resize is not None:
            mask = F.resize(mask, list(self.resize))
        return eval_input(image, self.resize, self.config.mean, self.config.std), mask.to(torch.int64)

    def __repr__(self) -> str:
        return f"EvalTransform(resize={self.resize})"
