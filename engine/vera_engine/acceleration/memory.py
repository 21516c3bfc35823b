"""Memory options for sampling: where the text encoder runs, group offloading, model offloading, VAE tiling.

A full-size Vera pipeline does not fit a 16 GB GPU as loaded: umT5-XXL's encoder alone is ~11.4 GB in bfloat16
(5.7B parameters), Vera-1.3B (three Wan-1.3B branches, 4.26B parameters) ~8.5 GB, and the Wan VAE's decoder
activations at 832x480x49 several more. The options
here trade speed for memory through diffusers' own machinery (group offloading hooks, accelerate's model offload,
the Wan VAE's tiled encode/decode); `apply_memory_options` puts a freshly loaded pipeline on its device with them.

Load with `model_store.load_pipeline(model, device, memory=options)`: it loads on the CPU and lets
`apply_memory_options` place every component; loading onto the GPU first would need the very memory the options
are meant to save.
Measured peaks: `bench/bench_memory.py`.
"""

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vera_engine.models.space_to_depth_codec import SpaceToDepthCodec

logger = logging.getLogger(__name__)

TEXT_ENCODER_OFFLOAD = ("auto", "none", "cpu", "swap")
"""Where the text encoder lives: `swap` on CUDA and `none` elsewhere (`auto`), on the device, on the CPU (runs
there), or in CPU memory and swapped in to encode."""

GROUP_OFFLOAD = (None, "block")
"""Group offloading kinds for the transformer: none, or diffusers' `block_level` (each `VeraMoTBlock` moves whole)."""


