"""The sections of `bench/gpu_probe.sh`, one per process (the shell time-boxes each); results as JSON lines.

    python bench/gpu_probe.py SECTION --out probe.jsonl [--dry]    # run one section, append its lines
    python bench/gpu_probe.py record --out probe.jsonl --section S --status timeout --rc 124 --log S.log
    python bench/gpu_probe.py table probe.jsonl                     # the results as a Markdown table

Every line is one measurement: {"section", "case", "status" (ok / skipped / failed / timeout / oom), "device",
"seconds", "tflops", "peak_gib", ...}. Lines are appended as soon as each case is measured, so a section stopped by
its time box keeps what it had. `--dry` runs the same code at tiny shapes on the CPU (CI runs it: the probe
cannot rot between GPU loans). docs/GPU.md says what each section measures and what to send back.
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

SECTIONS = (
    "env",
    "attention",
    "step",
    "vae",
    "offload_plain",
    "offload_stream",
    "compile",
    "train_lora",
    "train_full",
)

# Vera-1.3B at 832x480, 49 frames: 13 latent frames of 30x52 tokens per stream, 12 heads of 128.
FULL = dict(preset="wan-1.3b", frames=49, height=480, width=832, heads=12, head_dim=128, text_len=512)
DRY = dict(preset="tiny", frames=4, height=32, width=32, heads=2, head_dim=16, text_len=8)


class Probe:
    """Writes one section's JSON lines to `out`."""

    def __init__(self, section: str, out: Path, dry: bool) -> None:
        import torch

        self.section = section
        self.out = out
        self.dry = dry
        self.shape = DRY if dry else FULL
        self.torch = torch
        self.device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
        self.dtype = torch.float32 if dry else torch.bfloat16
        self.device_name = (
            torch.cuda.get_device_name(self.device)
            if self.device.type == "cuda"
            else platform.processor() or "cpu"
        )

    def write(self, case: str, status: str = "ok", **fields: Any) -> None:
        line = {
            "section": self.section,
            "case": case,
            "status": status,
            "device": self.device_name,
            "dry": self.dry,
            **fields,
        }
        with self.out.open("a") as handle:
            handle.write(json.dumps(line, default=str) + "\n")
        print(json.dumps(line, default=str), flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> dict[str, float]:
        if self.device.type != "cuda":
            import resource

            return {"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        return {
            "peak_gib": self.torch.cuda.max_memory_allocated(self.device) / 2**30,
            "peak_reserved_gib": self.torch.cuda.max_memory_reserved(self.device) / 2**30,
        }

    def timed(self, fn: Any, repeats: int) -> tuple[float, float]:
        """(first call seconds, median of `repeats` further calls)."""
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return first, statistics.median(times)

    def case(self, case: str, fn: Any) -> None:
        """Run one case, recording an OOM or an error as its line instead of ending the section."""
        try:
            fn()
        except self.torch.OutOfMemoryError as exc:
            self.write(case, "oom", error=str(exc).splitlines()[0], **self.peak_gib())
        except Exception as exc:  # every failure is a result to send back
            self.write(
                case,
                "failed",
                error=f"{type(exc).__name__}: {exc}"[:2000],
                trace=traceback.format_exc()[-3000:],
            )
        finally:
            if self.device.type == "cuda":
                self.torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------
# Sections


def section_env(probe: Probe) -> None:
    torch = probe.torch
    import importlib.metadata
    import importlib.util

    from vera_engine.acceleration.backends import choose_attention_backend, device_facts

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    facts = device_facts(probe.device, torch.bfloat16)
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
        "peft": version("peft"),
        "flash_attn": version("flash-attn") or version("flash_attn"),
        "flash_attn_3": importlib.util.find_spec("flash_attn_interface") is not None,
        "sageattention": version("sageattention"),
        "cpu_count": os.cpu_count(),
        "sdp_priority_order": list(facts.sdp_priority_order),
        "chosen_attention_backend": choose_attention_backend(facts),
    }
    if probe.device.type == "cuda":
        props = torch.cuda.get_device_properties(probe.device)
        free, total = torch.cuda.mem_get_info(probe.device)
        info.update(
            capability=list(facts.capability or ()),
            sm_count=props.multi_processor_count,
            memory_total_gib=total / 2**30,
            memory_free_gib=free / 2**30,
        )
    probe.write("environment", **info)


def _qkv(probe: Probe, batch: int, tokens: int) -> Any:
    torch = probe.torch
    shape = probe.shape
    generator = torch.Generator(device=probe.device).manual_seed(0)
    return [
        torch.randn(
            batch,
            tokens,
            shape["heads"],
            shape["head_dim"],
            generator=generator,
            device=probe.device,
            dtype=probe.dtype,
        )
        for _ in range(3)
    ]


