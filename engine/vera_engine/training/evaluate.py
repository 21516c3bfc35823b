"""`vera-engine eval`: score a Vera pipeline on a held-out split of a layered dataset.

Each clip is edited as the product edits a plate: the source and the instruction go in (background change also
gets its mask, as in the paper's benchmark), the predicted edit layer and matte are composited over the source
with the product's compositor, and the result is scored with `vera_engine.training.metrics`. Object addition runs
twice: without a mask (the instruction alone says where) and with one (an artist's roto of where the object goes),
scored as `object_addition` and `object_addition_masked`. Background change is scored beside its trivial baseline
(the flat mean of the two named colours), which the report prints next to the model's figure.
"""

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vera_engine.imaging.composite import (
    DEFAULT_CLIP_BLACK,
    DEFAULT_CLIP_WHITE,
    clip_matte,
    composite_over_plate,
    fill_unmatted,
    premultiply,
    snap_matte,
)
from vera_engine.training.data.dataset import LayeredClip

# Targets the shipped checkpoint is held to (issue 22's table), at its native size and shipped defaults. Rates are
# shares of clips; `matte_iou` and the `matte_clear_*` fractions are means over clips. The masked run has no row in
# the table and keeps issue 19's targets.
TARGETS: dict[str, dict[str, float]] = {
    "object_addition": {
        "colour_and_size_ok": 0.9,
        "direction_ok": 0.8,
        "present_all_frames": 0.9,
        # Not reachable on generator v3 (an oracle that knows every instructed fact scored 0.46); v4's tighter
        # paths put that oracle at 0.66.
        "matte_iou": 0.5,
        "preserved_exact": 1.0,
        "matte_clear_outside": 0.95,
    },
    "object_addition_masked": {"matte_iou": 0.7, "colour_ok": 0.9, "preserved_exact": 1.0},
    "background_change": {
        "composite_psnr_ge_20": 0.9,
        "background_ok": 0.8,
        "matte_iou": 0.9,
        "preserved_exact": 1.0,
        "matte_clear_subject": 0.95,
    },
}
# A rate's 95 % interval is about +-0.2 wide at 20 clips and +-0.08 at 100: fewer clips than this per task cannot
# tell a 0.8 target from 0.7 or 0.9. Generate held-out splits of 2 x this many clips (the tasks alternate).
MIN_CLIPS_PER_TASK = 100
# Printed beside the metric they are the baseline of.
BASELINES = {"composite_psnr": "flat_baseline_psnr"}


def predict_clip(
    pipe: Any,
    clip: LayeredClip,
    *,
    steps: int | None,
    guidance: float | None,
    seed: int,
    with_mask: bool = False,
    clip_black: float = DEFAULT_CLIP_BLACK,
    clip_white: float = DEFAULT_CLIP_WHITE,
) -> dict[str, np.ndarray]:
    """Run the pipeline on one clip and composite its layers over the source as the product does.

    Background change always gets the clip's mask; object addition only ``with_mask``. ``steps`` and ``guidance``
    None: the checkpoint's defaults (what a user gets); ``clip_black`` / ``clip_white`` the engine's matte clip
    (defaults: the engine's).
    """
    mask = clip.mask if clip.task == "background_change" or with_mask else None
    out = pipe(
        clip.input,
        clip.instruction,
        mask=mask,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
    )
    # The product's finishing steps (the runner's matte clip, then vera_engine.imaging.plate_layers), at native size:
    # clip black / white, snap the matte's near-0/1 noise, clean the edit colour where the matte is empty,
    # premultiply, composite over the source.
    alpha = snap_matte(clip_matte(out.alpha, clip_black, clip_white))
    edit = fill_unmatted(out.edit, alpha)
    composite = composite_over_plate(clip.input, premultiply(edit, alpha), alpha)[..., :3]
    return {"edit": edit, "alpha": alpha, "composite": composite}


