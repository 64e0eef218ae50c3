"""The command-line flags generated from the typed config: one per field, their help, and
how flag text becomes config values."""

from __future__ import annotations

import pytest

from unetseg.config import TrainConfig
from unetseg.errors import UnetsegError
from unetseg.flags import build_config, flags, parse_args


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
    assert TrainConfig.load(saved) != TrainConfig()


@pytest.mark.parametrize("argv, expected", [
    (["--optimizer", "lion"], ["optim.optimizer (--optimizer) = 'lion'", "'adamw', 'adam' or 'sgd'"]),
    (["--batch-size", "0"], ["data.batch_size (--batch-size) = '0'", "greater than or equal to 1"]),
    (["--lr", "fast"], ["optim.lr (--lr) = 'fast'", "valid number", "Allowed: a number > 0"]),
    (["--lr", "-0.1"], ["optim.lr (--lr) = '-0.1'", "greater than 0"]),
    (["--scale-range", "2,1"], ["data.scale_range (--scale-range) = '2,1'", "0 < min <= max"]),
    (["--crop-size", "360,abc"], ["data.crop_size (--crop-size) = '360,abc'", "item 2", "valid integer"]),
    (["--crop-size", "1,2,3"], ["data.crop_size (--crop-size) = '1,2,3'", "H,W"]),
    (["--tracker", "mlflow"], ["run.tracker (--tracker) = 'mlflow'", "'wandb', 'tensorboard' or 'none'"]),
    (["--mixed-precision", "fp32"], ["run.mixed_precision (--mixed-precision) = 'fp32'", "or none"]),
    (["--model-norm", "batchnorm"], ["model.norm (--model-norm) = 'batchnorm'", "'batch', 'group' or 'none'"]),
    (["--max-steps", "1.5"], ["run.max_steps (--max-steps) = '1.5'", "valid integer"]),
    (["--class-weights", "heavy"], ["loss.class_weights (--class-weights) = 'heavy'", "median_frequency"]),
])
def test_bad_flag_values_name_the_flag_the_value_what_is_allowed_and_the_fix(argv, expected):
    with pytest.raises(UnetsegError) as e:
        parse_args(argv)
    message = str(e.value)
    for part in expected:
        assert part in message
    assert "command-line flags" in message and "\nFix: " in message
    assert "pydantic" not in message and "errors.pydantic.dev" not in message


@pytest.mark.parametrize("overrides, section, key, expected", [
    ({"crop-size": "360,480"}, "data", "crop_size", [360, 480]),
    ({"crop-size": "256"}, "data", "crop_size", [256, 256]),
    ({"lr": "1e-3"}, "optim", "lr", 0.001),
    ({"max-steps": "100"}, "run", "max_steps", 100),
    ({"hflip": "false"}, "data", "hflip", False),
    ({"mixed-precision": "none"}, "run", "mixed_precision", None),
    ({"data": "shards/x", "val-data": "shards/y"}, "data", "val_data", "shards/y"),
    ({"model-width": "24"}, "model", "width", 24),
])
def test_flag_text_is_coerced_to_the_field_type(overrides, section, key, expected):
    value = getattr(getattr(build_config(None, overrides), section), key)
    assert value == expected and type(value) is type(expected)


def test_flag_none_clears_a_yaml_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  crop_size: 256\n")
    assert build_config(str(path), {"crop-size": "none"}).data.crop_size is None


def test_unknown_flag_names_are_errors():
    with pytest.raises(UnetsegError, match=r"unknown flag --learning-rate\..*Fix:"):
        build_config(None, {"learning-rate": "0.1"})


def test_every_field_has_a_flag_with_help():
    names = [f.flag for f in flags()]
    assert len(names) == len(set(names))
    for required in ("--data", "--val-data", "--output-dir", "--epochs", "--max-steps", "--batch-size", "--crop-size",
                     "--lr", "--optimizer", "--scheduler", "--mixed-precision", "--eval-every", "--save-every",
                     "--keep-checkpoints", "--resume", "--tracker", "--num-workers", "--seed", "--model-width",
                     "--model-depth"):
        assert required in names
    assert all(f.help and f.allowed for f in flags())
    assert names.index("--val-data") == names.index("--data") + 1
    by_flag = {f.flag: f for f in flags()}
    assert by_flag["--val-data"].help.startswith("Shard folder, URL or pattern to evaluate on. Default: the val split")
    assert by_flag["--channels-last"].help.startswith("channels_last memory format for the model and batches. auto:")
    assert "\n" not in by_flag["--channels-last"].help
    assert {f.flag for f in flags() if f.kind is bool} == {"--hflip", "--nesterov", "--sync-bn"}
    assert by_flag["--batch-size"].default == 16 and "Default: 16." in by_flag["--batch-size"].help_text
    assert by_flag["--model-norm"].allowed == "one of batch, group, none"
    assert by_flag["--lr"].allowed == "a number > 0"


def test_help_shows_the_field_help():
    text = " ".join(parse_help().split())
    assert "Shard folder, URL or pattern to evaluate on." in text and "Peak learning rate (reached after warmup)." in text


def parse_help() -> str:
    from unetseg.flags import parser

    return parser().format_help()


def test_help_is_grouped_by_section_and_shows_type_and_default():
    from unetseg.flags import parser

    text = parser().format_help()
    sections = [text.index(f"{section} (the `{section}:` section of --config)") for section in TrainConfig.model_fields]
    assert sections == sorted(sections)
    flat = " ".join(text.split())
    assert "--batch-size VALUE Training batch size per process. Allowed: a whole number >= 1. Default: 16." in flat
