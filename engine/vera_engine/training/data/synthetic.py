"""Seeded synthetic layered video data for the two Vera tasks, in model space (sRGB-encoded [0, 1] float32).

Each clip is a :class:`~vera_engine.training.data.dataset.LayeredClip`: source video, edit layer, alpha, composite
(exactly :func:`~vera_engine.training.data.dataset.compose_layers`), instruction, task, mask video and the structured
``fields`` behind the instruction.

* **Object addition** (METHOD: "remove an object from a video and learn to add it back"): the source is a
  scene without the object (procedural background, optional camera pan, static distractor shapes, maybe a
  foreground occluder). The edit layer is the object plus its soft drop shadow (dark colour, partial alpha);
  where the occluder stands in front, the object's alpha is cut by the occluder's coverage. The instruction
  names the colour, shape, motion and position, from several paraphrase templates.
* **Background change** (METHOD: "keep the matted subject, learn to generate the background layer"): a
  textured subject over an old background is the source. The edit layer is the *new* background (with the
  subject's shadow on it), its alpha ``1 - subject matte`` (soft at the edges), and the subject is the
  preserved content. The instruction describes the new background.

Everywhere ``alpha == 0`` the edit layer is undefined; it is filled with a Gaussian-smoothed composite
(paper §3.1.1). The mask video is 1 over the region the edit may change (``alpha > 0`` dilated by 0-2 px).
Camera pans crop a moving window out of a background larger than the frame; objects in the scene are
attached to that background, the added object moves in frame coordinates (its direction is on screen).

Clip ``i`` of split ``s`` is drawn from ``np.random.default_rng(clip_seed(seed, s, i))``: the same seed gives
the same bytes, and a held-out split (another name) gets different seeds.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vera_engine.training.data.dataset import (
    ALPHA_BITS,
    TASKS,
    LayeredClip,
    code_type,
    compose_layers,
    mirror_text,
    save_clip,
    snap,
    split_code,
    write_index,
)

GENERATOR_NAME = "vera_engine.training.data.synthetic"
GENERATOR_VERSION = 4

# Object colours: the vocabulary of instructions and of the colour check in evaluation (metrics.py).
# Chosen far apart in sRGB so shading (at most ±8%) never makes one look nearest to another.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.96, 0.90, 0.12),
    "green": (0.12, 0.68, 0.20),
    "cyan": (0.10, 0.80, 0.86),
    "blue": (0.10, 0.25, 0.90),
    "purple": (0.50, 0.15, 0.70),
    "pink": (1.00, 0.50, 0.75),
    "white": (0.95, 0.95, 0.95),
}
# Backgrounds may also use these, which objects never are.
BACKGROUND_COLOURS: dict[str, tuple[float, float, float]] = {
    **PALETTE,
    "black": (0.06, 0.06, 0.07),
    "grey": (0.50, 0.50, 0.50),
    "brown": (0.45, 0.28, 0.12),
}
SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star", "ring", "cross")
DIRECTIONS = ("left_to_right", "right_to_left", "top_to_bottom", "bottom_to_top", "static")
# Object radius as a fraction of min(height, width).
SIZES = {"small": 0.09, "medium": 0.13, "large": 0.17}
BACKGROUND_KINDS = ("gradient", "stripes", "checkerboard", "clouds", "dots", "radial")
# Kinds whose picture a sentence determines (with exact=True): new backgrounds of background change.
EXACT_BACKGROUND_KINDS = ("gradient", "stripes", "checkerboard", "radial")
SHADOW_RGB = (0.03, 0.03, 0.05)

# Where a path runs, as a fraction of the frame: position names are "_"-joined tokens that
# metrics.position_matches checks on the matte centroid (upper: cy < 0.5, middle: |cy - 0.5| < 0.15, ...).
# Generator v4: bands of +-0.02 around 0.27 / 0.5 / 0.73 (v3: +-0.05), so the words pin where the object runs.
_BANDS = {"upper": (0.25, 0.29), "middle": (0.48, 0.52), "lower": (0.71, 0.75)}
_COLUMNS = {"left": (0.25, 0.29), "center": (0.48, 0.52), "right": (0.71, 0.75)}
# Where a moving object starts and ends along its path (fractions of the frame; v3: 0.18-0.30 and 0.70-0.82).
_PATH_START, _PATH_END = (0.22, 0.26), (0.74, 0.78)
_WOBBLE = 0.01  # v3: up to 0.03
_STATIC_POSITIONS = ("upper_left", "upper_right", "lower_left", "lower_right", "middle_center")

# ---------------------------------------------------------------------------------------------------------
# Instruction vocabulary. Right-hand phrases are made by mirroring the left-hand ones, so a flipped clip's
# mirrored instruction is always one the generator could have written.

_MOTION_PHRASES: dict[str, list[str]] = {
    "left_to_right": [
        "moving from left to right",
        "moving left to right",
        "travelling to the right",
        "drifting rightwards",
        "going to the right",
        "that moves right",
        "and move it right",
    ],
    "top_to_bottom": [
        "moving from top to bottom",
        "falling downwards",
        "moving down the frame",
        "sliding downwards",
        "going down",
        "that moves down",
        "and move it down",
    ],
    "bottom_to_top": [
        "moving from bottom to top",
        "rising upwards",
        "moving up the frame",
        "floating upwards",
        "going up",
        "that moves up",
        "and move it up",
    ],
    "static": ["that stays still", "that does not move", "standing still", "at rest", "and keep it still"],
}
_POSITION_PHRASES: dict[str, list[str]] = {
    "upper": ["in the upper half", "near the top of the frame", "in the top half"],
    "middle": ["across the middle", "at mid-height", "through the middle of the frame"],
    "lower": ["in the lower half", "near the bottom of the frame", "in the bottom half"],
    "left": ["on the left side", "in the left half", "near the left edge"],
    "center": ["down the centre", "through the centre of the frame", "in the central column"],
    "upper_left": ["in the top-left corner", "in the upper left", "near the top left"],
    "lower_left": ["in the bottom-left corner", "in the lower left", "near the bottom left"],
    "middle_center": ["in the centre of the frame", "in the middle of the frame", "at the centre"],
}
_SHAPE_WORDS = {
    "circle": ["circle", "disc", "ball"],
    "square": ["square", "box"],
    "triangle": ["triangle"],
    "diamond": ["diamond", "rhombus"],
    "hexagon": ["hexagon"],
    "star": ["star"],
    "ring": ["ring", "donut"],
    "cross": ["cross", "plus sign"],
}
_SIZE_WORDS = {
    "small": ["small", "tiny", "little"],
    "medium": ["", "medium-sized"],
    "large": ["large", "big"],
}
_ADD_TEMPLATES = (
    "add {obj} {motion} {position}",
    "insert {obj} {position}, {motion}",
    "put {obj} {position} {motion}",
    "make {obj} appear {position}, {motion}",
    "place {obj} {motion} {position}",
    "add {obj} {position} {motion}",
)
_BG_TEMPLATES = (
    "replace the background with {bg}",
    "change the background to {bg}",
    "swap the backdrop for {bg}",
    "keep the {subject} and replace everything behind it with {bg}",
    "put the {subject} in front of {bg}",
    "give the {subject} a new background: {bg}",
)

# The "reworded" wording (`wording="reworded"`): other phrases and sentence shapes made only of words the training
# wording uses, never used for training. A held-out split in it checks that a model follows what an instruction
# says rather than the sentences it was trained on.
_REWORDED_MOTION_PHRASES: dict[str, list[str]] = {
    "left_to_right": ["moving to the right", "going rightwards", "travelling from left to right"],
    "top_to_bottom": ["moving downwards", "going down the frame", "falling down"],
    "bottom_to_top": ["moving upwards", "rising up the frame", "going upwards"],
    "static": ["that stays at rest", "not moving", "still and at rest"],
}
_REWORDED_POSITION_PHRASES: dict[str, list[str]] = {
    "upper": ["in the top half of the frame", "near the top"],
    "middle": ["across the middle of the frame", "through the middle"],
    "lower": ["in the bottom half of the frame", "near the bottom"],
    "left": ["in the left half of the frame", "near the left side"],
    "center": ["through the centre", "down the central column"],
    "upper_left": ["in the top left", "near the upper left corner"],
    "lower_left": ["in the bottom left", "near the lower left corner"],
    "middle_center": ["in the centre", "at the centre of the frame"],
}
_REWORDED_ADD_TEMPLATES = (
    "{obj} {position}, {motion}",
    "add to the frame {obj} {position}, {motion}",
    "put in {obj} {motion}, {position}",
    "make {obj} {motion} {position}",
)
_REWORDED_BG_TEMPLATES = (
    "make the background {bg}",
    "change the backdrop to {bg}",
    "put {bg} behind the {subject}",
    "keep the {subject}, and give it {bg} behind it",
)
for _table in (_MOTION_PHRASES, _REWORDED_MOTION_PHRASES):
    _table["right_to_left"] = [mirror_text(p) for p in _table["left_to_right"]]
for _table in (_POSITION_PHRASES, _REWORDED_POSITION_PHRASES):
    for _name in ("left", "upper_left", "lower_left"):
        _table[mirror_text(_name)] = [mirror_text(p) for p in _table[_name]]
WORDINGS: dict[str, dict[str, Any]] = {
    "train": {
        "motion": _MOTION_PHRASES,
        "position": _POSITION_PHRASES,
        "add": _ADD_TEMPLATES,
        "background": _BG_TEMPLATES,
    },
    "reworded": {
        "motion": _REWORDED_MOTION_PHRASES,
        "position": _REWORDED_POSITION_PHRASES,
        "add": _REWORDED_ADD_TEMPLATES,
        "background": _REWORDED_BG_TEMPLATES,
    },
}


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _choice(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


# ---------------------------------------------------------------------------------------------------------
# Image primitives (numpy only; arrays are float32, frames first)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, math.ceil(3.0 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Blur each frame of (F, H, W) or (F, H, W, C) spatially with a Gaussian of ``sigma`` pixels.

    Separable, truncated at 3 sigma (so the support is compact: a blurred shape stays zero far away),
    edges replicated.
    """
    x = np.asarray(x, dtype=np.float32)
    if sigma <= 0:
        return x.copy()
    k = _gaussian_kernel(sigma)
    r = len(k) // 2
    for axis in (1, 2):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        xp = np.pad(x, pad, mode="edge")
        n = x.shape[axis]
        out = np.zeros_like(x)
        for i, weight in enumerate(k):
            index = [slice(None)] * x.ndim
            index[axis] = slice(i, i + n)
            out += weight * xp[tuple(index)]
        x = out
    return x


