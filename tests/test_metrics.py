"""Evaluation metrics on hand-made cases whose answers are known."""

import math

import numpy as np
import pytest

from vera_engine.training.data import LayeredClip, compose_layers, generate_clip, generate_dataset
from vera_engine.training.data.geometry import centroid_direction, matte_centroids, position_matches
from vera_engine.training.data.synthetic import PALETTE
from vera_engine.training.metrics import (
    evaluate_clip,
    evaluate_split,
    matte_iou,
    nearest_colour_name,
    preservation_exact,
    psnr,
    summarize,
)


def moving_square(frames=5, size=32, start=(4, 12), step=(5, 0), side=6):
    """A (F, size, size) matte: a side x side square whose corner moves by `step` (dx, dy) per frame."""
    alpha = np.zeros((frames, size, size), np.float32)
    for t in range(frames):
        x, y = start[0] + step[0] * t, start[1] + step[1] * t
        alpha[t, y : y + side, x : x + side] = 1
    return alpha


def test_matte_iou_known_values():
    gt = np.zeros((1, 4, 4), np.float32)
    gt[0, :2, :2] = 1  # 4 pixels
    pred = np.zeros_like(gt)
    pred[0, :2, 1:3] = 1  # 4 pixels, 2 shared
    assert matte_iou(pred, gt) == pytest.approx(2 / 6)
    assert matte_iou(gt, gt) == 1.0
    assert matte_iou(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    assert matte_iou(np.zeros_like(gt), gt) == 0.0
    # Strictly above the threshold counts: 0.5 is outside, 0.51 inside.
    assert matte_iou(gt * 0.5, gt) == 0.0
    assert matte_iou(gt * 0.51, gt) == 1.0
    with pytest.raises(ValueError, match="shape"):
        matte_iou(gt, gt[:, :3])


def test_psnr_known_values():
    a = np.zeros((2, 4, 4, 3), np.float32)
    b = np.full_like(a, 0.1)
    assert psnr(a, b) == pytest.approx(20.0)
    assert psnr(a, a) == math.inf
    c = a.copy()
    c[0, 0, 0] = 1.0  # one pixel fully wrong; the rest exact
    mask = np.zeros((2, 4, 4), bool)
    mask[0, 0, :2] = True  # 2 pixels selected, one wrong: mse 0.5
    assert psnr(a, c, mask=mask) == pytest.approx(10 * math.log10(2))
    assert psnr(a, c, mask=~mask) == math.inf
    assert psnr(a, b, data_range=2.0) == pytest.approx(20.0 + 20 * math.log10(2))
    with pytest.raises(ValueError, match="selects no pixels"):
        psnr(a, c, mask=np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="mask has shape"):
        psnr(a, c, mask=np.ones((4, 4)))


def test_nearest_colour_name():
    for name, rgb in PALETTE.items():
        assert nearest_colour_name(rgb) == name
        assert (
            nearest_colour_name(np.clip(np.array(rgb) * 0.92, 0, 1)) == name
        )  # the generator's darkest shading
    assert nearest_colour_name((1.0, 0.0, 0.0)) == "red"
    assert nearest_colour_name((0.0, 0.0, 1.0)) == "blue"
    assert nearest_colour_name((1.0, 1.0, 1.0)) == "white"
    with pytest.raises(ValueError, match="three finite numbers"):
        nearest_colour_name((1.0, 0.0))


def test_centroids_and_directions():
    right = moving_square()
    c = matte_centroids(right)
    assert c[0] == pytest.approx([(4 + 3) / 32, (12 + 3) / 32])
    assert c[4, 0] - c[0, 0] == pytest.approx(20 / 32)
    assert centroid_direction(right) == "left_to_right"
    assert centroid_direction(right[::-1]) == "right_to_left"
    down = moving_square(start=(12, 2), step=(0, 5))
    assert centroid_direction(down) == "top_to_bottom"
    assert centroid_direction(down[::-1]) == "bottom_to_top"
    # Diagonal motion goes by the dominant axis.
    assert centroid_direction(moving_square(start=(2, 2), step=(5, 2))) == "left_to_right"
    # 1 px per frame over 5 frames is 4/32 = 12.5% of the frame: moving; 0.5 px per frame (jitter) is not.
    assert centroid_direction(moving_square(step=(1, 0))) == "left_to_right"
    jitter = moving_square(step=(0, 0))
    jitter[1:3] = moving_square(frames=2, start=(5, 13), step=(0, 0))
    assert centroid_direction(jitter) == "static"
    assert centroid_direction(np.zeros((3, 8, 8), np.float32)) == "empty"
    one = moving_square()
    one[1:] = 0
    assert centroid_direction(one) == "static"
    # Frames without matte are skipped, not read as position 0.
    gaps = moving_square()
    gaps[2] = 0
    assert centroid_direction(gaps) == "left_to_right"


def test_position_matches():
    upper_left = moving_square(start=(2, 2), step=(0, 0))
    assert position_matches(upper_left, "upper_left")
    assert position_matches(upper_left, "upper") and position_matches(upper_left, "left")
    assert not position_matches(upper_left, "lower") and not position_matches(upper_left, "middle_center")
    centre = moving_square(start=(13, 13), step=(0, 0))
    assert position_matches(centre, "middle_center")
    assert not position_matches(np.zeros((2, 8, 8), np.float32), "upper")
    with pytest.raises(ValueError, match="diagonal"):
        position_matches(centre, "diagonal")


def test_preservation_exact():
    rng = np.random.default_rng(0)
    plate = rng.random((2, 8, 8, 3), dtype=np.float32)
    alpha = np.zeros((2, 8, 8), np.float32)
    alpha[:, 2:5, 2:5] = 0.7
    composite = compose_layers(plate, np.ones_like(plate), alpha)
    assert preservation_exact(plate, composite, alpha)
    nudged = composite.copy()
    nudged[1, 7, 7, 2] = np.nextafter(nudged[1, 7, 7, 2], np.float32(2))  # one ulp, where alpha == 0
    assert not preservation_exact(plate, nudged, alpha)
    inside = composite.copy()
    inside[0, 3, 3] = 0.0  # a change under the matte is allowed
    assert preservation_exact(plate, inside, alpha)
    with pytest.raises(ValueError, match="same frames"):
        preservation_exact(plate, composite[:1], alpha)


def hand_made_clip(task):
    """4 frames of 32x32: a red 6x6 square moving right in the upper half, over a grey plate."""
    alpha = moving_square(frames=4, size=32, start=(4, 6), step=(5, 0))
    plate = np.full((4, 32, 32, 3), 0.5, np.float32)
    edit = np.empty_like(plate)
    edit[:] = np.float32(PALETTE["red"])
    if task == "background_change":
        alpha = 1 - alpha  # the edit layer is a new (red) background around a kept square
        fields = {"new_background": {"kind": "flat"}}
    else:
        fields = {"colour": "red", "direction": "left_to_right", "position": "upper"}
    return LayeredClip(
        input=plate,
        edit=edit,
        alpha=alpha,
        composite=compose_layers(plate, edit, alpha),
        instruction="add a red square moving left to right in the upper half",
        task=task,
        fields=fields,
        clip_id="hand/0",
    )


def test_evaluate_object_addition():
    clip = hand_made_clip("object_addition")
    perfect = evaluate_clip(clip, {"edit": clip.edit, "alpha": clip.alpha})
    assert perfect["matte_nonempty"] and perfect["colour"] == "red" and perfect["colour_ok"]
    assert perfect["direction"] == "left_to_right" and perfect["direction_ok"] and perfect["position_ok"]
    assert perfect["preserved_exact"] and perfect["matte_iou"] == 1.0
    # The square covers 36 of 1024 pixels with a colour 0.5 away in 3 channels and so on: a known PSNR.
    mse = np.mean((clip.composite - clip.input) ** 2, dtype=np.float64)
    assert perfect["source_psnr"] == pytest.approx(10 * math.log10(1 / mse))

    blue = np.empty_like(clip.edit)
    blue[:] = np.float32(PALETTE["blue"])
    wrong = evaluate_clip(clip, {"edit": blue, "alpha": clip.alpha[::-1]})
    assert wrong["colour"] == "blue" and not wrong["colour_ok"]
    assert wrong["direction"] == "right_to_left" and not wrong["direction_ok"]
    assert wrong["position_ok"]  # still in the upper half

    lower = np.roll(clip.alpha, 16, axis=1)
    assert not evaluate_clip(clip, {"edit": clip.edit, "alpha": lower})["position_ok"]

    empty = evaluate_clip(clip, {"edit": clip.edit, "alpha": np.zeros_like(clip.alpha)})
    assert not empty["matte_nonempty"] and empty["colour"] is None and not empty["colour_ok"]
    assert empty["direction"] == "empty" and empty["source_psnr"] == math.inf

    # A model composite that drifts outside its matte is caught.
    drifted = clip.composite.copy()
    drifted[0, 31, 31] += 0.01
    result = evaluate_clip(clip, {"edit": clip.edit, "alpha": clip.alpha, "composite": drifted})
    assert not result["preserved_exact"]


def test_evaluate_background_change():
    clip = hand_made_clip("background_change")
    perfect = evaluate_clip(clip, {"edit": clip.edit, "alpha": clip.alpha})
    assert perfect["matte_iou"] == 1.0 and perfect["composite_psnr"] == math.inf
    assert perfect["source_psnr"] == math.inf and perfect["preserved_exact"]
    # A matte that also eats the kept square: IoU = background / everything = (1024 - 36) / 1024.
    full = np.ones_like(clip.alpha)
    result = evaluate_clip(clip, {"edit": clip.edit, "alpha": full})
    assert result["matte_iou"] == pytest.approx((1024 - 36) / 1024)
    # The square (36 px of 1024 per frame) turned from grey 0.5 to red: known composite error.
    mse = np.mean((compose_layers(clip.input, clip.edit, full) - clip.composite) ** 2, dtype=np.float64)
    assert result["composite_psnr"] == pytest.approx(10 * math.log10(1 / mse))
    assert result["source_psnr"] < 10  # the preserved square was not preserved


def test_evaluate_rejects_mismatched_prediction():
    clip = hand_made_clip("object_addition")
    with pytest.raises(ValueError, match="like the ground truth"):
        evaluate_clip(clip, {"edit": clip.edit[:2], "alpha": clip.alpha[:2]})


def test_summarize_per_task():
    a = hand_made_clip("object_addition")
    b = hand_made_clip("background_change")
    results = [
        evaluate_clip(a, {"edit": a.edit, "alpha": a.alpha}),
        evaluate_clip(a, {"edit": a.edit, "alpha": a.alpha[::-1]}),
        evaluate_clip(b, {"edit": b.edit, "alpha": b.alpha}),
    ]
    summary = summarize(results)
    assert summary["object_addition"]["count"] == 2
    assert summary["object_addition"]["direction_ok"] == 0.5
    assert summary["object_addition"]["colour_ok"] == 1.0
    assert summary["background_change"]["composite_psnr"] == 100.0  # inf capped
    assert "colour" not in summary["object_addition"]  # names are not averaged


def test_synthetic_clip_scores_as_expected():
    clip = generate_clip("background_change", 5)
    result = evaluate_clip(clip, {"edit": clip.edit, "alpha": clip.alpha})
    assert result["matte_iou"] == 1.0 and result["preserved_exact"]


def test_evaluate_split_over_a_held_out_split(tmp_path):
    generate_dataset(tmp_path, {"heldout": 4}, seed=9, frames=4, height=32, width=32)

    def oracle(clip):
        return {"edit": clip.edit, "alpha": clip.alpha}

    def no_edit(clip):
        return {"edit": clip.input, "alpha": np.zeros_like(clip.alpha)}

    results, summary = evaluate_split(tmp_path, "heldout", oracle)
    assert [r["clip_id"] for r in results] == [f"heldout/{i:06d}" for i in range(4)]
    assert summary["object_addition"]["count"] == 2 and summary["background_change"]["count"] == 2
    for key in ("matte_nonempty", "colour_ok", "direction_ok", "position_ok", "preserved_exact"):
        assert summary["object_addition"][key] == 1.0
    _, summary = evaluate_split(tmp_path, "heldout", no_edit)
    assert summary["object_addition"]["matte_nonempty"] == 0.0
    assert summary["background_change"]["matte_iou"] == 0.0
    assert summary["background_change"]["composite_psnr"] < 30


def test_object_addition_checks_size_and_presence_not_only_colour():
    clip = hand_made_clip("object_addition")
    perfect = evaluate_clip(clip, {"edit": clip.edit, "alpha": clip.alpha})
    assert perfect["size_ok"] and perfect["colour_and_size_ok"] and perfect["present_all_frames"]
    # A whole-frame recolour in the right colour is not an object of the right size.
    recolour = evaluate_clip(clip, {"edit": clip.edit, "alpha": np.ones_like(clip.alpha)})
    assert recolour["colour_ok"] and not recolour["size_ok"] and not recolour["colour_and_size_ok"]
    # A speck (one pixel a frame) neither.
    speck = np.zeros_like(clip.alpha)
    speck[:, 13, 5] = 1
    assert not evaluate_clip(clip, {"edit": clip.edit, "alpha": speck})["size_ok"]
    # An object that vanishes in one frame is not present in every frame.
    gap = clip.alpha.copy()
    gap[2] = 0
    assert not evaluate_clip(clip, {"edit": clip.edit, "alpha": gap})["present_all_frames"]


def _generated_background_change(kind: str):
    for seed in range(200):
        clip = generate_clip("background_change", seed, frames=2, height=48, width=48)
        if clip.fields["new_background"]["kind"] == kind:
            return clip
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["gradient", "radial", "stripes", "checkerboard"])
def test_the_new_background_is_checked_for_its_named_colours_and_layout(kind):
    from vera_engine.training.metrics import background_matches, flat_two_colour_baseline

    clip = _generated_background_change(kind)
    facts = clip.fields["new_background"]
    assert background_matches(clip.edit, clip.alpha, facts) == (True, True)
    # The picture turned round (left <-> right and top <-> bottom) keeps its colours; a gradient's layout is then
    # wrong, stripes and checkers look the same either way.
    turned = clip.edit[:, ::-1, ::-1]
    colours, layout = background_matches(turned, clip.alpha[:, ::-1, ::-1], facts)
    assert colours and layout == (kind in ("radial", "stripes", "checkerboard"))
    # A flat background in between is not the two named colours.
    flat = np.full_like(clip.edit, 0.5)
    assert background_matches(flat, clip.alpha, facts)[0] is False
    # The flat baseline: the named colours' mean under the mask, the source elsewhere; the truth beats it.
    baseline = flat_two_colour_baseline(clip)
    outside = clip.mask == 0
    assert np.array_equal(baseline[outside], clip.input[outside])
    result = evaluate_clip(clip, {"edit": clip.edit, "alpha": clip.alpha})
    assert result["beats_flat_baseline"] and result["background_ok"]


