"""Step caching (vera_engine.acceleration.step_cache) against uncached sampling, measured in one run.

Samples each held-out clip uncached and with every cache setting (same seed, same steps and guidance), back to
back so that load on the machine affects all settings alike, and reports per setting, against the uncached result:
mean / max absolute error of the model's composite layer and of the matte, composite PSNR (per clip, capped at
100 dB, averaged), matte IoU at alpha > 0.5 (averaged), the fraction of MoT block evaluations skipped and the
wall-time ratio. MagCache is calibrated first on a clip of another split (reported apart, not in the ratios).

Usage (repository root):
    OMP_NUM_THREADS=1 python bench/bench_step_cache.py --data /tmp/vds32 --clips 8            # shipped model, CPU
    python bench/bench_step_cache.py --model /path/to/vera-1.3b --device cuda --steps 50 --guidance 5 \\
        --data /path/to/clips --clips 4                                                      # GPU speed-up
"""

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vera_engine.acceleration.step_cache import (
    BlockEvaluationCounter,
    calibrate_mag_ratios,
    parse_step_cache,
    step_cache,
)
from vera_engine.training.data.dataset import LayeredClip, iter_clips
from vera_engine.training.metrics import PSNR_CAP_DB, matte_iou, psnr

DEFAULT_SETTINGS = (
    "first_block:0.1",
    "first_block:0.15",
    "first_block:0.2",
    "mag:0.03",
    "mag:0.06",
    "mag:0.12",
    "taylorseer:2",
    "taylorseer:3",
    "taylorseer:4",
)


def _mask(clip: LayeredClip) -> Any:
    # As evaluation runs the clips: background change gets its mask, object addition none.
    return clip.mask if clip.task == "background_change" else None


def sample(
    pipe: Any, clip: LayeredClip, spec: str, *, steps: int, guidance: float, seed: int
) -> tuple[Any, float, BlockEvaluationCounter]:
    """One sampling call of `clip` under the step cache `spec`: (output, seconds, block counter)."""
    device = getattr(pipe, "_execution_device", "cpu")
    with (
        BlockEvaluationCounter(pipe.transformer) as counter,
        step_cache(pipe, spec, num_inference_steps=steps, guidance_scale=guidance),
    ):
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = pipe(
            clip.input,
            clip.instruction,
            mask=_mask(clip),
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
        )
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return out, seconds, counter


def compare_step_caches(
    pipe: Any,
    clips: Sequence[LayeredClip],
    settings: Sequence[str] = DEFAULT_SETTINGS,
    *,
    steps: int,
    guidance: float,
    seed: int = 0,
    calibration_clip: LayeredClip | None = None,
) -> dict[str, Any]:
    """Measure every setting against uncached sampling on `clips`; returns the report `format_table` prints.

    `calibration_clip` calibrates MagCache (needed when a setting is ``mag``); use a clip not among `clips`.
    """
    specs = [str(parse_step_cache(setting)) for setting in settings]
    if not clips:
        raise ValueError("clips is empty; expected at least one clip to sample")
    calibration_seconds = None
    if any(spec.startswith("mag") for spec in specs):
        if calibration_clip is None:
            raise ValueError("a mag setting needs calibration_clip (a clip not among the measured ones)")
        started = time.perf_counter()
        calibrate_mag_ratios(
            pipe,
            calibration_clip.input,
            calibration_clip.instruction,
            mask=_mask(calibration_clip),
            num_inference_steps=steps,
            guidance_scale=guidance,
            seed=seed,
        )
        calibration_seconds = time.perf_counter() - started

    # One untimed call first: the first call pays one-off costs (allocations, lazy initialisation).
    sample(pipe, clips[0], "none", steps=steps, guidance=guidance, seed=seed)

    totals: dict[str, dict[str, Any]] = {
        spec: {"seconds": 0.0, "calls": 0, "runs": 0, "per_clip": []} for spec in ["none", *specs]
    }
    for clip in clips:
        reference, seconds, counter = sample(pipe, clip, "none", steps=steps, guidance=guidance, seed=seed)
        _add(totals["none"], seconds, counter)
        for spec in specs:
            out, seconds, counter = sample(pipe, clip, spec, steps=steps, guidance=guidance, seed=seed)
            _add(totals[spec], seconds, counter)
            totals[spec]["per_clip"].append(_errors(out, reference))

    base_seconds = totals["none"]["seconds"]
    rows = []
    for spec in specs:
        total = totals[spec]
        per_clip = total["per_clip"]
        rows.append(
            {
                "setting": spec,
                "skipped": 1.0 - total["runs"] / total["calls"],
                "time_ratio": total["seconds"] / base_seconds,
                "seconds": total["seconds"],
                "composite_mean_abs": float(np.mean([c["composite_mean_abs"] for c in per_clip])),
                "composite_max_abs": float(np.max([c["composite_max_abs"] for c in per_clip])),
                "composite_psnr": float(np.mean([c["composite_psnr"] for c in per_clip])),
                "matte_mean_abs": float(np.mean([c["matte_mean_abs"] for c in per_clip])),
                "matte_max_abs": float(np.max([c["matte_max_abs"] for c in per_clip])),
                "matte_iou": float(np.mean([c["matte_iou"] for c in per_clip])),
                "per_clip": per_clip,
            }
        )
    return {
        "clips": [clip.clip_id for clip in clips],
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "uncached_seconds": base_seconds,
        "uncached_skipped": 1.0 - totals["none"]["runs"] / totals["none"]["calls"],
        "mag_calibration_seconds": calibration_seconds,
        "rows": rows,
    }


