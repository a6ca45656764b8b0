"""An option written once: a dataclass field that carries its help, flag and valid values.

`option(default, help, ...)` declares a field of an options dataclass (`TrainConfig`) together with
what the command line needs (help text, flag spelling, help panel) and what any source of values
must respect (a numeric range, a list of choices). The CLI builds its flags from these fields
(`piggyback.cli_signature`), and `check_option` validates a value from a flag, a config file or
Python against the same declaration, so the three can never disagree.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Option", "base_type", "check_option", "flag_name", "option", "option_fields"]


@dataclass(frozen=True)
class Option:
    """What a field means as an option. Ranges are inclusive unless `*_open`."""

    help: str
    panel: str = "Options"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    #: Valid values, or a function giving them (a registry's names, which may grow at run time).
    choices: tuple[str, ...] | Callable[[], list[str]] = ()
    #: Click flag declaration when not the default `--name/--no-name` (booleans) or `--name`.
    flag: str | None = None
    #: Shown as "(default: ...)" when the field's default (None) is resolved later.
    default_text: str | None = None
    #: Command-line text -> value, for a field whose type is not a plain str/int/float/bool.
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None

    @property
    def allowed(self) -> tuple[str, ...]:
        """The valid values (empty: any)."""
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def describe(self, kind: type) -> str:
        """What a valid value is, for error messages: 'a number > 0 and <= 10'."""
        if self.allowed:
            return f"one of {', '.join(self.allowed)}"
        noun = "a whole number" if kind is int else "a finite number"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " ".join([noun, " and ".join(bounds)]).strip()

    def allows(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


def option(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field with its `Option` (see the module docstring)."""
    return dataclasses.field(default=default, metadata={"option": Option(help, **spec)})


def flag_name(name: str, spec: Option) -> str:
    """The command-line flag of field `name`: `--batch-size`, or the first of `spec.flag`."""
    if spec.flag:
        return spec.flag.split("/")[0]
    return "--" + name.replace("_", "-")


def option_fields(cls: type) -> list[tuple[dataclasses.Field, Option, Any]]:
    """(field, its Option, its resolved type) for each option field of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    return [
        (f, f.metadata["option"], hints[f.name])
        for f in dataclasses.fields(cls)
        if "option" in f.metadata
    ]


def base_type(annotation: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed): `float | None` -> (float, True)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def check_option(label: str, value: Any, spec: Option, annotation: Any) -> Any:
    """`value` checked (and numbers from text files converted) for a field of `annotation`.

    `label` names the option in the message ('--lr', or 'lr in run.yaml'). A ValueError says what
    a valid value is: finite numbers in range, whole numbers for integer options, the choices.
    """
    kind, optional = base_type(annotation)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{label} needs a value ({spec.describe(kind)})")
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        wanted = f"{label} must be a list, each entry {spec.describe(item)}, got {value!r}"
        if not isinstance(value, list | tuple):
            raise ValueError(wanted)
        try:
            return [check_option(label, entry, spec, item) for entry in value]
        except ValueError:
            raise ValueError(wanted) from None
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{label} must be true or false, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{label} must be text, got {value!r}")
        if spec.allowed and value not in spec.allowed:
            raise ValueError(f"{label} must be {spec.describe(kind)}, got {value!r}")
        return value
    return _check_number(label, value, spec, kind)


def _check_number(label: str, value: Any, spec: Option, kind: type) -> int | float:
    number = _as_number(value, kind)
    if number is None or not math.isfinite(number) or not spec.allows(number):
        raise ValueError(f"{label} must be {spec.describe(kind)}, got {value!r}")
    return number


def _as_number(value: Any, kind: type) -> int | float | None:
    """The number `value` stands for, or None. Text is accepted because YAML reads `1e-3`
    (no dot) as a string; booleans are not numbers here."""
    if isinstance(value, str):
        try:
            value = float(value) if kind is float else int(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if kind is int:
        return value if isinstance(value, int) else None
    return float(value)