def test_stripes_are_checked_for_their_orientation():
    from vera_engine.training.metrics import background_matches

    clip = _generated_background_change("stripes")
    facts = dict(clip.fields["new_background"])
    turned = np.swapaxes(clip.edit, 1, 2)  # vertical <-> horizontal
    alpha = np.swapaxes(clip.alpha, 1, 2)
    if facts["orientation"] == "diagonal":
        facts["orientation"] = "vertical"  # a diagonal picture does not satisfy "vertical"
        assert background_matches(clip.edit, clip.alpha, facts)[1] is False
    else:
        assert background_matches(turned, alpha, facts)[1] is False


def test_wilson_interval_against_hand_computed_values():
    from vera_engine.training.metrics import wilson_interval

    # The Wilson interval's ends are the roots p of (k/n - p)^2 = z^2 p (1 - p) / n (Wilson 1927). 8 of 10, z^2 =
    # 3.8415: 1.38415 p^2 - 1.98415 p + 0.64 = 0, roots (1.98415 -+ sqrt(3.93685 - 3.54326)) / 2.76830 =
    # 0.49016 and 0.94332.
    low, high = wilson_interval(8, 10)
    assert (low, high) == (pytest.approx(0.49016, abs=1e-4), pytest.approx(0.94332, abs=1e-4))
    # 83 of 100: 1.038415 p^2 - 1.698415 p + 0.6889 = 0, roots 0.74452 and 0.89106; 0 and all of 20 stay inside
    # [0, 1] and are not empty.
    assert wilson_interval(83, 100) == (pytest.approx(0.74452, abs=1e-4), pytest.approx(0.89106, abs=1e-4))
    assert wilson_interval(0, 20) == (0.0, pytest.approx(0.16113, abs=1e-4))
    assert wilson_interval(20, 20) == (pytest.approx(0.83887, abs=1e-4), 1.0)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)


