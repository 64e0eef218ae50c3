"""One typed training config: nested dataclasses, a docstring per field, validation in
``__post_init__``, YAML in and out, and command-line flags generated from the fields.

Precedence: defaults < ``--config FILE.yaml`` < command-line flags. The effective config
is printed at start and saved as ``config.yaml`` in the run dir and beside every saved
model, so evaluate, predict and resume rebuild exactly what was trained.

Flags are the field names with dashes (``--batch-size``); fields of the ``model``
section get a ``model-`` prefix (``--model-width``). Lists are comma-separated
(``--crop-size 360,480``).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from unetseg.errors import UnetsegError

# Sections whose flags carry their name as a prefix.
PREFIXED = {"model"}


def _check(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise UnetsegError(f"{name}={value!r} is invalid. Fix: {fix}")


def _choice(name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, name, value, f"use one of {', '.join(map(str, choices))}")


@dataclass
class DataConfig:
    data: str | None = None
    """Shard folder or URL, or a shard pattern like dir/train-{000000..000009}.tar (dataset.json beside it). Default: the embedded synthetic set, generated under shards/synthetic when missing."""
    dataset_json: str | None = None
    """dataset.json to use with a shard pattern that has none beside it (e.g. a pipe: pattern)."""
    train_split: str = "train"
    """Split to train on."""
    val_split: str = "val"
    """Split to evaluate on."""
    batch_size: int = 16
    """Training batch size per process."""
    eval_batch_size: int | None = None
    """Evaluation batch size per process (default: batch size)."""
    num_workers: int = 2
    """DataLoader worker processes per training process (decoding and augmentation run there)."""
    shuffle_buffer: int = 256
    """Samples in each worker's shuffle buffer."""
    max_bad_samples: int = 10
    """Undecodable samples tolerated (skipped and counted) before the run stops."""
    crop_size: list[int] | None = None
    """Random crop H,W (or one number) after scaling. Default: the split's most common image size."""
    scale_range: list[float] = field(default_factory=lambda: [0.75, 1.5])
    """Random scale range min,max applied before the crop."""
    hflip: bool = True
    """Random horizontal flips."""
    jitter: float = 0.0
    """Colour jitter strength (brightness, contrast, saturation); 0 is off."""
    resize: list[int] | None = None
    """Train on images resized to H,W instead of scale + crop."""
    eval_resize: list[int] | None = None
    """Evaluate with the network input resized to H,W (metrics stay at the original mask size). Default: full resolution."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_workers", "shuffle_buffer", "max_bad_samples"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= (1 if name in ("batch_size", "shuffle_buffer") else 0),
                   name, value, "use a whole number (batch size and buffer at least 1)")
        _check(self.eval_batch_size is None or self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "use at least 1")
        _check(len(self.scale_range) == 2 and 0 < self.scale_range[0] <= self.scale_range[1], "scale_range",
               self.scale_range, "give min,max with 0 < min <= max, e.g. 0.5,2.0")
        for name in ("crop_size", "resize", "eval_resize"):
            value = getattr(self, name)
            _check(value is None or (len(value) in (1, 2) and min(value) >= 1), name, value, "give H,W or one size, e.g. 256")


@dataclass
class ModelSection:
    width: int = 16
    """Channels of the first U-Net level (doubling at each level)."""
    depth: int = 4
    """Number of down/up levels."""
    norm: Literal["batch", "group", "none"] = "batch"
    """Normalisation layer."""
    dropout: float = 0.0
    """Dropout2d probability in the bottleneck and decoder."""
    upsample: Literal["transpose", "bilinear"] = "transpose"
    """Decoder upsampling."""


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    """Optimiser."""
    lr: float = 2e-3
    """Peak learning rate (reached after warmup)."""
    weight_decay: float = 1e-4
    """Weight decay (not applied to biases and norm weights)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    scheduler: Literal["poly", "cosine", "onecycle", "cyclic", "constant"] = "poly"
    """Learning-rate schedule; it steps once per optimiser step whatever the number of processes."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    power: float = 0.9
    """Exponent of the poly schedule."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""
    grad_clip: float = 0.0
    """Clip the gradient norm to this; 0 is off."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimiser step."""

    def __post_init__(self) -> None:
        _choice("optimizer", self.optimizer, ("adamw", "adam", "sgd"))
        _choice("scheduler", self.scheduler, ("poly", "cosine", "onecycle", "cyclic", "constant"))
        _check(self.lr > 0, "lr", self.lr, "use a positive learning rate, e.g. 1e-3")
        _check(self.grad_accum >= 1, "grad_accum", self.grad_accum, "use 1 or more")
        _check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "use 0 or more")
        _check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "use 0 (off) or a positive norm")