def evaluate_pipeline(
    pipe: Any,
    data: "str | Path",
    split: str = "heldout",
    *,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    clip_black: float = DEFAULT_CLIP_BLACK,
    clip_white: float = DEFAULT_CLIP_WHITE,
    progress: bool = False,
) -> dict[str, Any]:
    """Score `pipe` on every clip of `split`; returns per-clip results, per-task summary and target checks.

    `steps` / `guidance` None: the checkpoint's defaults. `clip_black` / `clip_white`: the matte clip (the engine's
    defaults, what `vera edit` gives; 0 and 1 score the model's raw matte). `progress`: a progress bar over the clips
    on stderr (as `train` has), counting each clip once (object addition runs twice: without and with its mask).
    """
    from tqdm.auto import tqdm

    from vera_engine.training.data.dataset import iter_clips, read_index
    from vera_engine.training.metrics import evaluate_clip, summarize

    steps = steps if steps is not None else int(pipe.config.get("default_steps", 20))
    guidance = guidance if guidance is not None else float(pipe.config.get("default_guidance", 1.0))
    started = time.perf_counter()
    results = []
    count = len(read_index(data).get("splits", {}).get(split, []))  # a missing split: iter_clips names it
    clip_options = {"clip_black": clip_black, "clip_white": clip_white}
    for clip in tqdm(
        iter_clips(data, split), total=count, desc=f"eval {split}", unit="clip", disable=not progress
    ):
        prediction = predict_clip(pipe, clip, steps=steps, guidance=guidance, seed=seed, **clip_options)
        results.append(evaluate_clip(clip, prediction))
        if clip.task == "object_addition" and clip.mask is not None:
            masked = predict_clip(
                pipe, clip, steps=steps, guidance=guidance, seed=seed, with_mask=True, **clip_options
            )
            results.append({**evaluate_clip(clip, masked), "task": "object_addition_masked"})
    summary = summarize(results)
    return {
        "split": split,
        "clips_per_task_wanted": MIN_CLIPS_PER_TASK,
        "too_few_clips": too_few_clips(summary),
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "clip_black": clip_black,
        "clip_white": clip_white,
        "seconds": time.perf_counter() - started,
        "summary": summary,
        "targets": check_targets(summary),
        "clips": results,
    }


def too_few_clips(summary: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """The tasks of `summary` scored on fewer than `MIN_CLIPS_PER_TASK` clips, with their counts."""
    return {
        task: int(metrics["count"])
        for task, metrics in summary.items()
        if int(metrics.get("count", 0)) < MIN_CLIPS_PER_TASK
    }


def check_targets(summary: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each task in `summary`, each target metric: the value reached, the target and whether it is met.

    Where the summary gives the metric's 95 % interval (`<metric>_ci95`, rates), the check also carries it as
    `ci95` and says whether the interval lies wholly on one side of the target (`settled`): a rate of 0.83 whose
    interval is 0.75-0.89 neither meets nor misses a 0.8 target beyond chance.
    """
    checks: dict[str, dict[str, Any]] = {}
    for task, targets in TARGETS.items():
        if task not in summary:
            continue
        checks[task] = {}
        for metric, target in targets.items():
            value = summary[task].get(metric)
            check: dict[str, Any] = {
                "value": value,
                "target": target,
                "met": bool((value if value is not None else float("nan")) >= target),
            }
            interval = summary[task].get(f"{metric}_ci95")
            if interval is not None:
                low, high = interval
                check["ci95"] = [low, high]
                check["settled"] = bool(low >= target or high < target)
            checks[task][metric] = check
    return checks


def format_rate(value: float, interval: "Sequence[float] | None") -> str:
    """`0.83 (0.75–0.89)`: a rate with its 95 % interval (the value alone where there is none)."""
    if interval is None:
        return f"{value:.4g}"
    low, high = interval
    return f"{value:.2f} ({low:.2f}–{high:.2f})"


def format_report(report: Mapping[str, Any]) -> str:
    """A short human-readable table of an `evaluate_pipeline` report; rates with their 95 % intervals."""
    lines = [
        f"split {report['split']}: {report['steps']} steps, guidance {report['guidance']:g}, "
        f"{report['seconds']:.1f} s"
    ]
    for task, metrics in report["summary"].items():
        lines.append(f"  {task} ({int(metrics['count'])} clips)")
        for name, value in metrics.items():
            if name == "count" or name.endswith("_ci95"):
                continue
            if name in BASELINES.values():
                continue  # printed beside the metric it is the baseline of
            target = report["targets"].get(task, {}).get(name)
            mark = ""
            if target is not None:
                mark = f"   target {target['target']:g}: {'met' if target['met'] else 'NOT met'}"
                if target.get("settled") is False:
                    mark += " (the target is inside the 95 % interval)"
            baseline = BASELINES.get(name)
            if baseline in metrics:
                mark += f"   (baseline {metrics[baseline]:.4g})"
            lines.append(f"    {name:<22} {format_rate(value, metrics.get(f'{name}_ci95')):>18}{mark}")
    few = report.get("too_few_clips") or {}
    if few:
        wanted = report.get("clips_per_task_wanted", MIN_CLIPS_PER_TASK)
        counts = ", ".join(f"{task} {count}" for task, count in few.items())
        lines.append(
            f"  too few clips to tell the targets apart ({counts}; wanted >= {wanted} per task): generate the "
            f"split with --heldout {2 * wanted} or more"
        )
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], path: "str | Path") -> None:
    """Write an `evaluate_pipeline` report as JSON."""
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")
