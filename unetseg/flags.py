"""Command-line flags generated from typed options: the ``unetseg train`` parser, built
from the training config, and the parser of any other command whose options are one
:class:`~unetseg.options.Options` class (``unetseg evaluate``'s).

Flags are the field names with dashes (``--batch-size``); fields of the ``model``
section get a ``model-`` prefix (``--model-width``). Lists are comma-separated
(``--crop-size 360,480``); ``none`` clears a field whose default is none. Each option's
help is the field's description, what it accepts and its default, read from the
pydantic fields themselves: ``unetseg train --help`` and ``python -m unetseg.train
--help`` print the same text because both print this parser's help. Values are checked
by the fields, every problem at once, never by argparse (which only knows the flags).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from pydantic.fields import FieldInfo

from unetseg.config import TrainConfig, _read_yaml, _validate
from unetseg.errors import UnetsegError
from unetseg.models import model_names, model_options_class
from unetseg.options import FLAGS_SOURCE, Options, _did_you_mean, _optional, allowed, field_extra, flag_name, from_source


def _section_fields():
    """(section, field name, field info) of every flag; the model section lists the fields
    of every registered model once (a flag sets the field of whichever model is chosen)."""
    seen = set()
    for section, info in TrainConfig.model_fields.items():
        classes = [model_options_class(n) for n in model_names()] if section == "model" else [info.annotation]
        for cls in classes:
            for name, field in cls.model_fields.items():
                if (section, name) in seen or field_extra(field).get("flag") is False:
                    continue
                seen.add((section, name))
                yield section, name, field


@dataclass(frozen=True)
class Flag:
    section: str
    name: str
    flag: str
    kind: Any
    """The field's type: ``bool``, ``int``, ``list[int] | None``, a ``Literal``..."""
    help: str
    """The field's description on one line."""
    default: Any = None
    allowed: str = ""
    """What the flag accepts, in words."""
    required: bool = False
    """A field without a default: argparse asks for it."""
    positional: bool = False
    """An argument (``unetseg evaluate MODEL``), not a flag."""

    @property
    def help_text(self) -> str:
        """``help``, then what is allowed and the default: for ``--help``."""
        text = f"{self.help} Allowed: {self.allowed}."
        if self.default is not None:
            default = ",".join(map(str, self.default)) if isinstance(self.default, list) else self.default
            text += f" Default: {str(default).lower() if isinstance(default, bool) else default}."
        return text


def _flag(section: str, name: str, info: FieldInfo) -> Flag:
    positional = bool(field_extra(info).get("positional"))
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    return Flag(section, name, name if positional else flag_name(section, name), info.annotation,
                " ".join((info.description or "").split()), default, allowed(name, info), info.is_required(), positional)


def flags() -> list[Flag]:
    """Every config field as a command-line flag."""
    return [_flag(section, name, info) for section, name, info in _section_fields()]


def command_flags(cls: type[Options]) -> list[Flag]:
    """Every field of a command's options class as an argument or flag."""
    return [_flag("", name, info) for name, info in cls.model_fields.items() if field_extra(info).get("flag") is not False]


def add_flag(group: argparse._ActionsContainer, f: Flag) -> None:
    """``f`` as an argparse option whose value, kept as text, the field checks: an option
    left out is absent (the field's default applies), a bool is ``--x``/``--no-x``."""
    if f.positional:
        group.add_argument(f.flag, help=f.help_text)
    elif f.kind is bool:
        group.add_argument(f.flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=f.help_text)
    else:
        group.add_argument(f.flag, default=argparse.SUPPRESS, help=f.help_text, metavar="VALUE", required=f.required)


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


def parser() -> argparse.ArgumentParser:
    """The ``unetseg train`` options: ``--config`` and one flag per config field."""
    p = argparse.ArgumentParser(
        prog="unetseg train",
        description="Train a segmentation model on a shard folder (default: a U-Net on the embedded synthetic "
        "set). Run under `accelerate launch` for several processes or GPUs.",
    )
    p.add_argument("--config", help="YAML file with data/model/optim/loss/run sections; flags win over it")
    groups = {section: p.add_argument_group(f"{section} (the `{section}:` section of --config)")
              for section in TrainConfig.model_fields}
    for f in flags():
        add_flag(groups[f.section], f)
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The training config from command-line arguments (``sys.argv`` when ``None``)."""
    args = vars(parser().parse_args(argv))
    config_file = args.pop("config", None)
    overrides = {key.replace("_", "-"): (str(v).lower() if isinstance(v, bool) else v) for key, v in args.items()}
    return build_config(config_file, overrides)


def command_parser(cls: type[Options], description: str) -> argparse.ArgumentParser:
    """The parser of ``cls.command``: one argument or flag per field of ``cls``."""
    p = argparse.ArgumentParser(prog=cls.command, description=description)
    for f in command_flags(cls):
        add_flag(p, f)
    return p


def parse_command(cls: type[Options], description: str, argv: list[str] | None = None) -> Options:
    """``cls`` from command-line arguments (``sys.argv`` when ``None``): argparse finds the
    flags, the fields check the values and report every problem at once, naming each
    flag as typed and the fix."""
    by_name = {f.name: f for f in command_flags(cls)}
    args = vars(command_parser(cls, description).parse_args(argv))
    values = {name: parse_value(by_name[name], str(v).lower() if isinstance(v, bool) else v) for name, v in args.items()}
    return from_source(cls, values, FLAGS_SOURCE, frozenset(("", name) for name in values))
