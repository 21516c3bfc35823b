"""Model cards for trained Vera folders: what it was trained on, how long, its loss curve and eval figures.

`write_model_card(model_dir, run_dir, eval_report)` writes `README.md` and `loss_curve.png` into the model
folder from the training log (`<run>/training/log.jsonl`, `config.json`) and a `vera-engine eval` report.
"""

import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vera_engine.training.train import read_history, read_log, smoothed


def plot_loss_curve(
    log: Sequence[Mapping[str, Any]], path: "str | Path", size: tuple[int, int] = (640, 320)
) -> Path:
    """Draw the logged total and per-layer losses against steps as a PNG (Pillow, no plotting library)."""
    from PIL import Image, ImageDraw

    if not log:
        raise ValueError("the training log is empty: nothing to plot")
    width, height = size
    left, right, top, bottom = 56, 12, 12, 36
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    steps = [row["step"] for row in log]
    series = {
        "loss": (smoothed([row["loss"] for row in log]), (0, 0, 0)),
        "edit": (smoothed([row["edit"] for row in log]), (200, 60, 60)),
        "alpha": (smoothed([row["alpha"] for row in log]), (60, 140, 60)),
        "composite": (smoothed([row["composite"] for row in log]), (60, 80, 200)),
    }
    low = min(min(values) for values, _ in series.values())
    high = max(max(values) for values, _ in series.values())
    span = max(high - low, 1e-6)

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + (width - left - right) * (step - steps[0]) / max(steps[-1] - steps[0], 1)
        y = top + (height - top - bottom) * (1 - (value - low) / span)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline=(160, 160, 160))
    for fraction in (0.0, 0.5, 1.0):
        value = low + span * fraction
        _, y = xy(steps[0], value)
        draw.text((4, y - 6), f"{value:.3f}", fill=(80, 80, 80))
    draw.text((left, height - bottom + 6), f"step {steps[0]}", fill=(80, 80, 80))
    draw.text((width - right - 90, height - bottom + 6), f"step {steps[-1]}", fill=(80, 80, 80))
    for index, (name, (values, colour)) in enumerate(series.items()):
        points = [xy(step, value) for step, value in zip(steps, values, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2 if name == "loss" else 1)
        draw.text((left + 8 + 90 * index, height - 16), name, fill=colour)
    path = Path(path)
    image.save(path)
    return path


def _summary_rows(report: Mapping[str, Any]) -> list[str]:
    """The eval table: one row per metric, rates as `0.83 (0.75–0.89)` (their 95 % Wilson intervals), then a line
    for any task scored on fewer clips than can tell the targets apart."""
    from vera_engine.training.evaluate import MIN_CLIPS_PER_TASK, format_rate

    rows = ["| task | metric | value | target |", "| --- | --- | --- | --- |"]
    for task, metrics in report["summary"].items():
        for name, value in metrics.items():
            if name.endswith("_ci95"):
                continue  # shown beside its rate
            target = report.get("targets", {}).get(task, {}).get(name)
            target_text = (
                "" if target is None else f"≥ {target['target']:g} ({'met' if target['met'] else 'not met'})"
            )
            shown = f"{int(value)}" if name == "count" else format_rate(value, metrics.get(f"{name}_ci95"))
            rows.append(f"| {task} | {name} | {shown} | {target_text} |")
    few = {task: int(m["count"]) for task, m in report["summary"].items() if m["count"] < MIN_CLIPS_PER_TASK}
    if few:
        rows += [
            "",
            f"Fewer than {MIN_CLIPS_PER_TASK} clips per task ("
            + ", ".join(f"{task} {count}" for task, count in few.items())
            + "): the intervals are too wide to tell the targets apart.",
        ]
    return rows


def training_seconds(log: list[Mapping[str, Any]]) -> tuple[float, int]:
    """Time spent training, from the log's timestamps, and how many times the run was stopped and resumed.

    A run resumed later leaves a gap in the timestamps; an interval over 5x the median (per logged step) is such a
    gap and counts as the median instead of its length.
    """
    intervals = [(b["time"] - a["time"]) / max(1, b["step"] - a["step"]) for a, b in itertools.pairwise(log)]
    if not intervals:
        return 0.0, 0
    per_step = sorted(intervals)[len(intervals) // 2]
    seconds, resumes = 0.0, 0
    for a, b, interval in zip(log, log[1:], intervals, strict=False):
        steps = max(1, b["step"] - a["step"])
        if interval > 5 * per_step:
            resumes += 1
            interval = per_step
        seconds += interval * steps
    return seconds, resumes


def write_model_card(
    model_dir: "str | Path",
    run_dir: "str | Path",
    eval_report: Mapping[str, Any],
    *,
    name: str,
    data_command: str,
    train_command: str,
    eval_command: str,
    machine: str,
    started_from: str | None = None,
    extra_reports: Sequence[tuple[str, str, Mapping[str, Any]]] = (),
    notes: Sequence[str] = (),
) -> Path:
    """Write `README.md` and `loss_curve.png` into `model_dir` for the run in `run_dir`.

    `started_from`: for a run with `--init`, a sentence saying what the init model was and how it was trained.
    `extra_reports`: more evaluations, each (title, command, report), e.g. a second held-out split; `notes`:
    markdown lines for a closing "Notes" section (diagnostics, what the figures mean).
    """
    model_dir, run_dir = Path(model_dir), Path(run_dir)
    log = read_log(run_dir)
    config = json.loads((run_dir / "training" / "config.json").read_text())
    # What the run started with and what each resume changed (runs saved before histories were kept: config only).
    history = read_history(run_dir)
    first_settings = history[0]["settings"] if history else config
    index = json.loads((model_dir / "model_index.json").read_text())
    transformer = json.loads((model_dir / "transformer" / "config.json").read_text())
    plot_loss_curve(log, model_dir / "loss_curve.png")
    seconds, resumes = training_seconds(log)
    first, last = log[0], log[-1]
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    tokenizer_class = index["tokenizer"][1]
    reads = (
        "bytes (ByT5 tokenizer)"
        if tokenizer_class == "ByT5Tokenizer"
        else "words (a vocabulary of the training instructions)"
    )
    # A resume points `init` at the run itself: what the run started from is in its first stretch.
    if first_settings.get("init") == "unknown" or first_settings.get("init") == first_settings.get("out"):
        start_lines = [
            f"- started from: {started_from}"
            if started_from
            else "- started from: not recorded (the run was resumed before training histories were kept)"
        ]
    elif first_settings.get("init"):
        # The init folder's path is the trainer's machine's business; `started_from` says what that model was.
        start = "- started from the `--init` model" + (
            ": its transformer, with a new tokenizer and text encoder"
            if first_settings.get("fresh_text_encoder")
            else ""
        )
        start_lines = [start + (f". {started_from}" if started_from else "")]
    else:
        start_lines = ["- from random weights"]
    lines = [
        f"# {name}",
        "",
        "The default model of Vera Edit: a small Vera (three Wan2.1-shaped DiTs with joint attention) trained from",
        "scratch on the project's synthetic layered data, so that the whole product runs on a CPU with no",
        "downloaded weights. It is a demonstration and test model, not a production one: the Evaluation table",
        "says what it has learned so far (targets marked). For real footage use `vera-engine convert-wan` +",
        "`vera-engine train`.",
        "",
        "## Shape",
        "",
        f"- native size {index['native_width']}x{index['native_height']}, {index['native_frames']} frames; "
        f"lossless space-to-depth codec (no VAE); a small T5 text encoder over {reads}",
        f"- transformer: {transformer['num_layers']} layers, {transformer['num_attention_heads']} heads x "
        f"{transformer['attention_head_dim']}, FFN {transformer['ffn_dim']}, patch {transformer['patch_size']}, "
        f"{transformer['in_channels']} latent channels",
        f"- {size / 2**20:.1f} MiB on disk, safetensors only",
        "",
        "## Data",
        "",
        f"`{data_command}`",
        "",
        "Seeded synthetic clips (docs/DATASET.md): object addition (the source lacks a shape; the instruction names",
        "its colour, shape, motion and position) and background change (a textured subject kept, the background",
        "replaced by one the instruction describes), with soft shadows, occlusion and camera pans.",
        "",
        "## Training",
        "",
        f"`{train_command}`",
        "",
        *start_lines,
        f"- {last['step']} steps of batch {config['batch_size']} on {machine}, {seconds / 60:.0f} minutes of "
        f"training" + (f" (stopped and resumed {resumes} time{'s' * (resumes > 1)})" if resumes else ""),
        f"- base learning rate {first_settings['learning_rate']:g}, branch multipliers "
        f"{first_settings['branch_lr_scales']}, text encoder x{first_settings.get('text_encoder_lr_scale', 0):g}, "
        f"warm-up {first_settings['warmup_steps']}, EMA {first_settings['ema_decay']:g}, mask dropout "
        f"{first_settings['mask_dropout']}, text dropout {first_settings.get('text_dropout', 0):g}, noise-level "
        f"shift {first_settings.get('timestep_shift', 1):g}, precision {first_settings.get('mixed_precision', 'auto')}"
        + (
            f", learning rate decayed to 0 over the last {first_settings['cooldown_steps']} of "
            f"{first_settings['steps']} steps"
            if first_settings.get("cooldown_steps")
            else ""
        ),
        *[
            f"- from step {stretch['from_step']} (resumed with other settings): "
            + ", ".join(f"{key} {old} -> {new}" for key, (old, new) in stretch["changed"].items())
            for stretch in history[1:]
        ],
        f"- loss {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step {last['step']} "
        "(flow-matching MSE, mean of the three layers)",
        "- no pretrained weights, so the paper's per-branch multipliers (which keep the pretrained edit branch close to the",
        "  video prior) are set to 1 and the text encoder is trained too",
        "",
        "![loss curve](loss_curve.png)",
        "",
        "## Evaluation",
        "",
        f"`{eval_command}`",
        "",
        f"Held-out split, {eval_report['steps']} steps, guidance {eval_report['guidance']:g}; each rate (a share "
        "of clips) with its 95 % interval (Wilson score):",
        "",
        *_summary_rows(eval_report),
        "",
    ]
    for title, command, report in extra_reports:
        lines += [
            f"### {title}",
            "",
            f"`{command}`",
            "",
            f"{report['steps']} steps, guidance {report['guidance']:g}:",
            "",
            *_summary_rows(report),
            "",
        ]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    path = model_dir / "README.md"
    path.write_text("\n".join(lines))
    return path
