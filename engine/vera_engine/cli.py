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
        choices=("float32", "bfloat16"),
        default="float32",
        help="weight dtype of the Vera transformer; norms and modulation stay float32 (default: float32)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(handler=_run_convert_wan)


def _run_convert_wan(args: argparse.Namespace) -> int:
    import torch

    from .convert import convert_wan

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
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
        "--cfg-sequential",
        action="store_true",
        help="run CFG's two passes one after the other (batch 1 each) instead of as one batch of 2",
    )
    parser.add_argument(
        "--attention-backend",
        help="diffusers attention backend (native, _native_cudnn, flash, _flash_3, sage)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the repeated MoT block (first step compiles)"
    )
    parser.add_argument(
        "--context-parallel",
        choices=("ulysses", "ring"),
        help="split the sequence across the processes of a torchrun launch (only rank 0 prints)",
    )
    parser.add_argument(
        "--steps", type=int, default=50, help="steps per clip for the per-clip estimate (default: 50)"
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
        cfg_sequential=args.cfg_sequential,
        attention_backend=args.attention_backend,
        compile_blocks=args.compile,
        context_parallel=args.context_parallel,
        reference_wan=args.reference_wan,
        repeats=args.repeats,
        steps=args.steps,
    )
    if result.rank == 0:
        print_result(result, as_json=args.json)
    return 0


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    from .recipe import DEFAULT_BRANCH_LR_SCALES, DEFAULT_MASK_DROPOUT

    parser = subparsers.add_parser(
        "train",
        help="train Vera on a layered dataset (flow matching on all three layers)",
        description="Vera's recipe: flow matching on edit, alpha and composite with equal weights, per-branch "
        "learning rates, mask dropout per task, warm-up, EMA. Run under torchrun for DDP on several GPUs.",
    )
    parser.add_argument("--data", required=True, help="layered dataset folder (docs/DATASET.md)")
    parser.add_argument(
        "--out", required=True, help="pipeline folder to write (checkpoints replace it atomically)"
    )
    parser.add_argument(
        "--init", help="pipeline folder to start from (convert-wan output, or a trained Vera)"
    )
    parser.add_argument(
        "--preset",
        help="random-weight tiny preset to start from (default: tiny); with --init, only for --fresh-text-encoder",
    )
    parser.add_argument(
        "--fresh-text-encoder",
        action="store_true",
        help="with --init: keep its transformer, start a new tokenizer and text encoder of --preset's kind (a "
        "word-level vocabulary is built from the training instructions)",
    )
    parser.add_argument(
        "--frame-position-embedding",
        action="store_true",
        help="with --init: add frame-position embeddings (zero at first) to its transformer",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=4, help="clips per process and step")
    parser.add_argument("--lr", type=float, default=1e-5, help="base learning rate (paper: 1e-5)")
    scales = ",".join(f"{k}={v:g}" for k, v in DEFAULT_BRANCH_LR_SCALES.items())
    parser.add_argument(
        "--branch-lr", default=scales, help=f"per-branch multipliers of --lr (default: {scales})"
    )
    dropout = ",".join(f"{k}={v:g}" for k, v in DEFAULT_MASK_DROPOUT.items())
    parser.add_argument("--mask-dropout", default=dropout, help=f"mask dropout per task (default: {dropout})")
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument(
        "--cooldown-steps",
        type=int,
        default=0,
        help="decay the learning rate linearly to 0 over the last N of --steps (default 0: constant after warm-up, "
        "as in the paper); may be added at a --resume",
    )
    parser.add_argument(
        "--text-dropout",
        type=float,
        default=0.1,
        help="probability of training on an empty instruction (for classifier-free guidance)",
    )
    parser.add_argument(
        "--text-encoder-lr",
        type=float,
        default=0.0,
        help="train the text encoder at this multiple of --lr (default 0: frozen, as for a pretrained umT5)",
    )
    parser.add_argument(
        "--timestep-shift",
        type=float,
        default=1.0,
        help="flow shift of the training noise levels (1: uniform; 3: more high-noise steps, like inference)",
    )
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the transformer's weights, gradients, optimiser and EMA state across the "
        "processes (FSDP2) instead of replicating it (DDP); for sizes whose AdamW state does not fit one GPU",
    )
    parser.add_argument(
        "--mixed-precision",
        choices=("auto", "no", "bf16"),
        default="auto",
        help="auto: bf16 autocast on CUDA, float32 on CPU; bf16 also pays on CPUs with AVX-512 BF16",
    )
    parser.add_argument("--frames", type=int, help="frames per training crop (default: whole clips)")
    parser.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), help="spatial crop (default: full frames)"
    )
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, parse_branch_lr_scales, parse_mask_dropout, train

    if args.init and args.preset and not args.fresh_text_encoder:
        raise ValueError(
            "--init and --preset start from different weights; give one, or add --fresh-text-encoder to keep "
            "--init's transformer with a new text encoder of --preset's kind"
        )

    config = TrainConfig(
        data=args.data,
        out=args.out,
        init=args.init,
        preset=args.preset or "tiny",
        fresh_text_encoder=args.fresh_text_encoder,
        frame_position_embedding=args.frame_position_embedding,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        branch_lr_scales=parse_branch_lr_scales(args.branch_lr),
        mask_dropout=parse_mask_dropout(args.mask_dropout),
        warmup_steps=args.warmup_steps,
        cooldown_steps=args.cooldown_steps,
        text_dropout=args.text_dropout,
        text_encoder_lr_scale=args.text_encoder_lr,
        timestep_shift=args.timestep_shift,
        ema_decay=args.ema_decay,
        gradient_checkpointing=args.gradient_checkpointing,
        fsdp=args.fsdp,
        mixed_precision=args.mixed_precision,
        frames=args.frames,
        size=tuple(args.size) if args.size else None,
        save_every=args.save_every,
        log_every=args.log_every,
        seed=args.seed,
        num_workers=args.num_workers,
    )
    summary = train(config, resume=args.resume, progress=args.progress)
    if summary.get("rank", 0) == 0:
        print(
            f"trained to step {summary['steps']} ({summary['seconds_per_step']:.3g} s/step), "
            f"loss {summary['last'].get('loss', float('nan')):.4f}; pipeline in {summary['out']}"
        )
    return 0


