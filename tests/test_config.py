"""The training config: defaults < YAML < flags, validation, and the generated flags."""

from __future__ import annotations

import pytest

from conftest import REPO

from unetseg.config import TrainConfig, build_config, flags
from unetseg.errors import UnetsegError
from unetseg.train import parse_args


def test_flags_win_over_yaml_which_wins_over_defaults(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("data:\n  batch_size: 4\n  crop_size: [360, 480]\nmodel:\n  width: 24\noptim:\n  lr: 0.01\n")
    config = parse_args(["--config", str(path), "--lr", "0.003", "--no-hflip", "--scale-range", "0.5,2.0",
                         "--max-steps", "7", "--mixed-precision", "bf16"])
    assert config.data.batch_size == 4 and config.data.crop_size == [360, 480]  # from the YAML
    assert config.model.width == 24 and config.optim.lr == 0.003  # the flag won over the YAML
    assert config.data.hflip is False and config.data.scale_range == [0.5, 2.0] and config.run.max_steps == 7
    assert config.run.mixed_precision == "bf16"
    assert config.model.depth == TrainConfig().model.depth  # untouched default
    # The saved YAML reloads to the same config.
    saved = tmp_path / "config.yaml"
    saved.write_text(config.to_yaml())
    assert TrainConfig.load(saved) == config


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "lion"], "--optimizer 'lion'"),
    (["--batch-size", "0"], "batch_size=0"),
    (["--lr", "fast"], "--lr 'fast'"),
    (["--scale-range", "2,1"], "scale_range"),
    (["--tracker", "mlflow"], "--tracker 'mlflow'"),
])
def test_bad_values_name_the_option_and_the_fix(argv, message):
    with pytest.raises(UnetsegError) as e:
        parse_args(argv)
    assert message in str(e.value) and "Fix:" in str(e.value)


def test_unknown_yaml_keys_are_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(UnetsegError, match=r"unknown optim keys \['learning_rate'\]"):
        build_config(str(path), {})


def test_every_field_has_a_flag_with_help():
    names = [f.flag for f in flags()]
    assert len(names) == len(set(names))
    for required in ("--data", "--output-dir", "--epochs", "--max-steps", "--batch-size", "--crop-size", "--lr",
                     "--optimizer", "--scheduler", "--mixed-precision", "--eval-every", "--save-every",
                     "--keep-checkpoints", "--resume", "--tracker", "--num-workers", "--seed", "--model-width",
                     "--model-depth"):
        assert required in names
    assert all(f.help for f in flags())



@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid_configs(path):
    config = build_config(str(path), {})
    assert config.data.data == "shards/camvid"
    assert config.optim.warmup_steps < config.run.max_steps


@pytest.mark.parametrize("text, expected", [("on", "on"), ("off", "off"), ('"on"', "on"), ("auto", "auto")])
def test_unquoted_yaml_on_off_means_the_channels_last_choice(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"run:\n  channels_last: {text}\n")
    assert build_config(str(path), {}).run.channels_last == expected
