"""The synthetic layered data generator: determinism, exact ground truth, and what each task promises."""

import numpy as np
import pytest

from vera_engine.training.data import synthetic
from vera_engine.training.data.dataset import snap
from vera_engine.training.data.synthetic import (
    PALETTE,
    SHADOW_RGB,
    clip_seed,
    gaussian_blur,
    generate_clip,
    generate_object_addition,
)
from vera_engine.training.metrics import evaluate_clip

TASKS = ("object_addition", "background_change")


def eq2(input, edit, alpha):
    """METHOD Eq. 2 written out independently of the library, in float32."""
    a = alpha[..., None]
    return (np.float32(1) - a) * input + a * edit


def arrays(clip):
    return [clip.input, clip.edit, clip.alpha, clip.composite, clip.mask]


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_clip_and_other_seed_another(task):
    a, b, c = generate_clip(task, 7), generate_clip(task, 7), generate_clip(task, 8)
    for x, y in zip(arrays(a), arrays(b), strict=True):
        assert np.array_equal(x, y)
    assert (a.instruction, a.fields) == (b.instruction, b.fields)
    assert not np.array_equal(a.input, c.input)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("bits", [8, 16])
def test_composite_is_eq2_bit_for_bit(task, bits):
    for seed in range(6):
        clip = generate_clip(task, seed, frames=5, height=40, width=56, bits=bits)
        for x in (clip.input, clip.edit, clip.alpha, clip.composite):
            assert x.dtype == np.float32
        assert np.array_equal(clip.composite, eq2(clip.input, clip.edit, clip.alpha))
        # The layers sit on the grid the format stores, so saving cannot change them.
        assert np.array_equal(clip.input, snap(clip.input, bits))
        assert np.array_equal(clip.alpha, snap(clip.alpha, 16))
        keep = clip.alpha == 0
        assert np.array_equal(clip.composite[keep], clip.input[keep])


@pytest.mark.parametrize("task", TASKS)
def test_undefined_edit_is_smoothed_composite(task):
    clip = generate_clip(task, 3)
    undefined = clip.alpha == 0
    assert undefined.any()
    sigma = max(1.0, 0.04 * 64)
    expected = gaussian_blur(clip.composite, sigma)
    np.testing.assert_allclose(clip.edit[undefined], expected[undefined], atol=1.5 / 255)


@pytest.mark.parametrize("task", TASKS)
def test_mask_covers_every_changed_pixel(task):
    for seed in range(5):
        clip = generate_clip(task, seed)
        assert clip.mask is not None
        assert set(np.unique(clip.mask)) <= {0.0, 1.0}
        assert (clip.mask[clip.alpha > 0] == 1).all()
        outside = clip.mask == 0
        assert outside.any()
        assert np.array_equal(clip.composite[outside], clip.input[outside])


def test_ground_truth_passes_its_own_evaluation():
    for seed in range(40):
        task = TASKS[seed % 2]
        clip = generate_clip(task, 100 + seed)
        result = evaluate_clip(clip, {"edit": clip.edit, "alpha": clip.alpha})
        assert result["preserved_exact"] and result["matte_iou"] == 1.0
        if task == "object_addition":
            assert result["matte_nonempty"] and result["colour_ok"], (clip.instruction, result)
            assert result["direction_ok"] and result["position_ok"], (clip.instruction, result)
        else:
            assert result["composite_psnr"] == float("inf")


def test_object_addition_instruction_and_fields_agree():
    templates, seen_directions = set(), set()
    for seed in range(60):
        clip = generate_clip("object_addition", seed)
        f = clip.fields
        text = clip.instruction
        assert f["colour"] in text and tuple(f["colour_rgb"]) == PALETTE[f["colour"]]
        assert any(word in text for word in synthetic._SHAPE_WORDS[f["shape"]])
        assert any(p in text for p in synthetic._MOTION_PHRASES[f["direction"]]), text
        assert any(p in text for p in synthetic._POSITION_PHRASES[f["position"]]), text
        templates.add(text.split()[0])
        seen_directions.add(f["direction"])
    assert len(templates) >= 4  # several paraphrase templates in use
    assert seen_directions == set(synthetic.DIRECTIONS)


def test_object_addition_has_soft_dark_shadow():
    clip = generate_clip("object_addition", 11)
    partial = (clip.alpha > 0.02) & (clip.alpha < 0.45)
    shadow_only = partial & np.isclose(clip.edit, np.float32(SHADOW_RGB), atol=1.5 / 255).all(axis=-1)
    assert shadow_only.sum() > 10
    assert clip.edit[shadow_only].max() < 0.1


