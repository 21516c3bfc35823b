"""Compositing over the original plate: bit-exact outside the matte, Eq. 3 recovery, clean premultiplication."""

from __future__ import annotations

import numpy as np
import OpenEXR
import pytest

from vera_engine.imaging import exr
from vera_engine.imaging.composite import (
    composite_over_plate,
    fill_unmatted,
    premultiply,
    recover_preserved,
    snap_matte,
)


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint32)


def test_4k_float_plate_is_bit_exact_where_alpha_is_zero(tmp_path):
    height, width = 2160, 4096
    rng = np.random.default_rng(3)
    plate = rng.normal(0.5, 4.0, (height, width, 4)).astype(np.float32)  # values above 1 and below 0
    plate[0, :8, 0] = [-0.0, np.inf, -np.inf, np.nan, 65504.0, 1e30, -1e-40, 3.4e38]
    alpha = np.zeros((height, width), np.float32)
    alpha[800:1400, 1500:2600] = rng.uniform(0.0, 1.0, (600, 1100)).astype(np.float32)
    alpha[1000:1200, 1800:2300] = 1.0
    edit = premultiply(rng.uniform(-0.2, 3.0, (height, width, 3)).astype(np.float32), alpha)
    comp = composite_over_plate(plate, edit, alpha)
    untouched = alpha == 0
    assert untouched.mean() > 0.9
    np.testing.assert_array_equal(_bits(comp)[untouched], _bits(plate)[untouched])
    touched = ~untouched
    expected = plate[..., :3] * (1 - alpha[..., None]) + edit[..., :3]
    np.testing.assert_allclose(comp[..., :3][touched], expected[touched], rtol=1e-6)
    # ... and through a float32 EXR read by the independent reader, bits still equal.
    path = exr.write_layered_exr(tmp_path / "c.exr", comp, edit, alpha, pixel_type="float", compression="rle")
    with OpenEXR.File(str(path), separate_channels=True) as f:
        red = f.channels()["R"].pixels
    np.testing.assert_array_equal(_bits(red)[untouched], _bits(plate[..., 0])[untouched])


def test_half_plate_stays_bit_exact_through_half_output(tmp_path):
    rng = np.random.default_rng(4)
    plate = rng.normal(0.0, 10.0, (32, 48, 3)).astype(np.float16).astype(np.float32)  # a half plate, read
    alpha = np.zeros((32, 48), np.float32)
    alpha[8:20, 10:30] = 0.5
    edit = premultiply(np.full((32, 48, 3), 2.0, np.float32), alpha)
    comp = composite_over_plate(plate, edit, alpha)
    assert np.all(comp[..., 3] == 1.0)  # an RGB plate counts as opaque
    path = exr.write_layered_exr(tmp_path / "h.exr", comp, edit, alpha)
    with OpenEXR.File(str(path), separate_channels=True) as f:
        channels = {k: v.pixels for k, v in f.channels().items()}
    untouched = alpha == 0
    for i, c in enumerate("RGB"):
        np.testing.assert_array_equal(
            channels[c][untouched].view(np.uint16),
            plate[..., i].astype(np.float16)[untouched].view(np.uint16),
        )


def test_composite_alpha_is_over():
    plate = np.array([[[1.0, 2.0, 3.0, 0.5], [1.0, 1.0, 1.0, 0.25]]], np.float32)
    alpha = np.array([[0.5, 0.0]], np.float32)
    edit = premultiply(np.array([[[4.0, 4.0, 4.0], [9.0, 9.0, 9.0]]], np.float32), alpha)
    comp = composite_over_plate(plate, edit, alpha)
    np.testing.assert_allclose(comp[0, 0], [2.5, 3.0, 3.5, 0.75])
    np.testing.assert_array_equal(comp[0, 1], plate[0, 1])


