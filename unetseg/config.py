"""The training config's sections: data, model, optim, loss and run, each a typed
:class:`~unetseg.options.Options` with a description, a default and the values it
accepts per field, and :class:`TrainConfig`, which holds them and reads and writes YAML.

Precedence: defaults < ``--config FILE.yaml`` < command-line flags
(:mod:`unetseg.flags`). The effective config is printed at start and saved as
``config.yaml`` in the run dir and beside every saved model, so evaluate, predict and
resume rebuild exactly what was trained.

The ``model`` section is the options class of the model named by ``model.name``, taken
from the registry in :mod:`unetseg.models`: a new model brings its own options without
any change here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SerializeAsAny, field_validator, model_validator

from unetseg.errors import UnetsegError
from unetseg.models import DEFAULT_MODEL, ModelOptions, model_options_class
from unetseg.options import Options, Size, _items, _short, explained, from_source

CLASS_WEIGHT_KINDS = ("none", "median_frequency", "inverse_log")  # as unetseg.class_weights.CLASS_WEIGHT_KINDS


class DataConfig(Options):
    section = "data"

    data: str | None = Field(None, description='Shard folder or URL, or a shard pattern like dir/train-{000000..000009}.tar (dataset.json beside it). Default: the embedded synthetic set, generated under shards/synthetic when missing.')
    val_data: str | None = Field(None, description="Shard folder, URL or pattern to evaluate on. Default: the val split of --data (for a shard pattern, the val split's shards named in dataset.json, beside the pattern's shards).")
    dataset_json: str | None = Field(None, description='dataset.json to use with a shard pattern that has none beside it (e.g. a pipe: pattern).')
    train_split: str = Field("train", description="Split to train on, or several joined with commas (e.g. train,val, for the final model once the schedule is fixed on val; needs a shard folder).")
    val_split: str = Field("val", description='Split to evaluate on.')
    batch_size: int = Field(16, ge=1, description='Training batch size per process.')
    eval_batch_size: int | None = Field(None, ge=1, description='Evaluation batch size per process (default: batch size).')
    num_workers: int = Field(2, ge=0, description='DataLoader worker processes per training process (they read and decode, and augment unless augment_on is device).')
    augment_on: Literal["auto", "workers", "device"] = Field("auto", description="Where training augmentation runs: in the DataLoader workers, or on the training device (the GPU) on batches of decoded images, leaving the CPU only reading and decoding. Both give the same augmentation for a seed. auto: device on a GPU, else workers.")
    shuffle_buffer: int = Field(256, ge=1, description="Samples in each worker's shuffle buffer.")
    max_bad_samples: int = Field(10, ge=0, description='Undecodable samples tolerated (skipped and counted) before the run stops.')
    crop_size: Size = Field(None, description="Random crop H,W (or one number) after scaling. Default: the split's most common image size.")
    scale_range: list[float] = Field(default_factory=lambda: [0.75, 1.5], json_schema_extra=explained("min,max with 0 < min <= max, e.g. 0.5,2.0"), description='Random scale range min,max applied before the crop.')
    hflip: bool = Field(True, description='Random horizontal flips.')
    jitter: float = Field(0.0, ge=0, description='Colour jitter strength (brightness, contrast, saturation); 0 is off.')
    resize: Size = Field(None, description='Train on images resized to H,W instead of scale + crop.')
    eval_resize: Size = Field(None, description='Evaluate with the network input resized to H,W (metrics stay at the original mask size). Default: full resolution.')

    _scale_items = field_validator("scale_range", mode="before")(_items)

    @field_validator("scale_range")
    @classmethod
    def _scale_check(cls, value: list[float]) -> list[float]:
        if len(value) != 2 or not 0 < value[0] <= value[1]:
            raise ValueError("need min,max with 0 < min <= max, e.g. 0.5,2.0")
        return value


class OptimConfig(Options):
    section = "optim"

    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description='Optimiser.')
    lr: float = Field(2e-3, gt=0, description='Peak learning rate (reached after warmup).')
    weight_decay: float = Field(1e-4, ge=0, description='Weight decay (not applied to biases and norm weights).')
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], json_schema_extra=explained("two numbers in [0, 1), e.g. 0.9,0.999"), description='Adam betas.')
    eps: float = Field(1e-8, gt=0, description='Adam epsilon.')
    momentum: float = Field(0.9, ge=0, description='SGD momentum.')
    nesterov: bool = Field(False, description='SGD Nesterov momentum.')
    scheduler: Literal["poly", "cosine", "onecycle", "cyclic", "constant"] = Field("poly", description='Learning-rate schedule; it steps once per optimiser step whatever the number of processes.')
    warmup_steps: int = Field(0, ge=0, description='Linear warmup steps.')
    power: float = Field(0.9, gt=0, description='Exponent of the poly schedule.')
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description='Final learning rate as a fraction of the peak.')
    grad_clip: float = Field(0.0, ge=0, description='Clip the gradient norm to this; 0 is off.')
    grad_accum: int = Field(1, ge=1, description='Micro-batches accumulated per optimiser step.')
    encoder_lr_mult: float = Field(1.0, ge=0, description='Learning rate of a pretrained encoder (model.encoder) as a multiple of lr; e.g. 0.1 to change pretrained weights less than the new decoder.')
    encoder_freeze_steps: int = Field(0, ge=0, description='Steps at the start with the pretrained encoder frozen (its lr 0) while the decoder learns; 0 is off.')

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


class LossConfig(Options):
    section = "loss"

    loss: str = Field("ce", json_schema_extra=explained("registered losses joined with +, each with an optional weight*, "
                                                        "e.g. ce, dice, ce+dice, ce+0.5*dice"),
                      description="Loss: a registered loss (unetseg.losses: ce, dice, lovasz, ohem) or a weighted sum of them.")
    class_weights: str = Field("none", json_schema_extra=explained(f"{', '.join(CLASS_WEIGHT_KINDS)}, or one weight >= 0 per class separated by commas"), description='Cross-entropy class weights: none, median_frequency, inverse_log (from dataset.json pixel counts), or a comma-separated list.')
    label_smoothing: float = Field(0.0, ge=0, lt=1, description='Cross-entropy label smoothing.')
    dice_weight: float = Field(1.0, ge=0, description='Weight of a dice term written without one when the loss has other terms: ce+dice is ce + dice_weight * dice.')
    ohem_threshold: float = Field(0.7, gt=0, le=1, description="The ohem loss keeps pixels whose true class gets a probability below this.")
    ohem_min_kept: float = Field(0.1, ge=0, le=1, description="The ohem loss keeps at least this fraction of the valid pixels (the hardest).")
    deep_supervision: float = Field(0.0, ge=0, description="Weight of deep supervision: auxiliary heads on the inner decoder stages, their mean loss times this added in training only (the saved model has no such heads). 0 is off; e.g. 0.4.")

    @field_validator("loss")
    @classmethod
    def _loss_registered(cls, value: str) -> str:
        from unetseg.losses import parse_loss  # torch, only when a loss is checked

        try:
            parse_loss(value)
        except UnetsegError as e:
            what, _, fix = str(e).partition(" Fix: ")  # the config error ends with its own Fix line
            raise ValueError(f"{what.rstrip('.')}; {fix[:1].lower()}{fix[1:]}" if fix else what) from None
        return value.replace(" ", "")

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


class RunConfig(Options):
    section = "run"

    output_dir: str | None = Field(None, description='Run directory. Default: runs/<timestamp>.')
    epochs: int = Field(15, ge=1, description='Epochs: passes over the training split, each sample at most once per epoch over all processes.')
    max_steps: int | None = Field(None, ge=1, description='Optimiser steps to train; wins over epochs.')
    eval_every: int | None = Field(None, ge=1, description='Evaluate every this many steps (and at the end). Default: once per epoch.')
    save_every: int | None = Field(None, ge=1, description='Save a checkpoint every this many steps (and at the end). Default: as eval_every.')
    keep_checkpoints: int = Field(2, ge=1, description='Checkpoints kept; older ones are deleted once a newer one is complete.')
    resume: str | None = Field(None, description='auto: continue from the latest complete checkpoint in the run dir; or a checkpoint path.')
    tracker: Literal["wandb", "tensorboard", "none"] = Field("wandb", description='Experiment tracker (main process only). wandb runs offline when no credentials are configured.')
    project: str = Field("unetseg", description='Tracker project name.')
    run_name: str | None = Field(None, description="Tracker run name. Default: the run dir's name.")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = Field(None, description='Mixed precision. Default: what accelerate launch / the accelerate config says, else no.')
    channels_last: Literal["auto", "on", "off"] = Field("auto", description='channels_last memory format for the model and batches. auto: on for CUDA only. On an x86 CPU it can be faster too (docs/benchmarks.md): try on.')
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the model for training and validation (validation batches are padded to one "
        "shape, so it compiles once). auto: on for CUDA; on a CPU compiling takes minutes and rarely pays.")
    sync_bn: bool = Field(False, description='Convert BatchNorm to SyncBatchNorm when running on several processes.')
    seed: int = Field(0, ge=0, lt=2**32, description='Seed of model init, data order and augmentation (32 bits: every stream is derived from it and the run position, unetseg.stream.derive_seed).')
    log_every: int = Field(10, ge=1, description='Log loss, lr and images/s every this many steps.')
    log_images: int = Field(4, ge=0, description='Validation predictions logged as images to the tracker at each evaluation.')
    max_nonfinite: int = Field(5, ge=0, description='Non-finite losses in a row before the run stops. Each such step is skipped; they are counted on the device and read when the loop logs or saves, so the run stops (with a warning before) at the first log or save with at least this many in a row.')

    @field_validator("channels_last", "compile", mode="before")
    @classmethod
    def _yaml11_on_off(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted on/off as a bool
            return "on" if value else "off"
        return value

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml11_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads an unquoted no as false


class TrainConfig(Options):
    """The whole training config: one field per section."""

    data: DataConfig = Field(default_factory=DataConfig)
    # Serialised as the model's own options class, whatever the declared base.
    model: SerializeAsAny[ModelOptions] = Field(default_factory=lambda: model_options_class(DEFAULT_MODEL)())
    optim: OptimConfig = Field(default_factory=OptimConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @field_validator("*", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        return {} if value is None else value  # `optim:` with nothing under it

    @field_validator("model", mode="before")
    @classmethod
    def _model_by_name(cls, value: Any) -> Any:
        # The options class of the model named (its errors keep their model.* keys).
        if isinstance(value, dict):
            return model_options_class(value.get("name", DEFAULT_MODEL)).model_validate(value)
        return value

    @classmethod
    def section_classes(cls, data: Any) -> dict[str, type[Options]]:
        model = data.get("model") if isinstance(data, dict) else None
        name = model.get("name", DEFAULT_MODEL) if isinstance(model, dict) else DEFAULT_MODEL
        return {"data": DataConfig, "model": model_options_class(str(name)), "optim": OptimConfig,
                "loss": LossConfig, "run": RunConfig}

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
            f"{source}: expected a mapping of sections ({', '.join(TrainConfig.model_fields)}) at the top level, got {got} "
            f"({_short(data)}). Fix: write the config as sections with keys under them, e.g.\n"
            "data:\n  batch_size: 8\noptim:\n  lr: 0.001")
    # Keyword names must be text; a YAML key like `1:` is then reported as unknown.
    data = {str(k): ({str(kk): vv for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in data.items()}
    return from_source(TrainConfig, data, source, from_flags)
