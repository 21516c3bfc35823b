"""Evaluation metrics on layered outputs, in model space (sRGB-encoded [0, 1]); pure numpy.

What the held-out synthetic split can check (issue 5):

* background change: matte IoU against the ground-truth alpha (both thresholded at 0.5) and composite PSNR
  against the ground-truth composite;
* object addition: the matte is not empty, the mean edit colour over the matte is nearest to the instructed
  colour, the matte centroid moves in the instructed direction and stays in the instructed position;
* both: the composite equals the source exactly wherever the predicted alpha is 0 (content preservation),
  plus the paper's preservation PSNR against the source (object addition: full frame; background change:
  the preserved region, ground-truth alpha == 0);
* clean mattes (issue 22): how much of what must stay untouched has a predicted alpha of exactly 0, the only
  value at which the product keeps the plate bit for bit: object addition, the pixels outside the true object
  (dilated 2 px); background change, the kept subject's pixels (eroded 2 px).

:func:`summarize` gives every rate (the share of clips where a check holds) with its 95 % Wilson score interval,
so that a figure can be read against its target: at 20 clips a rate of 0.8 spans 0.58-0.92, at 100 clips
0.71-0.87.

Arrays: colour (F, H, W, 3), alpha / mask (F, H, W).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vera_engine.training.data.dataset import LayeredClip, compose_layers, iter_clips
from vera_engine.training.data.geometry import (
    centroid_direction,
    position_matches,
)
from vera_engine.training.data.synthetic import BACKGROUND_COLOURS, PALETTE

# Summaries cap PSNR (infinite for identical images) so that averages stay finite.
PSNR_CAP_DB = 100.0
# Issue 22's background check: a new background "within 20 dB PSNR of the truth".
COMPOSITE_PSNR_GOOD_DB = 20.0
# How far from the true object's edge a predicted matte may stray before it counts as touching plate pixels that
# must stay exact (object addition), and how far inside the kept subject's edge it must be gone (background
# change): soft edges and one latent cell of blur are allowed for.
CLEAR_MARGIN_PX = 2
# The two-sided 95 % normal quantile (scipy.stats.norm.ppf(0.975)), for the Wilson score interval.
Z_95 = 1.959963984540054


def _frames(name: str, x: Any, ndim: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != ndim:
        expected = "(frames, height, width, 3)" if ndim == 4 else "(frames, height, width)"
        raise ValueError(f"{name} has shape {x.shape}; expected {expected}.")
    return x


def matte_iou(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> float:
    """Intersection over union of ``pred > threshold`` and ``gt > threshold``; 1.0 when both are empty."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"matte_iou: pred has shape {pred.shape} but gt has {gt.shape}; they must match.")
    p, g = pred > threshold, gt > threshold
    union = int(np.count_nonzero(p | g))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(p & g)) / union


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB between ``a`` and ``b``; ``inf`` when they are identical.

    ``mask`` (boolean or 0/1, shaped like ``a`` without its channel axis, or like ``a``) restricts the mean
    squared error to the selected pixels; an empty mask is an error, since there is nothing to measure.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr: a has shape {a.shape} but b has {b.shape}; they must match.")
    se = (a - b) ** 2
    if mask is None:
        mse = float(se.mean())
    else:
        m = np.asarray(mask) > 0.5
        if m.shape == a.shape[:-1]:
            m = np.broadcast_to(m[..., None], a.shape)
        if m.shape != a.shape:
            raise ValueError(f"psnr: mask has shape {np.shape(mask)}; expected {a.shape[:-1]} or {a.shape}.")
        if not m.any():
            raise ValueError(
                "psnr: mask selects no pixels; there is nothing to compare. Pass mask=None or a region."
            )
        mse = float(se[m].mean())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def nearest_colour_name(rgb: Iterable[float], palette: Mapping[str, Any] = PALETTE) -> str:
    """The colour name of ``palette`` (default: the objects' palette) closest (Euclidean, sRGB-encoded [0, 1]) to
    ``rgb``."""
    rgb = np.asarray(list(rgb), dtype=np.float64)
    if rgb.shape != (3,) or not np.isfinite(rgb).all():
        raise ValueError(f"nearest_colour_name: rgb={rgb.tolist()}; expected three finite numbers (R, G, B).")
    names = list(palette)
    table = np.array([palette[n] for n in names])
    return names[int(np.argmin(((table - rgb) ** 2).sum(axis=1)))]


