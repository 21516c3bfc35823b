"""`vera-engine`: the engine's command line (convert Wan checkpoints, benchmark a step, serve, train, ...).

Exit codes: 0 success, 2 bad arguments or input (the message says which), 1 anything else.
"""

import argparse
import sys
from collections.abc import Sequence


def _add_convert_wan(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-wan",
        help="build a Vera pipeline folder from a diffusers-format Wan2.1 T2V folder",
        description="Initialise all three Vera branches from a Wan2.1 text-to-video transformer and carry its VAE, "
        "text encoder, tokenizer and scheduler over into a Vera pipeline folder.",
    )
    parser.add_argument(
        "--wan", required=True, help="diffusers-format Wan2.1 T2V folder (with model_index.json)"
    )
    parser.add_argument("--out", required=True, help="folder to write the Vera pipeline to")
    parser.add_argument("--native-height", type=int, default=480)
    parser.add_argument("--native-width", type=int, default=832)
    parser.add_argument("--native-frames", type=int, default=49)
    parser.add_argument(
        "--dtype",
        choices=("keep", "float32", "bfloat16"),
        default="keep",
        help="weight dtype of the Vera transformer (default: Wan's)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(handler=_run_convert_wan)


def _run_convert_wan(args: argparse.Namespace) -> int:
    import torch

    from .convert import convert_wan

    dtype = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    out = convert_wan(
        args.wan,
        args.out,
        native_height=args.native_height,
        native_width=args.native_width,
        native_frames=args.native_frames,
        torch_dtype=dtype,
        overwrite=args.overwrite,
    )
    print(f"wrote Vera pipeline to {out}")
    return 0


def _add_bench_step(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench-step",
        help="time one denoising step of a named Vera size (random weights)",
        description="Time one denoising step (one transformer forward over the three streams, CFG batched) and "
        "print tokens per stream, the step's FLOPs, seconds, achieved TFLOP/s and peak memory.",
    )
    parser.add_argument("--config", default="tiny", help="tiny, wan-1.3b or wan-14b (default: tiny)")
    parser.add_argument("--frames", type=int, help="pixel frames (default: the preset's native window)")
    parser.add_argument("--height", type=int, help="pixel height (default: native)")
    parser.add_argument("--width", type=int, help="pixel width (default: native)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--no-cfg", dest="cfg", action="store_false", help="one pass per step (guidance 1)")
    parser.add_argument(
        "--attention-backend", help="diffusers attention backend (native, _native_cudnn, flash, ...)"
    )
    parser.add_argument(
        "--reference-wan", action="store_true", help="time a single Wan transformer of the same size"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed steps after one warm-up (median reported)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_run_bench_step)


def _run_bench_step(args: argparse.Namespace) -> int:
    from .bench import bench_step, print_result

    result = bench_step(
        args.config,
        frames=args.frames,
        height=args.height,
        width=args.width,
        device=args.device,
        dtype=args.dtype,
        cfg=args.cfg,
        attention_backend=args.attention_backend,
        reference_wan=args.reference_wan,
        repeats=args.repeats,
    )
    print_result(result, as_json=args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `vera-engine` argument parser with all its subcommands."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="vera-engine", description="Vera Edit engine.")
    parser.add_argument("--version", action="version", version=f"vera-engine {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_convert_wan, _add_bench_step):
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `vera-engine`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"vera-engine {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vera-engine {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