def test_preserved_replaces_the_plate_only_under_the_matte():
    plate = np.ones((1, 3, 3), np.float32)
    alpha = np.array([[0.0, 0.5, 1.0]], np.float32)
    edit = premultiply(np.zeros((1, 3, 3), np.float32), alpha)
    preserved = np.full((1, 3, 3), 4.0, np.float32)
    comp = composite_over_plate(plate, edit, alpha, preserved=preserved)
    np.testing.assert_allclose(comp[0, :, 0], [1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="preserved has shape"):
        composite_over_plate(plate, edit, alpha, preserved=preserved[..., :2])


def test_composite_checks_shapes():
    with pytest.raises(ValueError, match="alpha has shape"):
        composite_over_plate(np.zeros((2, 2, 3)), np.zeros((2, 2, 4)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="differ in size"):
        composite_over_plate(np.zeros((2, 2, 3)), np.zeros((2, 3, 4)), np.zeros((2, 2)))


def test_premultiply_is_exactly_zero_outside_the_matte():
    rgb = np.array([[-1.0, np.inf, 2.0], [0.5, 0.5, 0.5]], np.float32)
    alpha = np.array([0.0, 0.5], np.float32)
    out = premultiply(rgb, alpha)
    np.testing.assert_array_equal(_bits(out[0]), _bits(np.zeros(4, np.float32)))  # +0.0, not -0.0 or NaN
    np.testing.assert_allclose(out[1], [0.25, 0.25, 0.25, 0.5])


def test_snap_matte():
    out = snap_matte(np.array([-0.1, 0.001, 0.01, 0.5, 0.999, 1.2], np.float32))
    np.testing.assert_array_equal(out, np.array([0.0, 0.0, 0.01, 0.5, 1.0, 1.0], np.float32))


def test_fill_unmatted_smooths_garbage_away():
    rng = np.random.default_rng(5)
    rgb = rng.uniform(0, 1, (2, 40, 50, 3)).astype(np.float32)  # garbage everywhere
    alpha = np.zeros((2, 40, 50), np.float32)
    alpha[0, 10:20, 10:25] = 1.0
    rgb[0, 10:20, 10:25] = [0.9, 0.2, 0.1]
    alpha[0, 25:30, 30:40] = 0.6
    rgb[0, 25:30, 30:40] = [0.1, 0.8, 0.3]
    out = fill_unmatted(rgb, alpha)
    known = alpha[0] > 0
    np.testing.assert_array_equal(out[0][known], rgb[0][known])
    filled = out[0][~known]
    # The fill is made of the matted colours only, with no trace of the garbage.
    assert filled[:, 0].min() >= 0.1 - 1e-5 and filled[:, 0].max() <= 0.9 + 1e-5
    assert np.allclose(out[0, 5, 5], [0.9, 0.2, 0.1], atol=0.05)  # next to the red region: red
    # And smooth: filled neighbours differ little (the garbage varied by up to 1 between neighbours).
    both_filled = ~known[:, 1:] & ~known[:, :-1]
    assert np.abs(np.diff(out[0], axis=1))[both_filled].max() < 0.1
    np.testing.assert_array_equal(out[1], 0.0)  # no matte at all: black
    with pytest.raises(ValueError, match=r"expected \(F, H, W, C\)"):
        fill_unmatted(rgb[0], alpha[0])


def test_recover_preserved_inverts_eq2():
    rng = np.random.default_rng(6)
    preserved = rng.uniform(0, 1, (1, 8, 8, 3)).astype(np.float32)
    edit = rng.uniform(0, 1, (1, 8, 8, 3)).astype(np.float32)
    alpha = rng.choice(np.array([0.0, 0.3, 0.6, 0.99], np.float32), size=(1, 8, 8))
    comp = (1 - alpha[..., None]) * preserved + alpha[..., None] * edit  # Eq. 2
    source = np.full_like(preserved, 0.5)
    out = recover_preserved(comp, edit, alpha, source)
    semi = (alpha > 0) & (alpha <= 0.95)
    np.testing.assert_allclose(out[semi], preserved[semi], atol=1e-5)
    np.testing.assert_array_equal(out[~semi], source[~semi])
    with pytest.raises(ValueError, match="shapes differ"):
        recover_preserved(comp, edit[..., :2], alpha, source)


# ----------------------------------------------------------------------------------------------------------
# Layers that composite like the model (issue 15): the linear over of the delivered layers gives the model's
# composite, which it learned in its sRGB-encoded space.


@pytest.fixture(scope="module")
def acescg():
    from vera_engine.imaging.colour import ColourConverter

    return ColourConverter("ACEScg")


def _linear_over(plate, edit, matte):
    return plate[..., :3] * (1.0 - matte[..., None]) + edit[..., :3]


def test_a_soft_black_shadow_composites_as_dark_as_the_models(acescg):
    from vera_engine.imaging.composite import layers_like_model

    grey = acescg.from_model(np.full((1, 1, 3), 0.5, np.float32))  # mid-grey in model space, as a plate
    plate = np.broadcast_to(grey, (4, 4, 3)).copy()
    alpha = np.full((4, 4), 0.4, np.float32)
    edit, matte, composite = layers_like_model(
        plate, acescg.to_model(plate), np.zeros((4, 4, 3), np.float32), alpha, acescg
    )
    # The model's composite: 0.6 * 0.5 = 0.30 in its space. A plain linear over at alpha 0.4 would give 0.394.
    naive = acescg.to_model(plate * 0.6)
    assert abs(float(naive[0, 0, 0]) - 0.394) < 0.01
    np.testing.assert_allclose(acescg.to_model(composite[..., :3]), 0.30, atol=2e-4)
    # One matte for all channels, raised where a linear over needs more coverage of black; the edit stays black.
    assert matte.shape == (4, 4) and np.allclose(matte, matte[0, 0]) and 0.6 < matte[0, 0] < 0.7
    np.testing.assert_allclose(edit[..., :3], 0.0, atol=1e-7)  # black, to float rounding
    np.testing.assert_array_equal(edit[..., 3], matte)
    # What a compositor's Merge (over) makes of the delivered layers is the delivered composite.
    np.testing.assert_allclose(_linear_over(plate, edit, matte), composite[..., :3], atol=1e-6)


def test_a_feathered_coloured_edge_composites_like_the_model(acescg):
    from vera_engine.imaging.composite import layers_like_model

    rng = np.random.default_rng(7)
    height, width = 24, 40
    plate_model = rng.uniform(0.02, 0.98, (height, width, 3)).astype(np.float32)
    plate = acescg.from_model(plate_model)
    edit_model = np.broadcast_to(np.array([0.9, 0.15, 0.1], np.float32), (height, width, 3)).copy()
    # A feathered edge: alpha ramps 0 -> 1 across the frame; the first and last columns are 0 and 1.
    alpha = np.broadcast_to(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, width)).copy()
    edit, matte, composite = layers_like_model(plate, acescg.to_model(plate), edit_model, alpha, acescg)
    target = acescg.from_model(plate_model * (1 - alpha[..., None]) + edit_model * alpha[..., None])
    soft = (alpha > 0) & (alpha < 1)
    # The bound stated in layers_like_model: exact up to float rounding for a plate with positive channels; here
    # also OpenColorIO's float round trip of the plate (to the model's space and back, ~1e-5 relative).
    np.testing.assert_allclose(composite[..., :3][soft], target[soft], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_linear_over(plate, edit, matte)[soft], target[soft], rtol=1e-4, atol=1e-5)
    assert (edit >= 0).all() and (matte >= alpha).all() and (matte <= 1).all()
    # Where alpha is 1: the edit's own colour; where it is 0: the plate's bits.
    opaque, empty = alpha == 1, alpha == 0
    np.testing.assert_allclose(edit[..., :3][opaque], acescg.from_model(edit_model)[opaque], rtol=1e-6)
    np.testing.assert_array_equal(_bits(composite[..., :3][empty]), _bits(plate[empty]))
    assert (edit[empty] == 0).all()


def test_plate_content_the_model_space_cannot_hold_shows_through_the_uncovered_part(acescg):
    from vera_engine.imaging.composite import layers_like_model

    plate = np.array([[[8.0, 6.0, 5.0], [-0.02, 0.3, 0.2]]], np.float32)  # a highlight and a negative channel
    plate_model = acescg.to_model(plate)  # clamped to [0, 1]: the highlight is 1.0 to the model
    edit_model = np.full((1, 2, 3), 0.2, np.float32)
    alpha = np.full((1, 2), 0.5, np.float32)
    edit, matte, composite = layers_like_model(plate, plate_model, edit_model, alpha, acescg)
    model_over = acescg.from_model(plate_model * 0.5 + edit_model * 0.5)
    # The highlight: the model's composite plus the half of the highlight it could not hold.
    expected = model_over[0, 0] + 0.5 * (plate[0, 0] - acescg.from_model(plate_model)[0, 0])
    np.testing.assert_allclose(composite[0, 0, :3], expected, rtol=1e-5)
    # The negative channel: the edit is clipped at 0, and the composite is off by at most (1 - a')·|P_c|.
    over = _linear_over(plate, edit, matte)
    assert (edit >= 0).all()
    target = model_over[0, 1] + 0.5 * (plate[0, 1] - acescg.from_model(plate_model)[0, 1])
    assert np.all(np.abs(over[0, 1] - target) <= (1 - matte[0, 1]) * np.abs(plate[0, 1]) + 1e-6)


def test_clip_matte_is_a_keyers_clip_black_and_white():
    from vera_engine.imaging.composite import DEFAULT_CLIP_BLACK, DEFAULT_CLIP_WHITE, clip_matte

    alpha = np.array([-0.1, 0.0, 0.03, 0.05, 0.06, 0.5, 0.94, 0.95, 0.99, 1.2], np.float32)
    out = clip_matte(alpha, 0.05, 0.95)
    np.testing.assert_array_equal(out[[0, 1, 2, 3]], 0.0)  # at or below black: exactly 0
    np.testing.assert_array_equal(out[[7, 8, 9]], 1.0)  # at or above white: exactly 1
    np.testing.assert_allclose(
        out[[4, 5, 6]], (alpha[[4, 5, 6]] - 0.05) / 0.9, rtol=1e-6
    )  # stretched between
    assert np.all(np.diff(out) >= 0)  # order kept: a matte stays continuous
    np.testing.assert_array_equal(clip_matte(alpha, 0.0, 1.0), np.clip(alpha, 0, 1))
    assert (DEFAULT_CLIP_BLACK, DEFAULT_CLIP_WHITE) == (0.05, 0.95)
    with pytest.raises(ValueError, match="expected 0 <= black < white <= 1"):
        clip_matte(alpha, 0.6, 0.4)
