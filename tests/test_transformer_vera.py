"""VeraTransformer3DModel: Wan equivalence, joint attention, conditioning and checkpoints (tiny, CPU, float32)."""

import copy
import math

import pytest
import torch
from diffusers import WanTransformer3DModel

from vera_engine import VeraTransformer3DModel
from vera_engine.models.transformer_vera import (
    BRANCHES,
    VERA_ONLY_PARAMETERS,
    apply_rotary_emb,
    wan_key_to_vera,
)

from .conftest import TINY_WAN_CONFIG


def _inputs(seed: int = 0, channels: int = 4, frames: int = 3, size: int = 8):
    generator = torch.Generator().manual_seed(seed)
    latents = [torch.randn(1, channels, frames, size, size, generator=generator) for _ in range(5)]
    text = torch.randn(1, 7, TINY_WAN_CONFIG["text_dim"], generator=generator)
    timestep = torch.tensor([637.0])
    return latents, text, timestep


def _randomise(model: torch.nn.Module, seed: int = 1, scale: float = 0.2) -> torch.nn.Module:
    # A trained model's Vera-only parameters are not zero; give every parameter a seeded random value.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


@pytest.mark.parametrize("branch", BRANCHES)
def test_each_branch_alone_reproduces_wan(tiny_wan, branch):
    vera = VeraTransformer3DModel.from_wan(tiny_wan).eval()
    (x, *_), text, timestep = _inputs()
    with torch.no_grad():
        expected = tiny_wan(x, timestep, text).sample
        got = vera.forward_branch(branch, x, timestep, text)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_branch_weights_load_back_into_wan(tiny_wan):
    vera = _randomise(VeraTransformer3DModel.from_wan(tiny_wan))
    wan = WanTransformer3DModel(**TINY_WAN_CONFIG)
    wan.load_state_dict(vera.branch_state_dict("alpha"), strict=True)
    for key, tensor in wan.state_dict().items():
        assert torch.equal(tensor, vera.state_dict()[wan_key_to_vera(key, "alpha")])


def test_wan_key_mapping():
    assert wan_key_to_vera("blocks.3.attn1.to_q.weight", "edit") == "blocks.3.edit.attn1.to_q.weight"
    assert wan_key_to_vera("patch_embedding.weight", "alpha") == "branches.alpha.patch_embedding.weight"
    with pytest.raises(ValueError, match="branch='mask'"):
        wan_key_to_vera("proj_out.weight", "mask")


def test_joint_attention_matches_explicit_softmax_reference(tiny_wan):
    vera = _randomise(VeraTransformer3DModel.from_wan(tiny_wan)).eval()
    block = vera.blocks[0]
    generator = torch.Generator().manual_seed(3)
    frames, height, width = 2, 3, 4
    seq_len = frames * height * width
    dim = vera.config.num_attention_heads * vera.config.attention_head_dim
    states = [torch.randn(2, seq_len, dim, generator=generator) for _ in BRANCHES]
    rotary = vera.rope(torch.zeros(1, 4, frames, height * 2, width * 2))
    with torch.no_grad():
        got = block.joint_self_attention(states, BRANCHES, rotary)

        # Reference: per-branch q/k/v, then one softmax over the concatenated keys, in float64.
        heads = vera.config.num_attention_heads
        qs, ks, vs = [], [], []
        for name, x in zip(BRANCHES, states, strict=True):
            attn = getattr(block, name).attn1
            q = attn.norm_q(attn.to_q(x)).unflatten(2, (heads, -1))
            k = attn.norm_k(attn.to_k(x)).unflatten(2, (heads, -1))
            qs.append(apply_rotary_emb(q, *rotary))
            ks.append(apply_rotary_emb(k, *rotary))
            vs.append(attn.to_v(x).unflatten(2, (heads, -1)))
        q, k, v = (torch.cat(t, dim=1).double().transpose(1, 2) for t in (qs, ks, vs))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        out = (weights @ v).transpose(1, 2).flatten(2, 3).float()
        for index, name in enumerate(BRANCHES):
            attn = getattr(block, name).attn1
            expected = attn.to_out[0](out[:, index * seq_len : (index + 1) * seq_len])
            torch.testing.assert_close(got[index], expected, atol=1e-5, rtol=0)


