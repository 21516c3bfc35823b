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


def _wan_pipe():
    parts = make_tiny_wan_pipeline_parts()
    parts["transformer"] = VeraTransformer3DModel.from_wan(parts["transformer"]).eval()
    pipe = VeraPipeline(**parts, native_height=32, native_width=32, native_frames=5, max_sequence_length=32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_one_frame_previews_of_the_wan_vae_are_a_linear_projection_without_a_decode(monkeypatch):
    pipe = _wan_pipe()
    decodes = []
    original = type(pipe.vae).decode
    monkeypatch.setattr(
        type(pipe.vae), "decode", lambda self, *a, **k: decodes.append(1) or original(self, *a, **k)
    )
    previews = {}

    def callback(p, step, timestep, kwargs):
        before = len(decodes)
        previews["linear"] = p.decode_preview(kwargs["composite_x0"], frame=3)
        assert len(decodes) == before  # no VAE decode for the preview
        previews["vae"] = p.decode_preview(kwargs["composite_x0"], frame=3, method="vae")
        return {}

    pipe(
        _video(frames=5, height=32, width=32),
        "add a ball",
        num_inference_steps=1,
        guidance_scale=1.0,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["composite_x0"],
        layers=("edit",),
    )
    assert previews["linear"].shape == previews["vae"].shape == (1, 32, 32, 3)
    assert previews["linear"].min() >= 0 and previews["linear"].max() <= 1
    with pytest.raises(ValueError, match="method='fast'"):
        pipe._trim = (5, 32, 32)
        pipe.decode_preview(torch.zeros(1, 16, 2, 4, 4), frame=0, method="fast")
    pipe._trim = None


def test_the_linear_projection_is_fitted_from_the_codec(pipe):
    # The space-to-depth codec stores each 2x2 block's pixels as channels: the exact linear read-out of a latent
    # pixel's colour is their mean, which the fit on the test card must find (for the Wan VAE it is approximate).
    weight, bias = pipe.preview_projection()
    assert weight.shape == (3, 12) and bias.shape == (3,)
    assert pipe.preview_projection()[0] is weight  # fitted once per codec and weights
    video = torch.rand(1, 3, 2, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1
    latents = pipe.encode_video(video)
    rgb = torch.einsum("oc,fchw->fohw", weight, latents[0].transpose(0, 1)) + bias.view(1, 3, 1, 1)
    block_means = torch.nn.functional.avg_pool2d(video[0].transpose(0, 1), 2)  # f, 3, 8, 8
    torch.testing.assert_close(rgb, block_means, atol=1e-4, rtol=0)
    with torch.no_grad():
        next(pipe.vae.parameters(), torch.zeros(1)).add_(0)  # the codec has no weights: nothing to invalidate
    assert pipe.preview_projection()[0] is weight
