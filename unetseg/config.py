"""One typed training config: pydantic models (one per section), a docstring per field,
validation and type coercion at load time, YAML in and out, and command-line flags
generated from the fields.

Precedence: defaults < ``--config FILE.yaml`` < command-line flags. The effective config
is printed at start and saved as ``config.yaml`` in the run dir and beside every saved
model, so evaluate, predict and resume rebuild exactly what was trained.

Flags are the field names with dashes (``--batch-size``); fields of the ``model``
section get a ``model-`` prefix (``--model-width``). Lists are comma-separated
(``--crop-size 360,480``); ``none`` clears a field whose default is none.

Every value, from the YAML file or from a flag, is coerced to its field's type (YAML
1.1 reads ``1e-3`` as a string: it becomes the float 0.001; ``"100"`` becomes the int
100; one number for an H,W field means that size for both) and checked against the
field's range or choices before anything runs. All the problems found are reported
together as one :class:`ConfigError` (a :class:`~unetseg.errors.UnetsegError`) that
names each key (and its flag when the value came from one), the value, what is
allowed, the file or "command-line flags", and the fix.
"""

from __future__ import annotations

import contextvars
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from unetseg.errors import UnetsegError

# Sections whose flags carry their name as a prefix.
PREFIXED = {"model"}

FLAGS_SOURCE = "command-line flags"
PYTHON_SOURCE = "Python code"
CLASS_WEIGHT_KINDS = ("none", "median_frequency", "inverse_log")  # as unetseg.losses.CLASS_WEIGHT_KINDS

# Where values being validated came from: (source, keys given by flags). Set by from_dict and
# build_config; plain Python construction and assignment report PYTHON_SOURCE.
_ORIGIN: contextvars.ContextVar[tuple[str, frozenset[tuple[str, str]]]] = contextvars.ContextVar(
    "unetseg_config_origin", default=(PYTHON_SOURCE, frozenset()))
# True while an outer model validates: nested models leave the reporting to it.
_NESTED: contextvars.ContextVar[bool] = contextvars.ContextVar("unetseg_config_nested", default=False)


class ConfigError(UnetsegError):
    """Every problem found in a training config, one line each, with where it came from and a fix."""

    def __init__(self, problems: list[str], source: str, fix: str):
        self.problems = list(problems)
        self.source = source
        n = len(self.problems)
        lines = [f"Invalid training config in {source} ({n} problem{'s' if n != 1 else ''}):"]
        lines += [f"  - {p}" for p in self.problems]
        lines.append(f"Fix: {fix}")
        super().__init__("\n".join(lines))


# --- the sections ---------------------------------------------------------------------------


