"""Where a matte is and where it goes: the facts an object-addition instruction states ("moving left to right",
"in the upper half"), checked on an alpha video. The loader uses them to keep only crops that leave an instruction
true; evaluation (`vera_engine.training.metrics`) uses them to score a prediction. Alpha is (F, H, W).
"""

from __future__ import annotations

import numpy as np

# A matte whose centroid travels less than this fraction of the frame over the clip counts as static.
STATIC_FRACTION = 0.1
# The "middle" / "center" position tokens accept a centroid this close to the frame's centre line.
MIDDLE_TOLERANCE = 0.15


def _frames(name: str, x: object, ndim: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != ndim:
        expected = "(frames, height, width, 3)" if ndim == 4 else "(frames, height, width)"
        raise ValueError(f"{name} has shape {x.shape}; expected {expected}.")
    return x


def matte_centroids(alpha: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Per-frame (x, y) centroid of ``alpha > threshold`` as fractions of the width / height; NaN if empty."""
    alpha = _frames("alpha", alpha, 3)
    frames, height, width = alpha.shape
    inside = alpha > threshold
    out = np.full((frames, 2), np.nan)
    ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
    for i, frame in enumerate(inside):
        n = np.count_nonzero(frame)
        if n:
            out[i, 0] = (frame.sum(axis=0) @ xs) / (n * width)
            out[i, 1] = (frame.sum(axis=1) @ ys) / (n * height)
    return out


def centroid_direction(
    alpha: np.ndarray, threshold: float = 0.5, static_fraction: float = STATIC_FRACTION
) -> str:
    """The direction the matte moves on screen, from the least-squares slope of its centroid over time.

    Returns "left_to_right", "right_to_left", "top_to_bottom" or "bottom_to_top" (the dominant axis, as a
    fraction of the frame), "static" when the fitted travel over the clip is below ``static_fraction``, and
    "empty" when no frame has matte.
    """
    c = matte_centroids(alpha, threshold)
    t = np.nonzero(~np.isnan(c[:, 0]))[0]
    if len(t) == 0:
        return "empty"
    if len(t) == 1:
        return "static"
    span = t[-1] - t[0]
    dx, dy = (np.polyfit(t, c[t, k], 1)[0] * span for k in (0, 1))
    if max(abs(dx), abs(dy)) < static_fraction:
        return "static"
    if abs(dx) >= abs(dy):
        return "left_to_right" if dx > 0 else "right_to_left"
    return "top_to_bottom" if dy > 0 else "bottom_to_top"


_POSITION_TESTS = {
    "upper": lambda x, y: y < 0.5,
    "lower": lambda x, y: y > 0.5,
    "middle": lambda x, y: abs(y - 0.5) < MIDDLE_TOLERANCE,
    "left": lambda x, y: x < 0.5,
    "right": lambda x, y: x > 0.5,
    "center": lambda x, y: abs(x - 0.5) < MIDDLE_TOLERANCE,
}


def position_matches(alpha: np.ndarray, position: str, threshold: float = 0.5) -> bool:
    """Whether the matte's mean centroid lies in ``position``: "_"-joined tokens from upper, middle, lower,
    left, center, right (e.g. "upper", "lower_left", "middle_center"), each a condition that must hold."""
    tokens = position.split("_")
    unknown = [t for t in tokens if t not in _POSITION_TESTS]
    if unknown or not position:
        raise ValueError(
            f"position {position!r} is not understood; expected '_'-joined tokens from {list(_POSITION_TESTS)}."
        )
    c = matte_centroids(alpha, threshold)
    valid = ~np.isnan(c[:, 0])
    if not valid.any():
        return False
    x, y = c[valid].mean(axis=0)
    return all(_POSITION_TESTS[t](x, y) for t in tokens)
