"""Which attention backend the joint attention uses when nobody names one: chosen at load, from what is installed.

The joint self-attention is ~82 % of a Vera-1.3B step at 49 frames (60,840 tokens), so the kernel behind it decides
the clip time. diffusers' `native` backend is torch's `scaled_dot_product_attention`, which picks a kernel itself:
FlashAttention-2 first on most builds, cuDNN's fused attention first only where torch's dispatcher prefers it
(`check_prefer_cudnn_attention` in ATen's `sdp_utils.cpp`: an sm90 / sm100 device and a recent enough cuDNN, a
threshold that moved between torch releases, and an environment switch). On an H100 the cuDNN kernel is the faster
one at this shape (estimated ~150-165 s per 50-step CFG clip against ~230 s for FA2; docs/GPU.md), so Vera asks
for it explicitly where SDPA would not pick it, rather than relying on whatever the build's default order is.

Rather than copy torch's version thresholds (which change), the choice reads the dispatcher's own priority order
after one tiny SDPA call on the device (`torch._C._get_sdp_priority_order`, filled in lazily by the first call):

- not CUDA, or not a half-precision model: `native` (cuDNN's fused attention takes fp16/bf16 only);
- an sm80+ GPU whose SDPA already tries cuDNN first: `native` (same kernel, and SDPA keeps its fallbacks);
- an sm80+ GPU with cuDNN >= 9 whose SDPA tries FlashAttention-2 first: `_native_cudnn`;
- otherwise `native`.

Backends that need a separate CUDA build (flash-attn's `flash`, FlashAttention-3's `_flash_3`, SageAttention's
`sage`) are never chosen automatically: they are used only when named, and `check_attention_backend` refuses them
with diffusers' own message when their package is missing. `VERA_ATTENTION_BACKEND` overrides the automatic choice
(any diffusers backend name).
"""

import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

AUTO = "auto"
"""The `attention_backend` value that asks for `choose_attention_backend`'s choice."""

ENV_OVERRIDE = "VERA_ATTENTION_BACKEND"

# torch's SDPBackend numbering (`torch.nn.attention.SDPBackend`): what `_get_sdp_priority_order` returns.
SDP_CUDNN = int(torch.nn.attention.SDPBackend.CUDNN_ATTENTION)

# Minimum cuDNN for a fused SDPA torch will run (ATen's cuDNN MHA needs cuDNN 9 for these head dims).
MIN_CUDNN_FOR_SDPA = 90000

# Backends diffusers can dispatch to that are not in a torch wheel: each needs a package built for the CUDA in use.
NEEDS_BUILD: dict[str, str] = {
    "flash": "flash-attn 2 (pip install flash-attn --no-build-isolation: compiles against the local CUDA)",
    "flash_varlen": "flash-attn 2",
    "_flash_3": "FlashAttention-3 (flash_attn_interface, built from the hopper/ folder of flash-attention; sm90)",
    "_flash_varlen_3": "FlashAttention-3",
    "sage": "sageattention (8-bit QK, approximate; built against the local CUDA)",
    "sage_varlen": "sageattention",
    "xformers": "xformers (wheel matching the torch build)",
}


@dataclass(frozen=True)
class DeviceFacts:
    """What the choice depends on, as plain values so the choice is testable without a GPU."""

    device_type: str
    capability: tuple[int, int] | None = None
    cudnn_version: int | None = None
    sdp_priority_order: tuple[int, ...] = ()
    half_precision: bool = True


def choose_attention_backend(facts: DeviceFacts) -> str:
    """The diffusers backend name for the joint attention on a device described by `facts` (module docstring)."""
    if facts.device_type != "cuda" or not facts.half_precision:
        return "native"
    if facts.capability is None or facts.capability < (8, 0):
        return "native"
    if facts.sdp_priority_order and facts.sdp_priority_order[0] == SDP_CUDNN:
        return "native"
    if facts.cudnn_version is not None and facts.cudnn_version >= MIN_CUDNN_FOR_SDPA:
        return "_native_cudnn"
    return "native"


def device_facts(device: "str | torch.device", dtype: torch.dtype) -> DeviceFacts:
    """Read `DeviceFacts` for `device` from the running torch (one tiny SDPA call on a GPU)."""
    device = torch.device(device)
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type != "cuda":
        return DeviceFacts(device.type, half_precision=half)
    # SDPA fills in its device-dependent priority order on its first call; before that the getter shows the
    # build-wide default.
    probe = torch.zeros(1, 1, 8, 64, device=device, dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(probe, probe, probe)
    return DeviceFacts(
        "cuda",
        capability=torch.cuda.get_device_capability(device),
        cudnn_version=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        sdp_priority_order=tuple(int(b) for b in torch._C._get_sdp_priority_order()),
        half_precision=half,
    )


def resolve_attention_backend(
    requested: str | None, device: "str | torch.device", dtype: torch.dtype
) -> tuple[str, str]:
    """`(backend, why)`: the named backend, `$VERA_ATTENTION_BACKEND`, or the automatic choice (None or 'auto')."""
    if requested not in (None, AUTO):
        return requested, "named"
    override = os.environ.get(ENV_OVERRIDE)
    if override:
        return override, f"${ENV_OVERRIDE}"
    facts = device_facts(device, dtype)
    return choose_attention_backend(facts), f"automatic ({facts})"