def test_summarize_gives_every_rate_its_interval():
    from vera_engine.training.metrics import wilson_interval

    rows = [{"task": "object_addition", "direction_ok": i < 3, "matte_iou": 0.5} for i in range(4)]
    summary = summarize(rows)["object_addition"]
    assert summary["direction_ok"] == 0.75
    assert summary["direction_ok_ci95"] == pytest.approx(list(wilson_interval(3, 4)))
    assert summary["direction_ok_ci95"] == pytest.approx([0.30064, 0.95441], abs=1e-4)
    assert "matte_iou_ci95" not in summary  # a mean of fractions is not a binomial rate
    # The clean-matte fractions: their mean and their worst clip.
    rows = [{"task": "object_addition", "matte_clear_outside": v} for v in (1.0, 0.9, 0.17, math.nan)]
    summary = summarize(rows)["object_addition"]
    assert summary["matte_clear_outside"] == pytest.approx((1.0 + 0.9 + 0.17) / 3)
    assert summary["matte_clear_outside_worst"] == 0.17


def test_square_dilate_and_erode_known_shapes():
    from vera_engine.training.metrics import square_dilate, square_erode

    dot = np.zeros((1, 9, 9), bool)
    dot[0, 4, 4] = True
    assert np.count_nonzero(square_dilate(dot, 2)) == 25  # a 5 x 5 square
    assert square_dilate(dot, 2)[0, 2:7, 2:7].all()
    block = np.zeros((1, 9, 9), bool)
    block[0, 1:8, 1:8] = True  # 7 x 7
    assert np.count_nonzero(square_erode(block, 2)) == 9  # 3 x 3 left
    # The frame's border is not an edge: a region filling the frame is not eroded.
    assert square_erode(np.ones((1, 6, 6), bool), 2).all()


