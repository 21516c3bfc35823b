"""Command-line flags made from a config dataclass, so that each setting's default and help live in one place.

Each field becomes `--field-name` (or `metadata["flag"]`), with its help from `metadata["help"]` and its default
shown from the dataclass. argparse itself keeps `None` as every default, so `given(args, name)` can tell what the
user typed; `config_from_arguments` fills in the dataclass's own defaults for the rest.

What a field's annotation and default make of its flag:

- a `bool` defaulting to False: a switch (`store_true`);
- a `bool | None` defaulting to None: `--name` / `--no-name` (None: neither given, the program decides);
- a `list[T]` (its default a list, from `default_factory`): a repeatable flag, one `T` per use;
- a required field, or one defaulting to None: parsed as its annotation's type (`Path`, `int`, ...);
- any other: parsed as the type of its default.

Field metadata: `help`, `flag`, `parse` (text -> value, for fields such as dicts) with `show` (value -> text, for
the help), `choices`, `nargs`, `metavar`, `type` (overrides the annotation's), `group` (the title of the argument
group the flag is listed under in `--help`), `show_default` (False: the help states the default in its own words,
or there is none to state; nothing is appended).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _annotations(config_class: type) -> dict[str, Any]:
    """Each field's annotation as a type. A module that names types only under TYPE_CHECKING cannot be resolved:
    then no annotation is used, and such fields say their `type` in metadata, as before annotations were read."""
    try:
        return typing.get_type_hints(config_class)
    except (NameError, TypeError):
        return {}


def _without_none(hint: Any) -> Any:
    """`T` for `T | None` (or `Optional[T]`); the hint itself otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return hint


def _parse_type(hint: Any) -> Any:
    """The callable argparse converts the text with for a field annotated `hint`, or None (text as it is)."""
    hint = _without_none(hint)
    if isinstance(hint, type) and hint is not str and hint is not bool:
        return hint
    return None


def add_config_arguments(
    parser: argparse.ArgumentParser, config_class: type, skip: tuple[str, ...] = ()
) -> None:
    """One flag per field of `config_class` (a dataclass), except those in `skip`, in the fields' order."""
    hints = _annotations(config_class)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(config_class):
        if field.name in skip:
            continue
        meta = field.metadata
        flag = meta.get("flag", "--" + field.name.replace("_", "-"))
        default = _default(field)
        required = default is dataclasses.MISSING
        hint = hints.get(field.name)
        help_text = meta.get("help", "")
        kwargs: dict[str, Any] = {"dest": field.name, "default": None}
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        elif default is None and _without_none(hint) is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if isinstance(default, list):
                # Repeatable: argparse starts from None (not the dataclass's list) so that `given` still works.
                kwargs["action"] = "append"
                (item,) = typing.get_args(hint) or (None,)
                item_type = meta.get("type", _parse_type(item))
                if item_type is not None:
                    kwargs["type"] = item_type
            elif "parse" in meta:
                kwargs["type"] = meta["parse"]
            elif "type" in meta:
                kwargs["type"] = meta["type"]
            elif required or default is None:
                if _parse_type(hint) is not None:
                    kwargs["type"] = _parse_type(hint)
            else:
                kwargs["type"] = type(default)
            for key in ("choices", "nargs", "metavar"):
                if key in meta:
                    kwargs[key] = meta[key]
            if required:
                kwargs["required"] = True
            elif meta.get("show_default", True):
                shown = meta["show"](default) if "show" in meta else default
                help_text = f"{help_text} (default: {shown})" if help_text else f"default: {shown}"
        kwargs["help"] = help_text.replace("%", "%%") or None
        target: argparse.ArgumentParser | argparse._ArgumentGroup = parser
        if "group" in meta:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]]
        target.add_argument(flag, **kwargs)


def given(args: argparse.Namespace, name: str) -> bool:
    """Whether the user gave the flag of field `name` (flags made here default to None)."""
    return getattr(args, name, None) is not None


def config_from_arguments(config_class: type, args: argparse.Namespace, **extra: Any) -> Any:
    """A `config_class` instance from parsed flags: given values, else the dataclass's defaults.

    A repeatable flag's values stay a list (the field is a list); a fixed count of values (`nargs`) becomes a tuple.
    """
    values: dict[str, Any] = {}
    for field in dataclasses.fields(config_class):
        value = getattr(args, field.name, None)
        if value is None:
            continue
        if isinstance(value, list) and not isinstance(_default(field), list):
            value = tuple(value)
        values[field.name] = value
    return config_class(**{**values, **extra})
