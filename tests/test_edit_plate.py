"""Plates in, layers out: edit_plate with the tiny random pipeline and with a scripted stand-in whose output is
known, then the layered EXR sequence and previews."""

from __future__ import annotations

import numpy as np
import OpenEXR
import pytest

from vera_engine.imaging.colour import ColourConverter
from vera_engine.imaging.edit_plate import (
    LayeredResult,
    edit_plate,
    write_result_previews,
    write_result_sequence,
)
from vera_engine.imaging.exr import Window


@pytest.fixture(scope="module")
def conv():
    return ColourConverter("ACEScg")


@pytest.fixture(scope="module")
def tiny_pipe():
    from vera_engine.pipelines.presets import build_random_pipeline

    return build_random_pipeline("tiny", seed=0)


def _plate(frames=2, height=45, width=80, channels=4, seed=0):
    rng = np.random.default_rng(seed)
    plate = rng.uniform(-0.1, 3.0, (frames, height, width, channels)).astype(np.float32)
    if channels == 4:
        plate[..., 3] = rng.uniform(0.5, 1.0, (frames, height, width))
    return plate


class DiscPipeline:
    """A scripted stand-in with the VeraPipeline call signature: it returns a known edit (a flat colour
    everywhere, garbage outside the disc) and a sharp disc matte, and records what it was given."""

    native_size = (32, 32)

    def __init__(self, colour_model=(0.8, 0.3, 0.1)):
        self.colour_model = np.array(colour_model, np.float32)
        self.calls: list[dict] = []

    def __call__(self, video, *, prompt, mask=None, **kwargs):
        self.calls.append({"video": video, "mask": mask, "prompt": prompt, **kwargs})
        frames, height, width, _ = video.shape
        yy, xx = np.mgrid[0:height, 0:width]
        disc = ((yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (min(height, width) / 4) ** 2).astype(
            np.float32
        )
        alpha = np.broadcast_to(disc, (frames, height, width)).copy()
        edit = np.where(alpha[..., None] > 0, self.colour_model, 1.0 - self.colour_model).astype(np.float32)

        class Out:
            pass

        out = Out()
        out.edit, out.alpha, out.composite = (
            edit,
            alpha,
            video * (1 - alpha[..., None]) + edit * alpha[..., None],
        )
        return out


def test_edit_plate_with_the_tiny_pipeline(tiny_pipe, conv):
    plate = _plate()
    steps_seen = []

    def callback(pipe, step, timestep, kwargs):
        steps_seen.append(step)
        assert pipe.decode_preview(kwargs["composite_x0"]).ndim == 4
        return {}

    result = edit_plate(
        tiny_pipe,
        plate,
        prompt="add a red ball",
        colour=conv,
        steps=2,
        guidance=3.0,
        seed=5,
        callback=callback,
        matte_threshold=0.2,  # random weights give a noisy matte; a wide snap leaves plenty of empty pixels
    )
    assert steps_seen == [0, 1]
    assert result.composite.shape == (2, 45, 80, 4) and result.edit.shape == (2, 45, 80, 4)
    assert result.matte.shape == (2, 45, 80) and result.matte.dtype == np.float32
    assert result.matte.min() >= 0.0 and result.matte.max() <= 1.0
    np.testing.assert_array_equal(result.edit[..., 3], result.matte)
    untouched = result.matte == 0
    assert untouched.any()  # the random matte has empty pixels; they keep the plate's bits
    np.testing.assert_array_equal(
        result.composite[untouched].view(np.uint32), plate[untouched].view(np.uint32)
    )
    np.testing.assert_array_equal(result.edit[untouched], 0.0)
    touched = ~untouched
    a = result.matte[..., None]
    expected = plate[..., :3] * (1 - a) + result.edit[..., :3]
    np.testing.assert_allclose(result.composite[..., :3][touched], expected[touched], rtol=1e-5, atol=1e-6)
    assert result.metadata["prompt"] == "add a red ball" and result.metadata["seed"] == 5
    assert result.metadata["working_colorspace"] == "ACEScg"
    assert result.model_composite.shape[1:3] == result.mapping.canvas_size
    # Same seed, same layers.
    again = edit_plate(
        tiny_pipe,
        plate,
        prompt="add a red ball",
        colour=conv,
        steps=2,
        guidance=3.0,
        seed=5,
        matte_threshold=0.2,
    )
    np.testing.assert_array_equal(again.composite, result.composite)


def test_edit_plate_maps_a_known_matte_and_colour_back(conv):
    pipe = DiscPipeline()
    plate = _plate(frames=1, height=96, width=160, channels=3, seed=1)
    mask = np.zeros(plate.shape[:3], np.float32)
    mask[:, 20:60, 40:120] = 1.0
    result = edit_plate(pipe, plate, prompt="p", colour=conv, mask=mask, steps=3, guidance=2.0, seed=1)
    call = pipe.calls[0]
    # The model saw model space, fitted: 96x160 -> 19x32, canvas 32x32 (aspect kept, padded to 16).
    assert call["video"].shape == (1, 32, 32, 3) and call["video"].min() >= 0 and call["video"].max() <= 1
    assert call["mask"].shape == (1, 32, 32) and call["mask"].max() == 1.0
    assert call["num_inference_steps"] == 3 and call["guidance_scale"] == 2.0
    assert result.mapping.scaled_size == (19, 32) and result.mapping.offset == (6, 0)
    # The disc (radius 8 model px, centred on the canvas) lands centred on the plate at 5x: radius ~40 px.
    matte = result.matte[0]
    assert matte[48, 80] == 1.0 and matte[48, 80 + 30] == 1.0 and matte[48, 80 + 50] == 0.0
    assert matte[5, 5] == 0.0
    # The edit colour comes back in the working space: model (0.8, 0.3, 0.1) -> ACEScg, premultiplied.
    working = conv.from_model(pipe.colour_model[None])[0]
    np.testing.assert_allclose(result.edit[0, 48, 80, :3], working, atol=1e-4)
    # The garbage colour outside the disc never bleeds into the edges: at the soft edge the layers composite to
    # the model's own mix of the disc colour and the plate (layers_like_model), never to the garbage colour.
    edge = (matte > 0) & (matte < 1)
    assert edge.any() and (result.edit[0][..., :3] >= 0).all()
    plate_model = conv.to_model(plate[0])
    alpha_low = result.matte[0]  # at least the model's alpha: raised only where a linear over needs it
    garbage = conv.from_model((1.0 - pipe.colour_model)[None])[0]
    assert not np.isclose(result.composite[0][edge][:, :3], garbage, atol=1e-3).all(axis=-1).any()
    assert plate_model.shape == result.composite[0][..., :3].shape and alpha_low.shape == matte.shape
    untouched = matte == 0
    np.testing.assert_array_equal(result.composite[0][untouched][:, :3], plate[0][untouched])


def test_bilinear_matte_and_recovery_options(conv):
    pipe = DiscPipeline()
    plate = _plate(frames=1, height=64, width=64, channels=4, seed=2)
    guided = edit_plate(pipe, plate, prompt="p", colour=conv, steps=1)
    plain = edit_plate(pipe, plate, prompt="p", colour=conv, steps=1, matte_filter="bilinear")
    assert not np.array_equal(guided.matte, plain.matte)
    recovered = edit_plate(pipe, plate, prompt="p", colour=conv, steps=1, recover=True)
    # The stand-in's composite is exactly Eq. 2 over the source, so Eq. 3 recovers the source: the composite
    # changes at most by resampling error, and never where the matte is 0.
    untouched = recovered.matte == 0
    np.testing.assert_array_equal(recovered.composite[untouched], plate[untouched])
    np.testing.assert_allclose(recovered.composite, guided.composite, atol=0.05)
    assert recovered.metadata["recover"] is True


def test_non_finite_plate_pixels_reach_the_composite_untouched_but_never_the_model(conv):
    pipe = DiscPipeline()
    plate = _plate(frames=1, height=32, width=32, channels=4, seed=4)
    plate[0, 1, 1, :3] = [np.nan, np.inf, -np.inf]
    plate[0, 2, 2, 0] = 1e30
    result = edit_plate(pipe, plate, prompt="p", colour=conv, steps=1)
    assert np.isfinite(pipe.calls[0]["video"]).all()
    assert result.matte[0, 1, 1] == 0 and result.matte[0, 2, 2] == 0
    np.testing.assert_array_equal(
        result.composite[0, :3, :3].view(np.uint32), plate[0, :3, :3].view(np.uint32)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"plate": np.zeros((2, 8, 8), np.float32)},
            r"plate frame 0 has shape \(8, 8\); expected \(H, W, 3 or 4\)",
        ),
        ({"plate": np.zeros((1, 8, 8, 3), np.float64)}, "expected float32"),
        ({"mask": np.zeros((1, 9, 8), np.float32)}, r"mask frame 0 has shape \(9, 8\)"),
        ({"mask": np.full((1, 8, 8), 2.0, np.float32)}, r"finite values in \[0, 1\]"),
        ({"matte_filter": "nearest"}, "matte_filter='nearest'"),
    ],
)
def test_edit_plate_input_errors(conv, kwargs, message):
    args = {"plate": np.zeros((1, 8, 8, 3), np.float32), **kwargs}
    with pytest.raises(ValueError, match=message):
        edit_plate(DiscPipeline(), prompt="p", colour=conv, **args)


