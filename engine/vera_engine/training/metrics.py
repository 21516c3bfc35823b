"""Evaluation metrics on layered outputs, in model space (sRGB-encoded [0, 1]); pure numpy.

What the held-out synthetic split can check (issue 5):

* background change: matte IoU against the ground-truth alpha (both thresholded at 0.5) and composite PSNR
  against the ground-truth composite;
* object addition: the matte is not empty, the mean edit colour over the matte is nearest to the instructed
  colour, the matte centroid moves in the instructed direction and stays in the instructed position;
* both: the composite equals the source exactly wherever the predicted alpha is 0 (content preservation),
  plus the paper's preservation PSNR against the source (object addition: full frame; background change:
  the preserved region, ground-truth alpha == 0).

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
from vera_engine.training.data.synthetic import PALETTE

# Summaries cap PSNR (infinite for identical images) so that averages stay finite.
PSNR_CAP_DB = 100.0


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


def nearest_colour_name(rgb: Iterable[float]) -> str:
    """The generator palette's colour name closest (Euclidean, sRGB-encoded [0, 1]) to ``rgb``."""
    rgb = np.asarray(list(rgb), dtype=np.float64)
    if rgb.shape != (3,) or not np.isfinite(rgb).all():
        raise ValueError(f"nearest_colour_name: rgb={rgb.tolist()}; expected three finite numbers (R, G, B).")
    names = list(PALETTE)
    table = np.array([PALETTE[n] for n in names])
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


def evaluate_clip(sample: LayeredClip, prediction: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Score one prediction against a ground-truth clip of the held-out split.

    ``prediction`` holds "edit" (F, H, W, 3) and "alpha" (F, H, W) in model space, and optionally
    "composite"; without it the composite is made from the source as the product makes it
    (:func:`~vera_engine.training.data.dataset.compose_layers`), and ``preserved_exact`` then holds by construction:
    pass the model's own composite to test it. Returns a flat dict of numbers, booleans and names:
    ``task``, ``matte_iou``, ``source_psnr``, ``preserved_exact`` for every task; ``composite_psnr`` for
    background change; ``matte_nonempty``, ``colour``, ``colour_ok``, ``direction``, ``direction_ok``,
    ``position_ok`` for object addition.
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
        preserved = sample.alpha == 0
        result["source_psnr"] = psnr(composite, sample.input, mask=preserved) if preserved.any() else math.nan
        return result

    result["source_psnr"] = psnr(composite, sample.input)
    fields = sample.fields
    inside = alpha > 0.5
    result["matte_nonempty"] = bool(inside.any())
    colour = mean_edit_colour(edit, alpha)
    result["colour"] = nearest_colour_name(colour) if colour is not None else None
    result["colour_ok"] = result["colour"] == fields.get("colour")
    result["direction"] = centroid_direction(alpha)
    result["direction_ok"] = result["direction"] == fields.get("direction")
    position = fields.get("position")
    result["position_ok"] = bool(position) and position_matches(alpha, position)
    return result


def summarize(results: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per-task means of :func:`evaluate_clip` results: numbers averaged (PSNR capped at 100 dB, NaN
    skipped), booleans as rates in [0, 1], plus ``count``."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault(str(r["task"]), []).append(r)
    summary: dict[str, dict[str, float]] = {}
    for task, rows in groups.items():
        out: dict[str, float] = {"count": float(len(rows))}
        keys = [k for k in rows[0] if k not in ("task", "clip_id")]
        for key in keys:
            values = [r[key] for r in rows if key in r]
            if all(isinstance(v, bool) for v in values):
                out[key] = float(np.mean(values))
            elif all(isinstance(v, int | float) for v in values):
                numbers = [min(float(v), PSNR_CAP_DB) if key.endswith("psnr") else float(v) for v in values]
                finite = [v for v in numbers if not math.isnan(v)]
                out[key] = float(np.mean(finite)) if finite else math.nan
        summary[task] = out
    return summary


def evaluate_split(
    root: str | Path, split: str, predict: Callable[[LayeredClip], Mapping[str, np.ndarray]]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Run ``predict`` on every clip of a split and score it: (per-clip results, per-task summary).

    ``predict`` receives the full ground-truth clip (it should use only ``input``, ``instruction``, ``task``
    and, if wanted, ``mask``) and returns what :func:`evaluate_clip` takes.
    """
    results = [evaluate_clip(clip, predict(clip)) for clip in iter_clips(root, split)]
    return results, summarize(results)
