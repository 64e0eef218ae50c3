"""The machinery every config section shares: a pydantic base class whose validation
errors become one readable :class:`ConfigError`, and the coercions text needs.

Values reach a config from a YAML file, command-line flags (text) and Python code.
Text is coerced to the field's type (YAML 1.1 reads ``1e-3`` as a string; a flag is
always text), and so are assignments (``config.optim.lr = "1e-3"``) and the mappings
given to ``TrainConfig``: scripts pass their own arguments through that way. A section
or model options class constructed directly in Python must get values of its types:
``UNetConfig(dropout="0.1")`` is reported, as the dataclass it replaces did.
Every problem found is reported at once, naming each key (and its flag when the value
came from one), the value, what is allowed, where it came from, and the fix.

The one image-size type, :data:`Size` (``256``, ``360,480`` or ``360x480``), lives here
too: config fields declare it, and :func:`size_pair` reads it for code outside a config.
A command's own options (``unetseg evaluate``'s) are an :class:`Options` class with
``command_line`` set: their problems are named by flag, as typed.

The sections themselves live in :mod:`unetseg.config`, the flags in
:mod:`unetseg.flags`; a model's section is its options class in
:mod:`unetseg.models`.
"""

from __future__ import annotations

import contextvars
import difflib
import functools
import re
import shlex
import types
import typing
from typing import Annotated, Any, ClassVar, Literal

import annotated_types
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from unetseg.errors import UnetsegError

# Sections whose flags carry their name as a prefix.
PREFIXED = {"model"}

FLAGS_SOURCE = "command-line flags"
PYTHON_SOURCE = "Python code"


# Where values being validated came from: (source, keys given by flags). Set by from_dict and
# build_config; plain Python construction and assignment report PYTHON_SOURCE.
_ORIGIN: contextvars.ContextVar[tuple[str, frozenset[tuple[str, str]]]] = contextvars.ContextVar(
    "unetseg_config_origin", default=(PYTHON_SOURCE, frozenset()))
# True while an outer model validates: nested models leave the reporting to it.
_NESTED: contextvars.ContextVar[bool] = contextvars.ContextVar("unetseg_config_nested", default=False)


class ConfigError(UnetsegError):
    """Every problem found in a config, one line each, with where it came from and a fix."""

    what = "training config"

    def __init__(self, problems: list[str], source: str, fix: str):
        self.problems = list(problems)
        self.source = source
        n = len(self.problems)
        lines = [f"Invalid {self.what} in {source} ({n} problem{'s' if n != 1 else ''}):"]
        lines += [f"  - {p}" for p in self.problems]
        lines.append(f"Fix: {fix}")
        super().__init__("\n".join(lines))


# --- the base class ---------------------------------------------------------------------------


