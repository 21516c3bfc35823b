"""One denoising step of Vera against a single Wan transformer of the same size, measured in one run.

Usage (repository root):
    python bench/bench_step.py --config tiny                       # CPU
    python bench/bench_step.py --config wan-1.3b --dtype bfloat16  # GPU: the engine's backend; or --attention-backend

Prints both `vera-engine bench-step` reports and the ratios (time and FLOPs) Vera / Wan.
"""

import argparse

from vera_engine.tools.bench import bench_step, print_result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--device")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--attention-backend",
        default="auto",
        help="diffusers backend name, or auto: the engine's choice (docs/GPU.md)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    common = dict(
        device=args.device, dtype=args.dtype, attention_backend=args.attention_backend, repeats=args.repeats
    )
    vera = bench_step(args.config, **common)
    wan = bench_step(args.config, reference_wan=True, **common)
    print_result(vera)
    print()
    print_result(wan)
    print()
    print(
        f"Vera / Wan: {vera.seconds_per_step / wan.seconds_per_step:.2f}x the time, "
        f"{vera.tflop_per_step / wan.tflop_per_step:.2f}x the FLOPs per step"
    )


if __name__ == "__main__":
    main()
