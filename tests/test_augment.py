"""Training augmentation: geometry lands identically on image and mask, labels stay labels,
the crop is taken before the resize, and the worker and device paths agree."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import coordinate_pair, make, train_stream, unnormalized
from unetseg.augment import PARAMS, DeviceAugment, TrainTransform, TrainTransformConfig, augment_on
from unetseg.batch import BatchHook
from unetseg.errors import UnetsegError
from unetseg.sources import open_source
from unetseg.stream import collate

IGNORE = 255
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # keeps pixel values readable
COL = {name: i for i, name in enumerate(PARAMS)}


@pytest.mark.parametrize("crop", [16, 24, (30, 60), 64])
def test_crop_and_flip_land_identically_on_image_and_mask(crop):
    image, mask = coordinate_pair()
    t = TrainTransform(TrainTransformConfig(crop_size=crop, scale_range=(1.0, 1.0), hflip=True, **RAW), IGNORE)
    flipped_seen = set()
    for seed in range(20):
        out_image, out_mask = t(image, mask, random.Random(seed))
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


@pytest.mark.parametrize("scale", [(0.5, 0.5), (0.7, 1.6), (2.0, 2.0)])
def test_a_scaled_crop_keeps_image_and_mask_aligned(scale):
    """The mask holds each pixel's source row (then column): the nearest-neighbour mask and
    the bilinear image must point at the same source place, to within a pixel."""
    h, w = 60, 80
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.stack([yy, xx, torch.full_like(yy, 255)]).to(torch.uint8)
    t = TrainTransform(TrainTransformConfig(crop_size=(40, 48), scale_range=scale, **RAW), IGNORE)
    for seed in range(8):
        for axis, coords in ((0, yy), (1, xx)):
            out_image, out_mask = t(image, coords.to(torch.uint8), random.Random(seed))
            pixels = out_image * 255
            real = unnormalized(out_image)[2] == 255
            assert torch.equal(real, out_mask != IGNORE)  # padding is the same place in both
            assert (pixels[axis][real] - out_mask[real]).abs().max() <= 1.0


def test_the_crop_is_taken_before_the_resize():
    """A 2x zoom into a 16x16 crop reads an 8x8 region, not the whole upscaled frame."""
    t = TrainTransform(TrainTransformConfig(crop_size=16, scale_range=(2.0, 2.0)), IGNORE)
    for seed in range(5):
        p = t.draw(random.Random(seed), 40, 50)
        assert (p[COL["src_h"]], p[COL["src_w"]], p[COL["out_h"]], p[COL["out_w"]]) == (8, 8, 16, 16)
        assert 0 <= p[COL["src_y"]] <= 32 and 0 <= p[COL["src_x"]] <= 42
    shrink = TrainTransform(TrainTransformConfig(crop_size=16, scale_range=(0.25, 0.25)), IGNORE)
    p = shrink.draw(random.Random(0), 40, 48)  # the whole image, 10x12, somewhere in the crop
    assert p[COL["src_h"]:COL["out_w"] + 1] == [40, 48, p[COL["out_y"]], p[COL["out_x"]], 10, 12]
    assert 0 <= p[COL["out_y"]] <= 6 and 0 <= p[COL["out_x"]] <= 4


def test_scaling_never_invents_labels():
    image, mask = coordinate_pair(num_classes=4)
    mask[:5] = IGNORE
    t = TrainTransform(TrainTransformConfig(crop_size=48, scale_range=(0.3, 2.5), jitter=0.4), IGNORE)
    for seed in range(15):
        out_image, out_mask = t(image, mask, random.Random(seed))
        assert out_image.shape == (3, 48, 48) and out_image.dtype == torch.float32
        assert torch.isfinite(out_image).all()
        assert out_mask.dtype == torch.int64
        assert set(out_mask.unique().tolist()) <= {0, 1, 2, 3, IGNORE}


def test_resize_instead_of_crop():
    image, mask = coordinate_pair(num_classes=7)
    t = TrainTransform(TrainTransformConfig(resize=(20, 25), hflip=False, **RAW), IGNORE)
    out_image, out_mask = t(image, mask)
    assert out_image.shape == (3, 20, 25) and out_mask.shape == (20, 25)
    # Nearest-exact: each output pixel takes the source pixel under its centre.
    assert torch.equal(out_mask, mask[1::2, 1::2].to(torch.int64))


def test_colour_jitter_stays_in_range_and_leaves_padding_at_the_mean():
    image, mask = coordinate_pair()
    t = TrainTransform(TrainTransformConfig(crop_size=64, scale_range=(1.0, 1.0), jitter=0.5), IGNORE)
    mean, std = torch.tensor(t.config.mean).view(3, 1, 1), torch.tensor(t.config.std).view(3, 1, 1)
    changed = 0
    for seed in range(6):
        out_image, out_mask = t(image, mask, random.Random(seed))
        x = out_image * std + mean
        real = out_mask != IGNORE
        assert x[:, real].min() >= -1e-6 and x[:, real].max() <= 1 + 1e-6
        assert (out_image[:, ~real] == 0).all()
        plain = TrainTransform(TrainTransformConfig(crop_size=64, scale_range=(1.0, 1.0)), IGNORE)
        changed += not torch.allclose(out_image, plain(image, mask, random.Random(seed))[0])
    assert changed == 6


def test_parameters_depend_only_on_the_random_source():
    t = TrainTransform(TrainTransformConfig(crop_size=16, jitter=0.3), IGNORE)
    assert t.draw(random.Random(3), 40, 50) == t.draw(random.Random(3), 40, 50)
    assert t.draw(random.Random(3), 40, 50) != t.draw(random.Random(4), 40, 50)


def test_worker_and_device_paths_agree_on_a_batch_of_mixed_sizes():
    """The device path gets the decoded samples collated (padded to the largest) and must
    give what the workers give from the separate samples."""
    t = TrainTransform(TrainTransformConfig(crop_size=(20, 24), scale_range=(0.4, 1.8), jitter=0.4), IGNORE)
    pairs = [coordinate_pair(h, w) for h, w in ((40, 50), (18, 30), (33, 21), (40, 50))]
    images, masks = [i.as_subclass(torch.Tensor) for i, _ in pairs], [m.as_subclass(torch.Tensor) for _, m in pairs]
    rng = random.Random(0)
    params = t.params(rng, [tuple(m.shape) for m in masks])
    want_image, want_mask = t.apply_batch(images, masks, params)
    raw_images, raw_masks = collate(images, masks, IGNORE, torch.uint8)
    batch = BatchHook("cpu", steps=[DeviceAugment(t)])({"image": raw_images, "mask": raw_masks, "aug": params})
    assert "aug" not in batch
    assert torch.equal(batch["mask"], want_mask)
    assert torch.allclose(batch["image"], want_image, atol=1e-6, rtol=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_augmented_on_the_device_equals_one_augmented_in_workers(tmp_path, workers):
    """Same seed, two streams: masks bit-identical, images equal to 1e-6 (on the CPU; a GPU's
    kernels round differently, docs/benchmarks.md)."""
    source = open_source(make(tmp_path, "d", train=14, size="30x36"), "train")
    kw = dict(workers=workers, crop=(20, 24), batch_size=3)
    in_workers = [b for _, b in zip(range(6), train_stream(source, augment_on="workers", **kw))]
    raw = [b for _, b in zip(range(6), train_stream(source, augment_on="device", **kw))]
    hook = BatchHook("cpu", steps=[DeviceAugment(TrainTransform(TrainTransformConfig(crop_size=(20, 24), jitter=0.3),
                                                                IGNORE))])
    for want, got in zip(in_workers, raw):
        assert got["image"].dtype == torch.uint8 and got["aug"].shape == (3, len(PARAMS))
        got = hook(got)
        assert want["keys"] == got["keys"]
        assert torch.equal(want["mask"], got["mask"])
        assert torch.allclose(want["image"], got["image"], atol=1e-6, rtol=0)


def test_validation_batches_pass_the_device_step_untouched():
    step = DeviceAugment(TrainTransform(TrainTransformConfig(), IGNORE))
    batch = {"image": torch.rand(2, 3, 8, 8), "mask": torch.zeros(2, 8, 8, dtype=torch.int64)}
    assert step(batch) is batch


def test_augment_on_auto_is_the_device_for_a_gpu_only():
    assert augment_on("auto", torch.device("cuda", 0)) == "device"
    assert augment_on("auto", torch.device("cpu")) == "workers"
    assert augment_on("device", torch.device("cpu")) == "device"


@pytest.mark.parametrize("config, message", [
    (TrainTransformConfig(scale_range=(2.0, 1.0)), "scale range"),
    (TrainTransformConfig(crop_size=0), "crop size"),
    (TrainTransformConfig(jitter=-1), "jitter"),
])
def test_bad_options_name_the_value(config, message):
    with pytest.raises(UnetsegError, match=message):
        TrainTransform(config, IGNORE)


def test_tiny_images_and_one_pixel_outputs_augment():
    """A 2x2 image scaled by a half is one pixel (torch's uint8 antialiased kernel fails on
    a 1x1 output: the float path takes it)."""
    image, mask = coordinate_pair(2, 2)
    t = TrainTransform(TrainTransformConfig(crop_size=4, scale_range=(0.5, 0.5), jitter=0.2), IGNORE)
    out_image, out_mask = t(image, mask, random.Random(0))
    assert out_image.shape == (3, 4, 4) and (out_mask != IGNORE).sum() == 1
    assert torch.isfinite(out_image).all()


def test_padding_carries_the_pad_label_it_is_given():
    """The pad label is the caller's ClassInfo.ignore_label; TrainTransform does not redo that rule."""
    image, mask = coordinate_pair(8, 8, num_classes=4)
    t = TrainTransform(TrainTransformConfig(crop_size=16, scale_range=(1.0, 1.0)), 9)
    _, out_mask = t(image, mask, random.Random(0))
    assert (out_mask == 9).sum() == 16 * 16 - 8 * 8
    with pytest.raises(TypeError, match="ignore_label"):
        TrainTransform(TrainTransformConfig(), None)
