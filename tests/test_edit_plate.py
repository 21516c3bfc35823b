"""Plates in, layers out: edit_plate with the tiny random pipeline and with a scripted stand-in whose output is
known, then the layered EXR sequence and previews."""

from __future__ import annotations

import numpy as np
import OpenEXR
import pytest

from vera_engine.imaging.colour import ColourConverter
from vera_engine.imaging.exr import Window
from vera_engine.imaging.plate_layers import LayeredResult, write_result_previews, write_result_sequence
from vera_engine.pipelines.edit_plate import edit_plate


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


# ---------------------------------------------------------------------------------------------------------------
# The post-model stage as tensor work (issue 26): the same layers as the numpy path it replaced.


class SoftPipeline:
    """A scripted stand-in whose matte is soft everywhere it is not 0 (a wide radial ramp, a flat 0.4 shadow and
    an opaque core) and whose edit colour varies, so every branch of the layer solve runs."""

    native_size = (32, 32)

    def __call__(self, video, *, prompt, mask=None, **kwargs):
        frames, height, width, _ = video.shape
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        radius = np.hypot((yy - height / 2) / height, (xx - width / 3) / width)
        alpha = np.clip(1.6 - 4.0 * radius, 0.0, 1.0)
        alpha[(yy > height * 0.7) & (xx > width * 0.6)] = 0.4
        alpha = np.broadcast_to(alpha, (frames, height, width)).astype(np.float32)
        edit = np.stack([xx / width, yy / height, 0.5 + 0.4 * np.sin(xx / 3)], -1).astype(np.float32)
        edit = np.broadcast_to(edit, video.shape).astype(np.float32)

        class Out:
            pass

        out = Out()
        out.edit, out.alpha = edit, alpha
        out.composite = video * (1 - alpha[..., None]) + edit * alpha[..., None]
        return out


def _reference_finish_frame(model, index, frame, colour, *, matte_filter="guided", recover=False):
    """The numpy path this stage ran before issue 26, step for step (guided_matte, resample_at,
    layers_like_model on the matte's pixels, 256-row bands): the reference the tensor path is held to."""
    from vera_engine.imaging.composite import layers_like_model, snap_matte
    from vera_engine.imaging.resize import guided_coefficients, guided_matte, resample, resample_at

    mapping = model.mapping
    size = mapping.source_size
    top, left = mapping.offset
    crop = (slice(top, top + mapping.scaled_size[0]), slice(left, left + mapping.scaled_size[1]))
    rgb = frame[..., :3]

    def model_rgb_at(ys, xs):
        return colour.to_model(np.nan_to_num(rgb[ys, xs], nan=0.0, posinf=0.0, neginf=0.0))

    low_alpha, low_edit = model.alpha[index][crop], model.edit[index][crop]
    coefficients = (
        guided_coefficients(model.guides[index], low_alpha, 2, 1e-3) if matte_filter == "guided" else None
    )
    delta_low = None
    if recover:
        from vera_engine.imaging.composite import recover_preserved

        preserved_low = recover_preserved(
            model.composite[index : index + 1],
            model.raw_edit[index : index + 1],
            model.alpha[index : index + 1],
            model.video[index : index + 1],
        )[0]
        delta_low = (colour.from_model(preserved_low) - colour.from_model(model.video[index]))[crop]
    height, width = size
    composite = np.empty((height, width, 4), np.float32)
    composite[..., : frame.shape[-1]] = frame
    if frame.shape[-1] == 3:
        composite[..., 3] = 1.0
    edit = np.zeros((height, width, 4), np.float32)
    matte = np.zeros((height, width), np.float32)
    for start in range(0, height, 256):
        rows = slice(start, min(height, start + 256))
        if coefficients is not None:
            alpha = guided_matte(
                low_alpha, model.guides[index], size, model_rgb_at, rows=rows, coefficients=coefficients
            )
        else:
            alpha = np.clip(resample(low_alpha, size, "triangle", rows=rows), 0.0, 1.0)
        alpha = snap_matte(alpha, 1.0 / 512.0)
        ys, xs = np.nonzero(alpha > 0)
        if not len(ys):
            continue
        alpha = alpha[ys, xs]
        ys += start
        edit_model = np.clip(resample_at(low_edit, size, ys, xs, "lanczos3"), 0.0, 1.0)
        under = None if delta_low is None else rgb[ys, xs] + resample_at(delta_low, size, ys, xs, "lanczos3")
        edit[ys, xs], matte[ys, xs], composite[ys, xs] = layers_like_model(
            frame[ys, xs], None, edit_model, alpha, colour, under=under
        )
    return composite, edit, matte