def _latent_grid(probe: Probe) -> tuple[int, int, int]:
    shape = probe.shape
    if probe.dry:
        return shape["frames"], shape["height"] // 2, shape["width"] // 2
    return (shape["frames"] - 1) // 4 + 1, shape["height"] // 8, shape["width"] // 8


def section_attention(probe: Probe) -> None:
    """The joint attention alone: batch 2 (CFG), three streams' tokens, each backend torch ships (plus the
    built ones that are installed)."""
    import importlib.util

    from diffusers.models.attention_dispatch import dispatch_attention_fn

    f, h, w = _latent_grid(probe)
    tokens = 3 * f * (h // 2) * (w // 2)
    batch = 2
    q, k, v = _qkv(probe, batch, tokens)
    flop = 4 * batch * probe.shape["heads"] * tokens**2 * probe.shape["head_dim"]
    if probe.device.type == "cuda":
        names = ["native", "_native_cudnn", "_native_flash", "_native_efficient"]
        names += [
            name
            for name, module in (
                ("flash", "flash_attn"),
                ("_flash_3", "flash_attn_interface"),
                ("sage", "sageattention"),
            )
            if importlib.util.find_spec(module)
        ]
    else:
        names = ["native", "_native_math"]
    reference = None
    for name in names:

        def run(name: str = name) -> None:
            nonlocal reference
            probe.reset_peak()
            out = None

            def call() -> None:
                nonlocal out
                out = dispatch_attention_fn(q, k, v, backend=name)

            first, seconds = probe.timed(call, repeats=3)
            difference = None
            if reference is None:
                reference = out.float()
            else:
                difference = float((out.float() - reference).abs().max())
            probe.write(
                name,
                tokens=tokens,
                batch=batch,
                seconds=seconds,
                first_seconds=first,
                tflop=flop / 1e12,
                tflops=flop / seconds / 1e12,
                max_abs_diff_vs_first=difference,
                **probe.peak_gib(),
            )

        probe.case(name, run)


def section_step(probe: Probe) -> None:
    """`bench-step` at 49 frames (CFG batch 2): the native backend and cuDNN, then what the engine picks."""
    from dataclasses import asdict

    from vera_engine.tools.bench import bench_step

    shape = probe.shape
    backends = ["native", "_native_cudnn", "auto"] if probe.device.type == "cuda" else ["native", "auto"]
    for backend in backends:

        def run(backend: str = backend) -> None:
            result = bench_step(
                shape["preset"],
                frames=shape["frames"],
                height=shape["height"],
                width=shape["width"],
                device=str(probe.device),
                dtype="float32" if probe.dry else "bfloat16",
                attention_backend=backend,
                repeats=1 if probe.dry else 2,
                text_len=shape["text_len"],
            )
            report = asdict(result)
            report.pop("device", None)
            probe.write(
                backend,
                seconds=result.seconds_per_step,
                tflops=result.achieved_tflops,
                peak_gib=result.peak_memory_gib,
                **{key: value for key, value in report.items() if key not in ("peak_memory_gib",)},
            )

        probe.case(backend, run)


def section_vae(probe: Probe) -> None:
    """A Wan VAE decode of one 49-frame latent clip, float32 against bfloat16 (random weights: the time and
    memory are the real shape's; the bf16 error is indicative only)."""
    torch = probe.torch
    from diffusers import AutoencoderKLWan

    if probe.dry:
        config = dict(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
        latent = (1, 16, 2, 4, 4)
    else:
        config = {}  # diffusers' defaults are the Wan2.1 VAE
        f, h, w = _latent_grid(probe)
        latent = (1, 16, f, h, w)
    torch.manual_seed(0)
    with torch.device(probe.device):
        vae = AutoencoderKLWan(**config).eval()
    latents = torch.randn(latent, device=probe.device)
    outputs: dict[str, Any] = {}
    for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):

        def run(dtype_name: str = dtype_name, dtype: Any = dtype) -> None:
            vae.to(dtype)
            probe.reset_peak()
            with torch.inference_mode():
                first, seconds = probe.timed(
                    lambda: outputs.__setitem__(dtype_name, vae.decode(latents.to(dtype)).sample), 1
                )
            fields: dict[str, Any] = {}
            if dtype_name != "float32" and "float32" in outputs:
                error = (outputs[dtype_name].float() - outputs["float32"].float()).pow(2).mean().item()
                # Decoded video in [-1, 1]: peak-to-peak 2.
                fields["psnr_vs_float32_db"] = 10 * math.log10(4 / error) if error > 0 else float("inf")
            probe.write(
                f"decode_{dtype_name}",
                latent_shape=list(latent),
                seconds=seconds,
                first_seconds=first,
                **fields,
                **probe.peak_gib(),
            )

        probe.case(f"decode_{dtype_name}", run)


def _transformer(probe: Probe, on: Any) -> Any:
    torch = probe.torch
    from vera_engine.pipelines.presets import build_random_transformer
    from vera_engine.tools.bench import cast_keeping_fp32_modules

    with torch.device(on):
        model = build_random_transformer(probe.shape["preset"], seed=0)
    return cast_keeping_fp32_modules(model, probe.dtype).eval()


def _inputs(probe: Probe, batch: int, requires_grad: bool = False) -> dict[str, Any]:
    torch = probe.torch
    f, h, w = _latent_grid(probe)
    from vera_engine.pipelines.presets import get_preset

    config = get_preset(probe.shape["preset"]).transformer
    generator = torch.Generator(device=probe.device).manual_seed(1)

    def randn(*shape: int) -> Any:
        return torch.randn(shape, generator=generator, device=probe.device, dtype=probe.dtype)

    channels = config["in_channels"]
    return dict(
        edit_latents=randn(batch, channels, f, h, w),
        alpha_latents=randn(batch, channels, f, h, w),
        composite_latents=randn(batch, channels, f, h, w),
        timestep=torch.full((batch,), 500.0, device=probe.device),
        encoder_hidden_states=randn(batch, probe.shape["text_len"], config["text_dim"]),
        source_latents=randn(batch, channels, f, h, w),
        return_dict=False,
    )


def _section_offload(probe: Probe, stream: bool) -> None:
    """One CFG step with the transformer's blocks in CPU memory (group offloading, one block at a time)."""
    torch = probe.torch
    from vera_engine.acceleration.memory import MemoryOptions, stream_group_offload

    case = "streams" if stream else "no_streams"
    if stream and probe.device.type != "cuda":
        probe.write(case, "skipped", why="side-stream copies need a CUDA device")
        return

    def run() -> None:
        model = _transformer(probe, probe.device).to("cpu")
        use_stream = stream_group_offload(
            MemoryOptions(group_offload="block", use_stream=stream), probe.device
        )
        model.enable_group_offload(
            onload_device=probe.device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=use_stream,
            record_stream=use_stream,
        )
        inputs = _inputs(probe, batch=2)
        probe.reset_peak()
        with torch.inference_mode():
            first, seconds = probe.timed(lambda: model(**inputs), repeats=1 if probe.dry else 2)
        probe.write(case, use_stream=use_stream, seconds=seconds, first_seconds=first, **probe.peak_gib())

    probe.case(case, run)


def section_offload_plain(probe: Probe) -> None:
    _section_offload(probe, stream=False)


def section_offload_stream(probe: Probe) -> None:
    _section_offload(probe, stream=True)


def section_compile(probe: Probe) -> None:
    """The MoT block's graph breaks, then a CFG step eager against `compile_repeated_blocks(fullgraph=True)`."""
    torch = probe.torch
    from vera_engine.acceleration.compile import compile_blocks, graph_breaks

    model = _transformer(probe, probe.device)
    inputs = _inputs(probe, batch=2)
    captured: dict[str, Any] = {}
    hook = model.blocks[0].register_forward_pre_hook(lambda module, args: captured.setdefault("args", args))
    times: dict[str, float] = {}

    def eager() -> None:
        with torch.inference_mode():
            first, seconds = probe.timed(lambda: model(**inputs), repeats=1 if probe.dry else 2)
        times["eager"] = seconds
        probe.write("eager_step", seconds=seconds, first_seconds=first, **probe.peak_gib())

    probe.case("eager_step", eager)
    hook.remove()

    def breaks() -> None:
        with torch.inference_mode():
            report = graph_breaks(model.blocks[0], *captured["args"])
        probe.write(
            "graph_breaks",
            "ok" if report.graph_break_count == 0 else "failed",
            graph_count=report.graph_count,
            graph_break_count=report.graph_break_count,
            break_reasons=report.break_reasons,
        )

    probe.case("graph_breaks", breaks)
    captured.clear()

    def compiled() -> None:
        # The dry run checks the plumbing with dynamo's eager backend (no C++ toolchain needed); the GPU run uses
        # inductor, what the engine uses.
        backend = os.environ.get("PROBE_COMPILE_BACKEND", "eager" if probe.dry else "inductor")
        compile_blocks(model, backend=backend)
        probe.reset_peak()
        with torch.inference_mode():
            first, seconds = probe.timed(lambda: model(**inputs), repeats=1 if probe.dry else 2)
        speedup = times["eager"] / seconds if "eager" in times else None
        probe.write(
            "compiled_step",
            backend=backend,
            seconds=seconds,
            first_seconds_with_compilation=first,
            speedup_vs_eager=speedup,
            **probe.peak_gib(),
        )

    probe.case("compiled_step", compiled)


def _train_step(probe: Probe, lora: bool) -> None:
    """One training step of the shape at batch 1, gradient checkpointing on, bf16 autocast on the GPU: forward,
    flow-matching-style loss on all three layers, backward, AdamW (fused on CUDA)."""
    torch = probe.torch
    rank = 4 if probe.dry else 32
    case = f"lora_r{rank}" if lora else "full"

    def run() -> None:
        model = _transformer(probe, probe.device)
        if not lora:
            model.float()  # full fine-tuning keeps fp32 master weights; autocast runs the matmuls in bf16
        else:
            from peft import LoraConfig, inject_adapter_in_model

            model.requires_grad_(False)
            targets = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), model)
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.data = param.data.float()
        model.train()
        model.enable_gradient_checkpointing()
        trainable = [p for p in model.parameters() if p.requires_grad]
        fused = probe.device.type == "cuda"
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=fused, foreach=None if fused else True)
        inputs = _inputs(probe, batch=1)
        targets = [torch.randn_like(inputs["edit_latents"]) for _ in range(3)]
        autocast = torch.autocast(
            probe.device.type, dtype=torch.bfloat16, enabled=probe.device.type == "cuda"
        )

        def step() -> None:
            with autocast:
                out = model(**inputs)
            loss = sum(
                torch.nn.functional.mse_loss(o.float(), t.float()) for o, t in zip(out, targets, strict=True)
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        probe.reset_peak()
        first, seconds = probe.timed(step, repeats=1)
        probe.write(
            case,
            trainable_parameters=sum(p.numel() for p in trainable),
            parameters=sum(p.numel() for p in model.parameters()),
            gradient_checkpointing=True,
            seconds=seconds,
            first_seconds=first,
            **probe.peak_gib(),
        )

    probe.case(case, run)


def section_train_lora(probe: Probe) -> None:
    _train_step(probe, lora=True)


def section_train_full(probe: Probe) -> None:
    _train_step(probe, lora=False)


# --------------------------------------------------------------------------------------------------------------
# Bookkeeping


def record(out: Path, section: str, status: str, rc: int, log: Path | None, budget: float | None) -> None:
    """The line for a section whose process did not finish (time box, crash), with the end of its log."""
    tail = ""
    if log is not None and log.is_file():
        tail = log.read_text(errors="replace")[-2000:]
    line = {
        "section": section,
        "case": "(section)",
        "status": status,
        "rc": rc,
        "budget_s": budget,
        "log_tail": tail,
    }
    with out.open("a") as handle:
        handle.write(json.dumps(line) + "\n")


def table(path: Path) -> str:
    """The JSON lines as a Markdown table, one row per measurement."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def number(value: Any, digits: int = 4) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.{digits}g}"
        return str(value)

    lines = [
        "| section | case | status | device | s | first s | TFLOP/s | peak GiB | reserved GiB | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        first = row.get("first_seconds", row.get("first_seconds_with_compilation"))
        note_keys = (
            "error",
            "why",
            "speedup_vs_eager",
            "psnr_vs_float32_db",
            "max_abs_diff_vs_first",
            "graph_break_count",
            "chosen_attention_backend",
            "torch",
            "trainable_parameters",
            "job_path",
            "budget_s",
        )
        note = "; ".join(f"{key}={number(row[key])}" for key in note_keys if row.get(key) is not None)
        lines.append(
            "| "
            + " | ".join(
                [
                    row.get("section", ""),
                    row.get("case", ""),
                    row.get("status", ""),
                    str(row.get("device", "")),
                    number(row.get("seconds")),
                    number(first),
                    number(row.get("tflops")),
                    number(row.get("peak_gib"), 3),
                    number(row.get("peak_reserved_gib"), 3),
                    note.replace("|", "/")[:300],
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=(*SECTIONS, "record", "table"))
    parser.add_argument("path", nargs="?", type=Path, help="for table: the JSON lines file")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--dry", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--section")
    parser.add_argument("--status")
    parser.add_argument("--rc", type=int, default=0)
    parser.add_argument("--log", type=Path)
    parser.add_argument("--budget", type=float)
    args = parser.parse_args(argv)
    if args.what == "table":
        if args.path is None or not args.path.is_file():
            parser.error(f"table needs the JSON lines file written by the sections; got {args.path}")
        print(table(args.path))
        return 0
    if args.out is None:
        parser.error(f"{args.what} needs --out FILE (the JSON lines to append to)")
    if args.what == "record":
        if not (args.section and args.status):
            parser.error("record needs --section and --status")
        record(args.out, args.section, args.status, args.rc, args.log, args.budget)
        return 0
    probe = Probe(args.what, args.out, args.dry)
    if probe.device.type != "cuda" and not args.dry:
        probe.write("(section)", "skipped", why="no CUDA device: run on a GPU, or DRY=1 for the tiny CPU run")
        return 0
    globals()[f"section_{args.what}"](probe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
