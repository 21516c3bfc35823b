"""Training's GPU-scale choices, checked on the CPU: checkpointing for real sizes, FSDP2's mixed-precision policy,
a bounded bf16 prompt cache in host memory, gradient clipping without a host read per gradient."""

import pytest
import torch

from vera_engine.pipelines.presets import build_random_pipeline, build_random_transformer
from vera_engine.training import train
from vera_engine.training.train import (
    PromptCache,
    clip_gradients,
    fsdp_mixed_precision,
    needs_checkpointing,
    shard_transformer,
)


def test_checkpointing_is_on_for_real_sizes_whatever_the_flag_says():
    with torch.device("meta"):  # shapes only: Vera-1.3B's 4.26 B parameters are never allocated
        big = build_random_transformer("wan-1.3b")
    small = build_random_transformer("tiny")
    assert needs_checkpointing(big, requested=False)
    assert not needs_checkpointing(small, requested=False)
    assert needs_checkpointing(small, requested=True)


def test_fsdp_mixed_precision_policy_for_bf16_runs(monkeypatch):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = fsdp_mixed_precision(True)
    assert isinstance(policy, MixedPrecisionPolicy)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert fsdp_mixed_precision(False) is None
    calls = []
    monkeypatch.setattr(
        "torch.distributed.fsdp.fully_shard", lambda module, **kwargs: calls.append((module, kwargs))
    )
    model = build_random_transformer("tiny")
    shard_transformer(model, policy)
    assert [module for module, _ in calls] == [*model.blocks, model]
    assert all(kwargs == {"mp_policy": policy} for _, kwargs in calls)
    calls.clear()
    shard_transformer(model)
    assert all(kwargs == {} for _, kwargs in calls)


def test_prompt_cache_is_bounded_and_kept_in_host_memory_in_its_storage_dtype():
    pipe = build_random_pipeline("tiny", seed=0)
    cpu = torch.device("cpu")
    cache = PromptCache(pipe, cpu, torch.float32, max_entries=2, storage_dtype=torch.bfloat16)
    states = cache(["add a ball", "add a cube", "add a ball"])
    assert states.dtype == torch.float32 and states.shape[0] == 3
    with torch.no_grad():  # as the cache encodes (SDPA may pick another CPU kernel when autograd records)
        encoded = pipe.encode_prompt("add a ball", cpu, torch.float32)[0]
    expected = encoded.to(torch.bfloat16).float()
    assert torch.equal(states[0], expected) and torch.equal(states[2], expected)
    assert all(s.dtype == torch.bfloat16 and s.device.type == "cpu" for s in cache._states.values())
    cache(["add a cone"])
    assert len(cache) == 2 and "add a cube" not in cache._states  # least recently used dropped
    # A float32 run keeps float32 states: the training arithmetic is unchanged.
    exact = PromptCache(pipe, cpu, torch.float32)
    assert torch.equal(exact(["add a ball"])[0], encoded)
    with pytest.raises(ValueError, match="max_entries=0"):
        PromptCache(pipe, cpu, torch.float32, max_entries=0)


def test_clipping_reads_the_norm_once(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(7, 3)) for _ in range(6)]
    for param in params:
        param.grad = torch.randn_like(param) * 3
    reference = [p.grad.clone() for p in params]
    reads = []
    original = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: reads.append(1) or original(self))
    total = clip_gradients(params, 1.0)
    assert len(reads) == 1  # one host read for the whole norm (was one per gradient, plus one)
    monkeypatch.undo()
    assert total == pytest.approx(
        float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in reference])))
    )
    scale = 1.0 / (total + 1e-6)
    for param, grad in zip(params, reference, strict=True):
        torch.testing.assert_close(param.grad, grad * scale)
    assert train.CHECKPOINTING_PARAMETERS == 10**9