class Options(BaseModel):
    """Base of every config section and of TrainConfig: unknown keys are errors (a typo
    must not silently keep a default), assignment is validated too, and pydantic's
    errors become one :class:`ConfigError` that a user can act on."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        coerce_numbers_to_str=True,  # `project: 2024` is the text "2024"
        allow_inf_nan=False,
    )
    section: ClassVar[str] = ""
    """The key of this section in a training config ("data", "model", ...); "" for the whole config."""
    command: ClassVar[str] = "unetseg train"
    """The command whose ``--help`` describes these options; the fix of an error names it."""
    command_line: ClassVar[bool] = False
    """The options of one command (no sections, no file): each problem is named by its flag
    and the value as it was typed."""
    error_class: ClassVar[type[ConfigError]] = ConfigError

    @classmethod
    def section_classes(cls, data: Any) -> dict[str, type[Options]]:
        """For a config made of sections: section name -> the class that validates ``data``'s
        values for it (a model section's class depends on its ``name``)."""
        return {}

    def __init__(self, /, **data: Any) -> None:
        if _NESTED.get():  # part of an outer validation, which reports every problem at once
            super().__init__(**data)
            return
        source, from_flags = _ORIGIN.get()
        token = _NESTED.set(True)
        try:
            # Text from files and flags is coerced; a direct construction in Python passes typed values.
            self.__pydantic_validator__.validate_python(data, self_instance=self, strict=source == PYTHON_SOURCE)
        except ValidationError as e:
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


def from_source(cls: type[Options], data: dict[str, Any], source: str,
                from_flags: frozenset[tuple[str, str]] = frozenset()) -> Options:
    """``cls(**data)``, its problems reported as coming from ``source`` (a file, or
    :data:`FLAGS_SOURCE`), except the ``(section, key)`` pairs in ``from_flags``, named by
    their flags."""
    token = _ORIGIN.set((source, from_flags))
    try:
        return cls(**data)
    finally:
        _ORIGIN.reset(token)


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


def explained(text: str) -> dict[str, Any]:
    """``Field(json_schema_extra=explained(...))``: what a field accepts, for fields whose
    type and bounds do not say it (an H,W pair, a min,max range)."""
    return {"allowed": text}


# --- image sizes --------------------------------------------------------------------------------


SIZE_ALLOWED = "H,W, HxW or one size for both (whole numbers >= 1), e.g. 256, 360,480 or 360x480"


def _size(value: Any) -> Any:
    """An image size as [H, W] items for the field to check: "H,W" or "HxW" text, one
    number (or a one-item list) for both sides, or a list of two."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in re.split(r"[,xX]", value)]
    items = _items(value)
    return items * 2 if len(items) == 1 else items


def _check_size(value: list[int] | None) -> list[int] | None:
    if value is not None and (len(value) != 2 or min(value) < 1):
        raise ValueError("need H,W or HxW (two whole numbers >= 1) or one size for both, e.g. 256, 360,480 or 360x480")
    return value


Size = Annotated[list[int] | None, BeforeValidator(_size), AfterValidator(_check_size),
                 Field(json_schema_extra=explained(SIZE_ALLOWED))]
"""The one image-size type: every ``H,W`` of a config, a flag and a Python argument is read
by it, in the forms :data:`SIZE_ALLOWED` lists, and kept as ``[H, W]`` (``None``: unset)."""


@functools.cache
def _size_adapter() -> TypeAdapter:
    return TypeAdapter(Size)


def size_pair(value: Any, name: str, *, smallest: int = 1, largest: int | None = None) -> tuple[int, int] | None:
    """``value`` read as :data:`Size`, for code outside a config (a Python argument, a
    flag's text): ``(H, W)``, or ``None`` for ``None``. Raises :class:`UnetsegError` naming
    ``name`` and the value, also for a side outside ``smallest..largest``."""
    try:
        size = _size_adapter().validate_python(value)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        why = _why(err, _message(err), err["loc"], value, None, name)
        fix = "give one of the sizes above" if "e.g." in why else "use e.g. 256, 360,480 or 360x480"
        raise UnetsegError(f"{name} {value!r}: {why} Fix: {fix}") from None
    if size is None:
        return None
    if min(size) < smallest or (largest is not None and max(size) > largest):
        sides = f"{smallest}..{largest}" if largest is not None else f"at least {smallest}"
        example = min(max(smallest, 128), largest or 128)
        raise UnetsegError(f"{name} {value!r}: sides must be {sides} pixels. Fix: use e.g. {example}x{example}")
    return size[0], size[1]


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


def field_extra(info: FieldInfo) -> dict[str, Any]:
    """A field's ``json_schema_extra``: "allowed" (see :func:`explained`), "flag": false (no
    flag), "positional": true (an argument, not a flag)."""
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


def allowed(name: str, info: FieldInfo) -> str:
    """What a field accepts, in words: 'a whole number >= 1', 'one of batch, group, none'."""
    annotation = info.annotation
    extra = field_extra(info)
    if "allowed" in extra:
        text = str(extra["allowed"])
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


def flag_name(section: str, name: str) -> str:
    return "--" + (f"{section}-{name}" if section in PREFIXED else name).replace("_", "-")


def _config_error(e: ValidationError, cls: type[Options], data: dict[str, Any], source: str,
                  from_flags: frozenset[tuple[str, str]]) -> ConfigError:
    if cls.command_line:
        problems = list(dict.fromkeys(_flag_problem(err, cls, data) for err in e.errors(include_url=False)))
        where, fix = _where_and_fix(source, 1, 0, len(problems), cls.command)
        return cls.error_class(problems, where, fix)
    if cls.section:  # a section validated on its own
        sections: dict[str, type[Options]] = {cls.section: cls}
        prefix: tuple[str, ...] = (cls.section,)
        data = {cls.section: data}
    else:
        sections, prefix = cls.section_classes(data), ()
    problems: list[str] = []
    flagged = filed = 0
    for err in e.errors(include_url=False):
        line, by_flag = _problem(err, prefix + tuple(err["loc"]), data, sections, from_flags)
        flagged += by_flag
        filed += not by_flag
        if line not in problems:  # one size for H,W fails twice
            problems.append(line)
    where, fix = _where_and_fix(source, flagged, filed, len(problems), cls.command)
    return cls.error_class(problems, where, fix)


def _problem(err: Any, loc: tuple[Any, ...], data: dict[str, Any], sections: dict[str, type[Options]],
             from_flags: frozenset[tuple[str, str]]) -> tuple[str, bool]:
    """One line for one pydantic error, and whether its value came from a flag."""
    msg = _message(err)
    if len(loc) < 2 and err["type"] not in ("extra_forbidden", "model_type", "model_attributes_type", "dict_type"):
        return f"{'.'.join(map(str, loc)) + ': ' if loc else ''}{msg}.", False  # a check across keys
    if len(loc) == 1:
        section = str(loc[0])
        if err["type"] == "extra_forbidden":
            return (f"{section}: unknown section.{_did_you_mean(section, sections)} "
                    f"Known sections: {', '.join(sections)}."), False
        keys = ", ".join(sections[section].model_fields) if section in sections else ""
        return f"{section} = {_short(data.get(section))}: expected a mapping of {section} keys ({keys}).", False
    section, name = str(loc[0]), str(loc[1])
    values = data.get(section)
    value = values.get(name) if isinstance(values, dict) else err.get("input")
    cls_fields = sections[section].model_fields if section in sections else {}
    by_flag = (section, name) in from_flags
    key = f"{section}.{name}" + (f" ({flag_name(section, name)})" if by_flag else "")
    if err["type"] == "extra_forbidden":
        return (f"{key} = {_short(value)}: unknown key.{_did_you_mean(name, cls_fields)} "
                f"Known {section} keys: {', '.join(cls_fields)}."), by_flag
    return f"{key} = {_short(value)}: {_why(err, msg, loc[2:], value, cls_fields.get(name), name)}", by_flag


def _flag_problem(err: Any, cls: type[Options], data: dict[str, Any]) -> str:
    """One line for one pydantic error of a command's options: the flag and its value as
    typed (``--batch-size 0: ...``), then why."""
    msg, loc = _message(err), err["loc"]
    if not loc:
        return f"{msg}."  # a check across options
    name = str(loc[0])
    info = cls.model_fields.get(name)
    if info is None:  # only from Python: argparse knows the flags
        return f"{name}: unknown option.{_did_you_mean(name, cls.model_fields)} Known options: {', '.join(cls.model_fields)}."
    flag = name if field_extra(info).get("positional") else flag_name("", name)
    if name not in data:
        return f"{flag}: {msg}."
    value = data[name]
    typed = shlex.quote(value) if isinstance(value, str) else _short(value)
    return f"{flag} {typed}: {_why(err, msg, loc[1:], value, info, name)}"


def _message(err: Any) -> str:
    # Without its final period: the report's lines add their own (a doubled ".." otherwise).
    return err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ").rstrip(".")


def _why(err: Any, msg: str, inner: tuple[Any, ...], value: Any, info: FieldInfo | None, name: str) -> str:
    """What is wrong with one value: the item at fault for a list given as several, and what
    the field allows unless the message already says it."""
    several = (isinstance(value, (list, tuple)) and len(value) > 1) or (isinstance(value, str) and re.search("[,xX]", value) is not None)
    item = "".join(f"item {p + 1}: " if isinstance(p, int) else f"{p}: " for p in inner) if several else ""
    if err["type"] == "literal_error" and info is not None and _optional(info.annotation):
        msg += " (or none)"  # the message lists the choices
    line = f"{item}{msg}."
    if info is not None and err["type"] not in ("literal_error", "value_error"):
        line += f" Allowed: {allowed(name, info)}."
    return line


def _where_and_fix(source: str, flagged: int, filed: int, num_problems: int, command: str) -> tuple[str, str]:
    if source == PYTHON_SOURCE:
        return PYTHON_SOURCE, "use the values allowed above"
    if source == FLAGS_SOURCE or (flagged and not filed):
        return FLAGS_SOURCE, f"give the flags named above a value that is allowed (`{command} --help` describes every option)"
    if flagged:
        return (f"{source} and {FLAGS_SOURCE}", f"correct the flags named above on the command line and the other keys "
                f"in {source} (`{command} --help` describes every option)")
    return source, (f"correct {'these keys' if num_problems > 1 else 'this key'} in {source} as said above "
                    f"(`{command} --help` describes every option; its flag names are the keys with dashes)")


def _did_you_mean(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" Did you mean {close[0]}?" if close else ""