def mean_edit_colour(edit: np.ndarray, alpha: np.ndarray, threshold: float = 0.5) -> np.ndarray | None:
    """Mean RGB of the edit layer over ``alpha > threshold`` (the object's body, not its faint shadow)."""
    edit, alpha = _frames("edit", edit, 4), _frames("alpha", alpha, 3)
    inside = alpha > threshold
    if not inside.any():
        return None
    return edit[inside].astype(np.float64).mean(axis=0)


def preservation_exact(plate: np.ndarray, composite: np.ndarray, alpha: np.ndarray) -> bool:
    """Whether ``composite`` equals ``plate`` bit for bit at every pixel where ``alpha == 0``."""
    plate, composite, alpha = (
        _frames("plate", plate, 4),
        _frames("composite", composite, 4),
        _frames("alpha", alpha, 3),
    )
    if plate.shape != composite.shape or plate.shape[:-1] != alpha.shape:
        raise ValueError(
            f"preservation_exact: plate {plate.shape}, composite {composite.shape} and alpha {alpha.shape} must "
            "cover the same frames and pixels."
        )
    keep = alpha == 0
    return bool(np.array_equal(plate[keep], composite[keep]))


def square_dilate(binary: np.ndarray, radius: int) -> np.ndarray:
    """Dilation of each (H, W) frame of a boolean (F, H, W) array by a (2 radius + 1)-pixel square, as the
    generator dilates its masks; pixels beyond the frame count as False."""
    binary = np.asarray(binary, dtype=bool)
    if binary.ndim != 3 or radius < 0:
        raise ValueError(
            f"square_dilate: got shape {binary.shape} and radius {radius}; expected (frames, height, width), >= 0."
        )
    if radius == 0:
        return binary.copy()
    padded = np.pad(binary, ((0, 0), (radius, radius), (radius, radius)), constant_values=False)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (2 * radius + 1, 2 * radius + 1), axis=(1, 2))
    return windows.any(axis=(-2, -1))


def square_erode(binary: np.ndarray, radius: int) -> np.ndarray:
    """Erosion of each (H, W) frame by a (2 radius + 1)-pixel square; the frame's border is not an edge (pixels
    beyond it count as True), so a region touching the border is eroded only from its inner edges."""
    return ~square_dilate(~np.asarray(binary, dtype=bool), radius)