def test_write_result_sequence_and_previews(conv, tmp_path):
    plate = _plate(frames=2, height=40, width=48, channels=4, seed=3)
    result = edit_plate(DiscPipeline(), plate, prompt="add a sun", colour=conv, steps=1, seed=9)
    assert isinstance(result, LayeredResult)
    paths = write_result_sequence(
        result,
        tmp_path / "out",
        [1001, 1002],
        metadata={"job_id": "j-1", "model": "tiny"},
        chromaticities=conv.chromaticities(),
        data_window=Window(0, 0, 48, 40),
        display_window=Window(0, 0, 48, 40),
    )
    assert [p.name for p in paths] == ["vera_edit.1001.exr", "vera_edit.1002.exr"]
    with OpenEXR.File(str(paths[1]), separate_channels=True) as f:
        header = dict(f.header())
        channels = {k: v.pixels.copy() for k, v in f.channels().items()}
    assert header["vera/prompt"] == "add a sun" and header["vera/job_id"] == "j-1"
    assert header["vera/working_colorspace"] == "ACEScg" and header["vera/seed"] == 9
    assert header["compression"] == OpenEXR.ZIP_COMPRESSION
    np.testing.assert_allclose(header["chromaticities"][:2], (0.713, 0.293), rtol=1e-6)
    np.testing.assert_array_equal(channels["matte.A"], result.matte[1].astype(np.float16))
    np.testing.assert_array_equal(channels["edit.R"], result.edit[1, ..., 0].astype(np.float16))
    np.testing.assert_array_equal(channels["R"], result.composite[1, ..., 0].astype(np.float16))
    with pytest.raises(ValueError, match="3 frame numbers for 2 frames"):
        write_result_sequence(result, tmp_path / "out", [1, 2, 3])

    png, movie = write_result_previews(result, plate, tmp_path / "prev", colour=conv, panel_height=20)
    assert png.name == "vera_edit_contact.png" and png.stat().st_size > 0
    assert movie.name == "vera_edit_preview.mp4" and movie.stat().st_size > 0
