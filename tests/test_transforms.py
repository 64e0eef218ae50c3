"""Joint augmentation: geometry lands identically on image and mask, labels stay labels."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from unetseg.errors import UnetsegError
from unetseg.transforms import EvalTransform, EvalTransformConfig, TrainTransform, TrainTransformConfig

IGNORE = 255


def coordinate_pair(h=40, w=50, num_classes=5):
    """An image whose pixels encode their own (y, x), a mask that is a function of (y, x),
    and a third channel of 255 that marks real (not padded) pixels."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.stack([yy, xx, torch.full_like(yy, 255)]).to(torch.uint8)
    mask = ((yy * 7 + xx * 3) % num_classes).to(torch.uint8)
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


def unnormalized(image: torch.Tensor) -> torch.Tensor:
    return (image * 255).round().to(torch.int64)


RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # keeps pixel values readable


@pytest.mark.parametrize("crop", [16, 24, (30, 60), 64])
def test_crop_and_flip_land_identically_on_image_and_mask(crop):
    image, mask = coordinate_pair()
    t = TrainTransform(TrainTransformConfig(crop_size=crop, scale_range=(1.0, 1.0), hflip=True, **RAW), IGNORE)
    flipped_seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out_image, out_mask = t(image, mask)
        pixels = unnormalized(out_image)
        real = pixels[2] == 255
        # Every real pixel's mask value is the input mask at the coordinates the image says.
        ys, xs = pixels[0][real], pixels[1][real]
        assert torch.equal(out_mask[real], mask[ys, xs].to(torch.int64))
        # Padding (crop larger than the image) is ignore in the mask and 0 in the image.
        assert (out_mask[~real] == IGNORE).all() and (pixels[:, ~real] == 0).all()
        row = real.sum(1).argmax()  # a row with the most real pixels
        xs = pixels[1][row][real[row]]
        if len(xs) > 1:
            flipped_seen.add(bool(xs[0] > xs[-1]))  # x decreasing along the row: mirrored
    assert flipped_seen == {True, False}  # both flipped and unflipped crops occurred


def test_scaling_never_invents_labels():
    image, mask = coordinate_pair(num_classes=4)
    mask[:5] = IGNORE
    t = TrainTransform(TrainTransformConfig(crop_size=48, scale_range=(0.3, 2.5), jitter=0.4, hue=0.1), IGNORE)
    for seed in range(15):
        torch.manual_seed(seed)
        out_image, out_mask = t(image, mask)
        assert out_image.shape == (3, 48, 48) and out_image.dtype == torch.float32
        assert out_mask.dtype == torch.int64
        assert set(out_mask.unique().tolist()) <= {0, 1, 2, 3, IGNORE}


def test_resize_instead_of_crop():
    image, mask = coordinate_pair()
    t = TrainTransform(TrainTransformConfig(resize=(20, 25), hflip=False, **RAW), IGNORE)
    out_image, out_mask = t(image, mask)
    assert out_image.shape == (3, 20, 25) and out_mask.shape == (20, 25)
    # Nearest-neighbour mask: each value is the input mask at a source pixel of the halved grid.
    assert torch.equal(out_mask, mask[::2, ::2].to(torch.int64))


def test_eval_preset_is_deterministic_and_leaves_masks_alone():
    image, mask = coordinate_pair()
    full = EvalTransform(EvalTransformConfig(**RAW))
    outs = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        outs.append(full(image, mask))
    assert all(torch.equal(outs[0][0], o[0]) and torch.equal(outs[0][1], o[1]) for o in outs)
    assert torch.equal(unnormalized(outs[0][0]), image.to(torch.int64))
    assert torch.equal(outs[0][1], mask.to(torch.int64))
    resized = EvalTransform(EvalTransformConfig(resize=(20, 25)))
    a, b = resized(image, mask), resized(image, mask)
    assert torch.equal(a[0], b[0]) and a[0].shape == (3, 20, 25) and a[1].shape == (20, 25)


def test_normalisation_uses_mean_and_std():
    image = tv_tensors.Image(torch.full((3, 4, 4), 255, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(4, 4, dtype=torch.uint8))
    out, _ = EvalTransform(EvalTransformConfig(mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0)))(image, mask)
    assert torch.allclose(out[:, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


@pytest.mark.parametrize("config, message", [
    (TrainTransformConfig(scale_range=(2.0, 1.0)), "scale range"),
    (TrainTransformConfig(crop_size=0), "crop size"),
    (TrainTransformConfig(jitter=-1), "jitter"),
])
def test_bad_options_name_the_value(config, message):
    with pytest.raises(UnetsegError, match=message):
        TrainTransform(config, IGNORE)
