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

    from vera_engine.tools.convert import convert_wan

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
        default="auto",
        help="diffusers attention backend (native, _native_cudnn, flash, _flash_3, sage), or auto (default): "
        "the one the engine picks for the device (docs/GPU.md)",
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
    from vera_engine.tools.bench import bench_step, print_result

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
    from vera_engine.tools.config_cli import add_config_arguments
    from vera_engine.training.train import TrainConfig

    parser = subparsers.add_parser(
        "train",
        help="train Vera on a layered dataset (flow matching on all three layers)",
        description="Vera's recipe: flow matching on edit, alpha and composite with equal weights, per-branch "
        "learning rates, mask dropout per task, warm-up, EMA. Run under torchrun for DDP on several GPUs. "
        "Settings not given come from the preset trained (--preset, or the one whose shape the --init model has): "
        "vera-tiny's own recipe (lr 5e-4, every branch at 1x, the text encoder trained, noise shift 3, "
        "foreground weight 4, batch 8, ...) for a model trained from scratch; the defaults shown below (the "
        "paper's: lr 1e-5, text encoder frozen) otherwise, which suit a start from a pretrained Wan. "
        "--init default is the shipped model.",
    )
    add_config_arguments(parser, TrainConfig)
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from vera_engine.tools.config_cli import config_from_arguments, given
    from vera_engine.training.train import TrainConfig, train

    if given(args, "init") and given(args, "preset") and not args.fresh_text_encoder:
        raise ValueError(
            "--init and --preset start from different weights; give one, or add --fresh-text-encoder to keep "
            "--init's transformer with a new text encoder of --preset's kind"
        )
    defaults = _preset_training_defaults(args)
    config = config_from_arguments(
        TrainConfig, args, **{name: value for name, value in defaults.items() if not given(args, name)}
    )
    summary = train(config, resume=args.resume, progress=args.progress)
    if summary.get("rank", 0) == 0:
        print(
            f"trained to step {summary['steps']} ({summary['seconds_per_step']:.3g} s/step), "
            f"loss {summary['last'].get('loss', float('nan')):.4f}; pipeline in {summary['out']}"
        )
    return 0


def _preset_training_defaults(args: argparse.Namespace) -> dict:
    """The training settings of the preset this run trains (`VeraPreset.training`): `--preset` when given, else the
    preset whose shape the --init model (or, resuming, the run itself) has; `--init default` means the shipped
    model. Flags given on the command line win over them."""
    import json
    from pathlib import Path

    from vera_engine.pipelines.model_store import resolve_model_dir
    from vera_engine.pipelines.presets import get_preset, preset_of_transformer

    if args.init is not None:
        args.init = str(resolve_model_dir(args.init))  # `default`, as everywhere else; a folder is checked
    if args.preset is not None:
        return dict(get_preset(args.preset).training)
    start = args.init or (args.out if args.resume else None)
    if start is None:
        from vera_engine.training.train import TrainConfig

        return dict(get_preset(TrainConfig.preset).training)
    config_path = Path(start) / "transformer" / "config.json"
    if not config_path.is_file():
        return {}
    preset = preset_of_transformer(json.loads(config_path.read_text()))
    return dict(preset.training) if preset is not None else {}


