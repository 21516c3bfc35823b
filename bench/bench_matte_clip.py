"""What the matte's clip black / clip white does to a checkpoint's edits: one sampling per clip, scored at several
clip settings (the engine's `clip_black` / `clip_white` options; docs/TINY_MODEL.md quotes the figures).

Usage (repository root):
    python -m vera_engine.training.data.synthetic --out CLIPS --train 0 --heldout 40 --seed 3 --height 32 --width 32 --frames 8
    python bench/bench_matte_clip.py --model default --data CLIPS --settings 0,1 0.02,0.98 0.05,0.95 0.1,0.9

Per setting and task: the share of what should stay untouched that has a matte of exactly 0 (`matte_clear_outside`
for object addition, `matte_clear_subject` for background change), the matte IoU, and the rates a clip must not lose
(object colour and size, background colours and layout): a clip black that eats the object would show there.
"""

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch

from vera_engine.pipelines.model_store import load_pipeline
from vera_engine.training.data.dataset import iter_clips
from vera_engine.training.evaluate import predict_clip
from vera_engine.training.metrics import evaluate_clip, summarize

COLUMNS = ("matte_clear_outside", "matte_clear_subject", "matte_iou", "colour_and_size_ok", "background_ok")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--settings", nargs="+", default=["0,1", "0.05,0.95"], help="black,white pairs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = [tuple(float(v) for v in text.split(",")) for text in args.settings]
    pipe = load_pipeline(args.model)
    steps, guidance = (
        int(pipe.config.get("default_steps", 20)),
        float(pipe.config.get("default_guidance", 1.0)),
    )
    results: dict[tuple[float, float], list] = {s: [] for s in settings}
    started = time.perf_counter()
    count = 0
    for clip in iter_clips(args.data, args.split):
        mask = clip.mask if clip.task == "background_change" else None
        raw = pipe(
            clip.input, clip.instruction, mask=mask, num_inference_steps=steps, guidance_scale=guidance,
            generator=torch.Generator().manual_seed(args.seed),
        )  # fmt: skip

        def replay(*_args, raw=raw, **_kwargs):  # the one sampling, finished at each setting
            return SimpleNamespace(alpha=raw.alpha, edit=raw.edit)

        for black, white in settings:
            prediction = predict_clip(
                replay,
                clip,
                steps=steps,
                guidance=guidance,
                seed=args.seed,
                clip_black=black,
                clip_white=white,
            )
            results[(black, white)].append(evaluate_clip(clip, prediction))
        count += 1
    print(f"{args.model}: {count} clips of {args.data} ({args.split}), {steps} steps, guidance {guidance:g}, "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    print(f"{'clip black,white':<18} {'task':<18} " + " ".join(f"{c:>20}" for c in COLUMNS))
    for setting, rows in results.items():
        for task, summary in summarize(rows).items():
            values = " ".join(f"{summary.get(c, float('nan')):>20.3f}" for c in COLUMNS)
            print(f"{setting[0]:g},{setting[1]:g}".ljust(18) + f" {task:<18} {values}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