def _add(total: dict[str, Any], seconds: float, counter: BlockEvaluationCounter) -> None:
    total["seconds"] += seconds
    total["calls"] += counter.calls
    total["runs"] += counter.runs


def _errors(out: Any, reference: Any) -> dict[str, float]:
    composite = np.abs(out.composite - reference.composite)
    matte = np.abs(out.alpha - reference.alpha)
    return {
        "composite_mean_abs": float(composite.mean()),
        "composite_max_abs": float(composite.max()),
        "composite_psnr": min(psnr(out.composite, reference.composite), PSNR_CAP_DB),
        "matte_mean_abs": float(matte.mean()),
        "matte_max_abs": float(matte.max()),
        "matte_iou": matte_iou(out.alpha, reference.alpha),
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table (one row per setting, uncached first)."""
    lines = [
        f"{len(report['clips'])} clips, {report['steps']} steps, guidance {report['guidance']:g}, seed "
        f"{report['seed']}; uncached {report['uncached_seconds']:.1f} s in all"
        + (
            f"; MagCache calibration {report['mag_calibration_seconds']:.1f} s (one clip, once)"
            if report["mag_calibration_seconds"] is not None
            else ""
        ),
        "",
        "| setting | blocks skipped | time vs uncached | composite mean abs | composite max abs | composite PSNR "
        "(dB) | matte mean abs | matte max abs | matte IoU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| none | 0.0% | 1.00 | 0 | 0 | inf | 0 | 0 | 1.000 |",
    ]
    for row in report["rows"]:
        psnr_text = "inf" if row["composite_psnr"] >= PSNR_CAP_DB else f"{row['composite_psnr']:.1f}"
        lines.append(
            f"| {row['setting']} | {row['skipped']:.1%} | {row['time_ratio']:.2f} | "
            f"{row['composite_mean_abs']:.2e} | {row['composite_max_abs']:.2e} | {psnr_text} | "
            f"{row['matte_mean_abs']:.2e} | {row['matte_max_abs']:.2e} | {row['matte_iou']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default", help="model name or folder (default: the shipped one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default="/tmp/vds32", help="layered dataset root (docs/DATASET.md)")
    parser.add_argument("--split", default="heldout", help="split whose clips are measured")
    parser.add_argument("--clips", type=int, default=8, help="number of clips of --split to measure")
    parser.add_argument(
        "--calibration-split", default="train", help="split whose first clip calibrates MagCache"
    )
    parser.add_argument("--steps", type=int, help="denoising steps (default: the checkpoint's)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--settings",
        default=",".join(DEFAULT_SETTINGS),
        help="comma-separated step-cache specs (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="also write the full report (per clip too) here")
    args = parser.parse_args(argv)

    from vera_engine.pipelines.model_store import load_pipeline

    if args.clips < 1:
        parser.error(f"--clips {args.clips}: expected at least 1")
    pipe = load_pipeline(args.model, device=args.device)
    steps = args.steps if args.steps is not None else pipe.config.default_steps
    guidance = args.guidance if args.guidance is not None else pipe.config.default_guidance
    clips = []
    for clip in iter_clips(args.data, args.split):
        clips.append(clip)
        if len(clips) == args.clips:
            break
    settings = [setting for setting in args.settings.split(",") if setting.strip()]
    calibration_clip = None
    if any(parse_step_cache(setting).name == "mag" for setting in settings):
        calibration_clip = next(iter_clips(args.data, args.calibration_split))
    report = compare_step_caches(
        pipe,
        clips,
        settings,
        steps=steps,
        guidance=guidance,
        seed=args.seed,
        calibration_clip=calibration_clip,
    )
    report["model"] = args.model
    report["device"] = str(args.device)
    print(format_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
