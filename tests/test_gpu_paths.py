"""The GPU path's choices, checked on the CPU: attention backend selection from device facts given as inputs,
default compilation and its traceability, the joint attention's one q/k/v buffer, the context-parallel advice."""

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

from vera_engine.acceleration import backends
from vera_engine.acceleration.backends import DeviceFacts, choose_attention_backend, resolve_attention_backend
from vera_engine.acceleration.compile import (
    compiled_blocks,
    eager_blocks,
    graph_breaks,
    should_compile,
)
from vera_engine.models import transformer_vera
from vera_engine.models.transformer_vera import BRANCHES, apply_rotary_emb
from vera_engine.pipelines.presets import build_random_transformer

FLASH_FIRST = (1, 2, 0, 3, 4)  # torch's default SDPBackend order: flash, efficient, math, cudnn, overrideable
CUDNN_FIRST = (3, 1, 2, 0, 4)  # what check_prefer_cudnn_attention installs on sm90/sm100 with a recent cuDNN


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (DeviceFacts("cpu"), "native"),
        (DeviceFacts("cuda", (9, 0), 91000, FLASH_FIRST), "_native_cudnn"),  # H100, SDPA would pick FA2
        (DeviceFacts("cuda", (9, 0), 91501, CUDNN_FIRST), "native"),  # SDPA already dispatches to cuDNN
        (DeviceFacts("cuda", (8, 0), 90100, FLASH_FIRST), "_native_cudnn"),  # A100
        (DeviceFacts("cuda", (7, 5), 90100, FLASH_FIRST), "native"),  # T4: no fused cuDNN attention
        (DeviceFacts("cuda", (9, 0), 8907, FLASH_FIRST), "native"),  # cuDNN 8: too old for torch's cuDNN SDPA
        (DeviceFacts("cuda", (9, 0), None, FLASH_FIRST), "native"),  # built without cuDNN
        (DeviceFacts("cuda", (9, 0), 91000, FLASH_FIRST, half_precision=False), "native"),  # fp32 model
    ],
)
def test_attention_backend_is_chosen_from_device_facts(facts, expected):
    assert choose_attention_backend(facts) == expected


def test_chosen_backends_ship_with_torch_and_build_only_backends_are_never_chosen():
    # The automatic choice never needs a separate build; the ones that do are listed for docs/GPU.md.
    for name in ("native", "_native_cudnn"):
        assert AttentionBackendName(name)
        assert name not in backends.NEEDS_BUILD
    assert {"flash", "_flash_3", "sage"} <= set(backends.NEEDS_BUILD)


def test_resolve_prefers_a_named_backend_then_the_environment(monkeypatch):
    monkeypatch.delenv(backends.ENV_OVERRIDE, raising=False)
    assert resolve_attention_backend("_native_math", "cpu", torch.float32) == ("_native_math", "named")
    assert resolve_attention_backend("auto", "cpu", torch.float32)[0] == "native"
    monkeypatch.setenv(backends.ENV_OVERRIDE, "_native_efficient")
    assert resolve_attention_backend(None, "cpu", torch.float32)[0] == "_native_efficient"
    assert resolve_attention_backend("native", "cpu", torch.float32)[0] == "native"


@pytest.fixture
def restore_active_backend():
    # diffusers' set_attention_backend also sets a process-wide active backend: put it back for later tests.
    saved = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry._active_backend = saved


def test_load_pipeline_sets_the_chosen_backend(monkeypatch, restore_active_backend):
    from vera_engine.pipelines.model_store import load_pipeline

    monkeypatch.delenv(backends.ENV_OVERRIDE, raising=False)
    monkeypatch.delenv("VERA_COMPILE", raising=False)
    pipe = load_pipeline("default", device="cpu")
    # CPU: left exactly as diffusers sets it (native), nothing compiled.
    assert pipe.transformer.attention_backend == "native"
    assert compiled_blocks(pipe.transformer) == []
    # On an H100 whose SDPA puts FA2 first, the loader asks for cuDNN explicitly.
    monkeypatch.setattr(
        backends, "device_facts", lambda device, dtype: DeviceFacts("cuda", (9, 0), 91000, FLASH_FIRST)
    )
    pipe = load_pipeline("default", device="cpu")
    assert pipe.transformer.attention_backend == "_native_cudnn"
    assert {p._attention_backend.value for b in pipe.transformer.blocks for p in _processors(b)} == {
        "_native_cudnn"
    }


def _processors(block):
    return [getattr(block, name).attn1.processor for name in BRANCHES]


@pytest.mark.parametrize(
    ("requested", "device", "offloading", "env", "expected"),
    [
        (None, "cuda", False, None, True),  # default on CUDA: exact sampling compiled
        (None, "cpu", False, None, False),
        (None, "cuda", True, None, False),  # offload hooks break the compiled block
        (None, "cuda", False, "0", False),  # the off switch
        (None, "cpu", False, "1", True),
        (False, "cuda", False, "1", False),  # an explicit request wins
        (True, "cpu", False, None, True),
    ],
)
def test_compile_default_and_switches(requested, device, offloading, env, expected):
    assert should_compile(requested, device, offloading, env=env if env is not None else "") is expected