def test_occluder_cuts_the_object_alpha_and_is_in_the_source():
    seed = next(
        s
        for s in range(200)
        if generate_object_addition(s, occlusion=False).fields["direction"]
        in ("left_to_right", "right_to_left")
    )
    free = generate_object_addition(seed, occlusion=False)
    hidden = generate_object_addition(seed, occlusion=True)
    assert hidden.fields["occluded"] and not free.fields["occluded"]
    # Same object, cut where the occluder stands in front of it.
    assert (hidden.alpha <= free.alpha + 1e-6).all()
    cut = hidden.alpha < free.alpha - 0.5
    assert cut.sum() > 5
    # The occluder is part of the source: the source changed exactly there.
    assert np.abs(hidden.input - free.input).max(axis=-1)[cut].min() > 0
    # Never fully hidden: every frame keeps some opaque object.
    assert (hidden.alpha > 0.5).any(axis=(1, 2)).all()


def test_forcing_occlusion_off_changes_nothing_when_there_is_none():
    seed = next(s for s in range(50) if not generate_object_addition(s).fields["occluded"])
    a, b = generate_object_addition(seed), generate_object_addition(seed, occlusion=False)
    assert np.array_equal(a.composite, b.composite) and a.instruction == b.instruction


def test_background_change_keeps_subject_and_replaces_background():
    for seed in range(6):
        clip = generate_clip("background_change", seed)
        f = clip.fields
        subject = clip.alpha == 0
        background = clip.alpha == 1
        assert subject.any() and background.any()
        soft = (clip.alpha > 0) & (clip.alpha < 1)
        assert soft.any()  # antialiased / feathered matte edge
        assert np.array_equal(clip.composite[subject], clip.input[subject])
        assert np.array_equal(clip.composite[background], clip.edit[background])
        # The edit layer is a new background, not the old one.
        assert np.abs(clip.edit[background] - clip.input[background]).mean() > 0.05
        assert f["new_background"]["description"] in clip.instruction
        assert f["new_background"]["kind"] != f["old_background"]["kind"]
        assert not set(f["new_background"]["colours"]) & set(f["old_background"]["colours"])


def test_camera_pan_crops_a_moving_window():
    canvas = np.arange(20 * 30, dtype=np.float32).reshape(20, 30, 1)
    camera = {"xs": np.array([0.0, 2.0, 4.5]), "ys": np.array([1.0, 1.0, 0.0])}
    frames = synthetic._film(canvas, camera, 8, 10)
    assert np.array_equal(frames[0], canvas[1:9, 0:10])
    assert np.array_equal(frames[1], canvas[1:9, 2:12])
    # Half-pixel offset on a linear ramp: the mean of the two neighbours.
    np.testing.assert_allclose(frames[2], (canvas[0:8, 4:14] + canvas[0:8, 5:15]) / 2)
    for seed in range(20):
        cam = synthetic._camera(np.random.default_rng(seed), 8, 64, 64)
        h, w = cam["canvas"]
        assert (cam["xs"] >= 0).all() and (cam["xs"] + 64 + 1 <= w).all()
        assert (cam["ys"] >= 0).all() and (cam["ys"] + 64 + 1 <= h).all()


def test_pan_moves_the_background():
    clip = next(
        c
        for c in (generate_clip("background_change", s) for s in range(40))
        if c.fields["camera_pan"] in ("left", "right") and c.fields["new_background"]["kind"] == "gradient"
    )
    background = (clip.alpha[0] == 1) & (clip.alpha[-1] == 1)
    assert np.abs(clip.edit[0] - clip.edit[-1]).max(axis=-1)[background].mean() > 0.01


def test_clip_seeds_are_stable_and_splits_disjoint():
    train = {clip_seed(0, "train", i) for i in range(300)}
    heldout = {clip_seed(0, "heldout", i) for i in range(300)}
    assert len(train) == 300 and len(heldout) == 300 and not train & heldout
    assert clip_seed(0, "train", 5) == clip_seed(0, "train", 5) != clip_seed(1, "train", 5)


