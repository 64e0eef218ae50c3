"""Training augmentation: per-sample random parameters, crop-first geometry, batched colour.

One augmentation, two places to run it (``data.augment_on``):

``workers``
    DataLoader workers decode, draw each sample's parameters, and augment; the batch
    that reaches the training process is ready to use.
``device``
    Workers decode and draw the parameters only. The batch carries the decoded uint8
    images and masks (a quarter of the bytes of float images) and the parameters
    (``aug``), and :class:`DeviceAugment`, a step of the training :class:`~unetseg.batch.BatchHook`,
    augments it where it lands (the GPU).

Both places call the same :meth:`TrainTransform.apply_batch` on the same parameters, so
for the same seed they give the same masks, bit for bit, and the same images to within
the device's rounding: on a CPU exactly (up to float error), on a GPU within 1/255 of a
pixel value before normalisation (torchvision resizes uint8 images on a CPU with a
fixed-point kernel and on CUDA in float32, rounded back; about a fifth of the resized
pixels differ by one level).

Parameters (:meth:`TrainTransform.draw`)
    Drawn per sample from a ``random.Random`` seeded by the sample's place in the epoch
    (the training stream does that), never per batch: a scale factor, a crop, a flip and
    colour factors. They are a row of :data:`PARAMS` numbers, so a batch carries them as one
    small tensor.

Geometry proportional to what is kept
    The crop is chosen in source coordinates, and only the cropped region is resized: a
    2x zoom into a 256x256 crop reads a 128x128 region, instead of resizing the whole
    frame to 4x its pixels and throwing most away. The image is resized bilinearly with
    antialiasing, the mask with nearest neighbour (``nearest-exact``: a label is always one
    of the input's labels). Where the scaled image is smaller than the crop, it lands at a
    random place in the crop; the rest of the mask is ``ignore_index`` and the rest of the
    image is 0 after normalisation (the mean colour).

Colour and normalisation
    Brightness, contrast and saturation factors in ``[1 - jitter, 1 + jitter]`` (in this
    order), then ``(x - mean) / std``, computed for a whole batch at once with per-sample
    factors. Contrast blends towards the mean grey of the sample's
    real pixels, so padding does not change it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from unetseg.dataset import MAX_LABEL
from unetseg.errors import UnetsegError
from unetseg.options import size_pair
from unetseg.transforms import IMAGENET_MEAN, IMAGENET_STD

AUGMENT_ON = ("auto", "workers", "device")

# A sample's parameters, one row of numbers: where the kept region is in the source
# image, where its resized copy lands in the output canvas (after the flip), the
# canvas size, the flip, and the colour factors.
PARAMS = ("src_y", "src_x", "src_h", "src_w", "out_y", "out_x", "out_h", "out_w", "canvas_h", "canvas_w",
          "flip", "brightness", "contrast", "saturation")
_COL = {name: i for i, name in enumerate(PARAMS)}
_GEOMETRY = len(PARAMS) - 3  # the integer columns
_GREY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class TrainTransformConfig:
    crop_size: int | tuple[int, int] | None = 256
    """Random crop (H, W) of the scaled image; the mask is padded with ``ignore_index``
    where the scaled image is smaller. ``None`` keeps the whole (scaled) image."""
    resize: int | tuple[int, int] | None = None
    """Resize every image to this (H, W) instead of scale + crop."""
    scale_range: tuple[float, float] = (0.5, 2.0)
    """Random scale factors, relative to the stored image size."""
    hflip: bool = True
    """Random horizontal flip with probability 0.5."""
    jitter: float = 0.0
    """Colour jitter strength: brightness, contrast and saturation vary by up to this
    fraction. 0 turns it off."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def _axis(rng: random.Random, n: int, crop: int | None, scale: float) -> tuple[int, int, int, int, int]:
    """One axis of the geometry: ``(src_off, src_len, out_off, out_len, canvas)`` for a
    source of length ``n`` scaled by ``scale`` and cropped to ``crop``."""
    scaled = max(1, round(n * scale))
    if crop is None:
        return 0, n, 0, scaled, scaled
    if scaled >= crop:  # a crop of the scaled image: read only what it keeps
        src_len = min(n, max(1, round(crop / scale)))
        return rng.randint(0, n - src_len), src_len, 0, crop, crop
    return 0, n, rng.randint(0, crop - scaled), scaled, crop  # all of it, somewhere in the crop