def _half_steps(a, b):
    """How many half floats apart ``a`` and ``b`` are once stored as half (same sign assumed)."""
    ha, hb = (np.asarray(x, np.float32).astype(np.float16).view(np.int16).astype(np.int32) for x in (a, b))
    return np.abs(ha - hb)


def _hard_plate(height, width, channels, seed):
    """Scene-linear values above 1 and below 0, and non-finite pixels both where the matte will be and not."""
    plate = _plate(frames=1, height=height, width=width, channels=channels, seed=seed)
    plate[0, 3, 3, :3] = [np.nan, np.inf, -np.inf]  # the matte's corner: 0 there
    plate[0, height // 2, width // 3, :3] = [np.nan, 2.0, np.inf]  # under the opaque core
    plate[0, 5:9, 5:9, 0] = 70000.0  # beyond half's range
    return plate


@pytest.mark.parametrize(
    ("channels", "matte_filter", "recover", "hard"),
    [
        (4, "guided", False, True),
        (4, "guided", False, False),
        (3, "guided", False, True),
        (4, "bilinear", False, True),
        (4, "guided", True, True),
    ],
)
def test_tensor_layers_equal_the_numpy_path_to_half_rounding(conv, channels, matte_filter, recover, hard):
    from vera_engine.imaging.plate_layers import finish_frame
    from vera_engine.pipelines.edit_plate import sample_plate

    plate = (
        _hard_plate(300, 520, channels, seed=7)
        if hard
        else _plate(frames=1, height=300, width=520, channels=channels, seed=7)
    )
    model = sample_plate(SoftPipeline(), plate, prompt="p", colour=conv, steps=1)
    composite, edit, matte = _reference_finish_frame(
        model, 0, plate[0], conv, matte_filter=matte_filter, recover=recover
    )
    layers = finish_frame(model, 0, plate[0], conv, matte_filter=matte_filter, recover=recover)
    assert (matte > 0).mean() > 0.3 and ((matte > 0) & (matte < 1)).mean() > 0.2  # mostly soft, big
    # The snap at 1/512 decides the same pixels; where the matte is 0 the plate's bits come back.
    np.testing.assert_array_equal(layers.matte == 0, matte == 0)
    untouched = layers.matte == 0
    np.testing.assert_array_equal(
        layers.composite[..., :channels][untouched].view(np.uint32), plate[0][untouched].view(np.uint32)
    )
    np.testing.assert_array_equal(layers.edit[untouched], 0.0)
    # Elsewhere, stored as half: the matte and composite at most one half step apart, or within 2e-6 (values
    # near 0, where half steps are finer than float32's rounding of the unit-scale values they come from).
    with np.errstate(invalid="ignore", over="ignore"):
        for new, old in ((layers.composite, composite), (layers.matte, matte)):
            finite = np.isfinite(old)
            np.testing.assert_array_equal(np.isfinite(new), finite)
            close = (_half_steps(new, old) <= 1) | (np.abs(new - old) <= 2e-6)
            assert close[finite].all(), np.abs(new - old)[finite & ~close].max()
        # The premultiplied edit is T - (1 - matte) * plate: a matte within its half step moves it by that much
        # times the plate's value (2.7 over a dark raised matte here), plus float32 rounding.
        under = np.nan_to_num(np.abs(plate[0][..., :3]), nan=0.0, posinf=0.0)
        allowed = np.abs(layers.matte - matte)[..., None] * under + 2e-6
        change = np.abs(layers.edit[..., :3] - edit[..., :3])
        close = (_half_steps(layers.edit[..., :3], edit[..., :3]) <= 1) | (change <= allowed)
        assert close.all(), (change - allowed)[~close].max()
        np.testing.assert_array_equal(layers.edit[..., 3], layers.matte)


def test_packed_layers_are_written_as_the_layered_exr_writer_would(conv, tmp_path):
    from vera_engine.imaging.exr import read_layers, write_layered_exr
    from vera_engine.imaging.plate_layers import ResultWriter, finish_frame
    from vera_engine.pipelines.edit_plate import sample_plate

    plate = _hard_plate(64, 96, 4, seed=8)
    model = sample_plate(SoftPipeline(), plate, prompt="p", colour=conv, steps=1)
    layers = finish_frame(model, 0, plate[0], conv)
    assert layers.channels is not None and layers.channels.shape == (64, 96, 9)
    ResultWriter(tmp_path, [7])(0, layers)
    write_layered_exr(tmp_path / "ref.exr", layers.composite, layers.edit, layers.matte)
    packed, reference = read_layers(tmp_path / "vera_edit.0007.exr"), read_layers(tmp_path / "ref.exr")
    for name in ("composite", "edit", "matte"):
        np.testing.assert_array_equal(packed[name].view(np.uint32), reference[name].view(np.uint32))
    assert packed["composite"][5, 5, 0] == 65504.0 and np.isnan(packed["composite"][3, 3, 0])


def test_frames_are_read_while_the_previous_frame_is_written(conv):
    """The stage is a pipeline: frame 1 is read while frame 0's sink (the EXR writer) still runs."""
    import threading

    from vera_engine.imaging.plate_layers import finish_frames
    from vera_engine.pipelines.edit_plate import sample_plate

    plate = _plate(frames=3, height=40, width=48, channels=4, seed=5)
    model = sample_plate(SoftPipeline(), plate, prompt="p", colour=conv, steps=1)
    read = [threading.Event() for _ in range(3)]

    class Frames:
        def __len__(self):
            return 3

        def __getitem__(self, index):
            read[index].set()
            return plate[index]

    overlapped = []

    def sink(index, layers):
        if index == 0:
            overlapped.append(read[1].wait(10))

    finish_frames(model, Frames(), conv, sink, workers=1)
    assert overlapped == [True]


def test_a_failing_sink_stops_the_stage_and_its_error_is_raised(conv):
    from vera_engine.imaging.plate_layers import finish_frames
    from vera_engine.pipelines.edit_plate import sample_plate

    plate = _plate(frames=8, height=24, width=32, channels=4, seed=6)
    model = sample_plate(SoftPipeline(), plate, prompt="p", colour=conv, steps=1)
    sunk = []

    def sink(index, layers):
        sunk.append(index)
        if index == 1:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        finish_frames(model, plate, conv, sink, workers=1)
    assert sunk[:2] == [0, 1] and len(sunk) < 8


def test_an_engine_job_samples_without_the_composite_decode(tiny_pipe, conv):
    # Issue 27 item 4: the layers a job writes come from edit and alpha; the composite decode was never read.
    from vera_engine.imaging.plate_layers import finish_frame
    from vera_engine.pipelines.edit_plate import sample_plate

    plate = np.random.default_rng(0).uniform(0.05, 0.6, (2, 24, 20, 3)).astype(np.float32)
    decoded: list[int] = []
    decode = tiny_pipe.decode_latents

    def counting(latents):
        decoded.append(latents.shape[0])
        return decode(latents)

    tiny_pipe.decode_latents = counting
    try:
        full = sample_plate(tiny_pipe, plate, prompt="add a ball", colour=conv, steps=2, guidance=1.0)
        calls_full, decoded[:] = list(decoded), []
        lean = sample_plate(
            tiny_pipe,
            plate,
            prompt="add a ball",
            colour=conv,
            steps=2,
            guidance=1.0,
            layers=("edit", "alpha"),
        )
    finally:
        del tiny_pipe.decode_latents
    assert lean.composite is None and full.composite is not None
    np.testing.assert_array_equal(lean.alpha, full.alpha)
    np.testing.assert_allclose(
        lean.edit, full.edit, atol=1e-5
    )  # a batch of 2 decoded as the full call's first two
    assert sum(decoded) < sum(calls_full)
    with pytest.raises(ValueError, match="recover needs the model's composite"):
        finish_frame(lean, 0, plate[0], conv, recover=True)
