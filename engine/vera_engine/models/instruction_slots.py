"""Structured conditioning for small checkpoints: an instruction read into slot tokens.

A model trained from scratch on a CPU cannot learn from a few thousand steps that "from left to right" and "from
right to left" (the same words in another order) mean opposite motions: measured on the first `vera-tiny`, swapping
them moved the predicted matte by 0.000 of the frame (docs/TINY_MODEL.md). A real checkpoint's umT5 reads word
order; a tiny one gets the facts an instruction states as one token per fact instead, each named by its role
("motion_right_to_left", "first_red", "second_blue"), so no fact depends on word order. The tokens go through the
checkpoint's own word tokenizer, text encoder and cross-attention like any prompt.

`read_instruction` is the reader: it finds the task, the object's colour, shape, size, motion and place, or the new
background's kind, colours, sides and orientation, in the phrasings the synthetic generator writes (both its
training and its reworded wordings, and their mirror images). `slot_text` writes the facts as the token sentence the
model reads. What the reader cannot place is reported (`InstructionSlots.unread`), and words outside the model's
vocabulary are still flagged by the hosts as for any word-level checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# The words that name each fact, as the synthetic generator writes them (training/data/synthetic.py).
COLOURS = (
    "red",
    "orange",
    "yellow",
    "green",
    "cyan",
    "blue",
    "purple",
    "pink",
    "white",
    "black",
    "grey",
    "brown",
)
SHAPE_WORDS = {
    "circle": "circle",
    "disc": "circle",
    "ball": "circle",
    "square": "square",
    "box": "square",
    "triangle": "triangle",
    "diamond": "diamond",
    "rhombus": "diamond",
    "hexagon": "hexagon",
    "star": "star",
    "ring": "ring",
    "donut": "ring",
    "cross": "cross",
    "plus": "cross",
}
SIZE_WORDS = {"small": "small", "tiny": "small", "little": "small", "large": "large", "big": "large"}
BACKGROUND_KIND_WORDS = {
    "radial": "radial",
    "gradient": "gradient",
    "stripes": "stripes",
    "checkerboard": "checkerboard",
    "clouds": "clouds",
    "dots": "dots",
}
ORIENTATIONS = ("vertical", "horizontal", "diagonal")

# Motion phrases, most specific first: a phrase is removed from the text once read, so "from top to bottom" is not
# also read as a place ("top").
_MOTION_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bleft to right\b", "left_to_right"),
    (r"\bright to left\b", "right_to_left"),
    (r"\btop to bottom\b", "top_to_bottom"),
    (r"\bbottom to top\b", "bottom_to_top"),
    (r"\b(?:to the right|rightwards|moves right|move it right)\b", "left_to_right"),
    (r"\b(?:to the left|leftwards|moves left|move it left)\b", "right_to_left"),
    (
        r"\b(?:downwards|falling down|falling|moving down|going down|sliding down|moves down|move it down)\b",
        "top_to_bottom",
    ),
    (r"\b(?:upwards|rising up|rising|moving up|going up|floating up|moves up|move it up)\b", "bottom_to_top"),
    (
        r"\b(?:stays still|stays at rest|does not move|not moving|standing still|at rest|keep it still|still)\b",
        "static",
    ),
)
_VERTICAL_PLACE = (
    (r"\b(?:top|upper)\b", "upper"),
    (r"\b(?:bottom|lower)\b", "lower"),
    (r"\bmid-height\b", "middle"),
)
_HORIZONTAL_PLACE = ((r"\bleft\b", "left"), (r"\bright\b", "right"), (r"\bcentral column\b", "center"))
_MIDDLE = r"\b(?:middle|centre|center|central)\b"

# Where a background colour is said to be: "on the left", "at the top", "in the top-left corner", "in the middle",
# "at the edges". Read in the order the colours are named.
_SIDE_PATTERNS = (
    (r"in the (top|bottom)-(left|right) corner", None),
    (r"on the (left|right)", None),
    (r"at the (top|bottom)", None),
    (r"in the (middle)", None),
    (r"at the (edges)", None),
)


@dataclass
class InstructionSlots:
    """The facts an instruction states, as the slot reader found them (None: not stated or not read)."""

    task: str
    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    motion: str | None = None
    place: str | None = None
    background_kind: str | None = None
    background_colours: list[str] = field(default_factory=list)
    background_sides: list[str] = field(default_factory=list)
    orientation: str | None = None
    unread: list[str] = field(default_factory=list)


def _words(text: str) -> str:
    return " " + re.sub(r"[^a-z\-]+", " ", text.lower()) + " "


def _background_part(text: str) -> str:
    """The part of a background-change instruction that describes the new background (the subject cut out)."""
    # The kept subject is "the <colour> <shape word>"; everything else describing colours is the background.
    shapes = "|".join(sorted(SHAPE_WORDS, key=len, reverse=True))
    colours = "|".join(COLOURS)
    return re.sub(rf"\bthe (?:{colours}) (?:{shapes})\b", " ", text)


def _read_background(text: str, slots: InstructionSlots) -> None:
    part = _background_part(text)
    kinds = [
        (m.start(), kind)
        for word, kind in BACKGROUND_KIND_WORDS.items()
        for m in re.finditer(rf"\b{word}\b", part)
    ]
    if kinds:
        slots.background_kind = min(kinds)[1]
    else:
        slots.unread.append("background kind")
    # Polka dots name their dot colour first ("red polka dots on a blue background"); every other kind names its
    # first colour first.
    found = [(m.start(), m.group(0)) for m in re.finditer(rf"\b(?:{'|'.join(COLOURS)})\b", part)]
    slots.background_colours = [colour for _, colour in sorted(found)][:2]
    if len(slots.background_colours) < 2:
        slots.unread.append("two background colours")
    sides: list[tuple[int, str]] = []
    for pattern, _ in _SIDE_PATTERNS:
        for m in re.finditer(pattern, part):
            sides.append((m.start(), "_".join(m.groups())))
    slots.background_sides = [side for _, side in sorted(sides)][:2]
    orientations = [o for o in ORIENTATIONS if re.search(rf"\b{o}\b", part)]
    if orientations:
        slots.orientation = orientations[0]
        # Diagonal stripes say which way they run ("running from top left to bottom right").
        if orientations[0] == "diagonal":
            m = re.search(r"from (?:the )?(top|bottom) (left|right)", part)
            if m:
                slots.orientation = f"diagonal_{m.group(1)}_{m.group(2)}"
    if slots.background_kind == "gradient" and len(slots.background_sides) < 2:
        slots.unread.append("the gradient's two sides")
    if slots.background_kind == "stripes" and slots.orientation is None:
        slots.unread.append("the stripes' orientation")


def _read_object(text: str, slots: InstructionSlots) -> None:
    shapes = "|".join(sorted(SHAPE_WORDS, key=len, reverse=True))
    colours = "|".join(COLOURS)
    m = re.search(rf"\b({colours}) ({shapes})\b", text)
    if m:
        slots.colour, slots.shape = m.group(1), SHAPE_WORDS[m.group(2)]
    else:
        colour = re.search(rf"\b({colours})\b", text)
        shape = re.search(rf"\b({shapes})\b", text)
        slots.colour = colour.group(1) if colour else None
        slots.shape = SHAPE_WORDS[shape.group(1)] if shape else None
    if slots.colour is None:
        slots.unread.append("the object's colour")
    if slots.shape is None:
        slots.unread.append("the object's shape")
    sizes = [SIZE_WORDS[w] for w in re.findall(r"\b(\w+)\b", text) if w in SIZE_WORDS]
    slots.size = sizes[0] if sizes else "medium"

    rest = text
    for pattern, motion in _MOTION_PATTERNS:
        if re.search(pattern, rest):
            slots.motion = motion
            rest = re.sub(pattern, " ", rest)
            break
    if slots.motion is None:
        slots.unread.append("the motion")
    vertical = next((name for pattern, name in _VERTICAL_PLACE if re.search(pattern, rest)), None)
    horizontal = next((name for pattern, name in _HORIZONTAL_PLACE if re.search(pattern, rest)), None)
    middle = re.search(_MIDDLE, rest) is not None
    if slots.motion in ("left_to_right", "right_to_left"):
        slots.place = vertical or ("middle" if middle else None)
    elif slots.motion in ("top_to_bottom", "bottom_to_top"):
        slots.place = horizontal or ("center" if middle else None)
    elif slots.motion == "static":
        if vertical and horizontal:
            slots.place = f"{vertical}_{horizontal}"
        elif middle or (vertical == "middle"):
            slots.place = "middle_center"
    if slots.place is None:
        slots.unread.append("the place")


def read_instruction(instruction: str) -> InstructionSlots:
    """The facts `instruction` states (see the module docstring for what is read)."""
    text = _words(instruction)
    # A background change names the background (or what stands in front of it) or describes a pattern; an object
    # addition never does.
    kinds = "|".join(BACKGROUND_KIND_WORDS)
    is_background = re.search(rf"\b(?:background|backdrop|behind|in front of|{kinds})\b", text) is not None
    slots = InstructionSlots(task="background_change" if is_background else "object_addition")
    if is_background:
        _read_background(text, slots)
    else:
        _read_object(text, slots)
    return slots


def slot_text(slots: InstructionSlots) -> str:
    """The token sentence a slot-conditioned model reads: one token per fact, named by its role."""
    if slots.task == "background_change":
        tokens = ["task_background", f"kind_{slots.background_kind or 'unknown'}"]
        tokens += [
            f"{order}_{colour}"
            for order, colour in zip(("first", "second"), slots.background_colours, strict=False)
        ]
        tokens += [
            f"{order}_at_{side}"
            for order, side in zip(("first", "second"), slots.background_sides, strict=False)
        ]
        if slots.orientation:
            tokens.append(f"orientation_{slots.orientation}")
    else:
        tokens = ["task_add"]
        tokens += [f"colour_{slots.colour}"] if slots.colour else []
        tokens += [f"shape_{slots.shape}"] if slots.shape else []
        tokens += [f"size_{slots.size}"] if slots.size else []
        tokens += [f"motion_{slots.motion}"] if slots.motion else []
        tokens += [f"place_{slots.place}"] if slots.place else []
    return " ".join(tokens)


def instruction_to_slot_text(instruction: str) -> str:
    """`slot_text(read_instruction(instruction))`: what a slot-conditioned checkpoint encodes for a prompt.

    An empty instruction (the unconditional branch of guidance, text dropout) stays empty.
    """
    if not instruction.strip():
        return ""
    return slot_text(read_instruction(instruction))
