"""Context parallelism for one Vera job across several processes (GPUs, or CPU processes with gloo).

Every rank runs the same pipeline call with the same seed; inside the transformer, diffusers' context-parallel hooks
(driven by `VeraTransformer3DModel._cp_plan`) give each rank a contiguous chunk of every layer's tokens, the joint
attention runs as Ulysses (all-to-all over heads) or ring attention (key/value chunks passed around) through
`dispatch_attention_fn`, and the three heads' outputs are gathered back, so every rank ends the step with the full
velocities. Text cross-attention, FFNs and modulation are per token and need no communication.

Launch: `torchrun --nproc-per-node N ...` (each process sets `CUDA_VISIBLE_DEVICES` or uses `LOCAL_RANK`), then
`enable_context_parallel(pipe.transformer, ulysses_degree=N)`. On GPUs this is diffusers' `enable_parallelism`.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from diffusers.hooks.context_parallel import apply_context_parallel
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

from vera_engine.models.transformer_vera import VeraTransformer3DModel

ParallelKind = Literal["ulysses", "ring"]

# Backends whose forward op cannot return the log-sum-exp that ring attention needs (diffusers raises mid-forward).
_NO_LOG_SUM_EXP = (AttentionBackendName.NATIVE, AttentionBackendName._NATIVE_MATH)

RING_BACKENDS = ("_native_cudnn", "_native_flash", "flash")
"""Backends to suggest for ring attention: context-parallel in diffusers 0.42.1 and returning the log-sum-exp
(`_native_cudnn` / `_native_flash` ship with torch; `flash` needs a flash-attn build). FlashAttention-3
(`_flash_3`) is not context-parallel there (only its kernels-hub variant `_flash_3_hub` is)."""


def init_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """Join the `torchrun` process group (NCCL on CUDA, gloo on CPU); returns rank, world size and this rank's device."""
    if "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "context parallelism needs several processes: launch with `torchrun --nproc-per-node N ...` "
            "(WORLD_SIZE is not set)"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        here = torch.device("cuda", local_rank)
    else:
        here = torch.device("cpu")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), here


def context_parallel_config(kind: ParallelKind, degree: int) -> ContextParallelConfig:
    """diffusers' config for `degree`-way Ulysses or ring attention."""
    if kind not in ("ulysses", "ring"):
        raise ValueError(f"context parallel kind {kind!r}; expected 'ulysses' or 'ring'")
    if degree < 2:
        raise ValueError(f"context parallel degree {degree}; expected 2 or more processes")
    if kind == "ulysses":
        return ContextParallelConfig(ulysses_degree=degree)
    return ContextParallelConfig(ring_degree=degree)


def enable_context_parallel(
    transformer: VeraTransformer3DModel, kind: ParallelKind = "ulysses", degree: int | None = None
) -> ParallelConfig:
    """Split `transformer`'s sequence across the current process group for every forward.

    Needs `torch.distributed` initialised (see `init_distributed`). Ulysses needs the head count divisible by the
    degree; both kinds need the tokens per layer divisible by it (frames × height × width after patching).
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError(
            "enable_context_parallel: torch.distributed is not initialised; call init_distributed()"
        )
    world_size = torch.distributed.get_world_size()
    degree = world_size if degree is None else degree
    heads = transformer.config.num_attention_heads
    if kind == "ulysses" and heads % degree:
        raise ValueError(
            f"Ulysses over {degree} processes needs the head count ({heads}) divisible by {degree}; use ring"
        )
    if degree != world_size:
        raise ValueError(
            f"context parallel degree {degree} with {world_size} processes; Vera splits one job across all of them"
        )
    if getattr(transformer, "_parallel_config", None) is not None:
        raise RuntimeError("enable_context_parallel: this transformer is already split across processes")
    backend = AttentionBackendName(transformer.attention_backend)
    if kind == "ring" and backend in _NO_LOG_SUM_EXP:
        raise ValueError(
            f"ring attention merges partial results by their log-sum-exp, which the {backend.value!r} attention "
            f"backend does not return; set_attention_backend({' / '.join(map(repr, RING_BACKENDS))}) first, "
            "or use Ulysses"
        )
    cp_config = context_parallel_config(kind, degree)
    if transformer.device.type != "cpu":
        transformer.enable_parallelism(config=cp_config)
        return transformer._parallel_config

    # CPU processes (gloo). diffusers' `enable_parallelism` picks the device as `rank % accelerator count`, which is
    # a division by zero without an accelerator; the rest of what it does is done here with the CPU as the device:
    # the mesh, the config on every attention processor (read by the joint attention) and the plan's hooks.
    if not _AttentionBackendRegistry._is_context_parallel_available(backend):
        raise ValueError(f"attention backend {backend.value!r} does not support context parallelism")
    mesh = torch.distributed.device_mesh.init_device_mesh(
        "cpu", mesh_shape=cp_config.mesh_shape, mesh_dim_names=cp_config.mesh_dim_names
    )
    config = ParallelConfig(context_parallel_config=cp_config)
    config.setup(torch.distributed.get_rank(), world_size, torch.device("cpu"), mesh=mesh)
    transformer._parallel_config = config
    for block in transformer.blocks:
        for branch in (block.edit, block.alpha, block.composite):
            for attention in (branch.attn1, branch.attn2):
                attention.processor._parallel_config = config
    apply_context_parallel(transformer, cp_config, transformer._cp_plan)
    return config
