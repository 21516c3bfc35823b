"""VeraPipeline end to end on tiny configurations: codecs, schedulers, padding, determinism, guidance, interrupt."""

import numpy as np
import pytest
import torch

from vera_engine import VeraInterrupted, VeraPipeline, VeraTransformer3DModel
from vera_engine.pipelines.model_store import max_window_frames
from vera_engine.pipelines.pipeline_vera import make_scheduler
from vera_engine.pipelines.presets import build_random_pipeline

from .conftest import make_tiny_wan_pipeline_parts


def _video(frames=5, height=30, width=34, seed=0):
    return np.random.default_rng(seed).random((frames, height, width, 3), dtype=np.float32)


def _wan_vae_pipeline():
    parts = make_tiny_wan_pipeline_parts()
    parts["transformer"] = VeraTransformer3DModel.from_wan(parts["transformer"]).eval()
    pipe = VeraPipeline(**parts, native_height=32, native_width=32, native_frames=5, max_sequence_length=32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _count_forwards(pipe):
    batches = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["edit_latents"].shape[0]), with_kwargs=True
    )
    return batches, handle


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_random_pipeline("tiny", seed=0)


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_space_to_depth_pipeline_runs_and_trims(tiny_pipe, scheduler):
    tiny_pipe.use_scheduler(scheduler)
    video = _video(frames=5, height=30, width=34)
    mask = np.zeros((5, 30, 34), np.float32)
    mask[:, 10:20, 8:20] = 1
    out = tiny_pipe(
        video,
        "add a red ball",
        mask=mask,
        num_inference_steps=3,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.edit.shape == (5, 30, 34, 3) and out.composite.shape == (5, 30, 34, 3)
    assert out.alpha.shape == (5, 30, 34)
    for layer in (out.edit, out.alpha, out.composite):
        assert layer.dtype == np.float32 and layer.min() >= 0 and layer.max() <= 1
    assert (
        type(tiny_pipe.scheduler).__name__
        == {"unipc": "UniPCMultistepScheduler", "euler": "FlowMatchEulerDiscreteScheduler"}[scheduler]
    )
    tiny_pipe.use_scheduler("unipc")


def test_wan_vae_pipeline_pads_to_4k_plus_1_frames_and_trims():
    pipe = _wan_vae_pipeline()
    assert pipe.padded_shape(6, 20, 18) == (9, 32, 32)
    assert pipe.padded_shape(5, 32, 32) == (5, 32, 32)
    out = pipe(
        _video(frames=6, height=20, width=18),
        "add a ball",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.edit.shape == (6, 20, 18, 3) and out.alpha.shape == (6, 20, 18)
    assert out.composite.shape == (6, 20, 18, 3)


def test_space_to_depth_codec_is_lossless(tiny_pipe):
    video = torch.rand(1, 3, 5, 8, 12) * 2 - 1
    latents = tiny_pipe.encode_video(video)
    assert latents.shape == (1, 12, 5, 4, 6)
    assert torch.equal(tiny_pipe.decode_latents(latents), video)


def test_same_seed_same_result_other_seed_differs(tiny_pipe):
    video = _video()
    runs = [
        tiny_pipe(video, "add a ball", num_inference_steps=2, generator=torch.Generator().manual_seed(seed))
        for seed in (7, 7, 8)
    ]
    for layer in ("edit", "alpha", "composite"):
        assert np.array_equal(getattr(runs[0], layer), getattr(runs[1], layer))
    assert not np.array_equal(runs[0].edit, runs[2].edit)


def test_guidance_batches_both_passes_in_one_forward_and_guidance_1_runs_one(tiny_pipe):
    batches, handle = _count_forwards(tiny_pipe)
    try:
        tiny_pipe(_video(frames=4), "add a ball", num_inference_steps=3, guidance_scale=4.0)
        assert batches == [2, 2, 2]
        batches.clear()
        tiny_pipe(_video(frames=4), "add a ball", num_inference_steps=3, guidance_scale=1.0)
        assert batches == [1, 1, 1]
    finally:
        handle.remove()


def test_negative_prompt_changes_the_guided_result(tiny_pipe):
    def run(negative):
        return tiny_pipe(
            _video(),
            "add a ball",
            negative_prompt=negative,
            num_inference_steps=2,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(0),
        ).edit

    assert not np.array_equal(run(None), run("blurry, low quality"))


def test_interrupt_stops_within_one_step(tiny_pipe):
    batches, handle = _count_forwards(tiny_pipe)

    def stop_after_second(pipe, step, timestep, kwargs):
        if step == 1:
            pipe.interrupt = True
        return {}

    try:
        with pytest.raises(VeraInterrupted) as error:
            tiny_pipe(
                _video(frames=4), "add a ball", num_inference_steps=10, callback_on_step_end=stop_after_second
            )
    finally:
        handle.remove()
    assert len(batches) == 2 and error.value.step == 2 and error.value.total == 10
    assert tiny_pipe._trim is None, "an interrupted call leaves no per-call state behind"
    # The next call starts afresh.
    out = tiny_pipe(_video(frames=4), "add a ball", num_inference_steps=2)
    assert out.edit.shape == (4, 30, 34, 3)


def test_step_callback_gives_progress_and_a_decodable_preview(tiny_pipe):
    seen = []

    def callback(pipe, step, timestep, kwargs):
        preview = pipe.decode_preview(kwargs["composite_x0"])
        seen.append((step, float(timestep), preview.shape, kwargs["latents"].shape))
        return {}

    tiny_pipe(
        _video(frames=3, height=17, width=19),
        "add a ball",
        num_inference_steps=3,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "composite_x0"],
    )
    assert [s[0] for s in seen] == [0, 1, 2]
    assert seen[0][1] > seen[1][1] > seen[2][1]  # timesteps go from noise towards data
    assert all(s[2] == (3, 17, 19, 3) for s in seen)
    assert seen[0][3][1] == 3 * tiny_pipe.transformer.config.in_channels


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(video=np.zeros((4, 32, 32), np.float32)), r"video has shape \(4, 32, 32\)"),
        (dict(video=np.full((2, 32, 32, 3), 1.5, np.float32)), r"video has values in \[1.5, 1.5\]"),
        (dict(video=np.full((2, 32, 32, 3), np.nan, np.float32)), "video contains NaN"),
        (dict(video=np.zeros((2, 32, 32, 3), np.uint8)), "video has dtype"),
        (dict(video=np.zeros((2, 2, 32, 3), np.float32)), "at least 4x4"),
        (dict(prompt="  "), "prompt='  '"),
        (
            dict(mask=np.zeros((2, 16, 32), np.float32)),
            r"mask has shape \(2, 16, 32\); expected \(2, 32, 32\)",
        ),
        (dict(num_inference_steps=0), "num_inference_steps=0"),
        (dict(guidance_scale=0.5), "guidance_scale=0.5"),
        (dict(negative_prompt=3), "negative_prompt=3"),
        (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_inputs_are_named(tiny_pipe, kwargs, message):
    call = dict(video=np.zeros((2, 32, 32, 3), np.float32), prompt="add a ball", num_inference_steps=1)
    call.update(kwargs)
    with pytest.raises(ValueError, match=message):
        tiny_pipe(**call)


def test_pipeline_folder_round_trip(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "model")
    loaded = VeraPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.native_size == tiny_pipe.native_size and loaded.native_frames == tiny_pipe.native_frames
    assert not list((tmp_path / "model").rglob("*.bin"))
    a = tiny_pipe(_video(), "add a ball", num_inference_steps=2, generator=torch.Generator().manual_seed(3))
    b = loaded(_video(), "add a ball", num_inference_steps=2, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(a.edit, b.edit, atol=1e-5)
    np.testing.assert_allclose(a.alpha, b.alpha, atol=1e-5)


def test_from_pretrained_refuses_anything_but_a_local_pipeline_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="local folders only"):
        VeraPipeline.from_pretrained("someone/vera-1.3b")
    with pytest.raises(FileNotFoundError, match=r"no model_index\.json"):
        VeraPipeline.from_pretrained(tmp_path)


def test_unknown_scheduler_is_named():
    with pytest.raises(ValueError, match="scheduler='ddim'"):
        make_scheduler("ddim")


@pytest.fixture(scope="module")
def conditioned_pipe():
    """A tiny pipeline whose source/mask embeddings are not zero, as in a trained model."""
    pipe = build_random_pipeline("tiny", seed=4)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in ("source_embedding.weight", "mask_embedding.weight", "alpha_layer_embedding"):
            param = pipe.transformer.get_parameter(name)
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return pipe


def test_source_and_mask_reach_the_model(conditioned_pipe):
    def run(video, mask=None):
        return conditioned_pipe(
            video, "add a ball", mask=mask, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
        )

    base = run(_video(seed=1))
    other_source = run(_video(seed=2))
    mask = np.ones((5, 30, 34), np.float32)
    with_mask = run(_video(seed=1), mask)
    assert not np.allclose(base.composite, other_source.composite, atol=1e-4)
    assert not np.allclose(base.alpha, with_mask.alpha, atol=1e-4)


def test_guidance_with_the_prompt_as_negative_equals_no_guidance(conditioned_pipe):
    # u + g (c - u) with u == c is c: checks the combination, whatever g is.
    def run(negative, guidance):
        return conditioned_pipe(
            _video(),
            "add a ball",
            negative_prompt=negative,
            guidance_scale=guidance,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
        ).edit

    np.testing.assert_allclose(run("add a ball", 6.0), run(None, 1.0), atol=1e-5)


def test_preview_at_the_last_euler_step_is_the_output_composite(conditioned_pipe):
    conditioned_pipe.use_scheduler("euler")
    previews = []

    def keep(pipe, step, timestep, kwargs):
        previews.append(pipe.decode_preview(kwargs["composite_x0"]))
        return {}

    try:
        out = conditioned_pipe(
            _video(),
            "add a ball",
            num_inference_steps=3,
            callback_on_step_end=keep,
            callback_on_step_end_tensor_inputs=["composite_x0"],
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        conditioned_pipe.use_scheduler("unipc")
    # Euler's last step goes to sigma 0, so its x0 prediction is the final latents.
    np.testing.assert_allclose(previews[-1], out.composite, atol=1e-6)
    assert previews[0].min() >= 0 and previews[0].max() <= 1


def test_first_block_cache_runs_on_the_mot_blocks(conditioned_pipe):
    from diffusers.hooks import FirstBlockCacheConfig

    def run():
        return conditioned_pipe(
            _video(), "add a ball", num_inference_steps=4, generator=torch.Generator().manual_seed(0)
        ).edit

    plain = run()
    conditioned_pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    try:
        exact = run()
    finally:
        conditioned_pipe.transformer.disable_cache()
    np.testing.assert_allclose(exact, plain, atol=1e-5)  # threshold 0: nothing is ever reused
    conditioned_pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    try:
        reused = run()
    finally:
        conditioned_pipe.transformer.disable_cache()
    assert reused.shape == plain.shape and not np.array_equal(reused, plain)


# ------------------------------------------------------------------------------------------------------------------
# Clips longer than the model's window


def test_temporal_windows_cover_the_clip_and_their_weights_hand_over(tiny_pipe):
    # The space-to-depth codec keeps every frame: latent frames = video frames.
    assert [(a, b) for a, b, _ in tiny_pipe.temporal_windows(4, 4, 1)] == [(0, 4)]
    assert [(a, b) for a, b, _ in tiny_pipe.temporal_windows(9, 0, 0)] == [(0, 9)]
    windows = tiny_pipe.temporal_windows(10, 4, 1)
    assert windows[0][0] == 0 and windows[-1][1] == 10
    assert all(b - a == 4 for a, b, _ in windows)
    total = torch.zeros(10)
    for start, stop, weight in windows:
        assert (weight > 0).all()
        total[start:stop] += weight
        if start:  # every window after the first overlaps its predecessor by at least one frame
            assert start < max(b for a, b, _ in windows if a < start)
    torch.testing.assert_close(total, torch.ones(10))  # a partition of unity: no frame is weighted twice
    # Ramps: the first window's last frames hand over to the second gradually.
    first, last = windows[0][2], windows[-1][2]
    assert first[0] == 1 and first[-1] < 1 and last[0] < 1 and last[-1] == 1


def test_a_long_clip_is_denoised_as_blended_windows_of_the_model_s_length(tiny_pipe):
    video = _video(frames=10)
    lengths = []
    handle = tiny_pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["edit_latents"].shape[2]), with_kwargs=True
    )
    try:
        out = tiny_pipe(
            video, "add a ball", num_inference_steps=2, generator=torch.Generator().manual_seed(0)
        )
    finally:
        handle.remove()
    windows = len(tiny_pipe.temporal_windows(10, tiny_pipe.native_frames, tiny_pipe.native_frames // 4))
    assert windows >= 3 and lengths == [tiny_pipe.native_frames] * (2 * windows)
    assert out.edit.shape == (10, 30, 34, 3) and out.alpha.shape == (10, 30, 34)
    again = tiny_pipe(video, "add a ball", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(out.composite, again.composite)
    whole = tiny_pipe(
        video,
        "add a ball",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        window_frames=0,
    )
    assert not np.array_equal(out.composite, whole.composite)  # 0 = one pass over all frames, as asked


def test_every_step_blends_the_windows_velocities_with_their_weights(tiny_pipe, monkeypatch):
    # A stand-in transformer whose velocity at a frame is that frame's position inside its window: the windows then
    # disagree wherever they overlap, and the velocity the scheduler gets must be exactly their weighted blend.
    from vera_engine.models.transformer_vera import VeraTransformerOutput

    def position_in_window(self, edit_latents, alpha_latents, composite_latents, timestep, encoder_hidden_states,
                           source_latents, mask_latents=None, return_dict=True, **kwargs):  # fmt: skip
        position = torch.arange(edit_latents.shape[2], dtype=edit_latents.dtype).view(1, 1, -1, 1, 1)
        out = tuple(layer * 0 + position for layer in (edit_latents, alpha_latents, composite_latents))
        return out if not return_dict else VeraTransformerOutput(*out)

    monkeypatch.setattr(type(tiny_pipe.transformer), "forward", position_in_window)
    velocities = []
    step = tiny_pipe.scheduler.step
    monkeypatch.setattr(
        tiny_pipe.scheduler,
        "step",
        lambda output, *a, **k: velocities.append(output) or step(output, *a, **k),
    )
    tiny_pipe(_video(frames=11), "add a ball", num_inference_steps=2, window_frames=4, window_overlap=2)
    expected = torch.zeros(11)
    for start, stop, weight in tiny_pipe.temporal_windows(11, 4, 2):
        expected[start:stop] += weight * torch.arange(stop - start)
    assert len(velocities) == 2
    for velocity in velocities:
        torch.testing.assert_close(velocity[0, :, :, 0, 0], expected.expand(velocity.shape[1], -1))
    assert 0 < float(expected[3]) < 3  # an overlap frame really is a blend of two windows' answers


def test_window_weights_are_a_partition_of_unity_for_any_geometry(tiny_pipe):
    for latent_frames in range(1, 30):
        for size in range(1, 9):
            for overlap in range(size):
                windows = tiny_pipe.temporal_windows(latent_frames, size, overlap)
                total = torch.zeros(latent_frames)
                for start, stop, weight in windows:
                    assert 0 <= start < stop <= latent_frames and (weight > 0).all() and (weight <= 1).all()
                    total[start:stop] += weight
                torch.testing.assert_close(total, torch.ones(latent_frames))


def test_window_arguments_are_checked(tiny_pipe):
    with pytest.raises(ValueError, match="window_frames=-1"):
        tiny_pipe(_video(), "add a ball", num_inference_steps=1, window_frames=-1)
    with pytest.raises(ValueError, match=r"window_overlap=4; expected 0 <= overlap < window_frames \(4\)"):
        tiny_pipe(_video(), "add a ball", num_inference_steps=1, window_frames=4, window_overlap=4)


def test_windows_are_counted_in_latent_frames_with_the_wan_vae_and_interrupt_between_windows():
    pipe = _wan_vae_pipeline()  # native 5 frames = 2 latent frames (the Wan VAE keeps frame 0, then 1 per 4)
    lengths = []

    def record(module, args, kwargs):
        lengths.append(kwargs["edit_latents"].shape[2])
        if len(lengths) == 5:
            pipe.interrupt = True  # e.g. a cancel from another thread, in the middle of step 2's windows

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = pipe(_video(frames=17, height=32, width=32), "add a ball", num_inference_steps=1)
        windows = len(pipe.temporal_windows(5, 5, 1))  # 17 frames = 5 latent frames
        assert windows == 4 and lengths == [2] * windows and out.edit.shape[0] == 17
        lengths.clear()
        with pytest.raises(VeraInterrupted) as error:
            pipe(_video(frames=17, height=32, width=32), "add a ball", num_inference_steps=3)
    finally:
        handle.remove()
    assert len(lengths) == 5 and error.value.step == 1  # stopped before step 2's second window


def test_sizes_and_windows_beyond_the_rotary_table_are_refused_naming_the_limit(tiny_pipe, tmp_path):
    assert tiny_pipe.position_limits == (64, 256, 256)  # rope_max_seq_len 64 x patch (1, 2, 2) x codec 2
    # What the engine publishes from a saved folder's configs (no weights loaded) is the same reach.
    tiny_pipe.save_pretrained(tmp_path / "saved")
    assert max_window_frames(tmp_path / "saved") == 64
    with pytest.raises(ValueError, match=r"272x272 pixels .* reach at most 256x256 \(rope_max_seq_len 64"):
        tiny_pipe(np.zeros((1, 272, 272, 3), np.float32), "add a ball", num_inference_steps=1)
    long_clip = np.zeros((70, 32, 32, 3), np.float32)
    with pytest.raises(
        ValueError, match=r"in one pass, spans more frames .* \(64; .* use window_frames <= 64"
    ):
        tiny_pipe(long_clip, "add a ball", num_inference_steps=1, window_frames=0)
    with pytest.raises(ValueError, match="use window_frames <= 64"):
        tiny_pipe(
            np.zeros((130, 32, 32, 3), np.float32), "add a ball", num_inference_steps=1, window_frames=65
        )
    # Within the reach: windows of the checkpoint's length cover any length.
    out = tiny_pipe(long_clip, "add a ball", num_inference_steps=1, guidance_scale=1.0)
    assert out.alpha.shape == (70, 32, 32)


def test_a_preview_decodes_only_the_frame_it_shows(tiny_pipe, monkeypatch):
    decoded = []
    original = tiny_pipe.decode_latents

    def counting(latents):
        decoded.append(latents.shape[2])
        return original(latents)

    monkeypatch.setattr(tiny_pipe, "decode_latents", counting)
    previews = []

    def callback(pipe, step, timestep, kwargs):
        previews.append(
            (
                pipe.decode_preview(kwargs["composite_x0"], frame=2),
                pipe.decode_preview(kwargs["composite_x0"]),
            )
        )
        return {}

    tiny_pipe(
        _video(frames=5),
        "add a ball",
        num_inference_steps=1,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=("composite_x0",),
    )
    one, whole = previews[0]
    assert decoded[:2] == [1, 5]  # one latent frame for the one-frame preview, all five for the whole clip
    np.testing.assert_allclose(one[0], whole[2], atol=1e-6)