def test_sizes_and_single_frame():
    clip = generate_clip("object_addition", 1, frames=1, height=24, width=40)
    assert clip.input.shape == (1, 24, 40, 3) and clip.fields["direction"] == "static"
    clip = generate_clip("background_change", 1, frames=3, height=48, width=16)
    assert clip.alpha.shape == (3, 48, 16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "relight"}, "relight"),
        ({"height": 8}, "height=8"),
        ({"frames": 0}, "frames=0"),
        ({"bits": 12}, "bits=12"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    args = {"task": "object_addition", "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_clip(args.pop("task"), args.pop("seed"), **args)


def test_gaussian_blur_is_normalised_and_compact():
    x = np.zeros((1, 31, 31), np.float32)
    x[0, 15, 15] = 1
    y = gaussian_blur(x, 2.0)
    assert y.sum() == pytest.approx(1.0, abs=1e-5)
    assert y[0, 15, 15] == y.max()
    assert y[0, 15, 15 + 7] == 0 and y[0, 15, 15 + 6] > 0  # truncated at 3 sigma
    flat = np.full((2, 9, 9, 3), 0.25, np.float32)
    np.testing.assert_allclose(gaussian_blur(flat, 1.5), flat, atol=1e-6)


def test_exact_backgrounds_are_determined_by_their_description():
    # Background change asks the model to paint the new background from the instruction alone, and eval
    # compares it with ground truth: two canvases with the same description must be the same picture.
    from vera_engine.training.data.synthetic import EXACT_BACKGROUND_KINDS, _background

    by_description: dict[str, np.ndarray] = {}
    repeats = 0
    for seed in range(400):
        rng = np.random.default_rng(seed)
        kind = EXACT_BACKGROUND_KINDS[seed % len(EXACT_BACKGROUND_KINDS)]
        image, facts = _background(rng, 40, 56, kind=kind, exact=True)
        seen = by_description.setdefault(facts["description"], image)
        if seen is not image:
            repeats += 1
            np.testing.assert_array_equal(seen, image, err_msg=facts["description"])
    assert repeats > 20
    with pytest.raises(ValueError, match="cannot be exact"):
        _background(np.random.default_rng(0), 8, 8, kind="clouds", exact=True)


def test_exact_backgrounds_mirror_with_their_sentence():
    # Generator v4: a horizontally flipped new background is the picture its mirrored sentence describes. v3 laid
    # stripes and checkers out from the frame's corner, and a flip turned "red and blue vertical stripes" into their
    # colour-swapped twin under the same sentence (45 % of background-change clips taught two answers to one text).
    from vera_engine.training.data.dataset import mirror_text
    from vera_engine.training.data.synthetic import EXACT_BACKGROUND_KINDS, _background

    pictures: dict[str, np.ndarray] = {}
    for seed in range(300):
        kind = EXACT_BACKGROUND_KINDS[seed % len(EXACT_BACKGROUND_KINDS)]
        image, facts = _background(np.random.default_rng(seed), 32, 32, kind=kind, exact=True)
        pictures[facts["description"]] = image
    checked = 0
    for description, image in pictures.items():
        mirrored = pictures.get(mirror_text(description))
        if mirrored is not None:
            np.testing.assert_allclose(image[:, ::-1], mirrored, atol=1e-6, err_msg=description)
            checked += 1
    assert checked > 30
    kinds_checked = {d.split()[-1] for d in pictures if mirror_text(d) in pictures}
    assert {"stripes", "checkerboard"} <= kinds_checked or any("stripes" in d for d in pictures)


def test_diagonal_stripes_say_which_way_they_run():
    from vera_engine.training.data.synthetic import _background

    seen = set()
    for seed in range(200):
        image, facts = _background(np.random.default_rng(seed), 32, 32, kind="stripes", exact=True)
        if facts["orientation"] == "diagonal":
            seen.add(facts["description"].split("running ")[1])
            # Along the named run the picture is constant: a step down-right on "top left to bottom right" lines.
            step = (1, 1) if "top left to bottom right" in facts["description"] else (1, -1)
            a = image[8:24, 8:24]
            b = image[8 + step[0] : 24 + step[0], 8 + step[1] : 24 + step[1]]
            assert np.abs(a - b).mean() < np.abs(a - image[8:24, 9:25]).mean()
    assert seen == {"from top left to bottom right", "from top right to bottom left"}


def test_object_paths_are_pinned_by_the_words():
    # v4 paths: start 0.22-0.26, end 0.74-0.78 of the frame, band within +-0.02 of its place.
    for seed in range(60):
        clip = generate_object_addition(seed, frames=8, height=64, width=64)
        direction, position = clip.fields["direction"], clip.fields["position"]
        if direction not in ("left_to_right", "top_to_bottom"):
            continue
        weights = clip.alpha * (clip.alpha > 0.5)
        ys, xs = np.mgrid[0:64, 0:64] + 0.5
        first = (
            (weights[0] * xs).sum() / weights[0].sum() / 64,
            (weights[0] * ys).sum() / weights[0].sum() / 64,
        )
        along, across = (first[0], first[1]) if direction == "left_to_right" else (first[1], first[0])
        centre = {"upper": 0.27, "middle": 0.5, "lower": 0.73, "left": 0.27, "center": 0.5, "right": 0.73}[
            position
        ]
        if not clip.fields["occluded"]:
            assert 0.17 < along < 0.31, (seed, along)
            assert abs(across - centre) < 0.06, (seed, across, position)


def test_dataset_index_records_generator_version(tmp_path):
    import json

    synthetic.generate_dataset(tmp_path, {"train": 2}, height=16, width=16, frames=2)
    assert (
        json.loads((tmp_path / "index.json").read_text())["generator"]["version"]
        == synthetic.GENERATOR_VERSION
        == 4
    )