def _dilate(binary: np.ndarray, radius: int) -> np.ndarray:
    """Square dilation of each (H, W) frame of a boolean (F, H, W) array."""
    out = binary.copy()
    for axis in (1, 2):
        src = out.copy()
        n = src.shape[axis]
        for shift in range(1, radius + 1):
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(0, n - shift), slice(shift, n)
            out[tuple(lo)] |= src[tuple(hi)]
            out[tuple(hi)] |= src[tuple(lo)]
    return out


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each (H, W) float32."""
    y = np.arange(height, dtype=np.float32) + 0.5
    x = np.arange(width, dtype=np.float32) + 0.5
    return np.broadcast_to(y[:, None], (height, width)), np.broadcast_to(x[None, :], (height, width))


def _polygon_sdf(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) from points to a closed polygon, any winding, also non-convex."""
    d = (px - verts[0, 0]) ** 2 + (py - verts[0, 1]) ** 2
    sign = np.ones_like(px)
    j = len(verts) - 1
    for i in range(len(verts)):
        (xi, yi), (xj, yj) = verts[i], verts[j]
        ex, ey = xj - xi, yj - yi
        wx, wy = px - xi, py - yi
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        bx, by = wx - ex * t, wy - ey * t
        d = np.minimum(d, bx * bx + by * by)
        c1, c2, c3 = py >= yi, py < yj, ex * wy > ey * wx
        sign = np.where((c1 & c2 & c3) | (~c1 & ~c2 & ~c3), -sign, sign)
        j = i
    return sign * np.sqrt(d)


