"""The model registry: a model added with one registration trains, saves, evaluates,
predicts and exports through the normal commands; saved models record their name and
options, and models saved before the registry still load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pydantic import Field
from torch import nn

from conftest import run_main

from unetseg.checkpoint import load_model, save_model
from unetseg.errors import UnetsegError
from unetseg.flags import flags, parse_args
from unetseg.models import ModelOptions, build_model, model_names, register_model, saved_model_options, unregister_model
from unetseg.models.unet import UNet, UNetConfig
from unetseg.synth import synth


class ToyOptions(ModelOptions):
    name: str = "toy"
    hidden: int = Field(6, ge=1, description="Channels of the toy model's hidden layer.")


class Toy(nn.Module):
    """Two convolutions: the smallest thing that segments."""

    def __init__(self, options: ToyOptions):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(options.in_channels, options.hidden, 3, padding=1), nn.BatchNorm2d(options.hidden),
                                  nn.ReLU(), nn.Conv2d(options.hidden, options.num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture
def toy():
    register_model(ToyOptions)(Toy)  # the one registration a new model needs
    yield
    unregister_model("toy")


def test_a_registered_model_trains_saves_evaluates_predicts_and_exports(toy, tmp_path, capsys):
    from unetseg.export import export
    from unetseg.predict import predict

    data = tmp_path / "syn"
    synth(data, train=16, val=6, size="32x32", shard_size=8, workers=1, progress=False)
    run_dir = tmp_path / "run"
    code, out, err = run_main("train", ["--data", data, "--output-dir", run_dir, "--model-name", "toy",
                                        "--model-hidden", "5", "--batch-size", "4", "--num-workers", "0",
                                        "--tracker", "none", "--max-steps", "4", "--crop-size", "32"], capsys)
    assert code == 0, err
    assert "final val mIoU" in out and "Toy: " in out
    saved = yaml.safe_load((run_dir / "final" / "config.yaml").read_text())
    # The normalisation trained with is recorded (ImageNet's: the base options' default).
    assert saved["model"] == {"name": "toy", "num_classes": 10, "in_channels": 3, "hidden": 5,
                              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    model, _, _ = load_model(run_dir / "final")
    assert isinstance(model, Toy) and model.body[0].out_channels == 5

    code, out, err = run_main("evaluate", [run_dir, "--data", data, "--num-workers", "0",
                                           "--out", tmp_path / "report.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_samples"] == 6

    Image.fromarray(np.full((20, 28, 3), 128, np.uint8)).save(tmp_path / "photo.png")
    result = predict(run_dir, [tmp_path / "photo.png"], tmp_path / "preds", progress=False)
    assert result.num_written == 1 and np.asarray(Image.open(tmp_path / "preds" / "photo.png")).shape == (20, 28)

    exported = export(run_dir, "torchscript", tmp_path / "toy.pt")
    assert exported.max_abs_diff <= exported.checks[0][2]
    extra = {"unetseg.json": ""}
    torch.jit.load(str(tmp_path / "toy.pt"), _extra_files=extra)
    assert json.loads(extra["unetseg.json"])["model"] == saved["model"]


def test_flags_and_config_follow_the_registry(toy):
    by_flag = {f.flag: f for f in flags()}
    assert "--model-hidden" in by_flag and "--model-width" in by_flag
    assert "--model-num-classes" not in by_flag  # taken from dataset.json
    config = parse_args(["--model-name", "toy", "--model-hidden", "3"])
    assert isinstance(config.model, ToyOptions) and config.model.hidden == 3
    assert config.to_dict()["model"] == {"name": "toy", "num_classes": None, "in_channels": 3, "mean": None, "std": None,
                                         "hidden": 3}
    with pytest.raises(UnetsegError, match=r"model\.width \(--model-width\) = '8': unknown key"):
        parse_args(["--model-name", "toy", "--model-width", "8"])  # a U-Net option given to the toy


def test_an_unknown_model_name_lists_the_registered_ones():
    with pytest.raises(UnetsegError) as e:
        parse_args(["--model-name", "resnet"])
    assert "model.name (--model-name) = 'resnet'" in str(e.value) and "use one of unet" in str(e.value)
    assert "unet" in model_names()


def test_build_model_takes_num_classes_from_the_data():
    net = build_model(UNetConfig(width=4, depth=1), num_classes=3)
    assert isinstance(net, UNet) and net.config.num_classes == 3
    with pytest.raises(UnetsegError, match="num_classes is not set"):
        build_model(UNetConfig(width=4, depth=1))


def test_models_saved_before_the_registry_still_load(tmp_path):
    """Their config.yaml recorded the U-Net under `unet`, without a name."""
    from unetseg.dataset import DatasetInfo
    from unetseg.synth import synth_classes

    net = UNet(UNetConfig(num_classes=10, width=4, depth=1))
    old = {k: v for k, v in net.config.to_dict().items() if k != "name"}
    save_model(tmp_path / "best", net, {"unet": old}, DatasetInfo(classes=synth_classes(), splits={}))
    model, config, _ = load_model(tmp_path)
    assert saved_model_options(config) == net.config
    for a, b in zip(model.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