class _Model(BaseModel):
    """Base of the sections and of TrainConfig: strict keys, docstrings as help, validated
    assignment, and validation errors turned into one :class:`ConfigError`."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        coerce_numbers_to_str=True,  # `project: 2024` is the text "2024"
        allow_inf_nan=False,
    )

    def __init__(self, /, **data: Any) -> None:
        if _NESTED.get():  # part of an outer validation, which reports every problem at once
            super().__init__(**data)
            return
        token = _NESTED.set(True)
        try:
            super().__init__(**data)
        except ValidationError as e:
            source, from_flags = _ORIGIN.get()
            raise _config_error(e, type(self), data, source, from_flags) from None
        finally:
            _NESTED.reset(token)

    def __setattr__(self, name: str, value: Any) -> None:
        token = _NESTED.set(True)
        try:
            super().__setattr__(name, value)
        except ValidationError as e:
            raise _config_error(e, type(self), {name: value}, PYTHON_SOURCE, frozenset()) from None
        finally:
            _NESTED.reset(token)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, value: Any, info: Any) -> Any:
        # pydantic reads true as 1 for a number; `batch_size: yes` is a mistake, not 1.
        if isinstance(value, bool) and _base_type(cls.model_fields[info.field_name].annotation) in (int, float):
            raise PydanticCustomError("number_type", "Input should be a number, not {value}", {"value": str(value).lower()})
        return value


def _items(value: Any) -> Any:
    """A list from a list, a comma-separated string ("360,480") or one value."""
    if isinstance(value, str):
        items: list[Any] = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    if any(isinstance(v, bool) for v in items):
        raise ValueError("expected numbers, got true/false")
    return items


def _size(value: Any) -> Any:
    """H,W: one number (or a one-item list) means that size for both."""
    if value is None:
        return None
    items = _items(value)
    return items * 2 if len(items) == 1 else items


def _check_size(value: list[int] | None) -> list[int] | None:
    if value is not None and (len(value) != 2 or min(value) < 1):
        raise ValueError("need H,W (two whole numbers >= 1) or one size for both, e.g. 256 or 360,480")
    return value


class DataConfig(_Model):
    data: str | None = None
    """Shard folder or URL, or a shard pattern like dir/train-{000000..000009}.tar (dataset.json beside it). Default: the embedded synthetic set, generated under shards/synthetic when missing."""
    val_data: str | None = None
    """Shard folder, URL or pattern to evaluate on. Default: the val split of --data (for a shard pattern, the val split's shards named in dataset.json, beside the pattern's shards)."""
    dataset_json: str | None = None
    """dataset.json to use with a shard pattern that has none beside it (e.g. a pipe: pattern)."""
    train_split: str = "train"
    """Split to train on."""
    val_split: str = "val"
    """Split to evaluate on."""
    batch_size: int = Field(16, ge=1)
    """Training batch size per process."""
    eval_batch_size: int | None = Field(None, ge=1)
    """Evaluation batch size per process (default: batch size)."""
    num_workers: int = Field(2, ge=0)
    """DataLoader worker processes per training process (decoding and augmentation run there)."""
    shuffle_buffer: int = Field(256, ge=1)
    """Samples in each worker's shuffle buffer."""
    max_bad_samples: int = Field(10, ge=0)
    """Undecodable samples tolerated (skipped and counted) before the run stops."""
    crop_size: list[int] | None = None
    """Random crop H,W (or one number) after scaling. Default: the split's most common image size."""
    scale_range: list[float] = Field(default_factory=lambda: [0.75, 1.5])
    """Random scale range min,max applied before the crop."""
    hflip: bool = True
    """Random horizontal flips."""
    jitter: float = Field(0.0, ge=0)
    """Colour jitter strength (brightness, contrast, saturation); 0 is off."""
    resize: list[int] | None = None
    """Train on images resized to H,W instead of scale + crop."""
    eval_resize: list[int] | None = None
    """Evaluate with the network input resized to H,W (metrics stay at the original mask size). Default: full resolution."""

    _size_items = field_validator("crop_size", "resize", "eval_resize", mode="before")(_size)
    _size_check = field_validator("crop_size", "resize", "eval_resize")(_check_size)

    _scale_items = field_validator("scale_range", mode="before")(_items)

    @field_validator("scale_range")
    @classmethod
    def _scale_check(cls, value: list[float]) -> list[float]:
        if len(value) != 2 or not 0 < value[0] <= value[1]:
            raise ValueError("need min,max with 0 < min <= max, e.g. 0.5,2.0")
        return value


class ModelSection(_Model):
    width: int = Field(16, ge=1)
    """Channels of the first U-Net level (doubling at each level)."""
    depth: int = Field(4, ge=1, le=8)
    """Number of down/up levels."""
    norm: Literal["batch", "group", "none"] = "batch"
    """Normalisation layer."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout2d probability in the bottleneck and decoder."""
    upsample: Literal["transpose", "bilinear"] = "transpose"
    """Decoder upsampling."""


class OptimConfig(_Model):
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    """Optimiser."""
    lr: float = Field(2e-3, gt=0)
    """Peak learning rate (reached after warmup)."""
    weight_decay: float = Field(1e-4, ge=0)
    """Weight decay (not applied to biases and norm weights)."""
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = Field(1e-8, gt=0)
    """Adam epsilon."""
    momentum: float = Field(0.9, ge=0)
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    scheduler: Literal["poly", "cosine", "onecycle", "cyclic", "constant"] = "poly"
    """Learning-rate schedule; it steps once per optimiser step whatever the number of processes."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps."""
    power: float = Field(0.9, gt=0)
    """Exponent of the poly schedule."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Final learning rate as a fraction of the peak."""
    grad_clip: float = Field(0.0, ge=0)
    """Clip the gradient norm to this; 0 is off."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimiser step."""

    _betas_items = field_validator("betas", mode="before")(_items)

    @field_validator("betas")
    @classmethod
    def _betas_check(cls, value: list[float]) -> list[float]:
        if len(value) != 2 or not all(0 <= b < 1 for b in value):
            raise ValueError("need two numbers in [0, 1), e.g. 0.9,0.999")
        return value

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimConfig:
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("optim.nesterov = true needs optim.momentum > 0 with sgd, got momentum 0; "
                             "set a momentum (e.g. 0.9) or turn nesterov off")
        return self