@dataclass(frozen=True)
class MemoryOptions:
    """How a pipeline uses the compute device's memory. The defaults keep everything on the device except, on CUDA,
    the text encoder, which visits it only to encode (`text_encoder_offload="auto"`); `"none"` keeps it there too.

    Offloading moves weights, not arithmetic: the sampled result is unchanged (bit-identical in the CPU tests),
    except that `text_encoder_offload="cpu"` on a GPU encodes with CPU kernels (rounding-level differences) and
    `vae_tiling` changes the decoded (and encoded) pixels near tile seams by a small, blended amount. On a CPU device the offloading options are accepted (so one
    setting runs everywhere) but save nothing, since the offload target is the CPU itself, with two exceptions
    measured by `bench/bench_memory.py`: `offload_to_disk` frees CPU memory, and `model_cpu_offload` costs a
    second copy of each component while it runs.
    """

    text_encoder_offload: str = "auto"
    """`"auto"` (default): `"swap"` on a CUDA device, `"none"` elsewhere (`text_encoder_placement`). The
    text-state cache (`VeraPipeline.text_states`) runs the encoder only for prompts it has not seen, so on a GPU
    the encoder is off it after encoding instead of holding ~11 GB for the whole job; on a CPU there is nothing to
    save. `"none"`: the text encoder stays on the device (umT5-XXL: ~11 GB in bfloat16 held for the whole job).
    `"cpu"`: it stays on the CPU and encodes there; only the prompt states (1 x 512 x 4096) go to the device.
    Saves all of its device memory, costs CPU time per prompt (seconds to tens of seconds for umT5-XXL,
    depending on the CPU's bfloat16 support), paid twice per job with guidance (prompt and negative prompt).
    `"swap"`: it stays in CPU memory and is moved to the device only while it encodes (diffusers group offloading
    with the whole encoder as one group), then moved back. Saves its memory during denoising and decoding; costs
    one host-to-device copy of the weights per encode and needs its full size free on the device while it encodes.
    On CUDA the weights are kept in pinned (page-locked) host memory (`pinned_swap`): the copy in runs at DMA speed
    (~0.5 s for 11.4 GB over PCIe 4 against ~1 s or more from pageable memory, estimated) and the copy out is
    free (the frozen weights' pinned copy is simply reused); costs the encoder's size in page-locked host memory."""

    group_offload: str | None = None
    """`None`, or `"block"`: the transformer's weights stay in CPU memory and each group of
    `num_blocks_per_group` `VeraMoTBlock`s is copied to the device just before it runs and dropped after
    (diffusers `enable_group_offload(offload_type="block_level")`). The parts outside the blocks (patch
    embeddings, text/time embedders, heads: ~2% of the weights) are on the device for each whole forward.
    Saves almost all of the transformer's weight memory (Vera-1.3B in bfloat16: ~8.5 GB -> ~0.43 GB: 78M
    parameters outside the blocks plus one 139M-parameter block); costs a host-to-device copy of all its weights
    every denoising step (hidden behind compute by `use_stream` on CUDA)."""

    num_blocks_per_group: int = 1
    """Blocks moved together with `group_offload="block"`. More per group: fewer, larger copies, more memory."""

    use_stream: bool | None = None
    """With `group_offload`: copy the next block group on a side stream while the current one computes, from
    pinned CPU memory, with `record_stream` so the copies are released as soon as the compute stream is done with
    them. `None` (default): on where it can run, a CUDA device with `num_blocks_per_group=1` (diffusers streams one
    group at a time); without it each step waits for ~17 GB of PCIe copies at Vera-1.3B (+50-125 s per 49-frame
    clip, estimated). Costs one more group on the device and pinned CPU memory for all weights. `True` on a
    non-CUDA device is refused; `False` turns it off."""

    offload_to_disk: str | None = None
    """With `group_offload`: a folder where the transformer's block groups are written as safetensors and read back
    for every use, so they occupy neither device nor CPU memory between uses (for machines short of RAM, e.g. a 14B
    Vera). Costs a disk read of all transformer weights per step; the folder needs their size free."""

    model_cpu_offload: bool = False
    """diffusers `enable_model_cpu_offload`: each whole component (text encoder, transformer, VAE) sits in CPU
    memory and is moved to the device when it runs, the previous one moved out. Peak: the largest component plus
    activations (the VAE, which encodes the source before denoising, stays alongside the transformer). Costs a copy of each component per job (seconds). Excludes `group_offload` (both manage the
    transformer's placement) and `text_encoder_offload` (it already offloads the text encoder)."""

    vae_tiling: bool = False
    """Wan VAE: encode and decode in overlapping spatial tiles of `vae_tile_size` pixels (blended over
    `vae_tile_size - vae_tile_stride` pixels), so the codec's activations scale with the tile, not the frame.
    Saves most of the codec's activation memory at large sizes; costs codec time for the overlap (832x480 with
    the defaults: 3x5 tiles covering ~2.5x the frame's pixels; a sampling call took 2.2x as long on a CPU, where
    the codec dominates) and small differences near tile seams. The lossless space-to-depth codec of tiny checkpoints is a per-pixel
    rearrangement with no activations to save: tiling is skipped for it (a note says so), exactly."""

    vae_tile_size: int = 256
    """Tile edge in pixels (diffusers' Wan default 256); a multiple of the VAE's spatial compression (8)."""

    vae_tile_stride: int = 192
    """Distance between tile origins in pixels (diffusers' Wan default 192); at most `vae_tile_size`."""

    def __post_init__(self) -> None:
        if self.text_encoder_offload not in TEXT_ENCODER_OFFLOAD:
            raise ValueError(
                f"text_encoder_offload={self.text_encoder_offload!r}; expected one of {TEXT_ENCODER_OFFLOAD}"
            )
        if self.group_offload not in GROUP_OFFLOAD:
            raise ValueError(
                f"group_offload={self.group_offload!r}; expected None or 'block' (block-level group offloading "
                "of the transformer; Vera supports no leaf-level offloading)"
            )
        for name in ("num_blocks_per_group", "vae_tile_size", "vae_tile_stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; expected an integer >= 1")
        if self.vae_tile_stride > self.vae_tile_size:
            raise ValueError(
                f"vae_tile_stride={self.vae_tile_stride} is larger than vae_tile_size={self.vae_tile_size}: tiles "
                "would leave gaps; use a stride <= the tile size (e.g. 3/4 of it)"
            )
        if self.model_cpu_offload and self.group_offload is not None:
            raise ValueError(
                f"model_cpu_offload=True and group_offload={self.group_offload!r} cannot be combined: both decide "
                "where the transformer's weights live. Use group_offload (lower peak) or model_cpu_offload, not both"
            )
        if self.model_cpu_offload and self.text_encoder_offload not in ("auto", "none"):
            raise ValueError(
                f"model_cpu_offload=True and text_encoder_offload={self.text_encoder_offload!r} cannot be combined: "
                "model CPU offload already keeps the text encoder in CPU memory between uses. Drop one of them"
            )
        needs_group = {
            "use_stream": self.use_stream is True,
            "offload_to_disk": self.offload_to_disk,
            "num_blocks_per_group": self.num_blocks_per_group != 1,
        }
        for name, is_set in needs_group.items():
            if is_set and self.group_offload is None:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} only applies to group offloading, but group_offload=None; "
                    "set group_offload='block' or leave it at its default"
                )
        if self.use_stream is True and self.num_blocks_per_group != 1:
            raise ValueError(
                f"use_stream=True and num_blocks_per_group={self.num_blocks_per_group} cannot be combined: "
                "diffusers streams one block group at a time; use num_blocks_per_group=1 with use_stream"
            )