def _regular(n: int, radius: float, start_deg: float = -90.0) -> np.ndarray:
    a = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    return np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)


def _shape_vertices(shape: str) -> np.ndarray | None:
    """Unit-radius polygon for polygonal shapes (x right, y down), None for analytic ones."""
    if shape == "triangle":
        return _regular(3, 1.15)
    if shape == "diamond":
        return np.array([[0.0, -1.1], [0.8, 0.0], [0.0, 1.1], [-0.8, 0.0]])
    if shape == "hexagon":
        return _regular(6, 1.0, 0.0)
    if shape == "star":
        outer, inner = _regular(5, 1.2), _regular(5, 0.5, -54.0)
        return np.stack([outer, inner], axis=1).reshape(10, 2)
    if shape == "cross":
        a, b = 0.34, 1.0
        return np.array(
            [
                [-a, -b],
                [a, -b],
                [a, -a],
                [b, -a],
                [b, a],
                [a, a],
                [a, b],
                [-a, b],
                [-a, a],
                [-b, a],
                [-b, -a],
                [-a, -a],
            ]
        )
    return None


def _shape_sdf(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance in pixels for a shape of ``radius`` at offsets (dx, dy) in the shape's own frame."""
    if shape == "circle":
        return np.hypot(dx, dy) - radius
    if shape == "ring":
        return np.abs(np.hypot(dx, dy) - 0.68 * radius) - 0.32 * radius
    if shape == "square":
        s = 0.82 * radius
        qx, qy = np.abs(dx) - s, np.abs(dy) - s
        outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
        return outside + np.minimum(np.maximum(qx, qy), 0.0)
    verts = _shape_vertices(shape)
    if verts is None:
        raise ValueError(f"shape {shape!r} is not known; expected one of {SHAPES}.")
    return _polygon_sdf(dx, dy, verts * radius)


def _shape_frame(
    height: int, width: int, cx: np.ndarray, cy: np.ndarray, rot: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame offsets (F, H, W) of every pixel from a moving, rotating centre, in the shape's frame."""
    yy, xx = _grid(height, width)
    ox = xx[None] - cx[:, None, None].astype(np.float32)
    oy = yy[None] - cy[:, None, None].astype(np.float32)
    c = np.cos(rot).astype(np.float32)[:, None, None]
    s = np.sin(rot).astype(np.float32)[:, None, None]
    return c * ox + s * oy, -s * ox + c * oy


def _coverage(sdf: np.ndarray) -> np.ndarray:
    """Antialiased coverage: a one-pixel ramp across the edge."""
    return np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)


def _over(dst: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight-alpha "over": ``colour`` with coverage ``alpha`` on top of ``dst``."""
    a = alpha[..., None]
    return (dst * (1.0 - a) + colour * a).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Backgrounds and the camera


def _resize_bilinear(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    gh, gw = grid.shape
    ys = np.linspace(0.0, gh - 1.0, height)
    xs = np.linspace(0.0, gw - 1.0, width)
    y0 = np.minimum(np.floor(ys).astype(int), gh - 2)
    x0 = np.minimum(np.floor(xs).astype(int), gw - 2)
    fy = ys - y0
    fx = xs - x0
    # Smoothstep weights hide the grid of plain bilinear interpolation.
    fy = (fy * fy * (3 - 2 * fy))[:, None]
    fx = (fx * fx * (3 - 2 * fx))[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _two_colours(rng: np.random.Generator, avoid: Sequence[str] = ()) -> tuple[str, str]:
    names = [n for n in BACKGROUND_COLOURS if n not in avoid]
    i, j = rng.choice(len(names), size=2, replace=False)
    return names[int(i)], names[int(j)]


_GRADIENT_DIRECTIONS = (
    (0.0, "on the left", "on the right"),
    (90.0, "at the top", "at the bottom"),
    (45.0, "in the top-left corner", "in the bottom-right corner"),
    (135.0, "in the top-right corner", "in the bottom-left corner"),
)


def _background(
    rng: np.random.Generator,
    height: int,
    width: int,
    kind: str | None = None,
    avoid: Sequence[str] = (),
    *,
    exact: bool = False,
    frame: tuple[float, float, int, int] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """A procedural background canvas (height, width, 3) and the facts that describe it.

    ``exact``: the picture is a function of its description alone (no random angle, period, phase or cell
    size; only kinds a sentence can pin down). Background change uses it for the new background, because
    the model must generate that from the instruction and eval compares it with the ground truth.
    ``frame`` = (x, y, frame_height, frame_width): where the first frame's window lies on the canvas. An exact
    picture is laid out in that window (a gradient runs from its left edge to its right edge, a radial gradient
    is centred in it, stripes and checkers start at its corner, their size a fraction of it), so the first frame
    shows exactly what the sentence says and a camera pan moves it from there. Default: the whole canvas.
    """
    if exact and kind not in EXACT_BACKGROUND_KINDS:
        raise ValueError(
            f"background kind {kind!r} cannot be exact; expected one of {EXACT_BACKGROUND_KINDS}."
        )
    kind = kind or _choice(rng, BACKGROUND_KINDS)
    c0, c1 = _two_colours(rng, avoid)
    rgb0 = np.array(BACKGROUND_COLOURS[c0], np.float32)
    rgb1 = np.array(BACKGROUND_COLOURS[c1], np.float32)
    yy, xx = (v.astype(np.float64) for v in _grid(height, width))
    fx0, fy0, frame_h, frame_w = frame if frame is not None else (0.0, 0.0, height, width)
    if exact:
        # Coordinates of the first frame's window: the picture is drawn in it.
        xx, yy = xx - fx0, yy - fy0
        height, width = frame_h, frame_w
    scale = float(min(height, width))
    layout: dict[str, Any] = {}  # what evaluation checks of the picture's orientation, besides its colours
    if kind == "gradient":
        angle, side0, side1 = _choice(rng, _GRADIENT_DIRECTIONS)
        if rng.random() < 0.5:  # either end may carry the first colour
            side0, side1 = side1, side0
            angle += 180.0
        a = math.radians(angle + (0.0 if exact else rng.uniform(-8, 8)))
        u = (xx - width / 2) * math.cos(a) + (yy - height / 2) * math.sin(a)
        if exact:
            # From one edge (or corner) of the frame to the other, whatever the pan shows beyond it.
            reach = width / 2 * abs(math.cos(a)) + height / 2 * abs(math.sin(a))
            t = np.clip((u + reach) / (2 * reach), 0.0, 1.0)
        else:
            t = (u - u.min()) / max(u.max() - u.min(), 1e-6)
        description = f"a gradient from {c0} {side0} to {c1} {side1}"
        layout = {"towards": [round(math.cos(a), 6), round(math.sin(a), 6)]}  # from c0's side to c1's (x, y)
    elif kind == "stripes":
        orientation, angle = _choice(rng, (("vertical", 0.0), ("horizontal", 90.0), ("diagonal", 45.0)))
        if orientation == "diagonal" and rng.random() < 0.5:
            angle = 135.0
        a = math.radians(angle)
        period = (0.25 if exact else rng.uniform(0.12, 0.3)) * scale
        # Measured from the frame's centre with a cosine (generator v4): the picture is its own mirror image, so a
        # horizontally flipped clip shows what its (mirrored) sentence says. v3 started at the corner, and a flip
        # turned "red and blue vertical stripes" into blue-and-red ones under the same sentence.
        u = (xx - width / 2) * math.cos(a) + (yy - height / 2) * math.sin(a)
        wave = np.cos(2 * np.pi * u / period + (0.0 if exact else rng.uniform(0, 2 * np.pi)))
        t = _smoothstep(-0.25, 0.25, wave)
        description = f"{c0} and {c1} {orientation} stripes"
        if orientation == "diagonal":
            # The stripes' lines run perpendicular to the wave's direction; the sentence says which way, so a
            # mirror (45 <-> 135 degrees) changes the words with the picture.
            runs = "from top right to bottom left" if angle == 45.0 else "from top left to bottom right"
            description += f" running {runs}"
        layout = {"orientation": orientation}
    elif kind == "checkerboard":
        cell = (0.2 if exact else rng.uniform(0.1, 0.22)) * scale
        # Exact: a cell centred on the frame's centre (generator v4), so the board is its own mirror image.
        px, py = (-width / 2, -height / 2) if exact else tuple(rng.uniform(0, cell, size=2))
        wave = np.cos(np.pi * (xx + px) / cell) * np.cos(np.pi * (yy + py) / cell)
        t = _smoothstep(-0.2, 0.2, wave)
        description = _article(f"{c0} and {c1} checkerboard")
    elif kind == "clouds":
        t = np.zeros((height, width))
        amplitude, total = 1.0, 0.0
        for cells in (3, 6, 12):
            grid = rng.random((cells + 1, cells + 1))
            t += amplitude * _resize_bilinear(grid, height, width)
            total += amplitude
            amplitude *= 0.5
        t = _smoothstep(0.2, 0.8, t / total)
        description = f"soft {c0} and {c1} clouds"
    elif kind == "dots":
        period = rng.uniform(0.16, 0.3) * scale
        radius = period * rng.uniform(0.2, 0.35)
        ox, oy = rng.uniform(0, period, size=2)
        fx = np.mod(xx + ox, period) - period / 2
        fy = np.mod(yy + oy, period) - period / 2
        t = np.clip(0.5 - (np.hypot(fx, fy) - radius), 0.0, 1.0)
        description = f"{c1} polka dots on {_article(c0)} background"
    elif kind == "radial":
        cx, cy = (
            (width / 2, height / 2)
            if exact
            else (width * rng.uniform(0.4, 0.6), height * rng.uniform(0.4, 0.6))
        )
        t = np.clip(np.hypot(xx - cx, yy - cy) / (0.75 * max(height, width)), 0.0, 1.0)
        description = f"a radial gradient from {c0} in the middle to {c1} at the edges"
    else:
        raise ValueError(f"background kind {kind!r} is not known; expected one of {BACKGROUND_KINDS}.")
    # No film grain: per-pixel noise would make the stored 16-bit layers incompressible (5x the size).
    image = rgb0 * (1.0 - t[..., None]) + rgb1 * t[..., None]
    facts = {"kind": kind, "colours": [c0, c1], "description": description, **layout}
    return np.clip(image, 0.0, 1.0).astype(np.float32), facts


def _camera(rng: np.random.Generator, frames: int, height: int, width: int) -> dict[str, Any]:
    """Window offsets into a canvas larger than the frame: a pan, or a locked-off camera."""
    if rng.random() < 0.6:
        sx = rng.uniform(0.1, 0.3) * width * rng.choice((-1.0, 1.0))
        sy = rng.uniform(0.0, 0.1) * height * rng.choice((-1.0, 1.0))
    else:
        sx = sy = 0.0
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    xs = (0.0 if sx >= 0 else -sx) + sx * t
    ys = (0.0 if sy >= 0 else -sy) + sy * t
    if sx == 0.0 and sy == 0.0:
        pan = "none"
    elif abs(sx) / width >= abs(sy) / height:
        pan = "right" if sx > 0 else "left"
    else:
        pan = "down" if sy > 0 else "up"
    canvas = (height + math.ceil(abs(sy)) + 2, width + math.ceil(abs(sx)) + 2)
    return {"xs": xs, "ys": ys, "canvas": canvas, "pan": pan}


def _film(canvas: np.ndarray, camera: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """Crop the moving window out of a canvas, with bilinear sub-pixel offsets: (F, H, W, C)."""
    frames = []
    for x, y in zip(camera["xs"], camera["ys"], strict=True):
        ix, iy = math.floor(x), math.floor(y)
        fx, fy = np.float32(x - ix), np.float32(y - iy)
        a = canvas[iy : iy + height + 1, ix : ix + width + 1]
        top = a[:-1, :-1] * (1 - fx) + a[:-1, 1:] * fx
        bottom = a[1:, :-1] * (1 - fx) + a[1:, 1:] * fx
        frames.append(top * (1 - fy) + bottom * fy)
    return np.stack(frames).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Objects


def _shaded(rgb: Sequence[float], dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Flat colour lit from the upper left (±8% at most, so the colour keeps its name)."""
    light = np.clip(-(dx + dy) / (1.5 * radius), -1.0, 1.0)
    return np.clip(np.asarray(rgb, np.float32) * (1.0 + 0.08 * light[..., None]), 0.0, 1.0).astype(np.float32)


def _drop_shadow(
    coverage_at: Callable[[float, float], np.ndarray],
    light: tuple[float, float],
    radius: float,
    opacity: float,
) -> np.ndarray:
    """A soft drop shadow: the coverage displaced away from the light, blurred, scaled to ``opacity``."""
    shifted = coverage_at(light[0] * radius, light[1] * radius)
    return (opacity * gaussian_blur(shifted, max(0.8, 0.25 * radius))).astype(np.float32)


def _texture(
    rng: np.random.Generator, dx: np.ndarray, dy: np.ndarray, radius: float
) -> tuple[str, np.ndarray]:
    """A pattern in the subject's own frame (moves with it): name and mix weight in [0, 1]."""
    kind = _choice(rng, ("striped", "spotted", "mottled", "banded"))
    if kind == "striped":
        a = rng.uniform(0, np.pi)
        u = dx * np.cos(a) + dy * np.sin(a)
        t = _smoothstep(-0.3, 0.3, np.sin(2 * np.pi * u / (0.45 * radius)))
    elif kind == "spotted":
        p = 0.5 * radius
        fx, fy = np.mod(dx, p) - p / 2, np.mod(dy, p) - p / 2
        t = np.clip(0.5 - (np.hypot(fx, fy) - 0.3 * p), 0.0, 1.0)
    elif kind == "mottled":
        t = np.sin(dx / (0.2 * radius) + rng.uniform(0, 6)) * np.sin(dy / (0.27 * radius) + rng.uniform(0, 6))
        t = _smoothstep(-0.6, 0.6, t)
    else:
        t = _smoothstep(-0.3, 0.3, np.sin(np.hypot(dx, dy) / (0.12 * radius)))
    return kind, t.astype(np.float32)


def _undefined_fill(input: np.ndarray, edit: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The edit layer with each ``alpha == 0`` pixel set to the Gaussian-smoothed composite (paper §3.1.1)."""
    defined = alpha[..., None] > 0
    composite = compose_layers(input, np.where(defined, edit, 0.0).astype(np.float32), alpha)
    sigma = max(1.0, 0.04 * min(alpha.shape[1:]))
    return np.where(defined, edit, gaussian_blur(composite, sigma)).astype(np.float32)


def _finish(
    rng: np.random.Generator,
    task: str,
    input: np.ndarray,
    edit: np.ndarray,
    alpha: np.ndarray,
    instruction: str,
    fields: dict[str, Any],
    seed: int | None,
    clip_id: str,
    bits: int,
) -> LayeredClip:
    """Snap the layers to the stored grid, fill the undefined edit, compose, and build the mask."""
    alpha = snap(alpha, ALPHA_BITS)
    input = snap(input, bits)
    edit = snap(_undefined_fill(input, edit, alpha), bits)
    composite = compose_layers(input, edit, alpha)
    dilation = int(rng.integers(0, 3))
    mask = _dilate(alpha > 0, dilation).astype(np.float32)
    fields = {**fields, "mask": {"region": "edit", "dilation_px": dilation}}
    return LayeredClip(
        input=input,
        edit=edit,
        alpha=alpha,
        composite=composite,
        mask=mask,
        instruction=instruction,
        task=task,
        fields=fields,
        seed=seed,
        clip_id=clip_id,
    )


def _path(
    rng: np.random.Generator, direction: str, frames: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """Centre (cx, cy) per frame, in pixels, for a motion direction; and the position it runs through."""
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    wobble = rng.uniform(0.0, _WOBBLE) * np.sin(
        2 * np.pi * rng.uniform(0.3, 1.0) * t + rng.uniform(0, 2 * np.pi)
    )
    start, end = rng.uniform(*_PATH_START), rng.uniform(*_PATH_END)
    if direction in ("left_to_right", "right_to_left"):
        position = _choice(rng, tuple(_BANDS))
        band = rng.uniform(*_BANDS[position])
        along = start + (end - start) * t
        cx = along if direction == "left_to_right" else 1.0 - along
        cy = band + wobble
    elif direction in ("top_to_bottom", "bottom_to_top"):
        position = _choice(rng, tuple(_COLUMNS))
        column = rng.uniform(*_COLUMNS[position])
        along = start + (end - start) * t
        cy = along if direction == "top_to_bottom" else 1.0 - along
        cx = column + wobble
    elif direction == "static":
        position = _choice(rng, _STATIC_POSITIONS)
        vertical, horizontal = position.split("_")
        cy = np.full(frames, rng.uniform(*_BANDS[vertical]))
        cx = np.full(frames, rng.uniform(*_COLUMNS[horizontal]))
    else:
        raise ValueError(f"direction {direction!r} is not known; expected one of {DIRECTIONS}.")
    return cx * width, cy * height, position


def generate_object_addition(
    seed: int,
    *,
    frames: int = 8,
    height: int = 64,
    width: int = 64,
    clip_id: str = "",
    bits: int = 8,
    occlusion: bool | None = None,
    wording: str = "train",
) -> LayeredClip:
    """One object-addition clip: the source lacks the object; the edit layer is the object and its shadow.

    ``occlusion`` forces a foreground occluder on or off (default: 30% of clips); everything else about
    the clip's scene and object stays the same either way.
    """
    rng = np.random.default_rng(seed)
    scale = float(min(height, width))
    camera = _camera(rng, frames, height, width)
    canvas, bg_facts = _background(rng, *camera["canvas"])
    scene = _film(canvas, camera, height, width)
    light = (rng.uniform(0.15, 0.35) * rng.choice((-1.0, 1.0)), rng.uniform(0.2, 0.4))
    shadow_opacity = rng.uniform(0.3, 0.5)
    shadow_rgb = np.array(SHADOW_RGB, np.float32)

    # Where the scene's own objects stand: attached to the background, so they move with a pan.
    world_x = -(camera["xs"] - camera["xs"][0])
    world_y = -(camera["ys"] - camera["ys"][0])

    colour, shape = _choice(rng, tuple(PALETTE)), _choice(rng, SHAPES)
    size = _choice(rng, tuple(SIZES))
    # A single frame cannot show motion, so it can only be instructed as static.
    direction = _choice(rng, DIRECTIONS) if frames > 1 else "static"

    # Distractors: shapes already in the scene, never the instructed shape.
    n_distractors = int(rng.integers(0, 3))
    for _ in range(n_distractors):
        d_shape = _choice(rng, [s for s in SHAPES if s != shape])
        d_rgb = BACKGROUND_COLOURS[_choice(rng, tuple(BACKGROUND_COLOURS))]
        d_r = rng.uniform(0.06, 0.12) * scale
        x0, y0 = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
        rot = np.full(frames, rng.uniform(0, 2 * np.pi))

        def d_cov(
            ox: float,
            oy: float,
            shape_: str = d_shape,
            r_: float = d_r,
            x_: float = x0,
            y_: float = y0,
            rot_: np.ndarray = rot,
        ) -> np.ndarray:
            dx, dy = _shape_frame(height, width, x_ + world_x + ox, y_ + world_y + oy, rot_)
            return _coverage(_shape_sdf(shape_, dx, dy, r_))

        scene = _over(scene, shadow_rgb, _drop_shadow(d_cov, light, d_r, shadow_opacity))
        dx, dy = _shape_frame(height, width, x0 + world_x, y0 + world_y, rot)
        scene = _over(scene, _shaded(d_rgb, dx, dy, d_r), d_cov(0.0, 0.0))

    # The object to add.
    radius = SIZES[size] * scale * rng.uniform(0.92, 1.08)
    cx, cy, position = _path(rng, direction, frames, height, width)
    spin = 0.0 if shape == "circle" else rng.uniform(-0.25, 0.25)
    rot = rng.uniform(0, 2 * np.pi) + spin * np.arange(frames)

    def obj_cov(ox: float, oy: float) -> np.ndarray:
        dx, dy = _shape_frame(height, width, cx + ox, cy + oy, rot)
        return _coverage(_shape_sdf(shape, dx, dy, radius))

    dx, dy = _shape_frame(height, width, cx, cy, rot)
    a_obj = obj_cov(0.0, 0.0)
    a_shadow = _drop_shadow(obj_cov, light, radius, shadow_opacity)
    rgb = np.array(PALETTE[colour], np.float32)
    obj_rgb = _shaded(rgb, dx, dy, radius)
    # The layer is the object over its shadow ("over" of two straight-alpha layers).
    layer_alpha = a_obj + a_shadow * (1.0 - a_obj)
    premult = a_obj[..., None] * obj_rgb + (a_shadow * (1.0 - a_obj))[..., None] * shadow_rgb
    edit = np.divide(
        premult, layer_alpha[..., None], out=np.zeros_like(premult), where=layer_alpha[..., None] > 0
    )

    # A foreground occluder (part of the source) cuts the object's alpha. It is narrower than the object,
    # so some of the object is always visible.
    draw = rng.random()  # drawn even when forced, so forcing changes nothing else about the clip
    occluded = bool(draw < 0.3) if occlusion is None else bool(occlusion)
    if occluded:
        occ_rgb = np.array(BACKGROUND_COLOURS[_choice(rng, ("brown", "grey", "black", "green"))], np.float32)
        if direction in ("left_to_right", "right_to_left", "static"):
            half_w = rng.uniform(0.25, 0.4) * radius
            half_h = float(height)
            ox = (
                rng.uniform(0.4, 0.6) * width
                if direction != "static"
                else cx[0] + rng.choice((-1, 1)) * rng.uniform(0.4, 0.7) * radius
            )
            oy = height if direction != "static" else cy[0] + height * 0.5
        else:
            half_w, half_h = float(width), rng.uniform(0.25, 0.4) * radius
            ox, oy = width / 2, rng.uniform(0.4, 0.6) * height
        odx, ody = _shape_frame(height, width, ox + world_x, oy + world_y, np.zeros(frames))
        qx, qy = np.abs(odx) - half_w, np.abs(ody) - half_h
        a_occ = _coverage(np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0))
        scene = _over(scene, _shaded(occ_rgb, odx, ody, 4 * half_w), a_occ)
        alpha = layer_alpha * (1.0 - a_occ)
    else:
        alpha = layer_alpha

    size_word = _choice(rng, _SIZE_WORDS[size])
    obj = _article(" ".join(w for w in (size_word, colour, _choice(rng, _SHAPE_WORDS[shape])) if w))
    phrases = WORDINGS[wording]
    instruction = _choice(rng, phrases["add"]).format(
        obj=obj,
        motion=_choice(rng, phrases["motion"][direction]),
        position=_choice(rng, phrases["position"][position]),
    )
    fields = {
        "colour": colour,
        "colour_rgb": list(PALETTE[colour]),
        "shape": shape,
        "size": size,
        "direction": direction,
        "position": position,
        "occluded": occluded,
        "shadow": True,
        "distractors": n_distractors,
        "camera_pan": camera["pan"],
        "background": bg_facts,
    }
    return _finish(
        rng,
        "object_addition",
        scene,
        edit.astype(np.float32),
        alpha,
        instruction,
        fields,
        seed,
        clip_id,
        bits,
    )


def generate_background_change(
    seed: int,
    *,
    frames: int = 8,
    height: int = 64,
    width: int = 64,
    clip_id: str = "",
    bits: int = 8,
    wording: str = "train",
) -> LayeredClip:
    """One background-change clip: a textured subject is kept; the edit layer is the new background."""
    rng = np.random.default_rng(seed)
    scale = float(min(height, width))
    camera = _camera(rng, frames, height, width)
    colour = _choice(rng, tuple(PALETTE))
    second = _choice(rng, [c for c in PALETTE if c != colour])
    old_canvas, old_facts = _background(rng, *camera["canvas"])
    # The new background must differ visibly: another kind, neither of the old colours, and not the
    # subject's own colour.
    new_kind = _choice(rng, [k for k in EXACT_BACKGROUND_KINDS if k != old_facts["kind"]])
    avoid = [*old_facts["colours"], colour]
    first_window = (float(camera["xs"][0]), float(camera["ys"][0]), height, width)
    new_canvas, new_facts = _background(
        rng, *camera["canvas"], kind=new_kind, avoid=avoid, exact=True, frame=first_window
    )
    # Same camera for both: the new background pans exactly like the old one.
    old_bg, new_bg = _film(old_canvas, camera, height, width), _film(new_canvas, camera, height, width)

    shape = _choice(rng, SHAPES)
    radius = rng.uniform(0.24, 0.34) * scale
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    cx = width * (rng.uniform(0.4, 0.6) + rng.uniform(-0.08, 0.08) * t)
    cy = height * (
        rng.uniform(0.42, 0.58) + rng.uniform(0.0, 0.03) * np.sin(2 * np.pi * t + rng.uniform(0, 6))
    )
    rot = rng.uniform(0, 2 * np.pi) + (0.0 if shape == "circle" else rng.uniform(-0.1, 0.1)) * np.arange(
        frames
    )
    soft_edges = bool(rng.random() < 0.5)
    feather = rng.uniform(0.6, 1.2) if soft_edges else 0.0

    def subject_cov(ox: float, oy: float) -> np.ndarray:
        dx, dy = _shape_frame(height, width, cx + ox, cy + oy, rot)
        return gaussian_blur(_coverage(_shape_sdf(shape, dx, dy, radius)), feather)

    dx, dy = _shape_frame(height, width, cx, cy, rot)
    texture, mix = _texture(rng, dx, dy, radius)
    subject_rgb = _over(
        _shaded(PALETTE[colour], dx, dy, radius), _shaded(PALETTE[second], dx, dy, radius), 0.8 * mix
    )
    matte = subject_cov(0.0, 0.0)

    # The subject's shadow belongs to the background (paper: effects stay in the background layer),
    # so it falls on the old background in the source and on the new one in the edit layer.
    shadow = bool(rng.random() < 0.6)
    if shadow:
        light = (rng.uniform(0.1, 0.25) * rng.choice((-1.0, 1.0)), rng.uniform(0.1, 0.25))
        a_shadow = _drop_shadow(subject_cov, light, radius, rng.uniform(0.25, 0.45))
        shadow_rgb = np.array(SHADOW_RGB, np.float32)
        old_bg, new_bg = _over(old_bg, shadow_rgb, a_shadow), _over(new_bg, shadow_rgb, a_shadow)

    source = _over(old_bg, subject_rgb, matte)
    alpha = (1.0 - matte).astype(np.float32)

    subject = f"{colour} {_choice(rng, _SHAPE_WORDS[shape])}"
    instruction = _choice(rng, WORDINGS[wording]["background"]).format(
        bg=new_facts["description"], subject=subject
    )
    fields = {
        "subject": {"shape": shape, "colour": colour, "second_colour": second, "texture": texture},
        "new_background": new_facts,
        "old_background": old_facts,
        "soft_edges": soft_edges,
        "shadow": shadow,
        "camera_pan": camera["pan"],
    }
    return _finish(rng, "background_change", source, new_bg, alpha, instruction, fields, seed, clip_id, bits)


_GENERATORS: dict[str, Callable[..., LayeredClip]] = {
    "object_addition": generate_object_addition,
    "background_change": generate_background_change,
}


def _check_size(frames: int, height: int, width: int) -> None:
    if frames < 1 or height < 16 or width < 16:
        raise ValueError(
            f"clip size frames={frames}, height={height}, width={width}; expected frames >= 1 and height, "
            "width >= 16 (shapes and textures need room)."
        )


def generate_clip(
    task: str,
    seed: int,
    *,
    frames: int = 8,
    height: int = 64,
    width: int = 64,
    clip_id: str = "",
    bits: int = 8,
    wording: str = "train",
) -> LayeredClip:
    """Generate one clip of ``task`` ("object_addition" or "background_change") from ``seed``.

    Colour layers are snapped to the ``bits``-bit grid (8 or 16) and alpha to 16 bits, so a clip saved
    with :func:`~vera_engine.training.data.dataset.save_clip` at the same ``bits`` loads back bit for bit.
    """
    if task not in _GENERATORS:
        raise ValueError(f"task {task!r} is not known; expected one of {TASKS}.")
    if wording not in WORDINGS:
        raise ValueError(f"wording {wording!r} is not known; expected one of {tuple(WORDINGS)}.")
    _check_size(frames, height, width)
    code_type(bits)
    return _GENERATORS[task](
        int(seed), frames=frames, height=height, width=width, clip_id=clip_id, bits=bits, wording=wording
    )


def clip_seed(seed: int, split: str, index: int) -> int:
    """The seed of clip ``index`` of ``split``: independent streams per (seed, split, index)."""
    state = np.random.SeedSequence([int(seed), split_code(split), int(index)]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


def generate_split(
    root: str | Path,
    split: str,
    count: int,
    *,
    seed: int = 0,
    tasks: Sequence[str] = TASKS,
    frames: int = 8,
    height: int = 64,
    width: int = 64,
    bits: int = 8,
    previews: bool = False,
    wording: str = "train",
) -> list[dict[str, Any]]:
    """Write ``count`` clips to ``root/split/NNNNNN/`` (tasks alternate) and return their index entries."""
    if count < 0:
        raise ValueError(f"count={count}; expected a number of clips >= 0.")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks={list(tasks)!r}; expected a non-empty list drawn from {TASKS}.")
    _check_size(frames, height, width)
    entries = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        name = f"{i:06d}"
        clip = generate_clip(
            task,
            clip_seed(seed, split, i),
            frames=frames,
            height=height,
            width=width,
            clip_id=f"{split}/{name}",
            bits=bits,
            wording=wording,
        )
        folder = Path(root) / split / name
        entries.append(save_clip(clip, folder, bits=bits))
        if previews:
            save_preview(clip, folder / "preview.png")
    return entries


def generate_dataset(
    root: str | Path,
    splits: Mapping[str, int] | None = None,
    *,
    seed: int = 0,
    tasks: Sequence[str] = TASKS,
    frames: int = 8,
    height: int = 64,
    width: int = 64,
    bits: int = 8,
    previews: bool = False,
    wording: str = "train",
) -> Path:
    """Write a whole dataset (default: 100 training and 20 held-out clips) and its ``index.json``.

    ``wording``: the instructions' phrases and sentence shapes, "train" or "reworded" (other phrasings of the
    same words, for a held-out split that checks a model reads instructions rather than recognising sentences).
    """
    splits = dict(splits or {"train": 100, "heldout": 20})
    entries = {
        name: generate_split(
            root,
            name,
            n,
            seed=seed,
            tasks=tasks,
            frames=frames,
            height=height,
            width=width,
            bits=bits,
            previews=previews,
            wording=wording,
        )
        for name, n in splits.items()
    }
    generator = {
        "name": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "tasks": list(tasks),
        "frames": frames,
        "height": height,
        "width": width,
        "bits": bits,
        "wording": wording,
    }
    return write_index(root, entries, generator=generator)


def save_preview(clip: LayeredClip, path: str | Path) -> None:
    """A contact sheet PNG (rows: input, edit over grey, alpha, composite, mask; one column per frame)."""
    from PIL import Image

    grey = np.float32(0.5)
    a = clip.alpha[..., None]
    rows = [
        clip.input,
        clip.edit * a + grey * (1 - a),
        np.repeat(a, 3, axis=-1),
        clip.composite,
        np.repeat((clip.mask if clip.mask is not None else np.zeros_like(clip.alpha))[..., None], 3, axis=-1),
    ]
    sheet = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    Image.fromarray(np.round(np.clip(sheet, 0, 1) * 255).astype(np.uint8)).save(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m vera_engine.training.data.synthetic --out DIR [--train N] [--heldout N] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m vera_engine.training.data.synthetic", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="dataset root to write")
    parser.add_argument("--train", type=int, default=100, help="clips in the training split")
    parser.add_argument("--heldout", type=int, default=20, help="clips in the held-out split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument(
        "--bits", type=int, default=8, choices=(8, 16), help="code width of the colour layers"
    )
    parser.add_argument("--previews", action="store_true", help="also write preview.png contact sheets")
    parser.add_argument(
        "--wording",
        default="train",
        choices=tuple(WORDINGS),
        help="instruction phrasing: the training one, or 'reworded' (other sentences of the same words)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    index = generate_dataset(
        args.out,
        {"train": args.train, "heldout": args.heldout},
        seed=args.seed,
        tasks=args.tasks,
        frames=args.frames,
        height=args.height,
        width=args.width,
        bits=args.bits,
        previews=args.previews,
        wording=args.wording,
    )
    print(
        f"wrote {args.train + args.heldout} clips to {args.out} in {time.perf_counter() - start:.1f} s ({index})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
