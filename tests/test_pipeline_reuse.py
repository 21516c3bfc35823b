"""What a sampling call does once instead of per pass or per take: one batched text-encoder call and a cache of
text states, source/mask latents reused across takes, sigmas moved once, only the layers asked for decoded (edit
and alpha in one codec call). Outputs are checked equal to the unbatched, uncached path."""

import numpy as np
import pytest
import torch

from vera_engine import VeraPipeline, VeraTransformer3DModel
from vera_engine.pipelines import pipeline_vera
from vera_engine.pipelines.presets import build_random_pipeline

from .conftest import make_tiny_wan_pipeline_parts


def _video(frames=4, height=32, width=32, seed=0):
    return np.random.default_rng(seed).random((frames, height, width, 3), dtype=np.float32)


@pytest.fixture
def pipe():
    return build_random_pipeline("tiny", seed=0)


def _spy_encoder(pipe):
    batches = []
    handle = pipe.text_encoder.register_forward_pre_hook(
        lambda module, args: batches.append(args[0].shape[0])
    )
    return batches, handle


def test_prompt_and_negative_are_one_encoder_call_and_cached(pipe):
    batches, handle = _spy_encoder(pipe)
    kwargs = dict(num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(0))
    first = pipe(_video(), "add a red ball", negative_prompt="blurry", **kwargs)
    assert batches == [2]  # one call, batch [prompt, negative]
    kwargs["generator"] = torch.Generator().manual_seed(0)
    second = pipe(_video(), "add a red ball", negative_prompt="blurry", **kwargs)
    assert batches == [2]  # the second take encodes nothing
    np.testing.assert_array_equal(first.edit, second.edit)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    pipe(_video(), "add a blue ball", negative_prompt="blurry", **kwargs)
    assert batches == [2, 2]
    handle.remove()


def test_batched_text_states_equal_separate_encodes(pipe):
    cpu = torch.device("cpu")
    batched = pipe.text_states("add a red ball", "blurry", True, cpu, torch.float32)
    separate = torch.cat(
        [
            pipe.encode_prompt("add a red ball", cpu, torch.float32),
            pipe.encode_prompt("blurry", cpu, torch.float32),
        ]
    )
    assert torch.equal(batched, separate)
    assert pipe.text_states("add a red ball", None, False, cpu, torch.float32).shape[0] == 1


def test_text_cache_follows_the_encoder_weights(pipe):
    cpu = torch.device("cpu")
    before = pipe.text_states("add a red ball", None, False, cpu, torch.float32)
    with torch.no_grad():
        next(pipe.text_encoder.parameters()).add_(0.5)  # an optimiser step does this (in place)
    after = pipe.text_states("add a red ball", None, False, cpu, torch.float32)
    assert not torch.equal(before, after)
    assert torch.equal(after, pipe.encode_prompt("add a red ball", cpu, torch.float32))
    for index in range(pipeline_vera.TEXT_CACHE_SIZE + 3):
        pipe.text_states(f"prompt {index}", None, False, cpu, torch.float32)
    assert len(pipe._text_cache) == pipeline_vera.TEXT_CACHE_SIZE


def test_source_and_mask_are_encoded_once_across_takes(pipe, monkeypatch):
    encoded = []
    original = VeraPipeline.encode_video

    def counting(self, video):
        encoded.append(tuple(video.shape))
        return original(self, video)

    monkeypatch.setattr(VeraPipeline, "encode_video", counting)
    mask = np.zeros((4, 32, 32), np.float32)
    mask[:, 8:24, 8:24] = 1
    outs = []
    for seed in (0, 1):
        outs.append(
            pipe(
                _video(),
                "add a ball",
                mask=mask,
                num_inference_steps=1,
                guidance_scale=1.0,
                generator=torch.Generator().manual_seed(seed),
            )
        )
    assert len(encoded) == 2  # source and mask, once each for both takes
    assert not np.array_equal(outs[0].edit, outs[1].edit)  # the takes still differ (their noise)
    pipe(_video(seed=5), "add a ball", mask=mask, num_inference_steps=1, guidance_scale=1.0)
    assert len(encoded) == 3  # another plate is encoded; the same mask is not


def test_sigmas_are_moved_to_the_device_once_before_the_loop(pipe, monkeypatch):
    moved = []
    original = pipeline_vera.sigmas_on_device

    def spy(scheduler, device):
        moved.append((scheduler.step_index, device))
        original(scheduler, device)

    monkeypatch.setattr(pipeline_vera, "sigmas_on_device", spy)
    pipe(_video(), "add a ball", num_inference_steps=3, guidance_scale=1.0)
    assert moved == [(None, torch.device("cpu"))]
    # diffusers leaves them on the CPU after set_timesteps; the helper moves them where sampling runs.
    pipe.scheduler.set_timesteps(3)
    assert pipe.scheduler.sigmas.device.type == "cpu"
    original(pipe.scheduler, torch.device("meta"))
    assert pipe.scheduler.sigmas.device.type == "meta"


def test_only_the_layers_asked_for_are_decoded_edit_and_alpha_in_one_call(pipe, monkeypatch):
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0)
    full = pipe(_video(), "add a ball", generator=torch.Generator().manual_seed(0), **kwargs)
    decodes = []
    original = VeraPipeline.decode_latents

    def counting(self, latents):
        decodes.append(latents.shape[0])
        return original(self, latents)

    monkeypatch.setattr(VeraPipeline, "decode_latents", counting)
    part = pipe(
        _video(), "add a ball", generator=torch.Generator().manual_seed(0), layers=("edit", "alpha"), **kwargs
    )
    assert decodes == [2] and part.composite is None
    np.testing.assert_array_equal(part.edit, full.edit)
    np.testing.assert_array_equal(part.alpha, full.alpha)
    decodes.clear()
    pipe(_video(), "add a ball", generator=torch.Generator().manual_seed(0), **kwargs)
    assert decodes == [2, 1]  # edit + alpha batched, then the composite
    with pytest.raises(ValueError, match="layers=\\('matte',\\)"):
        pipe(_video(), "add a ball", layers=("matte",), **kwargs)


def test_wan_vae_decodes_a_batch_like_its_parts():
    parts = make_tiny_wan_pipeline_parts()
    parts["transformer"] = VeraTransformer3DModel.from_wan(parts["transformer"]).eval()
    pipe = VeraPipeline(**parts, native_height=32, native_width=32, native_frames=5, max_sequence_length=32)
    latents = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = pipe.decode_latents(latents)
        apart = torch.cat([pipe.decode_latents(latents[:1]), pipe.decode_latents(latents[1:])])
    # Batched convolutions round differently in the last bits (measured: 1.1e-6 of a [-1, 1] range on this CPU).
    torch.testing.assert_close(together, apart, rtol=0, atol=1e-5)
