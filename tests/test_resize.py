"""Fitting plates to the model's resolution and mapping results back (guided matte upsampling)."""

from __future__ import annotations

import numpy as np
import pytest

from vera_engine.imaging.resize import (
    FitMapping,
    box_filter,
    fit_frames,
    fit_mapping,
    guided_upsample,
    resize_frames,
    unfit_frames,
    upsample_bilinear,
)


@pytest.mark.parametrize(
    ("source", "target", "scaled", "canvas", "offset"),
    [
        ((1080, 2048), (480, 832), (439, 832), (448, 832), (4, 0)),  # 2K scope: aspect kept, pad to 16
        ((2160, 3840), (480, 832), (468, 832), (480, 832), (6, 0)),  # UHD
        ((1080, 1440), (480, 832), (480, 640), (480, 640), (0, 0)),  # 4:3 pillar
        ((1920, 1080), (480, 832), (480, 270), (480, 272), (0, 1)),  # portrait
        ((100, 160), (480, 832), (480, 768), (480, 768), (0, 0)),  # small plates grow to the model size
    ],
)
def test_fit_mapping_keeps_aspect_and_pads_to_16(source, target, scaled, canvas, offset):
    mapping = fit_mapping(source, target)
    assert (mapping.scaled_size, mapping.canvas_size, mapping.offset) == (scaled, canvas, offset)
    assert all(c % 16 == 0 for c in mapping.canvas_size)
    assert abs(scaled[1] / scaled[0] - source[1] / source[0]) < 0.01 * source[1] / source[0]
    assert mapping.to_dict()["source_size"] == list(source)


def test_fit_mapping_pad_to_target_and_errors():
    mapping = fit_mapping((1080, 2048), (480, 832), pad_to_target=True)
    assert mapping.canvas_size == (480, 832) and mapping.offset == (20, 0)
    with pytest.raises(ValueError, match="source_size"):
        fit_mapping((0, 10), (480, 832))
    with pytest.raises(ValueError, match="target_size"):
        fit_mapping((10, 10), (8, 832))


def test_fit_then_unfit_round_trips_smooth_content():
    height, width = 90, 160
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    plate = np.stack([np.sin(xx / 17.0), np.cos(yy / 13.0), (xx + yy) / 250.0], axis=-1)[None] * 3.0
    mapping = fit_mapping((height, width), (48, 80))
    fitted = fit_frames(plate, mapping)
    assert fitted.shape == (1, *mapping.canvas_size, 3)
    top = mapping.offset[0]
    # Edge padding repeats the border rows.
    np.testing.assert_array_equal(fitted[0, 0], fitted[0, top])
    back = unfit_frames(fitted, mapping)
    assert back.shape == plate.shape
    inner = (slice(None), slice(8, -8), slice(8, -8))
    assert np.abs(back[inner] - plate[inner]).max() < 0.05
    # Scene-linear range survives (no clamping): values below 0 and above 1 remain.
    assert back.min() < -2.5 and back.max() > 2.5


def test_fit_frames_handles_masks_and_checks_sizes():
    mapping = fit_mapping((40, 64), (32, 32))
    mask = np.zeros((2, 40, 64), np.float32)
    assert fit_frames(mask, mapping).shape == (2, *mapping.canvas_size)
    with pytest.raises(ValueError, match="mapping was made for"):
        fit_frames(np.zeros((1, 10, 10, 3), np.float32), mapping)
    with pytest.raises(ValueError, match="canvas is"):
        unfit_frames(np.zeros((1, 10, 10, 3), np.float32), mapping)
    with pytest.raises(ValueError, match=r"expected \(F, H, W\)"):
        resize_frames(np.zeros((4, 4), np.float32), (8, 8))


def test_box_filter_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(9, 11)).astype(np.float32)
    out = box_filter(x, 2)
    for i in range(9):
        for j in range(11):
            window = x[max(0, i - 2) : i + 3, max(0, j - 2) : j + 3]
            assert out[i, j] == pytest.approx(window.mean(), rel=1e-5)


def test_upsample_bilinear_is_linear_interpolation():
    x = np.array([[0.0, 1.0]], np.float32)
    out = upsample_bilinear(x, (1, 4))
    np.testing.assert_allclose(out[0], [0.0, 0.25, 0.75, 1.0])