def test_branches_interact_through_joint_attention(tiny_wan):
    vera = _randomise(VeraTransformer3DModel.from_wan(tiny_wan)).eval()
    (edit, alpha, composite, source, _), text, timestep = _inputs()
    with torch.no_grad():
        first = vera(edit, alpha, composite, timestep, text, source_latents=source)
        second = vera(edit, alpha + 1.0, composite, timestep, text, source_latents=source)
    assert (first.edit - second.edit).abs().max() > 1e-3
    assert (first.composite - second.composite).abs().max() > 1e-3


def test_fresh_model_ignores_source_and_mask_exactly_and_learns_them(tiny_wan):
    vera = VeraTransformer3DModel.from_wan(tiny_wan)
    for name in VERA_ONLY_PARAMETERS:
        assert not vera.get_parameter(name).any(), name
    (edit, alpha, composite, source, mask), text, timestep = _inputs()
    with torch.no_grad():
        plain = vera(edit, alpha, composite, timestep, text, source_latents=torch.zeros_like(source))
        conditioned = vera(edit, alpha, composite, timestep, text, source_latents=source, mask_latents=mask)
    for layer in BRANCHES:
        assert torch.equal(getattr(plain, layer), getattr(conditioned, layer)), layer

    out = vera(edit, alpha, composite, timestep, text, source_latents=source, mask_latents=mask)
    (out.edit.square().mean() + out.alpha.square().mean() + out.composite.square().mean()).backward()
    for name in VERA_ONLY_PARAMETERS:
        grad = vera.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_no_mask_equals_dropped_mask(tiny_wan):
    vera = _randomise(VeraTransformer3DModel.from_wan(tiny_wan)).eval()
    (edit, alpha, composite, source, mask), text, timestep = _inputs()
    with torch.no_grad():
        without = vera(edit, alpha, composite, timestep, text, source_latents=source)
        dropped = vera(
            edit,
            alpha,
            composite,
            timestep,
            text,
            source_latents=source,
            mask_latents=mask,
            mask_keep=torch.zeros(1),
        )
        kept = vera(edit, alpha, composite, timestep, text, source_latents=source, mask_latents=mask)
    assert torch.equal(without.alpha, dropped.alpha)
    assert not torch.equal(without.alpha, kept.alpha)


