"""`vera-engine bench-step`: time one denoising step of a named Vera size and report its FLOPs and memory.

FLOPs are counted analytically from the config (matrix multiplies and the attention core; norms, RoPE and
element-wise work are left out, as is usual for utilisation figures), so "achieved TFLOP/s" is the same measure
whatever the backend. For reference the same count is made for one Wan transformer of the same size.
"""

import contextlib
import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from vera_engine.pipelines.presets import build_random_transformer, get_preset

# Codec strides of each preset's real codec: the Wan VAE (4 frames, 8x8 pixels) or the tiny space-to-depth codec.
WAN_VAE_STRIDES = (4, 8)


@dataclass
class StepFlops:
    """FLOPs of one transformer forward, split by where they go."""

    linear: float
    attention_core: float

    @property
    def total(self) -> float:
        return self.linear + self.attention_core


def step_flops(
    config: dict[str, Any], tokens_per_stream: int, text_len: int, batch: int, streams: int = 3
) -> StepFlops:
    """Analytic FLOPs of one forward of `streams` Wan-shaped branches with joint self-attention.

    Per layer and branch: QKV + output projections (4 D² per token), cross-attention query/output (2 D² per
    token) and key/value over the text (2 D² per text token), FFN (2 D·F per token); one multiply-add = 2 FLOPs.
    Joint attention core per layer: QKᵀ and AV over the concatenated sequence, 2 · 2 · (streams·L)² · D.
    `streams=1` is a plain Wan transformer.
    """
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    ffn = config["ffn_dim"]
    layers = config["num_layers"]
    patch = 1
    for p in config["patch_size"]:
        patch *= p
    tokens = tokens_per_stream
    per_branch_layer = 2 * tokens * (6 * dim * dim + 2 * dim * ffn) + 2 * text_len * 2 * dim * dim
    cross_core = 2 * 2 * tokens * text_len * dim
    embed_and_head = (
        2 * tokens * dim * config["in_channels"] * patch * 2 + 2 * text_len * config["text_dim"] * dim
    )
    # Vera adds the source (composite) and mask (alpha) patch embeddings.
    conditions = 2 * 2 * tokens * dim * config["in_channels"] * patch if streams == 3 else 0
    linear = layers * streams * per_branch_layer + streams * embed_and_head + conditions
    joint_core = layers * (2 * 2 * (streams * tokens) ** 2 * dim + streams * cross_core)
    return StepFlops(linear=batch * linear, attention_core=batch * joint_core)