def _disc_scene(size: int = 128):
    """A sharp-edged orange disc on a blue background and its exact (supersampled) coverage."""
    sub = 8
    yy, xx = (np.mgrid[0 : size * sub, 0 : size * sub] + 0.5) / sub
    inside = ((yy - 61.3) ** 2 + (xx - 70.7) ** 2 < 37.0**2).astype(np.float32)
    coverage = inside.reshape(size, sub, size, sub).mean(axis=(1, 3))
    fg, bg = np.array([0.9, 0.45, 0.1], np.float32), np.array([0.1, 0.3, 0.75], np.float32)
    guide = coverage[..., None] * fg + (1 - coverage[..., None]) * bg
    return guide.astype(np.float32), coverage.astype(np.float32)


def test_guided_matte_beats_bilinear_at_4x():
    guide, truth = _disc_scene(128)
    scale = 4
    mapping = fit_mapping((128, 128), (128 // scale, 128 // scale))
    assert mapping.canvas_size == (32, 32)
    low = truth.reshape(32, scale, 32, scale).mean(axis=(1, 3))  # the model's matte: area-averaged
    guided = guided_upsample(low[None], guide[None], mapping)[0]
    bilinear = upsample_bilinear(low, (128, 128))
    edge = box_filter(((truth > 0) & (truth < 1)).astype(np.float32), 4) > 0
    guided_error = np.abs(guided - truth)[edge].mean()
    bilinear_error = np.abs(bilinear - truth)[edge].mean()
    assert guided_error < 0.5 * bilinear_error, (guided_error, bilinear_error)
    # More than two model pixels from the edge the matte is exactly the truth (0 or 1): no halo.
    near = box_filter(((truth > 0) & (truth < 1)).astype(np.float32), 2 * scale) > 0
    np.testing.assert_array_equal(guided[~near], truth[~near])
    assert guided.min() >= 0.0 and guided.max() <= 1.0


def test_guided_upsample_with_padding_and_errors():
    guide, truth = _disc_scene(64)
    guide, truth = guide[:, :48], truth[:, :48]  # non-square: the canvas gets padding
    mapping = fit_mapping((64, 48), (32, 32))
    assert mapping.canvas_size != mapping.scaled_size
    low = fit_frames(truth[None], mapping)
    out = guided_upsample(low, guide[None], mapping)
    assert out.shape == (1, 64, 48)
    assert np.abs(out[0] - truth).mean() < 0.05
    with pytest.raises(ValueError, match="guide has shape"):
        guided_upsample(low, guide[None, :10], mapping)
    with pytest.raises(ValueError, match="guide has 2 frames"):
        guided_upsample(low, np.repeat(guide[None], 2, axis=0), mapping)
    with pytest.raises(ValueError, match="matte has shape"):
        guided_upsample(low[0], guide[None], mapping)


def test_mapping_scale_property():
    assert FitMapping((100, 200), (50, 100), (64, 112), (7, 6)).scale == pytest.approx(0.5)


@pytest.mark.parametrize("filter", ["lanczos3", "triangle"])
@pytest.mark.parametrize(("source", "size"), [((17, 32), (2160 // 8, 4096 // 8)), ((60, 90), (45, 70))])
def test_resample_tensor_equals_resample_band_by_band(filter, source, size):
    import torch

    from vera_engine.imaging.resize import resample, resample_tensor

    x = np.random.default_rng(3).uniform(-0.2, 1.2, (*source, 5)).astype(np.float32)
    for rows in (slice(0, size[0]), slice(0, size[0] // 3), slice(size[0] // 3, size[0])):
        expected = resample(x, size, filter, rows=rows)
        got = resample_tensor(torch.from_numpy(x), size, filter, rows=rows).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-6)
    if filter == "triangle" and size[0] > source[0]:
        # The matte's upsampling: where numpy's product is exactly 1, so is this one (rows first, two taps an
        # axis), which matters because the guided filter redraws only where the bilinear matte is below 1.
        matte = np.clip(np.random.default_rng(4).uniform(-1.0, 2.0, (*source, 1)), 0.0, 1.0).astype(
            np.float32
        )
        got = resample_tensor(torch.from_numpy(matte), size, filter)[0].numpy()
        np.testing.assert_array_equal(got == 1.0, resample(matte, size, filter)[..., 0] == 1.0)