def clear_fraction(alpha: np.ndarray, region: np.ndarray) -> float:
    """Fraction of the pixels of ``region`` (boolean, shaped like ``alpha``) where ``alpha`` is exactly 0; NaN for
    an empty region (nothing to measure)."""
    alpha, region = np.asarray(alpha), np.asarray(region, dtype=bool)
    if alpha.shape != region.shape:
        raise ValueError(f"clear_fraction: alpha has shape {alpha.shape} but region has {region.shape}.")
    count = int(np.count_nonzero(region))
    if count == 0:
        return math.nan
    return int(np.count_nonzero((alpha == 0) & region)) / count


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate (95 % by default): unlike the normal approximation it stays
    inside [0, 1] and is not empty at 0 % or 100 %. (NaN, NaN) for no trials."""
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(
            f"wilson_interval: {successes} successes in {trials} trials; expected 0 <= successes <= trials."
        )
    if trials == 0:
        return math.nan, math.nan
    rate = successes / trials
    denominator = 1 + z**2 / trials
    centre = (rate + z**2 / (2 * trials)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / trials + z**2 / (4 * trials**2)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate_clip(sample: LayeredClip, prediction: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Score one prediction against a ground-truth clip of the held-out split.

    ``prediction`` holds "edit" (F, H, W, 3) and "alpha" (F, H, W) in model space, and optionally
    "composite"; without it the composite is made from the source as the product makes it
    (:func:`~vera_engine.training.data.dataset.compose_layers`), and ``preserved_exact`` then holds by construction:
    pass the model's own composite to test it. Returns a flat dict of numbers, booleans and names:
    ``task``, ``matte_iou``, ``source_psnr``, ``preserved_exact`` for every task; ``composite_psnr`` for
    background change, with ``composite_psnr_ge_20`` (within 20 dB of the truth) and ``matte_clear_subject`` (the
    fraction of the kept subject, true alpha == 0 eroded by 2 px, where the predicted alpha is exactly 0);
    ``matte_nonempty``, ``colour``, ``colour_ok``, ``direction``, ``direction_ok``, ``position_ok`` and
    ``matte_clear_outside`` (the fraction of the pixels outside the true object, true alpha > 0 dilated by 2 px,
    where the predicted alpha is exactly 0) for object addition.
    """
    frames, height, width = sample.shape
    edit = np.asarray(prediction["edit"], dtype=np.float32)
    alpha = np.asarray(prediction["alpha"], dtype=np.float32)
    if edit.shape != (frames, height, width, 3) or alpha.shape != (frames, height, width):
        raise ValueError(
            f"prediction for {sample.clip_id or 'clip'}: edit {edit.shape} and alpha {alpha.shape}; expected "
            f"{(frames, height, width, 3)} and {(frames, height, width)} like the ground truth."
        )
    if "composite" in prediction:
        composite = np.asarray(prediction["composite"], dtype=np.float32)
        if composite.shape != edit.shape:
            raise ValueError(f"prediction composite has shape {composite.shape}; expected {edit.shape}.")
    else:
        composite = compose_layers(sample.input, edit, alpha)

    result: dict[str, Any] = {
        "clip_id": sample.clip_id,
        "task": sample.task,
        "matte_iou": matte_iou(alpha, sample.alpha),
        "preserved_exact": preservation_exact(sample.input, composite, alpha),
    }
    if sample.task == "background_change":
        result["composite_psnr"] = psnr(composite, sample.composite)
        result["composite_psnr_ge_20"] = bool(result["composite_psnr"] >= COMPOSITE_PSNR_GOOD_DB)
        preserved = sample.alpha == 0
        result["matte_clear_subject"] = clear_fraction(alpha, square_erode(preserved, CLEAR_MARGIN_PX))
        result["source_psnr"] = psnr(composite, sample.input, mask=preserved) if preserved.any() else math.nan
        background = sample.fields.get("new_background", {})
        if "colours" in background:  # clips that name their new background's colours (the generator's do)
            # The trivial baseline a model must beat: the plate where the mask is 0, the flat mean of the two named
            # colours elsewhere (it knows the words and the subject, nothing of the picture).
            result["flat_baseline_psnr"] = psnr(flat_two_colour_baseline(sample), sample.composite)
            result["beats_flat_baseline"] = result["composite_psnr"] > result["flat_baseline_psnr"]
            colours_ok, layout_ok = background_matches(edit, alpha, background)
            result["background_colours_ok"] = colours_ok
            result["background_ok"] = colours_ok and layout_ok
        return result

    result["source_psnr"] = psnr(composite, sample.input)
    outside = ~square_dilate(sample.alpha > 0, CLEAR_MARGIN_PX)
    result["matte_clear_outside"] = clear_fraction(alpha, outside)
    fields = sample.fields
    inside = alpha > 0.5
    result["matte_nonempty"] = bool(inside.any())
    result["present_all_frames"] = bool(inside.any(axis=(1, 2)).all())
    colour = mean_edit_colour(edit, alpha)
    result["colour"] = nearest_colour_name(colour) if colour is not None else None
    result["colour_ok"] = result["colour"] == fields.get("colour")
    # A whole-frame recolour or a speck is not "a red ball": the matte must be the object's size (0.25-4x).
    true_area = int(np.count_nonzero(sample.alpha > 0.5))
    area = int(np.count_nonzero(inside))
    result["size_ok"] = true_area > 0 and 0.25 * true_area <= area <= 4 * true_area
    result["colour_and_size_ok"] = result["colour_ok"] and result["size_ok"]
    result["direction"] = centroid_direction(alpha)
    result["direction_ok"] = result["direction"] == fields.get("direction")
    position = fields.get("position")
    result["position_ok"] = bool(position) and position_matches(alpha, position)
    return result


def flat_two_colour_baseline(sample: LayeredClip) -> np.ndarray:
    """Background change's trivial baseline: the source where the clip's mask is 0, the mean of the new
    background's two named colours everywhere else."""
    colours = sample.fields["new_background"]["colours"]
    flat = np.mean([BACKGROUND_COLOURS[c] for c in colours], axis=0).astype(np.float32)
    region = (sample.mask if sample.mask is not None else (sample.alpha > 0)).astype(bool)
    return np.where(region[..., None], flat, sample.input).astype(np.float32)


