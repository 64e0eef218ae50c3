"""Evaluation preprocessing: deterministic, masks untouched, normalisation as configured."""

from __future__ import annotations

import torch
from torchvision import tv_tensors

from conftest import coordinate_pair, unnormalized
from unetseg.transforms import EvalTransform, EvalTransformConfig

IGNORE = 255


RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # keeps pixel values readable


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