def test_matte_clear_outside_counts_exact_zeros_outside_the_dilated_object():
    clip = hand_made_clip("object_addition")  # a 6 x 6 square per 32 x 32 frame
    perfect = evaluate_clip(clip, {"edit": clip.edit, "alpha": clip.alpha})
    assert perfect["matte_clear_outside"] == 1.0
    # Outside the square dilated by 2 px (10 x 10 = 100 pixels) there are 1024 - 100 = 924 pixels per frame.
    faint = clip.alpha.copy()
    faint[:, 28:32, :] = np.maximum(faint[:, 28:32, :], 0.01)  # a faint bottom band of 4 x 32 = 128 pixels
    result = evaluate_clip(clip, {"edit": clip.edit, "alpha": faint})
    assert result["matte_clear_outside"] == pytest.approx((924 - 128) / 924)
    # Matte within 2 px of the object is allowed (soft edges, blur); 3 px away is not.
    halo = clip.alpha.copy()
    halo[0, 4:14, 2:12] = np.maximum(halo[0, 4:14, 2:12], 0.2)  # frame 0's square: rows 6-11, columns 4-9
    assert evaluate_clip(clip, {"edit": clip.edit, "alpha": halo})["matte_clear_outside"] == 1.0
    halo[0, 6 + 6 + 2, 4] = 0.2  # row 14: 3 px below the square (rows 6-11)
    assert evaluate_clip(clip, {"edit": clip.edit, "alpha": halo})["matte_clear_outside"] == pytest.approx(
        1 - 1 / (4 * 924)
    )
    # A whole-frame faint matte clears nothing.
    assert (
        evaluate_clip(clip, {"edit": clip.edit, "alpha": np.full_like(faint, 1e-6)})["matte_clear_outside"]
        == 0.0
    )