def _two_means(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two cluster means of (N, 3) colours (k-means, k = 2, started from the darkest and brightest)."""
    light = pixels.sum(axis=1)
    centres = np.stack([pixels[np.argmin(light)], pixels[np.argmax(light)]]).astype(np.float64)
    for _ in range(20):
        nearest = ((pixels[:, None, :] - centres[None]) ** 2).sum(-1).argmin(axis=1)
        for k in (0, 1):
            if (nearest == k).any():
                centres[k] = pixels[nearest == k].mean(axis=0)
    return centres[0], centres[1]


def background_matches(edit: np.ndarray, alpha: np.ndarray, facts: Mapping[str, Any]) -> tuple[bool, bool]:
    """Whether a predicted new background shows its two named colours, and laid out as named.

    Read on the first frame (where the description pins the picture; a pan moves it later), over the predicted
    background (alpha > 0.5), colours named from the background palette. Gradient: c0 on its side of the frame,
    c1 on the other (``towards``); radial: c0 in the middle, c1 at the edges; stripes: the two colours, varying
    across the stripes (vertical: along x; horizontal: along y; diagonal: both); checkerboard: the two colours,
    varying along both axes. Returns (colours right, layout right).
    """
    kind, names = facts.get("kind"), list(facts.get("colours", ()))
    frame, inside = edit[0].astype(np.float64), alpha[0] > 0.5
    if len(names) != 2 or inside.sum() < 16:
        return False, False
    height, width = inside.shape
    y, x = np.mgrid[0:height, 0:width] + 0.5
    if kind in ("gradient", "radial"):
        # Where each pixel lies between the first colour (0) and the second (1), as the generator lays it out;
        # a straight-line fit of the colours along that gives the two ends, which are named.
        if kind == "gradient":
            dx, dy = facts["towards"]
            reach = width / 2 * abs(dx) + height / 2 * abs(dy)
            t = ((x - width / 2) * dx + (y - height / 2) * dy + reach) / (2 * reach)
        else:
            t = np.hypot(x - width / 2, y - height / 2) / (0.75 * max(height, width))
        t = np.clip(t[inside], 0.0, 1.0)
        if np.ptp(t) < 0.3:
            return False, False
        design = np.stack([np.ones_like(t), t], axis=1)
        (start, slope), *_ = np.linalg.lstsq(design, frame[inside], rcond=None)
        ends = [nearest_colour_name(np.clip(c, 0, 1), BACKGROUND_COLOURS) for c in (start, start + slope)]
        return set(ends) == set(names), ends == names
    centres = _two_means(frame[inside])
    found = {nearest_colour_name(c, BACKGROUND_COLOURS) for c in centres}
    # Orientation: how much the colour changes between horizontal and between vertical neighbours.
    change_x = np.abs(np.diff(frame, axis=1)).sum(-1)[inside[:, 1:] & inside[:, :-1]].mean()
    change_y = np.abs(np.diff(frame, axis=0)).sum(-1)[inside[1:] & inside[:-1]].mean()
    ratio = change_x / max(change_y, 1e-6)
    orientation = facts.get("orientation")
    layout = {"vertical": ratio > 2.0, "horizontal": ratio < 0.5}.get(orientation, 0.5 <= ratio <= 2.0)
    return found == set(names), bool(layout)


def summarize(results: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-task means of :func:`evaluate_clip` results: numbers averaged (PSNR capped at 100 dB, NaN
    skipped), booleans as rates in [0, 1], each rate followed by ``<key>_ci95``, its 95 % Wilson score interval
    as [low, high]; the clean-matte fractions also by their worst clip (``<key>_worst``); plus ``count``."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault(str(r["task"]), []).append(r)
    summary: dict[str, dict[str, Any]] = {}
    for task, rows in groups.items():
        out: dict[str, Any] = {"count": float(len(rows))}
        keys = [k for k in rows[0] if k not in ("task", "clip_id")]
        for key in keys:
            values = [r[key] for r in rows if key in r]
            if all(isinstance(v, bool) for v in values):
                out[key] = float(np.mean(values))
                out[f"{key}_ci95"] = list(wilson_interval(sum(values), len(values)))
            elif all(isinstance(v, int | float) for v in values):
                numbers = [min(float(v), PSNR_CAP_DB) if key.endswith("psnr") else float(v) for v in values]
                finite = [v for v in numbers if not math.isnan(v)]
                out[key] = float(np.mean(finite)) if finite else math.nan
                if key.startswith("matte_clear"):
                    # A mean hides the clip that leaves most of the plate under a faint matte (issue 22: 63 % mean,
                    # 17 % worst).
                    out[f"{key}_worst"] = min(finite) if finite else math.nan
        summary[task] = out
    return summary


def evaluate_split(
    root: str | Path, split: str, predict: Callable[[LayeredClip], Mapping[str, np.ndarray]]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Run ``predict`` on every clip of a split and score it: (per-clip results, per-task summary).

    ``predict`` receives the full ground-truth clip (it should use only ``input``, ``instruction``, ``task``
    and, if wanted, ``mask``) and returns what :func:`evaluate_clip` takes.
    """
    results = [evaluate_clip(clip, predict(clip)) for clip in iter_clips(root, split)]
    return results, summarize(results)
