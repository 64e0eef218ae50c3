"""The training config: YAML in and out, coercion and validation at load time, and the
error messages (the flags built from it are tested in test_flags.py)."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO

from unetseg.config import TrainConfig
from unetseg.errors import UnetsegError
from unetseg.flags import build_config, parse_args
from unetseg.options import ConfigError

SECTIONS = ["data", "model", "optim", "loss", "run"]


def write(tmp_path, text: str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(tmp_path, text: str) -> tuple[str, str]:
    """The message of loading ``text`` as a YAML config, and the file's path."""
    path = write(tmp_path, text)
    with pytest.raises(UnetsegError) as e:
        build_config(str(path), {})
    return str(e.value), str(path)


@pytest.mark.parametrize("yaml_text, section, key, expected", [
    ("optim:\n  lr: 1e-3\n", "optim", "lr", 0.001),  # a string in YAML 1.1
    ("optim:\n  lr: '0.5'\n", "optim", "lr", 0.5),
    ("data:\n  crop_size: 256\n", "data", "crop_size", [256, 256]),
    ("data:\n  crop_size: [256]\n", "data", "crop_size", [256, 256]),
    ("data:\n  crop_size: '360,480'\n", "data", "crop_size", [360, 480]),
    ("data:\n  eval_resize: ['270', 360]\n", "data", "eval_resize", [270, 360]),
    ("data:\n  scale_range: 0.5, 2\n", "data", "scale_range", [0.5, 2.0]),
    ("run:\n  max_steps: \"100\"\n", "run", "max_steps", 100),
    ("run:\n  epochs: 3.0\n", "run", "epochs", 3),
    ("run:\n  mixed_precision: no\n", "run", "mixed_precision", "no"),  # false in YAML 1.1
    ("run:\n  project: 2024\n", "run", "project", "2024"),
    ("data:\n  hflip: off\n", "data", "hflip", False),
    ("loss:\n  class_weights: [1.0, 2.5]\n", "loss", "class_weights", "1.0,2.5"),
    ("optim:\n  betas: 0.8,0.99\n", "optim", "betas", [0.8, 0.99]),
    ("optim:\n", "optim", "lr", TrainConfig().optim.lr),  # an empty section keeps the defaults
])
def test_yaml_values_are_coerced_to_the_field_type(tmp_path, yaml_text, section, key, expected):
    value = getattr(getattr(build_config(str(write(tmp_path, yaml_text)), {}), section), key)
    assert value == expected and type(value) is type(expected)


def test_yaml_norm_batchnorm_names_the_key_value_choices_and_file(tmp_path):
    message, path = load_error(tmp_path, "model:\n  norm: batchnorm\n")
    assert "model.norm = 'batchnorm'" in message
    assert "'batch', 'group' or 'none'" in message
    assert path in message and "Fix:" in message
    assert "--model-norm" not in message.splitlines()[1]  # the value came from the file, not a flag


@pytest.mark.parametrize("yaml_text, expected", [
    ("data:\n  batch_size: 0\n", ["data.batch_size = 0", "greater than or equal to 1"]),
    ("data:\n  batch_size: yes\n", ["data.batch_size = True", "number"]),  # YAML 1.1 bool, not 1
    ("data:\n  num_workers: -1\n", ["data.num_workers = -1", "greater than or equal to 0"]),
    ("optim:\n  lr: -1e-3\n", ["optim.lr = '-1e-3'", "greater than 0"]),
    ("optim:\n  lr: .nan\n", ["optim.lr = nan", "finite number"]),
    ("data:\n  scale_range: [2, 1]\n", ["data.scale_range = [2, 1]", "0 < min <= max"]),
    ("data:\n  crop_size: [0, 10]\n", ["data.crop_size = [0, 10]", "H,W"]),
    ("data:\n  crop_size: [1, 2, 3]\n", ["data.crop_size = [1, 2, 3]", "H,W"]),
    ("model:\n  dropout: 1.0\n", ["model.dropout = 1.0", "less than 1"]),
    ("model:\n  depth: 9\n", ["model.depth = 9", "less than or equal to 8"]),
    ("loss:\n  label_smoothing: 1\n", ["loss.label_smoothing = 1", "less than 1"]),
    ("loss:\n  class_weights: 0,0\n", ["loss.class_weights = '0,0'", "not all 0"]),
    ("optim:\n  betas: [0.9, 1.5]\n", ["optim.betas = [0.9, 1.5]", "[0, 1)"]),
    ("run:\n  channels_last: maybe\n", ["run.channels_last = 'maybe'", "'auto', 'on' or 'off'"]),
    ("run:\n  max_steps: 10\noptim:\n  warmup_steps: 10\n", ["optim.warmup_steps = 10", "run.max_steps = 10"]),
    ("optim:\n  optimizer: sgd\n  nesterov: true\n  momentum: 0\n", ["optim.nesterov", "momentum"]),
])
def test_out_of_range_yaml_values_name_key_value_and_file(tmp_path, yaml_text, expected):
    message, path = load_error(tmp_path, yaml_text)
    for part in expected:
        assert part in message
    assert f"Invalid training config in {path} (1 problem)" in message and f"Fix: correct this key in {path}" in message