def test_save_and_load_round_trip_is_bit_exact(tiny_wan, tmp_path):
    vera = _randomise(VeraTransformer3DModel.from_wan(tiny_wan)).eval()
    vera.save_pretrained(tmp_path / "vera")
    assert (tmp_path / "vera" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((tmp_path / "vera").glob("*.bin"))
    loaded = VeraTransformer3DModel.from_pretrained(tmp_path / "vera").eval()
    for key, value in vera.config.items():
        if not key.startswith("_"):
            assert loaded.config[key] == (list(value) if isinstance(value, tuple) else value), key
    saved, restored = vera.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    for key in saved:
        assert torch.equal(saved[key], restored[key]), key
    (edit, alpha, composite, source, mask), text, timestep = _inputs()
    with torch.no_grad():
        a = vera(edit, alpha, composite, timestep, text, source_latents=source, mask_latents=mask)
        b = loaded(edit, alpha, composite, timestep, text, source_latents=source, mask_latents=mask)
    # Weights are bit-identical (above); outputs may differ in the last bits only because BLAS kernels pick
    # paths by memory alignment, which loading from a memory-mapped file changes.
    for layer in BRANCHES:
        torch.testing.assert_close(getattr(a, layer), getattr(b, layer), atol=1e-5, rtol=0)


def test_from_wan_accepts_a_folder_and_rejects_image_to_video(tiny_wan, tmp_path):
    tiny_wan.save_pretrained(tmp_path / "wan")
    vera = VeraTransformer3DModel.from_wan(tmp_path / "wan")
    assert torch.equal(vera.branch_state_dict("composite")["proj_out.weight"], tiny_wan.proj_out.weight)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        VeraTransformer3DModel.from_wan(tmp_path / "missing")
    i2v = WanTransformer3DModel(**{**TINY_WAN_CONFIG, "image_dim": 8, "added_kv_proj_dim": 24})
    with pytest.raises(ValueError, match="image-to-video"):
        VeraTransformer3DModel.from_wan(i2v)


def test_bad_latent_shapes_are_named(tiny_wan):
    vera = VeraTransformer3DModel.from_wan(tiny_wan)
    (edit, alpha, composite, source, _), text, timestep = _inputs()
    with pytest.raises(ValueError, match="alpha_latents has shape"):
        vera(edit, alpha[:, :, :2], composite, timestep, text, source_latents=source)
    with pytest.raises(ValueError, match=r"source_latents has shape .* expected \(batch, 4"):
        vera(edit, alpha, composite, timestep, text, source_latents=source[:, :3])
    with pytest.raises(ValueError, match="multiples of the patch size"):
        vera(
            *(t[..., :7, :7] for t in (edit, alpha, composite)),
            timestep,
            text,
            source_latents=source[..., :7, :7],
        )


def test_attention_backend_is_dispatched_through_diffusers(tiny_wan):
    vera = _randomise(VeraTransformer3DModel.from_wan(tiny_wan)).eval()
    (edit, alpha, composite, source, _), text, timestep = _inputs()
    with torch.no_grad():
        native = vera(edit, alpha, composite, timestep, text, source_latents=source).edit
        vera.set_attention_backend("_native_math")
        assert vera.blocks[0].edit.attn1.processor._attention_backend.value == "_native_math"
        math_backend = vera(edit, alpha, composite, timestep, text, source_latents=source).edit
    torch.testing.assert_close(native, math_backend, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_wan):
    vera = _randomise(VeraTransformer3DModel.from_wan(tiny_wan))
    (edit, alpha, composite, source, _), text, timestep = _inputs()

    def grads():
        vera.zero_grad()
        out = vera(edit, alpha, composite, timestep, text, source_latents=source)
        out.alpha.square().mean().backward()
        return [p.grad.clone() for p in vera.parameters() if p.grad is not None]

    plain = grads()
    vera.enable_gradient_checkpointing()
    checkpointed = grads()
    assert len(plain) == len(checkpointed)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_mask_keep_is_per_sample(tiny_wan):
    vera = _randomise(VeraTransformer3DModel.from_wan(tiny_wan)).eval()
    (edit, alpha, composite, source, mask), text, timestep = _inputs()

    def two(x):
        return torch.cat([x, x])

    with torch.no_grad():
        mixed = vera(
            two(edit),
            two(alpha),
            two(composite),
            timestep.repeat(2),
            two(text),
            source_latents=two(source),
            mask_latents=two(mask),
            mask_keep=torch.tensor([1.0, 0.0]),
        )
        kept = vera(edit, alpha, composite, timestep, text, source_latents=source, mask_latents=mask)
        without = vera(edit, alpha, composite, timestep, text, source_latents=source)
    torch.testing.assert_close(mixed.alpha[:1], kept.alpha, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed.alpha[1:], without.alpha, atol=1e-5, rtol=0)


def test_from_wan_in_bfloat16_keeps_fp32_modules_and_matches_wan(tiny_wan, tmp_path):
    tiny_wan.save_pretrained(tmp_path / "wan")
    wan = WanTransformer3DModel.from_pretrained(tmp_path / "wan", dtype=torch.bfloat16).eval()
    vera = VeraTransformer3DModel.from_wan(tmp_path / "wan", torch_dtype=torch.bfloat16).eval()
    assert vera.blocks[0].alpha.scale_shift_table.dtype == torch.float32
    assert vera.branches["edit"].condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert vera.blocks[0].edit.ffn.net[0].proj.weight.dtype == torch.bfloat16
    (x, *_), text, timestep = _inputs()
    with torch.no_grad():
        expected = wan(x.bfloat16(), timestep, text.bfloat16()).sample
        got = vera.forward_branch("composite", x.bfloat16(), timestep, text.bfloat16())
    assert torch.equal(got, expected)


def test_group_offloading_is_block_level(tiny_wan):
    vera = _randomise(VeraTransformer3DModel.from_wan(tiny_wan)).eval()
    (edit, alpha, composite, source, _), text, timestep = _inputs()
    with torch.no_grad():
        expected = vera(edit, alpha, composite, timestep, text, source_latents=source).edit
    with pytest.raises(ValueError, match="block_level"):
        vera.enable_group_offload(torch.device("cpu"), offload_type="leaf_level")
    vera.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    with torch.no_grad():
        got = vera(edit, alpha, composite, timestep, text, source_latents=source).edit
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_masked_text_padding_is_invisible_and_wan_style_padding_is_not(tiny_wan):
    wan_style = _randomise(VeraTransformer3DModel.from_wan(tiny_wan)).eval()
    masked = copy.deepcopy(wan_style)
    masked.register_to_config(mask_text_padding=True)  # what train --fresh-text-encoder does
    (e, a, c, s, m), text, timestep = _inputs()
    # The pipeline's padding: zero states past the prompt. More of it must not matter when it is masked.
    short = torch.cat([text, torch.zeros(1, 3, text.shape[2])], dim=1)
    long = torch.cat([text, torch.zeros(1, 20, text.shape[2])], dim=1)

    def run(model, states):
        with torch.no_grad():
            return torch.cat(model(e, a, c, timestep, states, s, m, return_dict=False))

    torch.testing.assert_close(run(masked, short), run(masked, long), rtol=0, atol=1e-5)
    assert (run(wan_style, short) - run(wan_style, long)).abs().max() > 1e-3
    # What the prompt says still matters, and a prompt with no padding is attended as Wan attends it.
    assert (run(masked, short) - run(masked, short * 0.5)).abs().max() > 1e-3
    torch.testing.assert_close(run(masked, text), run(wan_style, text), rtol=0, atol=1e-5)
    # Each sample of a batch is masked by its own prompt's length.
    batch = torch.cat([short, torch.cat([text[:, :4], torch.zeros(1, 6, text.shape[2])], dim=1)])
    mask = masked.text_padding_mask(batch)
    assert mask.shape == (2, 1, 1, 10) and mask[0, 0, 0].tolist() == [True] * 7 + [False] * 3
    assert mask[1, 0, 0].tolist() == [True] * 4 + [False] * 6
    assert wan_style.text_padding_mask(batch) is None
    # A text that is all padding (nothing to mask it against) is attended whole rather than not at all.
    assert masked.text_padding_mask(torch.zeros(1, 5, text.shape[2])).all()


def _forward(model: VeraTransformer3DModel, latents: list[torch.Tensor], text, timestep) -> tuple:
    with torch.no_grad():
        return model(*latents[:3], timestep, text, latents[3], latents[4], return_dict=False)


def test_frame_position_embedding_starts_at_zero_and_is_read_by_every_branch(tiny_wan):
    from vera_engine.training.train import with_frame_position_embedding

    base = _randomise(VeraTransformer3DModel.from_wan(tiny_wan)).eval()
    assert not base.config.frame_position_embedding
    with_positions = with_frame_position_embedding(base).eval()
    assert with_positions.config.frame_position_embedding
    latents, text, timestep = _inputs()
    # Added at zero: the model computes exactly what it did.
    for got, expected in zip(
        _forward(with_positions, latents, text, timestep),
        _forward(base, latents, text, timestep),
        strict=False,
    ):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # Once trained (here: random), every branch reads it, in the joint model and run alone.
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in BRANCHES:
            for param in with_positions.branches[name].frame_position_embedding.parameters():
                param.copy_(torch.randn(param.shape, generator=generator))
    moved = _forward(with_positions, latents, text, timestep)
    for got, expected in zip(moved, _forward(base, latents, text, timestep), strict=False):
        assert (got - expected).abs().max() > 1e-2
    with torch.no_grad():
        alone = with_positions.forward_branch("alpha", latents[1], timestep, text)
        assert (alone - base.forward_branch("alpha", latents[1], timestep, text)).abs().max() > 1e-2
    # Saved and loaded like any other config switch.
    assert "branches.edit.frame_position_embedding.weight" in with_positions.state_dict()


def test_frame_position_features_are_fractions_of_the_clip():
    from vera_engine.models.transformer_vera import FRAME_POSITION_FREQUENCIES, frame_position_features

    coarse = frame_position_features((1, 3, 3), torch.device("cpu"))
    fine = frame_position_features((1, 9, 9), torch.device("cpu"))
    assert coarse.shape == (9, 6 * len(FRAME_POSITION_FREQUENCIES))
    # The centre token of a 3x3 grid and of a 9x9 grid is the same place: the same features.
    torch.testing.assert_close(coarse[4], fine[4 * 9 + 4])
    # Every token of a grid has its own features.
    assert torch.cdist(fine, fine).add(torch.eye(81) * 10).min() > 1e-3
