"""The model registry: every architecture unetseg can train, save, evaluate, predict with
and export, looked up by ``model.name``.

Adding a model is one module and one registration; train, checkpoints, evaluate,
predict, export and the command-line flags find it through here::

    class TinyOptions(ModelOptions):
        name: str = "tiny"
        hidden: int = Field(8, ge=1, description="Channels of the hidden layer.")

    @register_model(TinyOptions)
    class Tiny(nn.Module):
        def __init__(self, options: TinyOptions): ...   # options.num_classes is set

The options class is the model's config: its fields become the ``model`` section of a
training config and ``--model-*`` flags, and a saved model records it (with
``num_classes``) in its ``config.yaml``, so it is rebuilt as it was trained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator, model_validator
from torch import nn

from unetseg.errors import UnetsegError
from unetseg.options import ConfigError, Options

DEFAULT_MODEL = "unet"


class ModelConfigError(ConfigError, ValueError):
    """An invalid model configuration; the message names each value and the fix."""

    what = "model config"


class ModelOptions(Options):
    """What every model is built from. Subclasses add their own fields and set the
    default of ``name`` to their registered name."""

    section = "model"
    error_class = ModelConfigError

    name: str = Field(DEFAULT_MODEL, description="Model architecture, by its registered name (unetseg.models).")
    num_classes: int | None = Field(None, ge=1, json_schema_extra={"flag": False},
                                    description="Output channels; set from dataset.json when training.")
    in_channels: int = Field(3, ge=1, json_schema_extra={"flag": False}, description="Input image channels (3 for RGB).")
    mean: list[float] | None = Field(
        None, json_schema_extra={"flag": False},
        description="Per-channel mean the input is normalised with, after scaling to [0, 1]. none: the model's default "
        "(a pretrained encoder's normalisation, else ImageNet's); a saved model records the value it was trained with.")
    std: list[float] | None = Field(None, json_schema_extra={"flag": False},
                                    description="Per-channel std of the normalisation (see mean).")

    @model_validator(mode="after")
    def _normalization_pairs(self) -> ModelOptions:
        if (self.mean is None) != (self.std is None) or (self.mean is not None and len(self.mean) != len(self.std)):
            raise ValueError(f"mean {self.mean} and std {self.std}: give both, with one value per channel each")
        if self.std is not None and not all(v > 0 for v in self.std):
            raise ValueError(f"std {self.std}: every value must be > 0")
        return self

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        entry = _REGISTRY.get(value)
        if entry is None:
            raise ValueError(f"unknown model {value!r}; use one of {', '.join(sorted(_REGISTRY))}")
        if cls is not ModelOptions and entry.options is not cls:
            raise ValueError(f"{cls.__name__} holds the options of model {entry.options.model_fields['name'].default!r}, "
                             f"not {value!r}")
        return value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def for_saved_weights(self) -> ModelOptions:
        """The options to build the model with when its own weights are loaded right after (a
        saved model, a resume): a model that fetches pretrained weights skips that here."""
        return self

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The (mean, std) the model's input is normalised with (after scaling to [0, 1]): its
        own, else :meth:`default_normalization`."""
        if self.mean is not None:
            return tuple(self.mean), tuple(self.std)
        return self.default_normalization()

    def default_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        from unetseg.transforms import IMAGENET_MEAN, IMAGENET_STD

        return IMAGENET_MEAN, IMAGENET_STD

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelOptions:
        """The options of a saved model (which always records ``num_classes``)."""
        if "num_classes" not in d:
            raise ModelConfigError([f"model: no num_classes in {sorted(d)}"], "the saved model config",
                                   "add the number of classes (num_classes)")
        return cls(**d)


@dataclass(frozen=True)
class _Entry:
    options: type[ModelOptions]
    build: Callable[[Any], nn.Module]


_REGISTRY: dict[str, _Entry] = {}


def register_model(options: type[ModelOptions]) -> Callable[[Callable[[Any], nn.Module]], Callable[[Any], nn.Module]]:
    """Register ``build(options) -> nn.Module`` (a module class or a function) under the
    default of ``options.name``."""
    name = options.model_fields["name"].default

    def register(build: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        if name in _REGISTRY and _REGISTRY[name].build is not build:
            raise UnetsegError(f"model {name!r} is registered twice. Fix: give the new model's options another name")
        _REGISTRY[name] = _Entry(options, build)
        return build

    return register


def unregister_model(name: str) -> None:
    """Forget a model (for tests that register one of their own)."""
    _REGISTRY.pop(name, None)


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def model_options_class(name: str) -> type[ModelOptions]:
    """The options class of a registered model; the base class for an unknown name (whose
    validation then reports the name)."""
    entry = _REGISTRY.get(name)
    return entry.options if entry else ModelOptions


def build_model(options: ModelOptions, num_classes: int | None = None) -> nn.Module:
    """The model ``options`` describe, with ``num_classes`` outputs when given (training
    takes it from dataset.json; a saved model has it in its options)."""
    if num_classes is not None:
        options = options.model_copy(update={"num_classes": num_classes})
    if options.num_classes is None:
        raise ModelConfigError([f"model.num_classes is not set for model {options.name!r}"], "Python code",
                               "pass num_classes (build_model(options, num_classes=...))")
    return _REGISTRY[options.name].build(options)


def describe_model(net: nn.Module) -> str:
    """One line for the start of a run: the model's own ``describe()``, else its class and size."""
    if callable(getattr(net, "describe", None)):
        return net.describe()
    count = sum(p.numel() for p in net.parameters())
    return f"{type(net).__name__}: {count / 1e6:.3g}M parameters"


def saved_model_options(config: dict[str, Any]) -> ModelOptions:
    """The options recorded in a saved model's ``config.yaml``. Models saved before the
    registry existed recorded a U-Net under ``unet``."""
    if "unet" in config:
        return model_options_class(DEFAULT_MODEL).from_dict({"name": DEFAULT_MODEL, **config["unet"]})
    model = dict(config.get("model") or {})
    return model_options_class(model.get("name", DEFAULT_MODEL)).from_dict(model)


# The built-in models register themselves on import.
from unetseg.models import unet as _unet  # noqa: E402,F401