def _has_offload_hooks(pipe: Any) -> str | None:
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        if _is_group_offload_enabled(component):
            return f"{name} has group offloading"
        if any(hasattr(module, "_hf_hook") for module in component.modules()):
            return f"{name} has accelerate offload hooks"
    return None


def apply_memory_options(pipe: Any, options: MemoryOptions, device: "str | torch.device") -> list[str]:
    """Place a freshly loaded `VeraPipeline`'s components on `device` as `options` say; returns what was done.

    Call once, on a pipeline that has no offloading yet, before sampling; do not call `pipe.to(...)` afterwards
    (it would undo the placement). The returned notes (also logged) say what each option did, including the
    ones that are no-ops for this pipeline (VAE tiling on the space-to-depth codec).
    """
    if not isinstance(options, MemoryOptions):
        raise TypeError(
            f"options is a {type(options).__name__}; expected a vera_engine.acceleration.memory.MemoryOptions"
        )
    device = torch.device(device)
    existing = _has_offload_hooks(pipe)
    if existing is not None:
        raise RuntimeError(
            f"apply_memory_options: the pipeline already has offloading ({existing}); apply memory options once, "
            "to a freshly loaded pipeline"
        )
    if options.use_stream is True and device.type != "cuda":
        raise ValueError(
            f"use_stream=True needs a CUDA device, but device={str(device)!r}; set use_stream=False on this device"
        )
    notes: list[str] = []

    if options.model_cpu_offload:
        # accelerate hooks move each whole component onto the device when it runs (order: model_cpu_offload_seq).
        pipe.enable_model_cpu_offload(device=device)
        notes.append(f"model_cpu_offload: components stay on the CPU and run on {device} one at a time")
    else:
        if options.group_offload == "block":
            use_stream = stream_group_offload(options, device)
            pipe.transformer.enable_group_offload(
                onload_device=device,
                offload_device=torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=options.num_blocks_per_group,
                use_stream=use_stream,
                record_stream=use_stream,
                offload_to_disk_path=options.offload_to_disk,
            )
            where = f"disk ({options.offload_to_disk})" if options.offload_to_disk else "CPU memory"
            notes.append(
                f"group_offload: transformer blocks live in {where}, {options.num_blocks_per_group} block(s) at a "
                f"time on {device}" + (" (streamed)" if use_stream else "")
            )
        else:
            pipe.transformer.to(device)
        pipe.vae.to(device)
        notes.extend(_place_text_encoder(pipe, options.text_encoder_offload, device))

    notes.extend(_apply_vae_tiling(pipe.vae, options))
    for note in notes:
        logger.info("memory: %s", note)
    return notes


def stream_group_offload(options: MemoryOptions, device: "str | torch.device") -> bool:
    """Whether group offloading copies on a side stream (with `record_stream`): `options.use_stream`, or where it
    is None, on for a CUDA device with one block per group."""
    if options.group_offload is None:
        return False
    if options.use_stream is not None:
        return options.use_stream
    return torch.device(device).type == "cuda" and options.num_blocks_per_group == 1


