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

The sections themselves live in :mod:`unetseg.config`, the flags in
:mod:`unetseg.flags`; a model's section is its options class in
:mod:`unetseg.models`.
"""

from __future__ import annotations

import contextvars
import difflib
import types
import typing
from typing import Any, ClassVar, Literal

import annotated_types
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
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


SIZE_ALLOWED = "H,W or one size for both (whole numbers >= 1), e.g. 256 or 360,480"


def explained(text: str) -> dict[str, Any]:
    """``Field(json_schema_extra=explained(...))``: what a field accepts, for fields whose
    type and bounds do not say it (an H,W pair, a min,max range)."""
    return {"allowed": text}


def allowed(name: str, info: FieldInfo) -> str:
    """What a field accepts, in words: 'a whole number >= 1', 'one of batch, group, none'."""
    annotation = info.annotation
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
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
    where, fix = _where_and_fix(source, flagged, filed, len(problems))
    return cls.error_class(problems, where, fix)


def _problem(err: Any, loc: tuple[Any, ...], data: dict[str, Any], sections: dict[str, type[Options]],
             from_flags: frozenset[tuple[str, str]]) -> tuple[str, bool]:
    """One line for one pydantic error, and whether its value came from a flag."""
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
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
    several = isinstance(value, (list, tuple)) or (isinstance(value, str) and "," in value)
    item = "".join(f"item {p + 1}: " if isinstance(p, int) else f"{p}: " for p in loc[2:]) if several else ""
    if err["type"] == "literal_error" and name in cls_fields and _optional(cls_fields[name].annotation):
        msg += " (or none)"  # the message lists the choices
    line = f"{key} = {_short(value)}: {item}{msg}."
    if name in cls_fields and err["type"] not in ("literal_error", "value_error"):
        line += f" Allowed: {allowed(name, cls_fields[name])}."
    return line, by_flag


def _where_and_fix(source: str, flagged: int, filed: int, num_problems: int) -> tuple[str, str]:
    if source == PYTHON_SOURCE:
        return PYTHON_SOURCE, "use the values allowed above"
    if source == FLAGS_SOURCE or (flagged and not filed):
        return FLAGS_SOURCE, "give the flags named above a value that is allowed (`unetseg train --help` describes every option)"
    if flagged:
        return (f"{source} and {FLAGS_SOURCE}", f"correct the flags named above on the command line and the other keys "
                f"in {source} (`unetseg train --help` describes every option)")
    return source, (f"correct {'these keys' if num_problems > 1 else 'this key'} in {source} as said above "
                    "(`unetseg train --help` describes every option; its flag names are the keys with dashes)")


def _did_you_mean(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" Did you mean {close[0]}?" if close else ""

