"""Host-neutral UI fields built from the engine's options schema (``GetInfo``), and the way back to a job.

Nuke knobs and the Qt panel are both built from :func:`fields_for_model`; what the artist typed goes back
through :func:`job_options`, which checks every value against the schema and names the field at fault.
Needs only protobuf (no Nuke, no Qt).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from vera_proto.vera.v1 import engine_pb2 as pb

__all__ = [
    "AUTO_COLORSPACE",
    "Field",
    "OptionsError",
    "fields_for_model",
    "find_model",
    "job_options",
    "model_from_json",
    "model_to_json",
    "resolve_colorspace",
    "unknown_words",
    "vocabulary_note",
    "words_of",
]

# The first choice of the colour space field: use whatever working space the host's script declares.
AUTO_COLORSPACE = "script working space"

_KINDS = {
    pb.OPTION_TYPE_INT: "int",
    pb.OPTION_TYPE_FLOAT: "float",
    pb.OPTION_TYPE_STRING: "string",
    pb.OPTION_TYPE_BOOL: "bool",
    pb.OPTION_TYPE_CHOICE: "choice",
}


class OptionsError(ValueError):
    """A UI value does not fit the engine's schema; ``field`` names the option."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Field:
    """One option as a UI control.

    ``kind`` is ``"int"``, ``"float"``, ``"string"``, ``"text"`` (multi-line string), ``"bool"`` or
    ``"choice"``. ``default`` is ``None`` where the engine draws the value itself (the seed). ``randomise``
    marks integer fields that get a "randomise" button (the seed).
    """

    name: str
    label: str
    kind: str
    default: int | float | str | bool | None
    minimum: float | None
    maximum: float | None
    choices: tuple[str, ...]
    help: str
    required: bool
    randomise: bool = False


def _default(spec: pb.OptionSpec) -> int | float | str | bool | None:
    which = spec.default.WhichOneof("value")
    return getattr(spec.default, which) if which else None


def fields_for_model(model: pb.ModelInfo) -> list[Field]:
    """The model's options as UI fields, in the engine's order.

    Prompts (string options whose name ends in ``prompt``) become multi-line text; the colour space choice
    gets :data:`AUTO_COLORSPACE` as its first choice and default, so a host follows its script's working space.
    """
    fields: list[Field] = []
    for spec in model.options:
        kind = _KINDS.get(spec.type)
        if kind is None:
            raise OptionsError(
                spec.name, f"the engine declares unknown option type {spec.type}; update vera_plugin"
            )
        if kind == "string" and spec.name.endswith("prompt"):
            kind = "text"
        choices = tuple(spec.choices)
        default = _default(spec)
        if spec.name == "colorspace" and kind == "choice":
            choices = (AUTO_COLORSPACE, *choices)
            default = AUTO_COLORSPACE
        fields.append(
            Field(
                name=spec.name,
                label=spec.label or spec.name,
                kind=kind,
                default=default,
                minimum=spec.min if spec.HasField("min") else None,
                maximum=spec.max if spec.HasField("max") else None,
                choices=choices,
                help=spec.help,
                required=spec.required,
                randomise=kind == "int" and default is None,
            )
        )
    return fields


def find_model(info: pb.EngineInfo, name: str = "") -> pb.ModelInfo:
    """The model called ``name``, or the engine's default model when ``name`` is empty."""
    if not info.models:
        raise OptionsError("model", "the engine serves no model; start it with --model")
    if not name:
        return next((m for m in info.models if m.is_default), info.models[0])
    for model in info.models:
        if model.name == name:
            return model
    served = ", ".join(m.name for m in info.models)
    raise OptionsError("model", f"{name!r} is not served by this engine; choose one of: {served}")


def model_to_json(model: pb.ModelInfo) -> str:
    """The model's schema as compact JSON, to keep it in a saved script (so it reopens without the engine)."""
    return json.dumps(json_format.MessageToDict(model, preserving_proto_field_name=True), sort_keys=True)


def model_from_json(text: str) -> pb.ModelInfo:
    """The inverse of :func:`model_to_json`."""
    return json_format.Parse(text, pb.ModelInfo())