def test_compile_switch_rejects_other_values():
    with pytest.raises(ValueError, match="VERA_COMPILE='yes'; expected 0"):
        should_compile(None, "cuda", False, env="yes")


def _block_inputs(model, mask=True):
    captured = {}
    hook = model.blocks[0].register_forward_pre_hook(lambda module, args: captured.setdefault("args", args))
    generator = torch.Generator().manual_seed(0)
    latents = [torch.randn(2, 12, 2, 8, 8, generator=generator) for _ in range(5)]
    text = torch.randn(2, 6, model.config.text_dim, generator=generator)
    text[:, 4:] = 0
    with torch.no_grad():
        model(
            *latents[:3],
            torch.tensor([900.0, 100.0]),
            text,
            source_latents=latents[3],
            mask_latents=latents[4] if mask else None,
            return_dict=False,
        )
    hook.remove()
    return captured["args"]


@pytest.mark.parametrize("preset", ["tiny", "vera-tiny"])
def test_mot_block_traces_as_one_graph(preset):
    # What compile_repeated_blocks(fullgraph=True) needs: dynamo traces the whole block with no break (vera-tiny
    # adds the masked cross-attention and frame positions).
    model = build_random_transformer(preset, seed=0).eval()
    args = _block_inputs(model)
    with torch.no_grad():
        report = graph_breaks(model.blocks[0], *args)
    assert (report.graph_count, report.graph_break_count, report.break_reasons) == (1, 0, [])


def test_step_cache_runs_compiled_blocks_eager_and_restores_them():
    from vera_engine.acceleration.step_cache import step_cache
    from vera_engine.pipelines.presets import build_random_pipeline

    pipe = build_random_pipeline("tiny", seed=0)
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")  # lazy: nothing compiles yet
    compiled = compiled_blocks(pipe.transformer)
    assert len(compiled) == len(pipe.transformer.blocks)
    with step_cache(pipe, "first_block:0.1", num_inference_steps=2, guidance_scale=1.0):
        assert compiled_blocks(pipe.transformer) == []
    assert compiled_blocks(pipe.transformer) == compiled
    with eager_blocks(pipe.transformer) as switched:
        assert switched == len(compiled)
    with step_cache(pipe, "none"):
        assert compiled_blocks(pipe.transformer) == compiled  # exact sampling stays compiled