def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a Vera pipeline on a held-out split of a layered dataset",
        description="Object addition (without and with a mask): colour and size of the matte, direction of motion, "
        "presence in every frame, IoU with the true object; background change: matte IoU, composite PSNR beside "
        "the flat two-colour baseline, named colours and layout; both: exact preservation where the matte is zero. "
        "At the checkpoint's own steps and guidance unless given. Prints a table (or JSON) against the targets, "
        "each rate with its 95 % interval. The targets need at least 100 clips per task to be told apart: make "
        "the held-out split (and the reworded one) with `--heldout 200` or more (docs/EVAL.md).",
    )
    parser.add_argument(
        "--model", default="default", help="pipeline folder, or 'default' for the shipped one"
    )
    parser.add_argument("--data", required=True, help="layered dataset folder")
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--steps", type=int, help="denoising steps per clip (default: the checkpoint's)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clip-black",
        type=float,
        help="matte clip black, as the engine's option (default: the engine's, 0.05)",
    )
    parser.add_argument(
        "--clip-white",
        type=float,
        help="matte clip white, as the engine's option (default: the engine's, 0.95)",
    )
    released = parser.add_argument_group(
        "released Vera layout (metadata.jsonl + MP4s): the paper's Table 1 preservation scores and matte IoU / MAD"
    )
    released.add_argument("--format", default="auto", choices=("auto", "vera", "layered"))
    released.add_argument("--frames", type=int, help="frames per clip (default: each record's)")
    released.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="fit clips to this size")
    released.add_argument("--skip-bad", action="store_true", help="leave out (and count) bad records")
    parser.add_argument("--report", help="also write the full report (per-clip results) as JSON here")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from vera_engine.pipelines.model_store import load_pipeline
    from vera_engine.training.data.released import detect_format
    from vera_engine.training.evaluate import evaluate_pipeline, format_report, write_report

    if detect_format(args.data, args.format) == "vera":
        return _run_paper_eval(args, load_pipeline(args.model))
    pipe = load_pipeline(args.model)
    from vera_engine.imaging.composite import DEFAULT_CLIP_BLACK, DEFAULT_CLIP_WHITE

    report = evaluate_pipeline(
        pipe,
        args.data,
        args.split,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        clip_black=DEFAULT_CLIP_BLACK if args.clip_black is None else args.clip_black,
        clip_white=DEFAULT_CLIP_WHITE if args.clip_white is None else args.clip_white,
        progress=args.progress,
    )
    if args.report:
        write_report(report, args.report)
    if args.json:
        print(
            json.dumps(
                {
                    "summary": report["summary"],
                    "targets": report["targets"],
                    "too_few_clips": report["too_few_clips"],
                },
                default=str,
            )
        )
    else:
        print(format_report(report))
    return 0


def _add_cache(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="encode a dataset once with a model's VAE and text encoder (for `train --cache`)",
        description="Encode every clip of a split (layered or released layout) with the model's own codec (Wan's "
        "AutoencoderKLWan for real checkpoints) and every instruction with its text encoder, into a folder that "
        "`vera-engine train --cache` trains from without loading either. The index records the model, the VAE, "
        "the text encoder, the size and the frames; training refuses a mismatch.",
    )
    parser.add_argument("--data", required=True, help="dataset folder (layered or released Vera layout)")
    parser.add_argument("--model", required=True, help="pipeline folder whose VAE and text encoder to use")
    parser.add_argument("--out", required=True, help="cache folder to write")
    parser.add_argument("--split", default="train")
    parser.add_argument("--format", default="auto", choices=("auto", "vera", "layered"))
    parser.add_argument("--frames", type=int, help="frames per clip (default: the data's)")
    parser.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), help="clip size (default: the data's)"
    )
    parser.add_argument("--skip-bad", action="store_true", help="leave out (and count) bad released records")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.set_defaults(handler=_run_cache)


