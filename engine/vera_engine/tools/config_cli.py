"""Command-line flags made from a config dataclass, so that each setting's default and help live in one place.

Each field becomes `--field-name` (or `metadata["flag"]`), with its help from `metadata["help"]` and its default
shown from the dataclass. argparse itself keeps `None` as every default, so `given(args, name)` can tell what the
user typed; `config_from_arguments` fills in the dataclass's own defaults for the rest.

Field metadata: `help`, `flag`, `parse` (text -> value, for fields such as dicts) with `show` (value -> text, for
the help), `choices`, `nargs`, `metavar`, `type` (for fields whose default is None).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def add_config_arguments(
    parser: argparse.ArgumentParser, config_class: type, skip: tuple[str, ...] = ()
) -> None:
    """One flag per field of `config_class` (a dataclass), except those in `skip`."""
    for field in dataclasses.fields(config_class):
        if field.name in skip:
            continue
        meta = field.metadata
        flag = meta.get("flag", "--" + field.name.replace("_", "-"))
        default = _default(field)
        required = default is dataclasses.MISSING
        help_text = meta.get("help", "")
        kwargs: dict[str, Any] = {"dest": field.name, "default": None}
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        else:
            if "parse" in meta:
                kwargs["type"] = meta["parse"]
            elif "type" in meta:
                kwargs["type"] = meta["type"]
            elif not required and default is not None:
                kwargs["type"] = type(default)
            for key in ("choices", "nargs", "metavar"):
                if key in meta:
                    kwargs[key] = meta[key]
            if required:
                kwargs["required"] = True
            else:
                shown = meta["show"](default) if "show" in meta else default
                help_text = f"{help_text} (default: {shown})" if help_text else f"default: {shown}"
        kwargs["help"] = help_text.replace("%", "%%") or None
        parser.add_argument(flag, **kwargs)


def given(args: argparse.Namespace, name: str) -> bool:
    """Whether the user gave the flag of field `name` (flags made here default to None)."""
    return getattr(args, name, None) is not None


def config_from_arguments(config_class: type, args: argparse.Namespace, **extra: Any) -> Any:
    """A `config_class` instance from parsed flags: given values, else the dataclass's defaults."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(config_class):
        value = getattr(args, field.name, None)
        if value is None:
            continue
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return config_class(**{**values, **extra})
