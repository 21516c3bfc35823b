"""The options schema: the engine, per model, declares every option a job takes; hosts build UI from it.

Option names are :class:`JobHeader` field names, so a host can fill a header generically from its UI.
:func:`resolve_header` checks a submitted header against the schema and fills the defaults.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from vera_engine.imaging.composite import DEFAULT_CLIP_BLACK, DEFAULT_CLIP_WHITE
from vera_engine.pipelines.windows import default_window_overlap
from vera_engine.service.errors import InputError
from vera_engine.service.limits import (
    MAX_CHOICE_CHARS,
    MAX_FRAMES,
    MAX_LABEL_CHARS,
    MAX_PROMPT_CHARS,
    MAX_TAKES,
    SEED_MAX,
    SEED_MIN,
    quote,
)
from vera_proto.vera.v1 import engine_pb2 as pb

TASKS = ("object_addition", "background_change")
# Step caches a job may ask for, fastest-for-its-error first after exact sampling (docs/BENCHMARKS.md, "Step
# caching": on the shipped checkpoint taylorseer:2 skips 45% of block work with the matte closest to exact).
STEP_CACHES = ("none", "taylorseer:2", "mag:0.06", "first_block:0.1", "taylorseer:3")
BIT_DEPTHS = ("half", "float")
# The most characters each string field of a JobHeader may have (a ListJobs reply repeats every header).
STRING_LIMITS = {
    "prompt": MAX_PROMPT_CHARS,
    "negative_prompt": MAX_PROMPT_CHARS,
    "name": MAX_LABEL_CHARS,
    "submitted_by": MAX_LABEL_CHARS,
    **dict.fromkeys(
        ("task", "model", "colorspace", "bit_depth", "compression", "step_cache", "lora"), MAX_CHOICE_CHARS
    ),
}
SHOWN_CHOICES = 12  # an error lists at most this many choices (an OCIO config may have hundreds of spaces)


@dataclass(frozen=True)
class ModelDefaults:
    """The per-model numbers the schema is built from."""

    name: str
    native_height: int
    native_width: int
    frame_window: int
    steps: int = 30
    max_steps: int = 200
    guidance: float = 5.0
    max_guidance: float = 30.0
    tasks: Sequence[str] = TASKS
    step_caches: Sequence[str] = STEP_CACHES
    description: str = ""
    weights_hash: str = ""
    # The longest window one sampling pass may have (the model's position tables), and the words a word-level
    # checkpoint reads (empty: free text).
    max_window_frames: int = 0
    vocabulary: Sequence[str] = ()
    # LoRA adapters served for this model (`serve --lora NAME=PATH`); none: no "lora" options.
    loras: Sequence[str] = ()

    @property
    def longest_window(self) -> int:
        """The longest window a job may ask for (the model's own window where its position reach is unknown)."""
        return max(self.max_window_frames, self.frame_window)

    @property
    def window_overlap(self) -> int:
        """The pipeline's default overlap for the model's own window (`pipelines.windows`)."""
        return default_window_overlap(self.frame_window)


def _value(v: int | float | str | bool) -> pb.OptionValue:
    if isinstance(v, bool):
        return pb.OptionValue(bool_value=v)
    if isinstance(v, int):
        return pb.OptionValue(int_value=v)
    if isinstance(v, float):
        return pb.OptionValue(float_value=v)
    return pb.OptionValue(string_value=v)


def prompt_help(model: ModelDefaults) -> str:
    """The prompt's help text: free text for a model that reads it, the model's own words for a word-level one."""
    if not model.vocabulary:
        return "What to add or the new background, in plain words (e.g. 'add a sea turtle swimming left to right')."
    return (
        "What to add or the new background, in the words this model knows (GetInfo lists them), e.g. 'add a red "
        "ball moving from left to right in the upper half' or 'replace the background with a gradient from blue on "
        "the left to orange on the right'."
    )


def options_schema(
    model: ModelDefaults, colorspaces: Sequence[str], compressions: Sequence[str]
) -> list[pb.OptionSpec]:
    """Every option of ``model``, with type, default, range or choices and help."""
    choice, integer, number, text = (
        pb.OPTION_TYPE_CHOICE,
        pb.OPTION_TYPE_INT,
        pb.OPTION_TYPE_FLOAT,
        pb.OPTION_TYPE_STRING,
    )
    return [  # noqa: RUF005 (the table stays one list literal; the adapter options follow it when there are any)
        pb.OptionSpec(name="task", label="Task", type=choice, default=_value(model.tasks[0]), choices=list(model.tasks),
                      help="What kind of edit this is: object_addition (add something to the shot) or background_change "
                      "(replace what is behind the subject). Recorded in the results and used for the defaults; the "
                      "model itself reads what to do from the prompt's words, so say it there too."),
        pb.OptionSpec(name="prompt", label="Prompt", type=text, required=True,
                      help=prompt_help(model)),
        pb.OptionSpec(name="negative_prompt", label="Negative prompt", type=text, default=_value(""),
                      help="What the result should not contain."),
        pb.OptionSpec(name="seed", label="Seed", type=integer, min=SEED_MIN, max=SEED_MAX,
                      help="Same seed + same inputs = same result. Leave unset for a random seed (reported back)."),
        pb.OptionSpec(name="steps", label="Steps", type=integer, default=_value(model.steps), min=1, max=model.max_steps,
                      help="Denoising steps: more is slower and usually cleaner."),
        pb.OptionSpec(name="guidance", label="Guidance", type=number, default=_value(model.guidance), min=1.0,
                      max=model.max_guidance, help="How strongly the prompt steers the result (classifier-free guidance; 1 = off, one pass per step)."),
        pb.OptionSpec(name="takes", label="Takes", type=integer, default=_value(1), min=1, max=MAX_TAKES,
                      help="Variations in one job: take k uses seed + k - 1; each take is its own set of layers "
                      "(vera_edit.####.exr, vera_edit_take2.####.exr, ...)."),
        pb.OptionSpec(name="window_frames", label="Window (frames)", type=integer, default=_value(model.frame_window),
                      min=0, max=model.longest_window,
                      help="Clips longer than this are sampled as overlapping windows blended at every step; 0 samples "
                      "the whole clip in one pass (only up to the maximum)."),
        pb.OptionSpec(name="window_overlap", label="Window overlap (frames)", type=integer,
                      default=_value(model.window_overlap), min=0, max=max(model.longest_window - 1, 0),
                      help="Frames neighbouring windows share; more is smoother and slower."),
        pb.OptionSpec(name="step_cache", label="Speed-up (approximate)", type=choice, default=_value(model.step_caches[0]),
                      choices=list(model.step_caches), help="Skip transformer work on steps that barely change: faster, "
                      "slightly different from exact sampling. none = exact."),
        pb.OptionSpec(name="colorspace", label="Plate colour space", type=choice, default=_value(colorspaces[0]),
                      choices=list(colorspaces), help="The colour space the plate is in (OCIO name): scene-linear, or display-referred video (a clip Resolve rendered); the results come back in it."),
        pb.OptionSpec(name="hdr", label="Keep HDR highlights", type=pb.OPTION_TYPE_BOOL, default=_value(False),
                      help="Roll highlights through the ACES SDR view transform and back instead of clamping them."),
        pb.OptionSpec(name="bit_depth", label="Output bit depth", type=choice, default=_value("half"),
                      choices=list(BIT_DEPTHS), help="half: 16-bit float EXRs; float: 32-bit float EXRs."),
        pb.OptionSpec(name="compression", label="Output compression", type=choice, default=_value("zip"),
                      choices=list(compressions), help="EXR compression of the results; the matte is always lossless."),
        pb.OptionSpec(name="clip_black", label="Matte clip black", type=number, default=_value(DEFAULT_CLIP_BLACK),
                      min=0.0, max=0.5, help="Matte values at or below this become exactly 0, so the plate is kept "
                      "bit for bit there (a keyer's clip black; values between black and white are stretched)."),
        pb.OptionSpec(name="clip_white", label="Matte clip white", type=number, default=_value(DEFAULT_CLIP_WHITE),
                      min=0.5, max=1.0, help="Matte values at or above this become exactly 1 (a keyer's clip white)."),
    ] + lora_options(model)  # fmt: skip


LORA_SCALE_MAX = 2.0


def lora_options(model: ModelDefaults) -> list[pb.OptionSpec]:
    """The adapter options of a model that serves LoRA adapters (none for one that does not)."""
    if not model.loras:
        return []
    return [
        pb.OptionSpec(name="lora", label="Adapter (LoRA)", type=pb.OPTION_TYPE_CHOICE, default=_value("none"),
                      choices=["none", *model.loras],
                      help="A fine-tuned adapter of this model to edit with (trained with `vera-engine train --lora`); "
                      "none = the base model."),
        pb.OptionSpec(name="lora_scale", label="Adapter strength", type=pb.OPTION_TYPE_FLOAT, default=_value(1.0),
                      min=0.0, max=LORA_SCALE_MAX,
                      help="How strongly the adapter applies: 0 = not at all, 1 = as trained."),
    ]  # fmt: skip


def model_info(model: ModelDefaults, colorspaces: Sequence[str], compressions: Sequence[str]) -> pb.ModelInfo:
    """The GetInfo entry of one model."""
    return pb.ModelInfo(
        name=model.name,
        description=model.description,
        native_width=model.native_width,
        native_height=model.native_height,
        frame_window=model.frame_window,
        tasks=list(model.tasks),
        options=options_schema(model, colorspaces, compressions),
        weights_hash=model.weights_hash,
        max_window_frames=model.max_window_frames,
        vocabulary=list(model.vocabulary),
    )


def _spec(info: pb.ModelInfo, name: str) -> pb.OptionSpec:
    return next(o for o in info.options if o.name == name)


def _check_range(info: pb.ModelInfo, name: str, value: float) -> None:
    spec = _spec(info, name)
    if (
        not math.isfinite(value)
        or (spec.HasField("min") and value < spec.min)
        or (spec.HasField("max") and value > spec.max)
    ):
        # Integers as integers: a seed range printed with %g would read 9.0072e+15.
        bounds = (
            f"{spec.min:.0f}..{spec.max:.0f}"
            if spec.type == pb.OPTION_TYPE_INT
            else f"{spec.min:g}..{spec.max:g}"
        )
        raise InputError(f"header.{name}", f"{value} is out of range; expected {bounds}")


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(quote(n) for n in names[:SHOWN_CHOICES])
    return shown + (f" ... ({len(names)} in all; GetInfo lists them)" if len(names) > SHOWN_CHOICES else "")


def _check_choice(info: pb.ModelInfo, header: pb.JobHeader, name: str) -> None:
    spec = _spec(info, name)
    value = getattr(header, name) or spec.default.string_value
    if value not in spec.choices:
        raise InputError(f"header.{name}", f"{quote(value)} is not one of {_listing(spec.choices)}")
    setattr(header, name, value)


def check_string_lengths(header: pb.JobHeader) -> None:
    """Refuse any string field of ``header`` longer than its limit (``STRING_LIMITS``), before anything else."""
    for name, limit in STRING_LIMITS.items():
        length = len(getattr(header, name))
        if length > limit:
            raise InputError(f"header.{name}", f"is {length} characters; at most {limit}")


def resolve_header(header: pb.JobHeader, models: Sequence[pb.ModelInfo]) -> pb.JobHeader:
    """Validate a submitted header against the schema; returns a copy with every default filled in.

    Raises :class:`InputError` naming the field.
    """
    out = pb.JobHeader()
    out.CopyFrom(header)
    check_string_lengths(out)
    if not models:
        raise InputError("header.model", "this engine serves no model")
    if out.model:
        info = next((m for m in models if m.name == out.model), None)
        if info is None:
            raise InputError(
                "header.model",
                f"{quote(out.model)} is not served here; models: {_listing([m.name for m in models])}",
            )
    else:
        info = models[0]
        out.model = info.name
    if not out.prompt.strip():
        raise InputError("header.prompt", "is empty; describe the edit, e.g. 'add a red ball rolling left'")
    for name in ("task", "step_cache", "colorspace", "bit_depth", "compression"):
        _check_choice(info, out, name)
    _resolve_lora(info, out)
    if out.HasField("seed"):
        _check_range(info, "seed", out.seed)
    else:
        out.seed = secrets.randbelow(2**31)
    if out.HasField("steps"):
        _check_range(info, "steps", out.steps)
    else:
        out.steps = _spec(info, "steps").default.int_value
    if out.HasField("guidance"):
        _check_range(info, "guidance", out.guidance)
    else:
        out.guidance = _spec(info, "guidance").default.float_value
    _resolve_windows_and_takes(info, out)
    _resolve_clip(info, out)
    frames = list(out.frames)
    if not frames:
        raise InputError("header.frames", "is empty; list the plate's frame numbers (e.g. 1001..1100)")
    if len(frames) > MAX_FRAMES:
        raise InputError("header.frames", f"has {len(frames)} frames; at most {MAX_FRAMES} per job")
    if len(set(frames)) != len(frames):
        seen: set[int] = set()
        dup = next(f for f in frames if f in seen or seen.add(f))  # type: ignore[func-returns-value]
        raise InputError("header.frames", f"frame {dup} is listed twice; each frame number must appear once")
    return out


def _resolve_clip(info: pb.ModelInfo, header: pb.JobHeader) -> None:
    """Check (and fill) the matte's clip black and clip white: each in range, black below white."""
    for name in ("clip_black", "clip_white"):
        if header.HasField(name):
            _check_range(info, name, getattr(header, name))
        else:
            setattr(header, name, _spec(info, name).default.float_value)
    if header.clip_black >= header.clip_white:
        raise InputError(
            "header.clip_black",
            f"{header.clip_black:g} is not below clip_white {header.clip_white:g}; expected clip_black < clip_white",
        )


def _resolve_lora(info: pb.ModelInfo, header: pb.JobHeader) -> None:
    """Check (and fill) the adapter and its strength against the adapters the model serves."""
    if not any(o.name == "lora" for o in info.options):
        if header.lora not in ("", "none"):
            raise InputError(
                "header.lora", f"{quote(header.lora)}: model {quote(info.name)} serves no adapters"
            )
        if header.HasField("lora_scale"):
            raise InputError("header.lora_scale", f"model {quote(info.name)} serves no adapters")
        return
    _check_choice(info, header, "lora")
    if header.HasField("lora_scale"):
        _check_range(info, "lora_scale", header.lora_scale)
    else:
        header.lora_scale = 1.0


def _resolve_windows_and_takes(info: pb.ModelInfo, header: pb.JobHeader) -> None:
    """Check (and fill) takes, window_frames and window_overlap against the model's limits."""
    if header.takes:
        _check_range(info, "takes", header.takes)
    else:
        header.takes = 1
    window = header.window_frames if header.HasField("window_frames") else info.frame_window
    if header.HasField("window_frames"):
        _check_range(info, "window_frames", window)
    overlap_spec = _spec(info, "window_overlap")
    if header.HasField("window_overlap"):
        if window and header.window_overlap >= window:
            raise InputError(
                "header.window_overlap",
                f"{header.window_overlap} frames; expected fewer than window_frames ({window})",
            )
        _check_range(info, "window_overlap", header.window_overlap)
    elif header.HasField("window_frames"):
        header.window_overlap = default_window_overlap(window)
    else:
        header.window_overlap = overlap_spec.default.int_value
    header.window_frames = window
    longest = info.max_window_frames
    one_pass = window == 0 or len(header.frames) <= window
    if longest and one_pass and len(header.frames) > longest:
        raise InputError(
            "header.window_frames",
            f"{window} samples the {len(header.frames)} frames in one pass, but this model's positions reach "
            f"{longest} frames; use window_frames 1..{longest} (default {info.frame_window})",
        )