def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a Vera pipeline on a held-out split of a layered dataset",
        description="Background change: matte IoU and composite PSNR against ground truth; object addition: "
        "matte non-empty, edit colour and direction of motion as instructed; both: exact preservation where the "
        "matte is zero. Prints a table (or JSON) and checks the shipped checkpoint's targets.",
    )
    parser.add_argument(
        "--model", default="default", help="pipeline folder, or 'default' for the shipped one"
    )
    parser.add_argument("--data", required=True, help="layered dataset folder")
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", help="also write the full report (per-clip results) as JSON here")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from .evaluate import evaluate_pipeline, format_report, write_report
    from .model_store import load_pipeline

    pipe = load_pipeline(args.model)
    report = evaluate_pipeline(
        pipe, args.data, args.split, steps=args.steps, guidance=args.guidance, seed=args.seed
    )
    if args.report:
        write_report(report, args.report)
    if args.json:
        print(json.dumps({"summary": report["summary"], "targets": report["targets"]}, default=str))
    else:
        print(format_report(report))
    return 0


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the whole product end to end on the shipped checkpoint (about a minute on a CPU)",
        description="Write a sample scene-linear EXR plate, start an engine, submit it through the gRPC client, "
        "show progress, fetch the layered EXRs and write a contact sheet.",
    )
    parser.add_argument(
        "--out", default="vera_demo", help="folder for everything it writes (default: vera_demo)"
    )
    parser.add_argument(
        "--model", default="default", help="pipeline folder, or 'default' for the shipped one"
    )
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, model=args.model, steps=args.steps, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `vera-engine` argument parser with all its subcommands."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="vera-engine", description="Vera Edit engine.")
    parser.add_argument("--version", action="version", version=f"vera-engine {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from .service.server import add_serve_parser

    for add in (add_serve_parser, _add_convert_wan, _add_bench_step, _add_train, _add_eval, _add_demo):
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
