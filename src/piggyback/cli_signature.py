"""Typer options generated from an options dataclass, so each option is written once.

Typer reads a command's options from its function signature. `options_signature` builds that
signature from the `option(...)` fields of a dataclass (`TrainConfig`): one keyword parameter per
field, typed `T | None` with default None so that a flag that was not given can be told from one
that was (a config file fills the rest), with the field's help, flag spelling and help panel.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer

from piggyback.options import Option, base_type, option_fields

__all__ = ["options_signature", "parsed", "with_signature"]


def _help(field: dataclasses.Field, spec: Option, kind: Any) -> str:
    """The field's help with its choices and its default appended."""
    parts = [spec.help]
    if spec.allowed:
        parts.append(" | ".join(spec.allowed) + ".")
    default = _default_text(field, spec, kind)
    if default:
        parts.append(f"(default: {default})")
    return " ".join(parts)


def _default_text(field: dataclasses.Field, spec: Option, kind: Any) -> str:
    if spec.default_text is not None:
        return spec.default_text
    if kind is bool:  # the flag that is in effect, unless the option is a bare on-switch
        return "" if _single(spec) else _bool_flags(field.name, spec)[0 if field.default else 1]
    return "" if field.default is None else str(field.default)


def _single(spec: Option) -> bool:
    """A bare on-switch such as `--strict` (no `--no-strict`)."""
    return spec.flag is not None and "/" not in spec.flag


def _bool_flags(name: str, spec: Option) -> list[str]:
    if spec.flag:
        return spec.flag.split("/")
    flag = name.replace("_", "-")
    return [f"--{flag}", f"--no-{flag}"]


def _parameter(field: dataclasses.Field, spec: Option, annotation: Any) -> inspect.Parameter:
    kind, _ = base_type(annotation)
    cli_type = str if spec.parse is not None else kind
    declarations = [spec.flag] if spec.flag else []
    info = typer.Option(
        *declarations,
        help=_help(field, spec, kind),
        rich_help_panel=spec.panel,
        show_default=False,
        metavar=spec.metavar,
    )
    return inspect.Parameter(
        field.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[cli_type | None, info],
    )


def options_signature(
    cls: type,
    *,
    first: Sequence[str] = (),
    before: Sequence[inspect.Parameter] = (),
    after: Sequence[inspect.Parameter] = (),
) -> inspect.Signature:
    """The fields of `cls` as Typer options: the fields named in `first`, then `before`, then the
    other fields in declaration order, then `after`."""
    fields = {f.name: _parameter(f, spec, hint) for f, spec, hint in option_fields(cls)}
    head = [fields.pop(name) for name in first]
    return inspect.Signature([*head, *before, *fields.values(), *after])


def with_signature(signature: inspect.Signature) -> Callable[[Callable], Callable]:
    """Give a `**options` function the signature Typer should read."""

    def apply(function: Callable) -> Callable:
        function.__signature__ = signature  # type: ignore[attr-defined]
        return function

    return apply


def parsed(cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """Flag values converted by each field's `parse` (None stays "not given")."""
    specs = {f.name: spec for f, spec, _ in option_fields(cls)}
    return {
        name: specs[name].parse(value) if value is not None and specs[name].parse else value
        for name, value in given.items()
    }