class LossConfig(_Model):
    loss: Literal["ce", "dice", "ce+dice"] = "ce"
    """Loss: cross-entropy, soft Dice, or their sum."""
    class_weights: str = "none"
    """Cross-entropy class weights: none, median_frequency, inverse_log (from dataset.json pixel counts), or a comma-separated list."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Cross-entropy label smoothing."""
    dice_weight: float = Field(1.0, ge=0)
    """Weight of the Dice term in ce+dice."""

    @field_validator("class_weights", mode="before")
    @classmethod
    def _weights_list(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):  # a YAML list of weights
            return ",".join(str(v) for v in value)
        return value

    @field_validator("class_weights")
    @classmethod
    def _weights_check(cls, value: str) -> str:
        value = value.strip()
        if value in CLASS_WEIGHT_KINDS:
            return value
        try:
            weights = [float(v) for v in value.split(",")]
        except ValueError:
            weights = []
        if len(weights) < 2 or not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
            raise ValueError(f"use {', '.join(CLASS_WEIGHT_KINDS)}, or one weight >= 0 per class separated by "
                             "commas (not all 0), e.g. 1,2.5,0.8")
        return ",".join(v.strip() for v in value.split(","))


class RunConfig(_Model):
    output_dir: str | None = None
    """Run directory. Default: runs/<timestamp>."""
    epochs: int = Field(15, ge=1)
    """Epochs: passes over the training split, counted in samples over all processes."""
    max_steps: int | None = Field(None, ge=1)
    """Optimiser steps to train; wins over epochs."""
    eval_every: int | None = Field(None, ge=1)
    """Evaluate every this many steps (and at the end). Default: once per epoch."""
    save_every: int | None = Field(None, ge=1)
    """Save a checkpoint every this many steps (and at the end). Default: as eval_every."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept; older ones are deleted once a newer one is complete."""
    resume: str | None = None
    """auto: continue from the latest complete checkpoint in the run dir; or a checkpoint path."""
    tracker: Literal["wandb", "tensorboard", "none"] = "wandb"
    """Experiment tracker (main process only). wandb runs offline when no credentials are configured."""
    project: str = "unetseg"
    """Tracker project name."""
    run_name: str | None = None
    """Tracker run name. Default: the run dir's name."""
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    """Mixed precision. Default: what accelerate launch / the accelerate config says, else no."""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """channels_last memory format for the model and batches. auto: on for CUDA only. On an
    x86 CPU it can be faster too (docs/benchmarks.md): try on."""
    compile: bool = False
    """torch.compile the model."""
    sync_bn: bool = False
    """Convert BatchNorm to SyncBatchNorm when running on several processes."""
    seed: int = Field(0, ge=0)
    """Seed of model init, data order and augmentation."""
    log_every: int = Field(10, ge=1)
    """Log loss, lr and images/s every this many steps."""
    log_images: int = Field(4, ge=0)
    """Validation predictions logged as images to the tracker at each evaluation."""
    max_nonfinite: int = Field(5, ge=0)
    """Non-finite losses in a row (each step skipped with a warning) before the run stops."""

    @field_validator("channels_last", mode="before")
    @classmethod
    def _yaml11_on_off(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted on/off as a bool
            return "on" if value else "off"
        return value

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml11_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads an unquoted no as false


class TrainConfig(_Model):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @field_validator("*", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        return {} if value is None else value  # `optim:` with nothing under it

    @model_validator(mode="after")
    def _warmup_within_training(self) -> TrainConfig:
        steps, warmup = self.run.max_steps, self.optim.warmup_steps
        if steps is not None and warmup >= steps:
            raise ValueError(f"optim.warmup_steps = {warmup} must be less than run.max_steps = {steps}; "
                             "lower the warmup or train for more steps")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of YAML/JSON-safe values (lists as lists)."""
        return self.model_dump()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> TrainConfig:
        """Build from nested sections; every problem (unknown keys, wrong types, out of range)
        is reported at once as a :class:`ConfigError` naming ``source``."""
        return _validate(data, source, frozenset())

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(_read_yaml(path), source=str(path))


def _read_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UnetsegError(f"{path}: no such config file. Fix: check the --config path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UnetsegError(f"{path}: cannot read the config file ({e}). Fix: give --config a readable UTF-8 YAML file") from None
    try:
        data = yaml.safe_load(text)
        return {} if data is None else data  # an empty file: the defaults
    except yaml.YAMLError as e:
        raise UnetsegError(f"{path}: not valid YAML ({e}). Fix: correct the file's syntax") from None


def _validate(data: Any, source: str, from_flags: frozenset[tuple[str, str]]) -> TrainConfig:
    """TrainConfig from a nested dict; ``source`` names where values not in ``from_flags`` came from."""
    if not isinstance(data, dict):
        got = "empty" if data is None else type(data).__name__
        raise UnetsegError(
            f"{source}: expected a mapping of sections ({', '.join(section_types())}) at the top level, got {got} "
            f"({_short(data)}). Fix: write the config as sections with keys under them, e.g.\n"
            "data:\n  batch_size: 8\noptim:\n  lr: 0.001")
    # Keyword names must be text; a YAML key like `1:` is then reported as unknown.
    data = {str(k): ({str(kk): vv for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in data.items()}
    token = _ORIGIN.set((source, from_flags))
    try:
        return TrainConfig(**data)
    finally:
        _ORIGIN.reset(token)


# --- reporting -------------------------------------------------------------------------------


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _base_type(annotation: Any) -> Any:
    """int for ``int | None``, list for ``list[int]``; Literal stays Literal."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    return typing.get_origin(annotation) or annotation


def _optional(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _choices(annotation: Any) -> tuple[str, ...]:
    if _optional(annotation):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()


# What is allowed, for fields whose type and bounds do not say it.
_ALLOWED = {
    "crop_size": "H,W or one size for both (whole numbers >= 1), e.g. 256 or 360,480",
    "resize": "H,W or one size for both (whole numbers >= 1), e.g. 256 or 360,480",
    "eval_resize": "H,W or one size for both (whole numbers >= 1), e.g. 256 or 360,480",
    "scale_range": "min,max with 0 < min <= max, e.g. 0.5,2.0",
    "betas": "two numbers in [0, 1), e.g. 0.9,0.999",
    "class_weights": f"{', '.join(CLASS_WEIGHT_KINDS)}, or one weight >= 0 per class separated by commas",
}


def allowed(name: str, info: FieldInfo) -> str:
    """What a field accepts, in words: 'a whole number >= 1', 'one of batch, group, none'."""
    annotation = info.annotation
    if name in _ALLOWED:
        text = _ALLOWED[name]
    elif choices := _choices(annotation):
        text = "one of " + ", ".join(choices)
    else:
        base = _base_type(annotation)
        text = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(base, str(base))
        bounds = []
        for m in info.metadata:
            for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                if isinstance(m, getattr(annotated_types, attr.capitalize())):
                    bounds.append(f"{op} {getattr(m, attr)}")
        if bounds:
            text += " " + " and ".join(bounds)
    return text + (", or none" if _optional(annotation) else "")


def _flag_name(section: str, name: str) -> str:
    return "--" + (f"{section}-{name}" if section in PREFIXED else name).replace("_", "-")


def _config_error(e: ValidationError, cls: type, data: dict[str, Any], source: str,
                  from_flags: frozenset[tuple[str, str]]) -> ConfigError:
    sections = section_types()
    prefix: tuple[str, ...] = ()
    if cls is not TrainConfig:  # a section validated on its own
        prefix = tuple(s for s, t in sections.items() if t is cls)[:1]
        data = {prefix[0]: data} if prefix else data
    problems, flagged, filed = [], 0, 0
    for err in e.errors(include_url=False):
        loc = prefix + tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if len(loc) < 2 and err["type"] not in ("extra_forbidden", "model_type", "model_attributes_type", "dict_type"):
            problems.append(f"{'.'.join(map(str, loc)) + ': ' if loc else ''}{msg}.")  # a check across keys
            filed += 1
            continue
        if len(loc) == 1:
            section = str(loc[0])
            value = data.get(section)
            if err["type"] == "extra_forbidden":
                problems.append(f"{section}: unknown section.{_did_you_mean(section, sections)} "
                                f"Known sections: {', '.join(sections)}.")
            else:
                keys = ", ".join(sections[section].model_fields) if section in sections else ""
                problems.append(f"{section} = {_short(value)}: expected a mapping of {section} keys ({keys}).")
            filed += 1
            continue
        section, name = str(loc[0]), str(loc[1])
        values = data.get(section)
        value = values.get(name) if isinstance(values, dict) else err.get("input")
        cls_fields = sections[section].model_fields if section in sections else {}
        if err["type"] == "extra_forbidden":
            problems.append(f"{section}.{name} = {_short(value)}: unknown key.{_did_you_mean(name, cls_fields)} "
                            f"Known {section} keys: {', '.join(cls_fields)}.")
            filed += 1
            continue
        by_flag = (section, name) in from_flags
        flagged += by_flag
        filed += not by_flag
        key = f"{section}.{name}" + (f" ({_flag_name(section, name)})" if by_flag else "")
        several = isinstance(value, (list, tuple)) or (isinstance(value, str) and "," in value)
        item = "".join(f"item {p + 1}: " if isinstance(p, int) else f"{p}: " for p in loc[2:]) if several else ""
        if err["type"] == "literal_error" and name in cls_fields and _optional(cls_fields[name].annotation):
            msg += " (or none)"  # the message lists the choices
        line = f"{key} = {_short(value)}: {item}{msg}."
        if name in cls_fields and err["type"] not in ("literal_error", "value_error"):
            line += f" Allowed: {allowed(name, cls_fields[name])}."
        if line not in problems:  # one size for H,W fails twice
            problems.append(line)
    if source == PYTHON_SOURCE:
        where, fix = PYTHON_SOURCE, "pass the values allowed above"
    elif source == FLAGS_SOURCE or (flagged and not filed):
        where = FLAGS_SOURCE
        fix = "give the flags named above a value that is allowed (`unetseg train --help` describes every option)"
    elif flagged:
        where = f"{source} and {FLAGS_SOURCE}"
        fix = (f"correct the flags named above on the command line and the other keys in {source} "
               "(`unetseg train --help` describes every option)")
    else:
        where = source
        fix = (f"correct {'these keys' if len(problems) > 1 else 'this key'} in {source} as said above "
               "(`unetseg train --help` describes every option; its flag names are the keys with dashes)")
    return ConfigError(problems, where, fix)


def _did_you_mean(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" Did you mean {close[0]}?" if close else ""


# --- flags generated from the fields ---------------------------------------------------------


def section_types() -> dict[str, type[_Model]]:
    """Section name -> its model class."""
    return {name: info.annotation for name, info in TrainConfig.model_fields.items()}


@dataclass(frozen=True)
class Flag:
    section: str
    name: str
    flag: str
    kind: Any
    """The field's type: ``bool``, ``int``, ``list[int] | None``, a ``Literal``..."""
    help: str
    """The field's docstring on one line."""
    default: Any = None
    allowed: str = ""
    """What the flag accepts, in words."""

    @property
    def help_text(self) -> str:
        """``help``, then what is allowed and the default: for ``--help``."""
        text = f"{self.help} Allowed: {self.allowed}."
        if self.default is not None:
            default = ",".join(map(str, self.default)) if isinstance(self.default, list) else self.default
            text += f" Default: {str(default).lower() if isinstance(default, bool) else default}."
        return text


def flags() -> list[Flag]:
    """Every config field as a command-line flag."""
    out = []
    for section, cls in section_types().items():
        for name, info in cls.model_fields.items():
            out.append(Flag(section, name, _flag_name(section, name), info.annotation,
                            " ".join((info.description or "").split()), info.get_default(call_default_factory=True),
                            allowed(name, info)))
    return out


def parse_value(flag: Flag, text: Any) -> Any:
    """A flag's text as input for its field: ``none`` (or nothing) clears a field whose default
    is none; everything else is converted and checked by the field itself."""
    if isinstance(text, str) and _optional(flag.kind) and text.strip().lower() in ("none", "null", ""):
        return None
    return text


def build_config(config_file: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the YAML file, then ``overrides`` (flag name without dashes -> its text;
    booleans as "true"/"false"). Every problem in either is reported at once."""
    data = _read_yaml(config_file) if config_file else {}
    by_flag = {f.flag[2:]: f for f in flags()}
    unknown = [key for key in overrides if key not in by_flag]
    if unknown:
        hints = "".join(_did_you_mean(k, by_flag) for k in unknown)
        raise UnetsegError(f"unknown flag{'s' if len(unknown) > 1 else ''} {', '.join('--' + k for k in unknown)}.{hints} "
                           "Fix: use the flags listed by `unetseg train --help`")
    if overrides and isinstance(data, dict):
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
        for key, text in overrides.items():
            f = by_flag[key]
            if data.get(f.section) is None:
                data[f.section] = {}
            if isinstance(data[f.section], dict):  # else the section itself is reported
                data[f.section][f.name] = parse_value(f, text)
    from_flags = frozenset((by_flag[k].section, by_flag[k].name) for k in overrides)
    source = FLAGS_SOURCE if not config_file else str(config_file)
    return _validate(data, source, from_flags)
