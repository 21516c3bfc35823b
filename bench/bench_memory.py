"""Peak memory of one Vera sampling call under each memory option (`vera_engine.acceleration.memory.MemoryOptions`).

Each option runs in a fresh process on the same saved pipeline folder (loaded with `load_pipeline`, placed with
`apply_memory_options`), so one option's allocations cannot hide another's. Reported per option:

* peak: `torch.cuda.max_memory_allocated` during the call on CUDA; on a CPU the process's peak resident set during
  the call (VmHWM, reset just before it), which includes the weights wherever they are;
* at rest: device memory allocated (CUDA) or resident set (CPU) after the options were applied, before the call;
* device weights: the most weight bytes on the compute device at once during the call: those the options place
  there plus those group offloading had onloaded at the same moment (observed at diffusers' `ModuleGroup.onload_`
  / `offload_` by `watch_onloads`). On a CPU this is the saving an accelerator would see; "-" for
  model_cpu_offload, whose accelerate hooks are not observed.
* seconds of the call (offloading costs time).

Usage (repository root):
    OMP_NUM_THREADS=1 python bench/bench_memory.py --device cpu                       # tiny Wan VAE, CPU RSS
    OMP_NUM_THREADS=1 python bench/bench_memory.py --config cpu-codec --device cpu    # codec memory on a CPU
    OMP_NUM_THREADS=1 python bench/bench_memory.py --config cpu-weights --device cpu  # weight memory on a CPU
    python bench/bench_memory.py --config wan-1.3b --device cuda                      # random Vera-1.3B, bf16
    python bench/bench_memory.py --model /models/vera-1.3b --device cuda              # a real pipeline folder
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# Named option sets, measured one per process. "target" is the 16 GB goal's setting (text encoder off the device,
# tiled VAE); "minimal" adds group offloading of the transformer; "minimal_swap" encodes on the device instead
# (the text encoder and the transformer's blocks are then never on the device at the same time).
OPTION_SETS: dict[str, dict[str, Any]] = {
    "none": {},
    "text_encoder_cpu": dict(text_encoder_offload="cpu"),
    "text_encoder_swap": dict(text_encoder_offload="swap"),
    "group_offload": dict(group_offload="block"),
    "group_offload_stream": dict(group_offload="block", use_stream=True),
    "group_offload_disk": dict(group_offload="block", offload_to_disk="<tmp>"),
    "model_cpu_offload": dict(model_cpu_offload=True),
    "vae_tiling": dict(vae_tiling=True),
    "target": dict(text_encoder_offload="cpu", vae_tiling=True),
    "minimal": dict(text_encoder_offload="cpu", group_offload="block", vae_tiling=True),
    "minimal_swap": dict(text_encoder_offload="swap", group_offload="block", vae_tiling=True),
}
CUDA_ONLY = {"group_offload_stream"}

# umT5-XXL's encoder (Wan2.1's text encoder): the shape of the real one, random weights.
UMT5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=256384)

# Random-weight pipelines with a real (random) Wan VAE. "tiny-wan" is the test suite's tiny Wan pipeline shape.
# Two sizes make a difference show in a CPU process's resident set within minutes on one core: "cpu-codec" (a
# Wan-shaped VAE at 1/12 of the width, 832x480 frames: codec activations dominate) and "cpu-weights" (a 0.4 GB
# transformer and a 0.3 GB text encoder on small frames: weights dominate). "wan-1.3b" is Vera-1.3B with umT5-XXL and the Wan2.1 VAE at
# 832x480x49 (GPU only: ~20 GB of weights in bfloat16).
# The test suite's tiny Wan VAE (base width 3): a real Wan2.1 VAE architecture, cheap enough for any frame size.
TINY_WAN_VAE = dict(
    base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
)

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-wan": dict(
        transformer=dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=16,
            freq_dim=32,
            ffn_dim=32,
            num_layers=2,
            rope_max_seq_len=1024,  # Wan's: positions for frames up to 832x480 and beyond
        ),
        vae=TINY_WAN_VAE,
        text_encoder=dict(d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4),
        max_sequence_length=32,
        size=(9, 480, 832),
    ),
    "cpu-codec": dict(
        transformer="tiny-wan",
        vae=dict(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ),
        text_encoder=dict(d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4),
        max_sequence_length=32,
        size=(5, 480, 832),
    ),
    "cpu-weights": dict(
        transformer=dict(
            patch_size=(1, 2, 2),
            num_attention_heads=4,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=768,
            freq_dim=64,
            ffn_dim=2048,
            num_layers=8,
            rope_max_seq_len=32,
        ),
        vae=TINY_WAN_VAE,
        text_encoder=dict(d_model=768, d_kv=64, d_ff=3072, num_layers=8, num_heads=12),
        max_sequence_length=64,
        size=(5, 64, 64),
    ),
    "wan-1.3b": dict(
        transformer="wan-1.3b",
        vae={},  # the Wan2.1 VAE's own defaults
        text_encoder=UMT5_XXL,
        max_sequence_length=512,
        size=(49, 480, 832),
    ),
}


def build_pipeline(config: str, seed: int = 0) -> Any:
    """A random-weight `VeraPipeline` of `config` (see CONFIGS) with a Wan VAE and a umT5 encoder, float32."""
    import torch
    from diffusers import AutoencoderKLWan
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    from vera_engine.models.transformer_vera import VeraTransformer3DModel
    from vera_engine.pipelines.pipeline_vera import VeraPipeline, make_scheduler
    from vera_engine.pipelines.presets import get_preset

    spec = CONFIGS[config]
    transformer_config = spec["transformer"]
    if transformer_config == "tiny-wan":
        transformer_config = CONFIGS["tiny-wan"]["transformer"]
    elif isinstance(transformer_config, str):
        transformer_config = get_preset(transformer_config).transformer
    torch.manual_seed(seed)
    tokenizer = ByT5Tokenizer()
    text = dict(spec["text_encoder"])
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=text.pop("vocab_size", len(tokenizer)),
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **text,
        )
    ).eval()
    frames, height, width = spec["size"]
    return VeraPipeline(
        transformer=VeraTransformer3DModel(**transformer_config).eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=AutoencoderKLWan(**spec["vae"]).eval(),
        scheduler=make_scheduler("unipc"),
        native_height=height,
        native_width=width,
        native_frames=frames,
        max_sequence_length=spec["max_sequence_length"],
    )


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(
    model: str,
    option: str,
    device: str,
    frames: int,
    height: int,
    width: int,
    steps: int,
    guidance: float,
    precision: str,
    offload_dir: str | None = None,
) -> dict[str, Any]:
    """Load `model`, apply the option set `option` on `device`, sample once and return the memory figures."""
    import torch

    from vera_engine.acceleration.memory import (
        MemoryOptions,
        apply_memory_options,
        module_bytes,
        offload_folder_size,
        watch_onloads,
    )
    from vera_engine.pipelines.model_store import load_pipeline

    kwargs = dict(OPTION_SETS[option])
    if kwargs.get("offload_to_disk") == "<tmp>":
        kwargs["offload_to_disk"] = offload_dir or tempfile.mkdtemp(prefix="vera-offload-")
    options = MemoryOptions(**kwargs)
    torch_device = torch.device(device)
    if precision == "auto":
        # What load_pipeline's "auto" means for this device; it is loaded on the CPU and placed by the options.
        precision = "bfloat16" if torch_device.type == "cuda" else "float32"
    pipe = load_pipeline(model, device=None, precision=precision)
    notes = apply_memory_options(pipe, options, torch_device)

    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    static = None
    if not options.model_cpu_offload:
        static = 0
        for name in ("transformer", "vae", "text_encoder"):
            component = getattr(pipe, name)
            if _is_group_offload_enabled(component):
                continue  # counted by the ledger when onloaded
            if name == "text_encoder" and options.text_encoder_offload == "cpu":
                continue  # on the host, not the compute device (even when the compute device is the CPU)
            static += module_bytes(component)

    video = np.random.default_rng(0).random((frames, height, width, 3), dtype=np.float32)
    if torch_device.type == "cuda":
        torch.cuda.synchronize()
        at_rest = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        # safetensors loads are memory-mapped and read lazily: page the weights in first, so that "at rest" holds
        # them as a running engine's would. Disk-offloaded groups are left alone (their placeholders never are).
        with torch.no_grad():
            for name in ("transformer", "vae", "text_encoder"):
                if name == "transformer" and options.offload_to_disk:
                    continue
                for tensor in [*getattr(pipe, name).parameters(), *getattr(pipe, name).buffers()]:
                    tensor.sum()
        at_rest = _status_kib("VmRSS") * 1024
        # Writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS: the peak below is the call's own.
        Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    with watch_onloads() as ledger:
        pipe(
            video,
            "a red ball rolling left to right",
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(0),
        )
    if torch_device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    seconds = time.perf_counter() - start
    return dict(
        option=option,
        options={k: v for k, v in kwargs.items()},
        device=str(torch_device),
        peak_bytes=peak,
        at_rest_bytes=at_rest,
        device_weight_bytes=None if static is None else static + ledger.peak_bytes,
        onloads=ledger.onloads,
        disk_bytes=offload_folder_size(options.offload_to_disk) if options.offload_to_disk else 0,
        seconds=seconds,
        notes=notes,
    )


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def print_table(rows: list[dict[str, Any]], device: str) -> None:
    """The results as a Markdown table (what docs/BENCHMARKS.md shows)."""
    peak = "peak allocated MiB" if device.startswith("cuda") else "peak RSS MiB"
    rest = "allocated at rest MiB" if device.startswith("cuda") else "RSS at rest MiB"
    print(f"| option | {peak} | {rest} | device weights MiB | onloads | s/call |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['option']} | {_mib(row['peak_bytes'])} | {_mib(row['at_rest_bytes'])} | "
            f"{_mib(row['device_weight_bytes'])} | {row['onloads']} | {row['seconds']:.1f} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="tiny-wan", choices=sorted(CONFIGS))
    parser.add_argument("--model", help="a Vera pipeline folder to measure instead of a random --config")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument(
        "--options", default=",".join(OPTION_SETS), help="comma-separated option sets to measure"
    )
    parser.add_argument("--frames", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per option instead of a table"
    )
    parser.add_argument(
        "--worker", help=argparse.SUPPRESS
    )  # internal: measure one option set in this process
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    unknown = [name for name in args.options.split(",") if name not in OPTION_SETS]
    if unknown:
        parser.error(f"--options has {unknown}; expected names from {sorted(OPTION_SETS)}")
    spec_size = CONFIGS[args.config]["size"]
    frames = args.frames or spec_size[0]
    height = args.height or spec_size[1]
    width = args.width or spec_size[2]

    if args.worker:
        row = measure(
            args.model, args.worker, device, frames, height, width, args.steps, args.guidance, args.precision
        )
        print(json.dumps(row))
        return

    options = [name for name in args.options.split(",") if device.startswith("cuda") or name not in CUDA_ONLY]
    with tempfile.TemporaryDirectory(prefix="vera-bench-memory-") as workdir:
        model = args.model
        if model is None:
            model = os.path.join(workdir, "model")
            pipe = build_pipeline(args.config)
            if args.precision == "bfloat16" or (args.precision == "auto" and device.startswith("cuda")):
                # Saved as it will run: half the disk and load time of float32 for the full-size config.
                from vera_engine.tools.bench import cast_keeping_fp32_modules

                cast_keeping_fp32_modules(pipe.transformer, torch.bfloat16)
                pipe.text_encoder.to(torch.bfloat16)
            pipe.save_pretrained(model)
            del pipe
        rows = []
        for option in options:
            command = [
                sys.executable,
                __file__,
                "--worker",
                option,
                "--model",
                model,
                "--device",
                device,
                "--frames",
                str(frames),
                "--height",
                str(height),
                "--width",
                str(width),
                "--steps",
                str(args.steps),
                "--guidance",
                str(args.guidance),
                "--precision",
                args.precision,
            ]
            # A fixed mmap threshold turns off glibc's adaptive one, under which freed large blocks stay in the
            # heap and the peak RSS of a CPU run depends on allocation history rather than on live memory.
            env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ, "TMPDIR": workdir}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"option {option!r} failed:\n{done.stderr[-4000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if not args.json:
        print(
            f"{args.model or args.config}, {frames}x{height}x{width} frames, {args.steps} steps, guidance "
            f"{args.guidance}, device {device}"
        )
        print_table(rows, device)


if __name__ == "__main__":
    main()