def text_encoder_placement(mode: str, device: "str | torch.device") -> str:
    """What `text_encoder_offload=mode` does on `device`: `"auto"` is `"swap"` on CUDA (the encoder, ~11 GB for
    umT5-XXL, is off the GPU between encodes) and `"none"` elsewhere (on a CPU the offload target is the device
    itself); the other modes are themselves."""
    if mode not in TEXT_ENCODER_OFFLOAD:
        raise ValueError(f"text_encoder_offload={mode!r}; expected one of {TEXT_ENCODER_OFFLOAD}")
    if mode != "auto":
        return mode
    return "swap" if torch.device(device).type == "cuda" else "none"


def pinned_swap(device: "str | torch.device") -> bool:
    """Whether `swap` keeps the text encoder in pinned host memory: on a CUDA device, where page-locked memory makes
    the host-to-device copy a DMA transfer (pinning needs CUDA; elsewhere there is no copy worth speeding up)."""
    return torch.device(device).type == "cuda"


def default_memory_options(
    memory: "MemoryOptions | None", device: "str | torch.device"
) -> "MemoryOptions | None":
    """The options `model_store.load_pipeline` places a pipeline with: `memory` when given; without it, on CUDA,
    `MemoryOptions()` (the text encoder swapped in to encode, everything else on the device), and elsewhere None
    (every component moved to the device, as before)."""
    if memory is not None:
        return memory
    return MemoryOptions() if torch.device(device).type == "cuda" else None


def _copy_stream(device: torch.device) -> Any:
    """The side stream the pinned swap copies on (its own function so CPU tests can give a CPU stream)."""
    return torch.cuda.Stream(device)


def _place_text_encoder(pipe: Any, mode: str, device: torch.device) -> list[str]:
    # `encode_prompt` feeds the encoder on its own device and moves the states to the execution device, so the
    # encoder may live anywhere.
    mode = text_encoder_placement(mode, device)
    if mode == "none":
        pipe.text_encoder.to(device)
        return []
    if mode == "cpu":
        pipe.text_encoder.to("cpu")
        return ["text_encoder_offload: the text encoder stays on the CPU and encodes there"]
    if pinned_swap(device):
        _swap_from_pinned_memory(pipe.text_encoder, device, _copy_stream(device))
        return [
            f"text_encoder_offload: the text encoder stays in pinned CPU memory and moves to {device} to encode"
        ]
    from diffusers.hooks import apply_group_offloading

    # A transformers encoder has no ModuleList child at its top level, so block-level group offloading makes the
    # whole encoder one group: onloaded when its forward starts, offloaded when it returns.
    apply_group_offloading(
        pipe.text_encoder,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
    )
    return [f"text_encoder_offload: the text encoder stays in CPU memory and moves to {device} to encode"]


def _swap_from_pinned_memory(encoder: torch.nn.Module, device: torch.device, stream: Any) -> None:
    """Swap the whole encoder in and out as one diffusers `ModuleGroup` that keeps its weights in pinned memory.

    `apply_group_offloading` cannot do this for an encoder: the whole-module ("unmatched") group it makes is always
    built without a stream, and diffusers keeps pinned copies (`cpu_param_dict`) only for a group with one. Without
    them every onload copies from pageable memory and every offload copies the weights back to new pageable memory.
    Given a stream, the group pins each weight once; an onload copies from the pinned copy, an offload points the
    weights back at it (no device-to-host copy: the weights are frozen). The copies are blocking
    (`non_blocking=False`): the encode needs every weight before its first layer, so there is nothing to overlap,
    and a blocking copy cannot race the compute stream (an async one on the side stream would, with `onload_self`).
    """
    from diffusers.hooks.group_offloading import (
        GroupOffloadingConfig,
        GroupOffloadingType,
        ModuleGroup,
        _apply_group_offloading_hook,
    )

    cpu = torch.device("cpu")
    config = GroupOffloadingConfig(
        onload_device=device,
        offload_device=cpu,
        offload_type=GroupOffloadingType.BLOCK_LEVEL,
        non_blocking=False,
        record_stream=False,
        low_cpu_mem_usage=False,
        num_blocks_per_group=1,
        stream=stream,
    )
    group = ModuleGroup(
        modules=[encoder],
        offload_device=cpu,
        onload_device=device,
        offload_leader=encoder,
        onload_leader=encoder,
        stream=stream,
        record_stream=False,
        low_cpu_mem_usage=False,
        onload_self=True,
        group_id="text_encoder",
    )
    group.non_blocking = False  # ModuleGroup turns it on with a stream; see above
    # Registering the hook offloads the group: the weights now live in their pinned copies only.
    _apply_group_offloading_hook(encoder, group, config=config)