class TrainTransform:
    """Random scale, crop (mask padded with ``pad_label``), horizontal flip, optional
    colour jitter, normalisation: see the module docstring. ``pad_label`` is the
    dataset's :attr:`~unetseg.dataset.ClassInfo.ignore_label`, the label no loss or
    metric counts."""

    def __init__(self, config: TrainTransformConfig, pad_label: int):
        self.crop = size_pair(config.crop_size, "crop size")
        self.resize = size_pair(config.resize, "resize")
        lo, hi = config.scale_range
        if not 0 < lo <= hi:
            raise UnetsegError(f"scale range {config.scale_range}: need 0 < min <= max. Fix: use e.g. 0.5,2.0")
        if config.jitter < 0:
            raise UnetsegError(f"jitter {config.jitter}: must be >= 0. Fix: use 0 (off) to 0.4")
        if isinstance(pad_label, bool) or not isinstance(pad_label, int) or not 0 <= pad_label <= MAX_LABEL:
            raise TypeError(f"pad_label {pad_label!r}: expected a label 0..{MAX_LABEL}. Fix: pass the dataset's classes.ignore_label")
        self.config = config
        self.pad_label = pad_label
        self._on_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    # --- parameters (where the sample is read) ---------------------------------------

    def draw(self, rng: random.Random, height: int, width: int) -> list[float]:
        """One sample's parameters (a row of :data:`PARAMS`) for a ``height`` x ``width``
        source, drawn from ``rng`` in a fixed order."""
        c = self.config
        if self.resize is not None:  # the whole image to one size
            (oh, ow), (ch, cw) = self.resize, self.resize
            sy, sx, sh, sw, oy, ox = 0, 0, height, width, 0, 0
        else:
            lo, hi = c.scale_range
            scale = lo + (hi - lo) * rng.random() if hi > lo else lo
            crop_h, crop_w = self.crop if self.crop is not None else (None, None)
            sy, sh, oy, oh, ch = _axis(rng, height, crop_h, scale)
            sx, sw, ox, ow, cw = _axis(rng, width, crop_w, scale)
        flip = int(c.hflip and rng.random() < 0.5)
        if flip:
            ox = cw - ox - ow  # the kept region mirrors inside the canvas too
        colour = [1.0, 1.0, 1.0]
        if c.jitter > 0:
            colour = [rng.uniform(max(0.0, 1 - c.jitter), 1 + c.jitter) for _ in range(3)]
        return [sy, sx, sh, sw, oy, ox, oh, ow, ch, cw, flip, *colour]

    def params(self, rng: random.Random, sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Parameters of several samples, ``(N, len(PARAMS))`` float64 (integers exact)."""
        return torch.tensor([self.draw(rng, h, w) for h, w in sizes], dtype=torch.float64)

    # --- applying them (in a worker or on the device) -------------------------------

    def geometry(self, images, masks, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop, resize and flip each sample into a canvas: uint8 ``(N, 3, H, W)`` and
        uint8 ``(N, H, W)`` masks (``pad_label`` outside the kept region), on the
        images' device. ``images``/``masks``: a list of ``(3, h, w)``/``(h, w)`` tensors, or
        a batch padded beyond each sample's size (the padding is never read)."""
        rows = params[:, :_GEOMETRY].to(torch.int64).tolist()
        height = max(r[_COL["canvas_h"]] for r in rows)
        width = max(r[_COL["canvas_w"]] for r in rows)
        device = images[0].device
        out_images = torch.zeros((len(rows), 3, height, width), dtype=torch.uint8, device=device)
        out_masks = torch.full((len(rows), height, width), self.pad_label, dtype=torch.uint8, device=device)
        for i, (sy, sx, sh, sw, oy, ox, oh, ow, _, _, flip) in enumerate(rows):
            image = images[i][:, sy:sy + sh, sx:sx + sw]
            mask = masks[i][sy:sy + sh, sx:sx + sw]
            if (oh, ow) != (sh, sw):
                # torch's uint8 antialiased kernel fails for a 1x1 output; float does not.
                image = F.resize(image, [oh, ow], antialias=True) if oh * ow > 1 else \
                    F.resize(image.float(), [oh, ow], antialias=True).round_().clamp_(0, 255).to(torch.uint8)
                mask = F.resize(mask[None], [oh, ow], interpolation=InterpolationMode.NEAREST_EXACT)[0]
            if flip:
                image, mask = image.flip(-1), mask.flip(-1)
            out_images[i, :, oy:oy + oh, ox:ox + ow] = image
            out_masks[i, oy:oy + oh, ox:ox + ow] = mask
        return out_images, out_masks

    def colour(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """uint8 canvases ``(N, 3, H, W)`` to normalised float32: colour factors per sample,
        then ``(x - mean) / std``; 0 outside each sample's kept region."""
        device, (n, _, height, width) = images.device, images.shape
        # Non-blocking (the DataLoader pins the batch): no wait for the device's queue.
        p = params.to(device=device, non_blocking=True).to(torch.float32)
        grey_weights, mean, std = self._constants(device)

        def col(name):
            return p[:, _COL[name]].view(n, 1, 1, 1)

        ys = torch.arange(height, device=device).view(1, 1, height, 1)
        xs = torch.arange(width, device=device).view(1, 1, 1, width)
        real = ((ys >= col("out_y")) & (ys < col("out_y") + col("out_h"))
                & (xs >= col("out_x")) & (xs < col("out_x") + col("out_w")))
        x = images.to(torch.float32) / 255
        if self.config.jitter > 0:
            x = (x * col("brightness")).clamp_(0, 1)
            grey = (x * grey_weights).sum(1, keepdim=True)
            mean_grey = (grey * real).sum((2, 3), keepdim=True) / real.sum((2, 3), keepdim=True)
            x = (col("contrast") * x + (1 - col("contrast")) * mean_grey).clamp_(0, 1)
            grey = (x * grey_weights).sum(1, keepdim=True)
            x = (col("saturation") * x + (1 - col("saturation")) * grey).clamp_(0, 1)
        return ((x - mean) / std) * real

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The grey weights, mean and std on ``device``, copied there once."""
        if device not in self._on_device:
            self._on_device[device] = tuple(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device)
                                            for v in (_GREY, self.config.mean, self.config.std))
        return self._on_device[device]

    def apply_batch(self, images, masks, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented float32 images ``(N, 3, H, W)`` and int64 masks ``(N, H, W)``."""
        canvases, out_masks = self.geometry(images, masks, params)
        return self.colour(canvases, params), out_masks.to(torch.int64)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, rng: random.Random | None = None):
        """One sample, ``(3, H, W)`` uint8 and ``(H, W)`` mask; parameters from ``rng``, else
        from torch's global generator."""
        if rng is None:
            rng = random.Random(int(torch.randint(0, 2**62, ()).item()))
        params = self.params(rng, [tuple(mask.shape[-2:])])
        images, masks = self.apply_batch([image.as_subclass(torch.Tensor)], [mask.as_subclass(torch.Tensor)], params)
        return images[0], masks[0]

    def __repr__(self) -> str:
        c = self.config
        what = f"resize={self.resize}" if self.resize else f"crop={self.crop}, scale_range={tuple(c.scale_range)}"
        return f"TrainTransform({what}, hflip={c.hflip}, jitter={c.jitter})"


class DeviceAugment:
    """A :class:`~unetseg.batch.BatchHook` step: augments a batch that carries raw samples
    and their parameters (``aug``) where the batch is, typically the GPU. Other batches
    (validation) pass through."""

    __name__ = "DeviceAugment"

    def __init__(self, transform: TrainTransform):
        self.transform = transform

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if "aug" not in batch:
            return batch
        out = {k: v for k, v in batch.items() if k != "aug"}
        out["image"], out["mask"] = self.transform.apply_batch(batch["image"], batch["mask"], batch["aug"])
        return out


def augment_on(choice: str, device: torch.device) -> str:
    """``workers`` or ``device`` for ``data.augment_on`` (auto: the device when it is a GPU)."""
    if choice == "auto":
        return "device" if device.type == "cuda" else "workers"
    return choice
