"""Training step time with and without `vera-engine cache`, and LoRA against full fine-tuning (time, memory, size).

    python bench/bench_train_cache_lora.py [--steps 12] [--json]

Everything is tiny and on the CPU, in one run, so the figures compare with each other only:

* cache: the tiny preset (lossless space-to-depth codec, a small T5) and a tiny Wan-shaped model (a small
  `AutoencoderKLWan` + umT5, tests/wan_fixtures.py), each trained on the same synthetic clips from pixels and from
  its cache; the step time is the median gap between logged steps (no checkpoint inside the window);
* LoRA: full fine-tuning against `--lora 4` from the same base (the vera-tiny shape): step time, peak resident
  memory of the process (each run in its own process), trainable parameters and the adapter file's size.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train(data: Path, out: Path, steps: int, **settings) -> dict:
    """Train ``steps`` steps; the median CPU time and wall time of one optimiser step (data loading included,
    the first step left out as warm-up). CPU time is what compares on a shared machine; wall time is printed too."""
    from vera_engine.training import train as train_module

    cpu: list[float] = []
    wall: list[float] = []
    step = train_module._train_step
    last = [time.process_time(), time.perf_counter()]

    def timed_step(*args, **kwargs):
        # From the end of the previous step: the loader's work for this batch counts too.
        result = step(*args, **kwargs)
        now = [time.process_time(), time.perf_counter()]
        cpu.append(now[0] - last[0])
        wall.append(now[1] - last[1])
        last[:] = now
        return result

    train_module._train_step = timed_step
    config = train_module.TrainConfig(
        data=str(data), out=str(out), steps=steps, batch_size=2, warmup_steps=0, log_every=1,
        save_every=10**6, **settings,
    )  # fmt: skip
    train_module.train(config, progress=False)
    return {
        "cpu_seconds_per_step": statistics.median(cpu[1:]),
        "wall_seconds_per_step": statistics.median(wall[1:]),
    }


def child(kind: str, work: Path, steps: int) -> dict:
    """One measured run (in its own process, for its peak memory)."""
    import torch

    torch.set_num_threads(1)
    data, base = work / "data", work / "base"
    out = work / f"run-{kind}"
    if kind == "full":
        result = _train(data, out, steps, init=str(base), learning_rate=1e-4)
    elif kind == "lora":
        from vera_engine.training.lora import adapter_size

        result = _train(data, out, steps, init=str(base), learning_rate=1e-3, lora=4)
        result["adapter_bytes"] = adapter_size(out)["bytes"]
    else:  # cache comparisons: "<model>-pixels" / "<model>-cache"
        model, source = kind.split("-")
        settings = {"init": str(work / model)}
        if source == "cache":
            settings["cache"] = str(work / f"cache-{model}")
        result = _train(work / f"data-{model}", out, steps, **settings)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def prepare(work: Path, only: str | None) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.released_fixtures import write_released_dataset
    from tests.wan_fixtures import save_tiny_wan_pipeline
    from vera_engine.pipelines.presets import build_random_pipeline
    from vera_engine.training.cache import build_cache
    from vera_engine.training.data import generate_dataset
    from vera_engine.training.data.dataset import LayeredVideoDataset

    if only != "cache":  # full fine-tuning against LoRA: the vera-tiny shape
        generate_dataset(work / "data", {"train": 8}, frames=8, height=32, width=32, seed=1)
        words = LayeredVideoDataset(work / "data", "train").instructions()
        pipe = build_random_pipeline("vera-tiny", vocabulary=words)
        pipe.save_pretrained(work / "base", safe_serialization=True)
    if only == "lora":
        return {}
    # Cache comparison: the tiny preset on the synthetic clips, the tiny Wan model on released-layout clips.
    generate_dataset(work / "data-tiny", {"train": 8}, frames=4, height=32, width=32, seed=2)
    build_random_pipeline("tiny").save_pretrained(work / "tiny", safe_serialization=True)
    write_released_dataset(work / "data-wan", count=4)
    save_tiny_wan_pipeline(work / "wan")
    seconds = {}
    for model in ("tiny", "wan"):
        index = build_cache(work / f"data-{model}", work / model, work / f"cache-{model}", progress=False)
        seconds[model] = index["seconds"]
    return {"cache_build_seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", choices=("cache", "lora"), help="run one of the two comparisons")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.work), args.steps)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results: dict = prepare(work, args.only)
        kinds = {"cache": ("tiny-pixels", "tiny-cache", "wan-pixels", "wan-cache"), "lora": ("full", "lora")}
        for kind in kinds[args.only] if args.only else (*kinds["cache"], *kinds["lora"]):
            done = subprocess.run(
                [sys.executable, __file__, "--child", kind, "--work", str(work), "--steps", str(args.steps)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        from vera_engine.pipelines.presets import build_random_transformer
        from vera_engine.training.lora import add_training_adapter

        model = build_random_transformer("vera-tiny")
        total = sum(p.numel() for p in model.parameters())
        add_training_adapter(model, 4)
        results["parameters"] = {
            "full": total,
            "lora_rank_4": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    if "cache_build_seconds" in results:
        print(f"cache build (wall s): {results['cache_build_seconds']}")

    def ms(result: dict) -> str:
        return f"{result['cpu_seconds_per_step'] * 1e3:7.1f} ms CPU ({result['wall_seconds_per_step'] * 1e3:.0f} wall)"

    for model in ("tiny", "wan"):
        if f"{model}-pixels" in results:
            pixels, cached = results[f"{model}-pixels"], results[f"{model}-cache"]
            ratio = pixels["cpu_seconds_per_step"] / cached["cpu_seconds_per_step"]
            print(
                f"{model:>5}: {ms(pixels)} per step from pixels, {ms(cached)} from the cache ({ratio:.2f}x)"
            )
    if "full" in results:
        full, lora = results["full"], results["lora"]
        print(
            f"full fine-tune: {ms(full)} per step, peak RSS {full['peak_rss_mib']:.0f} MiB, "
            f"{results['parameters']['full']:,} trainable parameters"
        )
        print(
            f"LoRA rank 4:    {ms(lora)} per step, peak RSS {lora['peak_rss_mib']:.0f} MiB, "
            f"{results['parameters']['lora_rank_4']:,} trainable parameters, adapter "
            f"{lora['adapter_bytes'] / 1024:.0f} KiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