# Working-space names hosts use for the engine's choices (Nuke's default config calls Rec.709 linear "linear").
_ALIASES = {
    "acescg": "ACEScg",
    "aces - acescg": "ACEScg",
    "acescg (aces)": "ACEScg",
    "lin_ap1": "ACEScg",
    "lin_ap1_scene": "ACEScg",
    "linear": "Linear Rec.709 (sRGB)",
    "lin_rec709": "Linear Rec.709 (sRGB)",
    "lin_rec709_scene": "Linear Rec.709 (sRGB)",
    "lin_srgb": "Linear Rec.709 (sRGB)",
    "utility - linear - srgb": "Linear Rec.709 (sRGB)",
    "utility - linear - rec.709": "Linear Rec.709 (sRGB)",
    "scene_linear": "",  # a role, not a space: ambiguous on its own
}


def resolve_colorspace(value: str, working_space: str, choices: Sequence[str]) -> str:
    """The engine colour space to declare for a plate.

    ``value`` is the field's value; :data:`AUTO_COLORSPACE` means the host's ``working_space`` (e.g. Nuke's
    ``root['workingSpaceLUT']``), matched against the engine's ``choices`` by name, case-insensitively or
    through well-known aliases.
    """
    if value != AUTO_COLORSPACE:
        if value not in choices:
            raise OptionsError("colorspace", f"{value!r} is not one of {', '.join(choices)}")
        return value
    wanted = working_space.strip()
    by_lower = {c.lower(): c for c in choices}
    match = by_lower.get(wanted.lower()) or _ALIASES.get(wanted.lower(), "")
    if match in choices:
        return match
    raise OptionsError(
        "colorspace",
        f"the script's working space {working_space!r} is not one the engine knows ({', '.join(choices)}); "
        "pick the plate's colour space explicitly on the node",
    )


def job_options(
    fields: Sequence[Field], values: Mapping[str, Any], working_space: str = ""
) -> tuple[str, dict[str, Any]]:
    """Check UI ``values`` against ``fields``; returns ``(prompt, options)`` for ``EngineClient.submit_*``.

    Missing values take the field's default; an int field left ``None`` (the seed) is drawn by the engine.
    """
    options: dict[str, Any] = {}
    prompt = ""
    for field in fields:
        value = values.get(field.name, field.default)
        if field.kind in ("string", "text"):
            value = "" if value is None else str(value)
            if field.required and not value.strip():
                raise OptionsError(field.name, f"is empty; {field.help or 'fill it in'}")
        elif field.kind == "bool":
            value = bool(value)
        elif field.kind == "choice":
            value = str(value)
            if field.name == "colorspace":
                engine_choices = tuple(c for c in field.choices if c != AUTO_COLORSPACE)
                value = resolve_colorspace(value, working_space, engine_choices)
            elif value not in field.choices:
                raise OptionsError(field.name, f"{value!r} is not one of {', '.join(field.choices)}")
        elif value is not None:
            number = float(value)
            if number != number or (field.kind == "int" and number != int(number)):
                raise OptionsError(field.name, f"{value!r} is not a whole number")
            low = field.minimum if field.minimum is not None else -float("inf")
            high = field.maximum if field.maximum is not None else float("inf")
            if not low <= number <= high:
                raise OptionsError(field.name, f"{value!r} is out of range; expected {low:g}..{high:g}")
            value = int(number) if field.kind == "int" else number
        if field.name == "prompt":
            prompt = value
        else:
            options[field.name] = value
    if not any(f.name == "prompt" for f in fields):
        raise OptionsError("prompt", "the engine's schema has no prompt option; update vera_plugin")
    return prompt, options


# What a word-level checkpoint's tokenizer splits a prompt into: runs of word characters and runs of other
# non-space characters, lower-cased (the engine's `word_tokenizer.words_of`, written again here because the host
# side never imports the engine).
_WORD = re.compile(r"\w+|[^\w\s]+")


def words_of(text: str) -> list[str]:
    """The words a word-level model reads in ``text``: lower-cased, punctuation split off (``"Kite," -> kite ,``)."""
    return _WORD.findall(text.lower())


def unknown_words(text: str, vocabulary: Iterable[str]) -> list[str]:
    """The words of ``text`` not in ``vocabulary``, each once, in order; none when the vocabulary is empty
    (``ModelInfo.vocabulary`` empty: the model reads free text)."""
    known = set(vocabulary)
    if not known:
        return []
    unknown: list[str] = []
    for word in words_of(text):
        if word not in known and word not in unknown:
            unknown.append(word)
    return unknown


def vocabulary_note(text: str, model: pb.ModelInfo) -> str:
    """A status line for the prompt: ``"unknown to this model: kite, quickly"``, or ``""`` when every word is
    known or the model reads free text."""
    words = unknown_words(text, model.vocabulary)
    return f"unknown to this model: {', '.join(words)}" if words else ""