def _reference_joint_attention(block, states, rotary):
    """The joint attention as it was written before the shared buffer: per-branch lists, then `torch.cat`."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_wan import _get_qkv_projections

    queries, keys, values = [], [], []
    for name, hidden in zip(BRANCHES, states, strict=True):
        attn = getattr(block, name).attn1
        q, k, v = _get_qkv_projections(attn, hidden, None)
        q = attn.norm_q(q).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
        queries.append(apply_rotary_emb(q, *rotary))
        keys.append(apply_rotary_emb(k, *rotary))
        values.append(v.unflatten(2, (attn.heads, -1)))
    out = dispatch_attention_fn(torch.cat(queries, 1), torch.cat(keys, 1), torch.cat(values, 1))
    out = out.flatten(2, 3).type_as(queries[0])
    seq_len = states[0].shape[1]
    return [
        getattr(block, name).attn1.to_out[0](part)
        for name, part in zip(BRANCHES, out.split(seq_len, dim=1), strict=True)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_joint_attention_writes_one_qkv_buffer_with_equal_outputs(monkeypatch, dtype):
    model = build_random_transformer("tiny", seed=2).eval()
    model = model.to(dtype)
    block = model.blocks[0]
    generator = torch.Generator().manual_seed(4)
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    states = [torch.randn(2, 16, dim, generator=generator).to(dtype) for _ in BRANCHES]
    rotary = model.rope(torch.zeros(1, 12, 1, 8, 8))
    seen = []
    original = transformer_vera.dispatch_attention_fn

    def watching(query, key, value, **kwargs):
        seen.append((query, key, value))
        return original(query, key, value, **kwargs)

    monkeypatch.setattr(transformer_vera, "dispatch_attention_fn", watching)
    with torch.no_grad():
        got = block.joint_self_attention(states, BRANCHES, rotary)
        expected = _reference_joint_attention(block, states, rotary)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    (query, key, value), *_ = seen
    # One allocation holds all three: no per-branch copies, no concatenation; heads-first in memory, so the
    # backends' permute(0, 2, 1, 3).contiguous() is free, and the last dimension contiguous (flash-attn's need).
    storage = query.untyped_storage().data_ptr()
    assert key.untyped_storage().data_ptr() == storage == value.untyped_storage().data_ptr()
    assert query.untyped_storage().nbytes() == 3 * query.numel() * query.element_size()
    assert all(t.permute(0, 2, 1, 3).is_contiguous() and t.stride(-1) == 1 for t in (query, key, value))


def test_joint_attention_casts_float32_queries_and_keys_to_the_values_dtype(monkeypatch):
    # Under autocast torch >= 2.12 runs RMSNorm in float32: q/k come out float32 while v is bfloat16, which the
    # fused kernels (and SDPA itself) refuse. Emulated here by norms that return float32.
    model = build_random_transformer("tiny", seed=2).eval().to(torch.bfloat16)
    block = model.blocks[0]
    for name in BRANCHES:
        attn = getattr(block, name).attn1
        for norm_name in ("norm_q", "norm_k"):
            norm = getattr(attn, norm_name)
            monkeypatch.setattr(norm, "forward", lambda x, norm=norm: type(norm).forward(norm, x).float())
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    states = [torch.randn(2, 16, dim).to(torch.bfloat16) for _ in BRANCHES]
    rotary = model.rope(torch.zeros(1, 12, 1, 8, 8))
    with torch.no_grad():
        out = block.joint_self_attention(states, BRANCHES, rotary)
    assert all(part.dtype == torch.bfloat16 and torch.isfinite(part).all() for part in out)


def test_ring_advice_names_only_context_parallel_backends(tmp_path):
    from vera_engine.acceleration.parallel import RING_BACKENDS, enable_context_parallel

    for name in RING_BACKENDS:
        assert _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(name)), name
    # FlashAttention-3 is not context-parallel in diffusers 0.42.1: the old advice named it.
    assert not _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName._FLASH_3)
    assert "_flash_3" not in RING_BACKENDS
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = build_random_transformer("tiny", seed=0)
        with pytest.raises(ValueError, match="log-sum-exp") as raised:
            enable_context_parallel(model, "ring", degree=1)
        assert "_flash_3" not in str(raised.value)
        assert all(repr(name) in str(raised.value) for name in RING_BACKENDS)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize(
    ("options", "device", "expected"),
    [
        (dict(group_offload="block"), "cuda", True),  # the default on CUDA: streamed
        (dict(group_offload="block"), "cpu", False),
        (dict(group_offload="block", num_blocks_per_group=2), "cuda", False),  # diffusers streams one group
        (dict(group_offload="block", use_stream=False), "cuda", False),  # the off switch
        (dict(), "cuda", False),  # no group offloading, nothing to stream
    ],
)
def test_group_offload_streams_by_default_on_cuda(options, device, expected):
    from vera_engine.acceleration.memory import MemoryOptions, stream_group_offload

    assert stream_group_offload(MemoryOptions(**options), device) is expected


def test_streamed_group_offload_records_streams(monkeypatch):
    from vera_engine.acceleration.memory import MemoryOptions, apply_memory_options
    from vera_engine.pipelines.presets import build_random_pipeline

    pipe = build_random_pipeline("tiny", seed=0)
    calls = {}
    monkeypatch.setattr(pipe.transformer, "enable_group_offload", lambda **kw: calls.update(kw))
    # Placement of the other components is not under test (and there is no CUDA device here).
    monkeypatch.setattr(pipe.vae, "to", lambda *a, **k: pipe.vae)
    monkeypatch.setattr(pipe.text_encoder, "to", lambda *a, **k: pipe.text_encoder)
    # (The text encoder stays put: its CUDA default, a pinned swap, needs CUDA; tests/test_memory.py covers it.)
    notes = apply_memory_options(
        pipe, MemoryOptions(group_offload="block", text_encoder_offload="none"), "cuda"
    )
    assert calls["use_stream"] is True and calls["record_stream"] is True
    assert any("(streamed)" in note for note in notes)


def test_bench_step_names_per_step_and_per_forward_flops(capsys):
    from vera_engine.tools.bench import bench_step, job_path, print_result

    result = bench_step("tiny", device="cpu", repeats=1, steps=2)
    assert result.tflop_per_step == pytest.approx(2 * result.tflop_per_forward)
    assert (result.forwards_per_step, result.forward_batch) == (1, 2)
    assert result.peak_reserved_gib is None and result.device_free_gib is None  # CUDA-only figures
    print_result(result)
    printed = capsys.readouterr().out
    assert "TFLOP per step (CFG batch 2)" in printed and "TFLOP per forward (batch 1)" in printed
    sequential = bench_step("tiny", device="cpu", repeats=1, steps=2, cfg_sequential=True)
    assert (sequential.forwards_per_step, sequential.forward_batch) == (2, 1)
    assert sequential.tflop_per_step == pytest.approx(result.tflop_per_step)
    # What jobs do at 81 frames with the default windows of a 49-frame checkpoint (Wan VAE: 4 frames a latent).
    assert "2 windows of 49 frames" in job_path(81, 49, 4)
    assert "one pass" in job_path(49, 49, 4)


def test_vera_1_3b_figures_per_step_and_per_forward():
    from vera_engine.pipelines.presets import WAN_1_3B
    from vera_engine.tools.bench import step_flops

    tokens = 13 * 30 * 52  # 49 frames at 832x480
    assert step_flops(WAN_1_3B.transformer, tokens, 512, batch=2).total / 1e12 == pytest.approx(
        1681, rel=2e-3
    )
    assert step_flops(WAN_1_3B.transformer, tokens, 512, batch=1).total / 1e12 == pytest.approx(841, rel=2e-3)