@pytest.mark.parametrize("yaml_text, expected", [
    ("optim:\n  learning_rate: 0.1\n", ["optim.learning_rate = 0.1: unknown key", "Known optim keys: optimizer, lr,"]),
    ("model:\n  widht: 8\n", ["model.widht = 8: unknown key", "Did you mean width?", "Known model keys"]),
    ("modle:\n  width: 8\n", ["modle: unknown section", "Did you mean model?", "Known sections: " + ", ".join(SECTIONS)]),
    ("optim: 5\n", ["optim = 5: expected a mapping of optim keys (optimizer, lr,"]),
])
def test_unknown_yaml_keys_and_sections_are_named_with_the_known_ones(tmp_path, yaml_text, expected):
    message, path = load_error(tmp_path, yaml_text)
    for part in expected:
        assert part in message
    assert path in message and "Fix:" in message


@pytest.mark.parametrize("text, got", [("- data\n- optim\n", "list"), ("just words\n", "str"), ("3\n", "int")])
def test_a_yaml_file_that_is_not_a_mapping_is_an_error(tmp_path, text, got):
    message, path = load_error(tmp_path, text)
    assert path in message and f"expected a mapping of sections ({', '.join(SECTIONS)})" in message
    assert f"got {got}" in message and "Fix:" in message


def test_missing_file_and_bad_yaml_syntax_name_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(UnetsegError, match=r"nope\.yaml: no such config file\. Fix: check the --config path"):
        TrainConfig.load(missing)
    bad = write(tmp_path, "optim:\n  lr: [1, 2\n", "bad.yaml")
    with pytest.raises(UnetsegError, match=r"(?s)bad\.yaml: not valid YAML .*Fix: correct the file's syntax"):
        TrainConfig.load(bad)


def test_every_problem_is_reported_at_once_with_its_source(tmp_path):
    path = write(tmp_path, "data:\n  batch_size: 0\n  crop_size: big\nmodel:\n  norm: batchnorm\noptim:\n  lr: fast\n"
                 "  learning_rate: 1\n")
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", str(path), "--epochs", "0", "--tracker", "mlflow", "--lr", "slow"])
    err = e.value
    assert len(err.problems) == 7 and "(7 problems)" in str(err)
    assert f"{path} and command-line flags" in str(err)
    lines = {p.split(" = ")[0]: p for p in err.problems}
    # Values from the file carry no flag; values from flags name it. The flag won for lr.
    assert set(lines) == {"data.batch_size", "data.crop_size", "model.norm", "optim.learning_rate",
                          "optim.lr (--lr)", "run.epochs (--epochs)", "run.tracker (--tracker)"}
    assert "'slow'" in lines["optim.lr (--lr)"] and "'fast'" not in str(err)
    assert str(err).splitlines()[-1].startswith("Fix: ")


def test_errors_are_unetseg_errors_not_pydantic_tracebacks(tmp_path):
    with pytest.raises(UnetsegError) as e:
        TrainConfig.from_dict({"data": {"batch_size": "x"}}, source="somewhere")
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert "Invalid training config in somewhere (1 problem)" in str(e.value)
    with pytest.raises(UnetsegError, match=r"optim\.lr = -1: Input should be greater than 0"):
        TrainConfig(optim={"lr": -1})


def test_assignment_is_validated_and_coerced():
    config = TrainConfig()
    config.optim.lr = "1e-3"
    config.data.crop_size = 128
    assert config.optim.lr == 0.001 and config.data.crop_size == [128, 128]
    with pytest.raises(UnetsegError, match=r"data\.batch_size = 0: Input should be greater than or equal to 1"):
        config.data.batch_size = 0
    assert config.data.batch_size == TrainConfig().data.batch_size


def test_to_dict_is_plain_data_in_field_order():
    d = TrainConfig().to_dict()
    assert list(d) == SECTIONS
    assert list(d["data"])[:2] == ["data", "val_data"]
    assert isinstance(d["data"]["scale_range"], list) and isinstance(d["optim"]["betas"], list)
    assert json.loads(json.dumps(d)) == d and yaml.safe_load(TrainConfig().to_yaml()) == d
    assert TrainConfig.from_dict(d) == TrainConfig()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid_configs(path):
    written = yaml.safe_load(path.read_text())
    config = build_config(str(path), {})
    loaded = config.to_dict()
    assert written and set(written) <= set(SECTIONS)
    for section, values in written.items():
        for key, value in values.items():
            assert loaded[section][key] == value, f"{path.name}: {section}.{key}"
    assert TrainConfig.from_dict(yaml.safe_load(config.to_yaml())) == config


@pytest.mark.parametrize("text, expected", [("on", "on"), ("off", "off"), ('"on"', "on"), ("auto", "auto")])
def test_unquoted_yaml_on_off_means_the_channels_last_choice(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"run:\n  channels_last: {text}\n")
    assert build_config(str(path), {}).run.channels_last == expected


@pytest.mark.parametrize("text, expected", [("on", "on"), ("true", "on"), ("false", "off"), ("auto", "auto")])
def test_compile_is_auto_on_or_off_and_old_configs_with_a_bool_still_load(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"run:\n  compile: {text}\n")  # runs saved before had compile: false
    assert build_config(str(path), {}).run.compile == expected
    assert TrainConfig().run.compile == "auto"
