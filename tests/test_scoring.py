"""The scoring loop and test-time augmentation, on hand-made batches: what evaluate and
training's validation both count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unetseg.batch import BatchHook
from unetseg.errors import UnetsegError
from unetseg.scoring import TTA, FixedShape, confusion_matrix


class Echo(nn.Module):
    """Logits that are the image's first channels: the prediction is known in advance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2] * 10


def test_every_pixel_but_the_ignored_is_counted_once():
    image = torch.zeros(2, 3, 4, 4)
    image[:, 1, :, :2] = 1.0  # left half class 1, right half class 0
    mask = torch.zeros(2, 4, 4, dtype=torch.long)
    mask[:, :, :2] = 1
    mask[1, 0, :] = 255  # ignored
    cm, _ = confusion_matrix(Echo(), [{"image": image, "mask": mask, "sizes": [(4, 4), (4, 4)]}], 2, 255)
    matrix = cm.matrix
    assert matrix.sum() == 2 * 16 - 4
    assert matrix[0, 1] == 0 and matrix[1, 0] == 0


def test_resized_logits_are_scored_against_the_full_mask():
    image = torch.zeros(1, 3, 2, 2)
    image[:, 1, :, 0] = 1.0  # left column class 1 at the network's size, right column class 0
    image[:, 0] = 1.0 - image[:, 1]
    full = torch.zeros(4, 4, dtype=torch.long)
    full[:, :2] = 1  # left half class 1 at the original size
    batch = {"image": image, "mask": torch.zeros(1, 2, 2, dtype=torch.long), "full_mask": [full]}
    cm, _ = confusion_matrix(Echo(), [batch], 2, 255)
    assert cm.matrix.sum() == 16 and torch.equal(cm.matrix.diag(), torch.tensor([8, 8]))


def test_the_hook_is_applied_to_every_batch():
    seen = []

    def record(b):
        seen.append(b["image"].shape)
        return b

    batch = {"image": torch.zeros(1, 3, 4, 4), "mask": torch.zeros(1, 4, 4, dtype=torch.long), "sizes": [(4, 4)]}
    confusion_matrix(Echo(), [batch, batch], 2, 255, hook=BatchHook("cpu", steps=[record]))
    assert len(seen) == 2


def test_flip_tta_of_a_flip_symmetric_model_is_its_softmax():
    model = nn.Conv2d(3, 4, 1)  # per-pixel: flipping the input flips the output
    x = torch.randn(2, 3, 6, 10)
    torch.testing.assert_close(TTA(model, "flip")(x), model(x).softmax(1))
    assert TTA(model, "multiscale")(x).shape == (2, 4, 6, 10)
    assert torch.equal(TTA(model, "none")(x), model(x))
    with pytest.raises(UnetsegError, match="--tta 'rotate'"):
        TTA(model, "rotate")


def test_fixed_shape_compiles_once_for_every_eval_size_and_batch():
    from torch._dynamo.testing import CompileCounter

    from unetseg.models.unet import UNet, UNetConfig

    inputs = [torch.randn(n, 3, h, w) for n, h, w in [(4, 30, 40), (4, 32, 48), (3, 17, 23), (1, 32, 48)]]
    per_pixel = nn.Conv2d(3, 5, 1).eval()  # padding cannot change a per-pixel model's outputs
    for model in (per_pixel, UNet(UNetConfig(num_classes=5, width=4, depth=2)).eval()):
        counter = CompileCounter()  # dynamo only, no inductor: fast
        fixed = FixedShape(torch.compile(model, backend=counter), 4, 32, 48)
        with torch.no_grad():
            for x in inputs:
                out = fixed(x)
                assert out.shape == (x.shape[0], 5, *x.shape[-2:])
                if model is per_pixel:
                    torch.testing.assert_close(out, model(x))
        assert counter.frame_count == 1  # one graph for the whole evaluation
    counter = CompileCounter()
    plain = torch.compile(per_pixel, backend=counter, dynamic=False)
    with torch.no_grad():
        for x in inputs:
            plain(x)
    assert counter.frame_count > 1  # what the padding saves


def test_fixed_shape_keeps_channels_last_for_a_short_batch():
    """The short last batch is padded with the others' strides, so a compiled model fed
    channels_last batches needs no second graph for it."""
    from torch._dynamo.testing import CompileCounter

    per_pixel = nn.Conv2d(3, 5, 1).eval().to(memory_format=torch.channels_last)
    counter = CompileCounter()
    fixed = FixedShape(torch.compile(per_pixel, backend=counter), 4, 32, 48)
    with torch.no_grad():
        for n in (4, 4, 3):
            x = torch.randn(n, 3, 30, 40).contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(fixed(x), per_pixel(x))
    assert counter.frame_count == 1


class Recorder(nn.Module):
    """A per-pixel model that records the size of every input it is fed."""

    def __init__(self):
        super().__init__()
        self.conv, self.sizes = nn.Conv2d(3, 4, 1), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        return self.conv(x)


def test_multiscale_tta_keeps_a_side_that_would_scale_to_nothing():
    """A 1-pixel-high image at scale 0.75 stays 1 pixel high (interpolate's floor gave 0:
    a RuntimeError); each side is scaled to max(1, round(side * scale))."""
    model = Recorder()
    x = torch.randn(2, 3, 1, 5)
    with torch.no_grad():
        probs = TTA(model, "multiscale")(x)
    assert probs.shape == (2, 4, 1, 5)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 1, 5))
    assert sorted(set(model.sizes)) == [(1, 4), (1, 5), (1, 6)]  # 0.75 -> 1x4, 1 -> 1x5, 1.25 -> 1x6 (each flipped too)
    assert len(model.sizes) == 6
