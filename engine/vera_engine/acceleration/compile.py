"""Regional compilation of the MoT block: on by default for exact sampling on CUDA, off for step caches.

Eager bf16 sampling spends 10-15 % of a step in fp32 element-wise work around the matmuls (norms, modulation,
gated residuals, RoPE temporaries); `torch.compile` fuses it. diffusers' `compile_repeated_blocks(fullgraph=True)`
compiles the one `VeraMoTBlock` class once and reuses the graph for every layer, so the first job pays seconds, not
minutes. `fullgraph=True` makes a graph break an error rather than a silent slow path; `graph_breaks` (used by the
tests on the CPU and by `bench/gpu_probe.sh` on the GPU) shows that the block traces as one graph.

Step caches (`acceleration.step_cache`) hook the blocks' `forward`, which a compiled block cannot call into, so
`eager_blocks` runs the blocks uncompiled for the length of a cached job and puts the compiled ones back after:
one engine serves exact jobs compiled and cached jobs eager.
"""

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

ENV_SWITCH = "VERA_COMPILE"
"""`0` turns the automatic compilation off (`1` forces it wherever it can run)."""


def should_compile(
    requested: bool | None, device_type: str, offloading: bool, env: str | None = None
) -> bool:
    """Whether to compile the repeated blocks at load.

    `requested`: True / False from the caller (`--compile` / `--no-compile`), None for the default: compile on CUDA
    unless offloading hooks sit on the transformer (group / model offload hooks break the compiled block).
    `env`: the value of `$VERA_COMPILE` (read from the environment when None), which overrides the default only.
    """
    if requested is not None:
        return requested
    env = os.environ.get(ENV_SWITCH) if env is None else env
    if env is not None and env.strip() != "":
        if env.strip() not in ("0", "1"):
            raise ValueError(f"${ENV_SWITCH}={env!r}; expected 0 (off) or 1 (on)")
        return env.strip() == "1" and not offloading
    return device_type == "cuda" and not offloading


def compile_blocks(transformer: torch.nn.Module, **compile_kwargs: Any) -> None:
    """`compile_repeated_blocks(fullgraph=True, ...)`: every `VeraMoTBlock` compiled, one graph reused per layer."""
    compile_kwargs.setdefault("fullgraph", True)
    transformer.compile_repeated_blocks(**compile_kwargs)


def compiled_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer's blocks that carry a compiled call (`nn.Module.compile`)."""
    return [
        module for module in transformer.modules() if getattr(module, "_compiled_call_impl", None) is not None
    ]


@contextlib.contextmanager
def eager_blocks(transformer: torch.nn.Module) -> Iterator[int]:
    """Run compiled blocks uncompiled inside the block (yields how many were switched), restoring them after."""
    saved = [(module, module._compiled_call_impl) for module in compiled_blocks(transformer)]
    for module, _ in saved:
        module._compiled_call_impl = None
    try:
        yield len(saved)
    finally:
        for module, compiled in saved:
            module._compiled_call_impl = compiled


@dataclass
class GraphReport:
    """What dynamo made of one call: graphs, breaks and their reasons (`torch._dynamo.explain`)."""

    graph_count: int
    graph_break_count: int
    break_reasons: list[str] = field(default_factory=list)


def graph_breaks(module: torch.nn.Module, *args: Any, **kwargs: Any) -> GraphReport:
    """Trace `module(*args, **kwargs)` with dynamo (no compilation, no inductor) and report its graph breaks."""
    import torch._dynamo

    torch._dynamo.reset()
    explained = torch._dynamo.explain(module)(*args, **kwargs)
    reasons = [str(getattr(reason, "reason", reason)).splitlines()[0] for reason in explained.break_reasons]
    torch._dynamo.reset()
    return GraphReport(explained.graph_count, explained.graph_break_count, reasons)