def _apply_vae_tiling(vae: Any, options: MemoryOptions) -> list[str]:
    if not options.vae_tiling:
        return []
    if isinstance(vae, SpaceToDepthCodec):
        # Per-pixel rearrangement: memory is the video tensor itself, which tiles would not shrink.
        return [
            "vae_tiling: skipped, the space-to-depth codec is a per-pixel rearrangement with no activations"
        ]
    if not hasattr(vae, "enable_tiling"):
        raise TypeError(
            f"vae_tiling=True but the codec is a {type(vae).__name__}, which has no tiled encode/decode; "
            "set vae_tiling=False"
        )
    ratio = getattr(vae, "spatial_compression_ratio", None) or vae.config.scale_factor_spatial
    for name in ("vae_tile_size", "vae_tile_stride"):
        value = getattr(options, name)
        if value % ratio:
            raise ValueError(
                f"{name}={value}; expected a multiple of the VAE's spatial compression {ratio} "
                f"(e.g. {max(ratio, value - value % ratio)})"
            )
    vae.enable_tiling(
        tile_sample_min_height=options.vae_tile_size,
        tile_sample_min_width=options.vae_tile_size,
        tile_sample_stride_height=options.vae_tile_stride,
        tile_sample_stride_width=options.vae_tile_stride,
    )
    return [f"vae_tiling: {options.vae_tile_size}px tiles every {options.vae_tile_stride}px"]


@dataclass
class OnloadLedger:
    """What diffusers group offloading moved during a `watch_onloads()` block.

    `resident` maps each offload group now on its onload device to its weight bytes; `peak_bytes` is the most that
    were there at once; `events` lists `("onload" | "offload", group)` in order. This observes the mechanism itself
    (every copy diffusers makes goes through `ModuleGroup.onload_` / `offload_`), so it works where device memory
    cannot show the difference, e.g. when the compute device is the CPU.
    """

    onloads: int = 0
    offloads: int = 0
    peak_bytes: int = 0
    resident: dict[Any, int] = field(default_factory=dict)
    events: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def resident_bytes(self) -> int:
        """Weight bytes of the groups on their onload device now."""
        return sum(self.resident.values())


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of `tensors`, each counted once (shared weights appear once)."""
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return tensor_bytes([*module.parameters(), *module.buffers()])


def group_bytes(group: Any) -> int:
    """Bytes of the parameters and buffers one diffusers `ModuleGroup` moves."""
    tensors = [t for module in group.modules for t in [*module.parameters(), *module.buffers()]]
    return tensor_bytes([*tensors, *group.parameters, *group.buffers])


@contextlib.contextmanager
def watch_onloads() -> Iterator[OnloadLedger]:
    """Record every group onload/offload diffusers makes inside the block (diagnostics, tests and benchmarks).

    Not thread-safe: it wraps `ModuleGroup.onload_` / `offload_` for the whole process while the block runs.
    """
    from diffusers.hooks.group_offloading import ModuleGroup

    ledger = OnloadLedger()
    original_onload, original_offload = ModuleGroup.onload_, ModuleGroup.offload_
    sizes: dict[int, int] = {}

    def onload(group: Any) -> None:
        original_onload(group)
        ledger.onloads += 1
        ledger.events.append(("onload", group))
        ledger.resident[group] = sizes.setdefault(id(group), group_bytes(group))
        ledger.peak_bytes = max(ledger.peak_bytes, ledger.resident_bytes)

    def offload(group: Any) -> None:
        original_offload(group)
        ledger.offloads += 1
        ledger.events.append(("offload", group))
        ledger.resident.pop(group, None)

    ModuleGroup.onload_, ModuleGroup.offload_ = onload, offload
    try:
        yield ledger
    finally:
        ModuleGroup.onload_, ModuleGroup.offload_ = original_onload, original_offload


def offload_folder_size(folder: "str | Path") -> int:
    """Bytes of safetensors written by disk group offloading in `folder` (0 if none yet)."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))