def _run_cache(args: argparse.Namespace) -> int:
    from vera_engine.training.cache import build_cache

    index = build_cache(
        args.data,
        args.model,
        args.out,
        split=args.split,
        format=args.format,
        frames=args.frames,
        size=tuple(args.size) if args.size else None,
        skip_bad=args.skip_bad,
        device=args.device,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    print(
        f"cached {len(index['clips'])} clips ({index['frames']} frames, {index['size'][0]}x{index['size'][1]}, "
        f"latents {index['latent_shape']}) with the {index['vae_class']} and {index['text_encoder_class']} of "
        f"{index['model']} in {index['seconds']:.1f} s -> {args.out}"
    )
    return 0


def _run_paper_eval(args: argparse.Namespace, pipe: object) -> int:
    """`eval` on the released layout: the paper's scores, a table with its rows, and the JSON beside."""
    import json
    from pathlib import Path

    from vera_engine.pipelines.model_store import resolve_model_dir
    from vera_engine.training.paper_metrics import evaluate_released, format_paper_table, write_paper_report

    report = evaluate_released(
        pipe,
        args.data,
        args.split,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        format=args.format,
        frames=args.frames,
        size=tuple(args.size) if args.size else None,
        skip_bad=args.skip_bad,
    )
    path = Path(args.report or f"vera-eval-{args.split}.json")
    write_paper_report(report, path)
    if args.json:
        print(json.dumps({"summary": report["summary"], "lpips": report["lpips"]}))
    else:
        print(format_paper_table(report, resolve_model_dir(args.model).resolve().name))
        print(f"per-clip scores: {path}")
    return 0


def _add_dataset(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dataset",
        help="build training data: layered tuples from a studio's own elements and plates",
        description="Dataset tools (docs/DATASET.md).",
    )
    tools = parser.add_subparsers(dest="dataset_command", required=True, metavar="TOOL")
    build = tools.add_parser(
        "from-elements",
        help="object-addition and background-change tuples from RGBA elements over clean plates",
        description="Layered tuples in the project's format from RGBA element sequences (EXR or PNG) and clean "
        "plates (image sequences or MP4), each with a caption; colour converted with OpenColorIO to the model's "
        "space; seeded and reproducible. Layouts: docs/DATASET.md, 'Your own elements'.",
    )
    build.add_argument(
        "--elements", required=True, help="folder with a folder (frames + caption.txt) per element"
    )
    build.add_argument("--plates", required=True, help="folder with a folder of frames (or an MP4) per plate")
    build.add_argument("--out", required=True, help="dataset folder to write")
    build.add_argument("--count", type=int, default=100, help="training tuples (default: 100)")
    build.add_argument("--heldout", type=int, default=0, help="held-out tuples (default: 0)")
    build.add_argument(
        "--tasks",
        default="object_addition,background_change",
        help="comma-separated tasks, alternated (default: both)",
    )
    build.add_argument("--frames", type=int, default=16, help="frames per tuple (default: 16)")
    build.add_argument("--size", type=int, nargs=2, default=(480, 832), metavar=("H", "W"))
    build.add_argument("--seed", type=int, default=0)
    build.add_argument(
        "--scale",
        type=float,
        nargs=2,
        default=(0.3, 0.6),
        metavar=("MIN", "MAX"),
        help="element height / frame",
    )
    build.add_argument(
        "--motion-probability", type=float, default=0.5, help="object addition: share that moves"
    )
    build.add_argument(
        "--element-colorspace", help="OCIO space of the elements (default: EXR header, else ACEScg)"
    )
    build.add_argument(
        "--plate-colorspace", help="OCIO space of the plates (default: EXR header, else ACEScg)"
    )
    build.add_argument(
        "--captions", help="JSON file {name: caption} for elements and plates without a caption file"
    )
    build.add_argument("--bits", type=int, default=8, choices=(8, 16), help="stored colour code width")
    build.set_defaults(handler=_run_dataset_from_elements)


def _run_dataset_from_elements(args: argparse.Namespace) -> int:
    from vera_engine.training.data.elements import build_from_elements

    summary = build_from_elements(
        args.elements,
        args.plates,
        args.out,
        count=args.count,
        heldout=args.heldout,
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        frames=args.frames,
        size=tuple(args.size),
        seed=args.seed,
        scale=tuple(args.scale),
        motion_probability=args.motion_probability,
        element_colorspace=args.element_colorspace,
        plate_colorspace=args.plate_colorspace,
        captions=args.captions,
        bits=args.bits,
    )
    print(f"wrote {summary['splits']} tuples to {summary['out']}")
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
    from vera_engine.tools.demo import run_demo

    run_demo(args.out, model=args.model, steps=args.steps, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `vera-engine` argument parser with all its subcommands."""
    from vera_engine import __version__

    parser = argparse.ArgumentParser(prog="vera-engine", description="Vera Edit engine.")
    parser.add_argument("--version", action="version", version=f"vera-engine {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from vera_engine.service.serve import add_serve_parser

    for add in (
        add_serve_parser,
        _add_convert_wan,
        _add_bench_step,
        _add_train,
        _add_eval,
        _add_demo,
        _add_cache,
        _add_dataset,
    ):
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