def cast_keeping_fp32_modules(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a diffusers model to `dtype` but keep its `_keep_in_fp32_modules` (norms, time embedder) in float32.

    This is what `from_pretrained(dtype=...)` does for loaded weights; random-weight models need it by hand.
    """
    if dtype == torch.float32:
        return model
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, module in model.named_modules():
        if keep.intersection(name.split(".")):
            module.float()
        else:
            for param_name, param in module.named_parameters(recurse=False):
                if not keep.intersection({param_name}):
                    param.data = param.data.to(dtype)
    return model


@dataclass
class BenchResult:
    """What `bench-step` prints (also as JSON with --json)."""

    config: str
    model: str
    device: str
    dtype: str
    attention_backend: str
    frames: int
    height: int
    width: int
    latent_shape: tuple[int, ...]
    tokens_per_stream: int
    batch: int
    cfg_mode: str
    compiled: bool
    context_parallel: str
    # A step is `forwards_per_step` forwards of batch `forward_batch` (CFG batched: 1 forward of batch 2).
    tflop_per_step: float
    # One forward of batch 1 (one pass over the three streams): what "per forward" means.
    tflop_per_forward: float
    forwards_per_step: int
    forward_batch: int
    attention_share: float
    seconds_per_step: float
    achieved_tflops: float
    peak_memory_gib: float
    # First (warm-up) step: includes torch.compile's compilation when --compile is on.
    first_step_seconds: float
    # `steps` denoising steps at the measured rate: the per-clip sampling time the targets speak of.
    steps: int
    seconds_per_clip: float
    # This process's rank under context parallelism (0 otherwise); only rank 0 needs to print. Under context
    # parallelism "achieved" is per process and "peak memory" is this process's.
    rank: int = 0
    world_size: int = 1
    # CUDA only (None elsewhere): what the caching allocator reserved at its peak (what the device really had to
    # hold, fragmentation included) and the device's free / total memory after the run (`cudaMemGetInfo`: other
    # processes and the CUDA context included).
    peak_reserved_gib: float | None = None
    device_free_gib: float | None = None
    device_total_gib: float | None = None
    # How a job at these frames is sampled: one pass, or temporal windows of the checkpoint's native frames (the
    # pipeline's default `window_frames`); this bench always times one pass over all `frames`.
    job_path: str = ""


def _cuda_memory(device: torch.device) -> dict[str, float | None]:
    if device.type != "cuda":
        return {"peak_reserved_gib": None, "device_free_gib": None, "device_total_gib": None}
    free, total = torch.cuda.mem_get_info(device)
    return {
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        "device_free_gib": free / 2**30,
        "device_total_gib": total / 2**30,
    }


def job_path(frames: int, native_frames: int, temporal: int) -> str:
    """How `VeraPipeline` samples a clip of `frames` with its default windows (`native_frames`, a quarter overlap)."""
    from types import SimpleNamespace

    from vera_engine.pipelines.pipeline_vera import VeraPipeline
    from vera_engine.pipelines.windows import default_window_overlap

    latent_frames = (frames - 1) // temporal + 1 if temporal > 1 else frames
    overlap = default_window_overlap(native_frames)
    windows = VeraPipeline.temporal_windows(
        SimpleNamespace(temporal_compression=temporal), latent_frames, native_frames, overlap
    )
    if len(windows) == 1:
        return f"jobs sample {frames} frames in one pass (what this bench times)"
    return (
        f"jobs sample {frames} frames as {len(windows)} windows of {native_frames} frames ({overlap} overlapping) "
        f"per step, {len(windows)} forwards of {native_frames} frames; this bench times one {frames}-frame pass "
        f"(--frames {native_frames} times one window)"
    )


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is KiB on Linux: the whole process's peak, which is the honest CPU figure.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_step(
    config: str = "tiny",
    *,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    device: str | None = None,
    dtype: str = "float32",
    cfg: bool = True,
    cfg_sequential: bool = False,
    attention_backend: str | None = "auto",
    compile_blocks: bool = False,
    context_parallel: str | None = None,
    reference_wan: bool = False,
    repeats: int = 3,
    steps: int = 50,
    text_len: int | None = None,
    seed: int = 0,
) -> BenchResult:
    """Time one denoising step of a random-weight model of `config`.

    A step is one transformer forward over batch 2 (CFG batched, what the pipeline does), two forwards of batch 1
    (`cfg_sequential`: the conditional and unconditional passes one after the other), or one forward of batch 1
    (`cfg=False`, guidance 1). `compile_blocks` compiles the repeated MoT block with `torch.compile` (diffusers'
    `compile_repeated_blocks`: one graph reused by every layer). `context_parallel` ("ulysses" or "ring") splits
    the sequence across the processes of a `torchrun` launch.
    """
    if cfg_sequential and not cfg:
        raise ValueError("cfg_sequential needs cfg: sequential CFG is two passes; without CFG there is one")
    preset = get_preset(config)
    rank = 0
    if context_parallel:
        from vera_engine.acceleration.parallel import init_distributed

        rank, _world, cp_device = init_distributed(device)
        device = str(cp_device)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"--dtype {dtype!r}; expected float32, bfloat16 or float16")
    if preset.codec_spatial_factor is None and torch_device.type != "cuda":
        raise ValueError(
            f"--config {config!r} is a full-size model (billions of parameters): run it on a GPU (--device cuda). "
            "On a CPU, use --config tiny."
        )
    frames = frames or preset.native_frames
    height = height or preset.native_height
    width = width or preset.native_width
    if preset.codec_spatial_factor is None:
        temporal, spatial = WAN_VAE_STRIDES
        latent_frames = (frames - 1) // temporal + 1
    else:
        temporal, spatial = 1, preset.codec_spatial_factor
        latent_frames = frames
    tconf = dict(preset.transformer)
    latent_shape = (tconf["in_channels"], latent_frames, height // spatial, width // spatial)
    p_t, p_h, p_w = tconf["patch_size"]
    tokens = (latent_frames // p_t) * (latent_shape[2] // p_h) * (latent_shape[3] // p_w)
    text_len = text_len or preset.max_sequence_length
    batch = 2 if cfg else 1
    forward_batch = 1 if cfg_sequential else batch

    torch.manual_seed(seed)
    # On a GPU the random weights are made there: initialising billions of parameters on the CPU takes minutes.
    with torch.device(torch_device) if torch_device.type == "cuda" else contextlib.nullcontext():
        if reference_wan:
            from diffusers import WanTransformer3DModel

            model = WanTransformer3DModel(**{k: v for k, v in tconf.items()})
            streams = 1
        else:
            model = build_random_transformer(preset, seed=seed)
            streams = 3
    model = cast_keeping_fp32_modules(model.to(torch_device), torch_dtype).eval()
    from vera_engine.acceleration.backends import resolve_attention_backend

    attention_backend, _why = resolve_attention_backend(attention_backend, torch_device, torch_dtype)
    if attention_backend != "native":
        model.set_attention_backend(attention_backend)
    if context_parallel:
        if reference_wan:
            raise ValueError(
                "context_parallel is for the Vera transformer; the reference Wan runs on one process"
            )
        from vera_engine.acceleration.parallel import enable_context_parallel

        enable_context_parallel(model, context_parallel)
    if compile_blocks:
        model.compile_repeated_blocks(fullgraph=True)

    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device=torch_device, dtype=torch_dtype)

    latents = [randn(forward_batch, *latent_shape) for _ in range(4)]
    text = randn(forward_batch, text_len, tconf["text_dim"])
    timestep = torch.full((forward_batch,), 500.0, device=torch_device)

    def forward() -> None:
        if reference_wan:
            model(latents[0], timestep, text, return_dict=False)
        else:
            model(
                latents[0],
                latents[1],
                latents[2],
                timestep,
                text,
                source_latents=latents[3],
                return_dict=False,
            )

    def step() -> None:
        for _ in range(batch // forward_batch):
            forward()

    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    times = []
    with torch.inference_mode():
        start = time.perf_counter()
        step()  # warm-up: allocator, kernels, lazy initialisation, compilation
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)
        first_step = time.perf_counter() - start
        for _ in range(max(1, repeats)):
            if torch_device.type == "cuda":
                torch.cuda.synchronize(torch_device)
            start = time.perf_counter()
            step()
            if torch_device.type == "cuda":
                torch.cuda.synchronize(torch_device)
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    flops = step_flops(tconf, tokens, text_len, batch, streams)
    per_forward = step_flops(tconf, tokens, text_len, 1, streams)
    world_size = 1
    if context_parallel:
        world_size = torch.distributed.get_world_size()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return BenchResult(
        config=config,
        model="WanTransformer3DModel (reference)" if reference_wan else "VeraTransformer3DModel",
        device=torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu",
        dtype=dtype,
        attention_backend=attention_backend or "native",
        frames=frames,
        height=height,
        width=width,
        latent_shape=(batch, *latent_shape),
        tokens_per_stream=tokens,
        batch=batch,
        cfg_mode=("sequential" if cfg_sequential else "batched") if cfg else "off",
        compiled=compile_blocks,
        context_parallel=context_parallel or "off",
        tflop_per_step=flops.total / 1e12,
        tflop_per_forward=per_forward.total / 1e12,
        forwards_per_step=batch // forward_batch,
        forward_batch=forward_batch,
        attention_share=flops.attention_core / flops.total,
        seconds_per_step=seconds,
        # Per process: under context parallelism each GPU does 1/world_size of the step's work.
        achieved_tflops=flops.total / seconds / 1e12 / world_size,
        peak_memory_gib=_peak_memory_gib(torch_device),
        first_step_seconds=first_step,
        steps=steps,
        seconds_per_clip=steps * seconds,
        rank=rank,
        world_size=world_size,
        **_cuda_memory(torch_device),
        job_path=job_path(frames, preset.native_frames, temporal),
    )


def print_result(result: BenchResult, as_json: bool = False) -> None:
    """Print a `BenchResult` as aligned text, or one JSON object."""
    if as_json:
        print(json.dumps(asdict(result)))
        return
    rows = [
        ("model", f"{result.model} [{result.config}]"),
        ("device / dtype", f"{result.device} / {result.dtype}, attention {result.attention_backend}"),
        ("input", f"{result.frames} frames {result.width}x{result.height}, latents {result.latent_shape}"),
        ("tokens per stream", f"{result.tokens_per_stream}"),
        ("batch (CFG)", f"{result.batch}, CFG {result.cfg_mode}"),
        ("compiled / context parallel", f"{result.compiled} / {result.context_parallel}"),
        (
            f"TFLOP per step (CFG batch {result.batch})",
            f"{result.tflop_per_step:.4g} ({result.attention_share:.0%} attention core; "
            f"{result.forwards_per_step} forward(s) of batch {result.forward_batch})",
        ),
        ("TFLOP per forward (batch 1)", f"{result.tflop_per_forward:.4g}"),
        ("job path", result.job_path),
        ("seconds per step", f"{result.seconds_per_step:.4g} (first step {result.first_step_seconds:.4g})"),
        (f"seconds for {result.steps} steps", f"{result.seconds_per_clip:.4g}"),
        (
            "achieved",
            f"{result.achieved_tflops:.4g} TFLOP/s" + (" per process" if result.world_size > 1 else ""),
        ),
        (
            "peak memory",
            f"{result.peak_memory_gib:.3g} GiB "
            + ("allocated" if result.peak_reserved_gib is not None else "(process peak RSS)"),
        ),
    ]
    if result.peak_reserved_gib is not None:
        rows.append(("peak reserved", f"{result.peak_reserved_gib:.3g} GiB"))
        rows.append(
            ("device free / total", f"{result.device_free_gib:.3g} / {result.device_total_gib:.3g} GiB")
        )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}", file=sys.stdout)
