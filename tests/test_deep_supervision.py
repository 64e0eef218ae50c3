"""Deep supervision: auxiliary heads during training only, never in the saved model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_main
from unetseg.deep_supervision import DeepSupervision, DeepSupervisionLoss
from unetseg.errors import UnetsegError
from unetseg.losses import SegmentationLoss
from unetseg.models.unet import UNet, UNetConfig
from unetseg.synth import synth


def tiny(depth=3) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(num_classes=4, width=4, depth=depth, norm="group"))


def test_heads_on_the_inner_stages_at_the_input_size_in_training_only():
    net = tiny()
    model = DeepSupervision(net, 4)
    x = torch.randn(2, 3, 17, 23)  # padded to 24x24 inside, cropped back
    logits, aux = model.train()(x)
    assert len(aux) == 2 and all(a.shape == (2, 4, 17, 23) for a in aux)
    torch.testing.assert_close(logits, net(x))
    model.eval()
    torch.testing.assert_close(model(x), net(x))  # evaluation sees the model alone
    assert not any(k.startswith("heads") for k in net.state_dict())


def test_the_loss_adds_the_weighted_mean_of_the_auxiliary_losses():
    base = SegmentationLoss("ce", ignore_index=255)
    logits, aux = torch.randn(2, 4, 6, 6), [torch.randn(2, 4, 6, 6) for _ in range(3)]
    target = torch.randint(0, 4, (2, 6, 6))
    want = base(logits, target) + 0.4 * sum(base(a, target) for a in aux) / 3
    torch.testing.assert_close(DeepSupervisionLoss(base, 0.4)((logits, aux), target), want)
    torch.testing.assert_close(DeepSupervisionLoss(base, 0.4)(logits, target), base(logits, target))


def test_gradients_reach_the_heads_and_the_model():
    model = DeepSupervision(tiny(), 4).train()
    out = model(torch.randn(2, 3, 16, 16))
    DeepSupervisionLoss(SegmentationLoss("ce"), 0.5)(out, torch.randint(0, 4, (2, 16, 16))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads.parameters())
    assert all(p.grad is not None for p in model.net.parameters())


def test_models_without_inner_stages_are_refused_with_the_fix():
    with pytest.raises(UnetsegError, match="depth 2 or more"):
        DeepSupervision(tiny(depth=1), 4)
    with pytest.raises(UnetsegError, match="forward_stages"):
        DeepSupervision(torch.nn.Conv2d(3, 4, 1), 4)


def test_training_with_deep_supervision_saves_a_plain_model(tmp_path, capsys):
    data = tmp_path / "syn"
    synth(data, train=12, val=4, size="32x32", shard_size=6, workers=1, progress=False)
    common = ["--data", data, "--batch-size", "4", "--model-width", "4", "--model-depth", "3", "--num-workers", "0",
              "--tracker", "none", "--crop-size", "32", "--log-every", "1", "--eval-every", "2", "--output-dir",
              tmp_path / "run"]
    code, _, err = run_main("train", [*common, "--max-steps", "2", "--deep-supervision", "0.4"], capsys)
    assert code == 0, err
    plain = UNet(UNetConfig(num_classes=10, width=4, depth=3)).state_dict()
    for folder in ("best", "final"):
        assert set(load_file(tmp_path / "run" / folder / "model.safetensors")) == set(plain)
    (checkpoint,) = (tmp_path / "run" / "checkpoints").iterdir()
    assert any(k.startswith("heads.") for k in load_file(checkpoint / "model.safetensors"))  # resumable
    # Turning it off on resume would drop the heads the checkpoint holds: refused by name.
    code, _, err = run_main("train", [*common, "--max-steps", "4", "--resume", "auto"], capsys)
    assert code != 0 and "deep_supervision" in err