@dataclass
class LossConfig:
    loss: Literal["ce", "dice", "ce+dice"] = "ce"
    """Loss: cross-entropy, soft Dice, or their sum."""
    class_weights: str = "none"
    """Cross-entropy class weights: none, median_frequency, inverse_log (from dataset.json pixel counts), or a comma-separated list."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    dice_weight: float = 1.0
    """Weight of the Dice term in ce+dice."""

    def __post_init__(self) -> None:
        _choice("loss", self.loss, ("ce", "dice", "ce+dice"))
        _check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "use a value in [0, 1)")


@dataclass
class RunConfig:
    output_dir: str | None = None
    """Run directory. Default: runs/<timestamp>."""
    epochs: int = 15
    """Epochs: passes over the training split, counted in samples over all processes."""
    max_steps: int | None = None
    """Optimiser steps to train; wins over epochs."""
    eval_every: int | None = None
    """Evaluate every this many steps (and at the end). Default: once per epoch."""
    save_every: int | None = None
    """Save a checkpoint every this many steps (and at the end). Default: as eval_every."""
    keep_checkpoints: int = 2
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
    seed: int = 0
    """Seed of model init, data order and augmentation."""
    log_every: int = 10
    """Log loss, lr and images/s every this many steps."""
    log_images: int = 4
    """Validation predictions logged as images to the tracker at each evaluation."""
    max_nonfinite: int = 5
    """Non-finite losses in a row (each step skipped with a warning) before the run stops."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", self.epochs, "use 1 or more")
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps", self.max_steps, "use 1 or more")
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, value, "use 1 or more steps")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "keep at least 1")
        _check(self.log_every >= 1, "log_every", self.log_every, "use 1 or more")
        _choice("tracker", self.tracker, ("wandb", "tensorboard", "none"))
        if isinstance(self.channels_last, bool):  # YAML 1.1 reads an unquoted on/off as a bool
            self.channels_last = "on" if self.channels_last else "off"
        _choice("channels_last", self.channels_last, ("auto", "on", "off"))
        _check(self.mixed_precision in (None, "no", "fp16", "bf16"), "mixed_precision", self.mixed_precision, "use no, fp16 or bf16")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from nested sections; unknown keys are an error naming them."""
        if not isinstance(data, dict):
            raise UnetsegError(f"{source}: expected a mapping of sections. Fix: see `unetseg train --help` for the layout")
        sections = {}
        for name, section in section_types().items():
            values = data.get(name) or {}
            known = {g.name for g in dataclasses.fields(section)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise UnetsegError(f"{source}: unknown {name} keys {unknown}. Fix: use some of {sorted(known)}")
            sections[name] = section(**values)
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise UnetsegError(f"{source}: unknown sections {unknown}. Fix: use {sorted(sections)}")
        return cls(**sections)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise UnetsegError(f"{path}: no such config file. Fix: check the --config path") from None
        except yaml.YAMLError as e:
            raise UnetsegError(f"{path}: not valid YAML ({e}). Fix: correct the file's syntax") from None
        return cls.from_dict(data, source=str(path))


# --- flags generated from the fields ------------------------------------------------------


def section_types() -> dict[str, type]:
    return {f.name: typing.get_type_hints(TrainConfig)[f.name] for f in dataclasses.fields(TrainConfig)}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


@dataclass(frozen=True)
class Flag:
    section: str
    name: str
    flag: str
    kind: Any
    help: str


def flags() -> list[Flag]:
    """Every config field as a command-line flag."""
    out = []
    for section, cls in section_types().items():
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            name = f"{section}-{f.name}" if section in PREFIXED else f.name
            out.append(Flag(section, f.name, "--" + name.replace("_", "-"), hints[f.name], docs.get(f.name, "")))
    return out


def parse_value(flag: Flag, text: str) -> Any:
    """Convert a flag's text to the field's type (lists are comma-separated)."""
    kind = flag.kind
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        if text.lower() in ("none", "null", ""):
            return None
        kind = args[0]
    try:
        if typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            return [item(v) for v in text.split(",")]
        if typing.get_origin(kind) is Literal:
            if text not in typing.get_args(kind):
                raise ValueError(f"choose one of {', '.join(typing.get_args(kind))}")
            return text
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("use true or false")
            return text.lower() in ("true", "1", "yes")
        return kind(text)
    except ValueError as e:
        raise UnetsegError(f"{flag.flag} {text!r}: {e}. Fix: see `unetseg train --help`") from None


def build_config(config_file: str | None, overrides: dict[str, str]) -> TrainConfig:
    """Defaults, then the YAML file, then ``overrides`` (flag name without dashes -> text)."""
    base = TrainConfig.load(config_file).to_dict() if config_file else TrainConfig().to_dict()
    by_flag = {f.flag.lstrip("-"): f for f in flags()}
    for key, text in overrides.items():
        f = by_flag[key]
        base[f.section][f.name] = parse_value(f, text)
    return TrainConfig.from_dict(base, source=config_file or "flags")