def test_matte_clear_subject_counts_exact_zeros_inside_the_eroded_subject():
    clip = hand_made_clip("background_change")  # background alpha 1 around a kept 6 x 6 square
    perfect = evaluate_clip(clip, {"edit": clip.edit, "alpha": clip.alpha})
    assert perfect["matte_clear_subject"] == 1.0 and perfect["composite_psnr_ge_20"]
    # The kept square eroded by 2 px is its 2 x 2 core; a faint matte over the frame but on one core pixel per
    # frame clears 3 of 4.
    faint = np.maximum(clip.alpha, 0.004)
    for t in range(4):
        faint[t, 6 + 2, 4 + 5 * t + 2] = 0.0
        faint[t, 6 + 2, 4 + 5 * t + 3] = 0.0
        faint[t, 6 + 3, 4 + 5 * t + 2] = 0.0
    result = evaluate_clip(clip, {"edit": clip.edit, "alpha": faint})
    assert result["matte_clear_subject"] == pytest.approx(3 / 4)
    # The subject's 2 px rim may carry matte (soft edges).
    rim = clip.alpha.copy()
    rim[:, 6, :] = np.maximum(rim[:, 6, :], 0.3)
    assert evaluate_clip(clip, {"edit": clip.edit, "alpha": rim})["matte_clear_subject"] == 1.0


def test_composite_psnr_ge_20_is_the_issue_s_background_check():
    clip = hand_made_clip("background_change")
    # The composite off by 0.099 everywhere: 20.09 dB, which counts; 0.101 is 19.91 dB, which does not.
    for offset, expected in ((0.099, True), (0.101, False)):
        composite = clip.composite + np.float32(offset)
        result = evaluate_clip(clip, {"edit": clip.edit, "alpha": clip.alpha, "composite": composite})
        assert result["composite_psnr_ge_20"] is expected, (offset, result["composite_psnr"])
