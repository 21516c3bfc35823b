"""The layered dataset format and its loader: exact round trips, refused damage, aligned crops and flips."""

import json

import numpy as np
import pytest
import torch

from vera_engine.training.data import (
    LayeredVideoDataset,
    clip_seed,
    collate_layered,
    generate_clip,
    generate_dataset,
    iter_clips,
    load_clip,
    mirror_fields,
    mirror_text,
    read_index,
    save_clip,
)
from vera_engine.training.data.geometry import centroid_direction, position_matches


def eq2(input, edit, alpha):
    a = alpha[..., None]
    return (np.float32(1) - a) * input + a * edit


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("layered")
    generate_dataset(path, {"train": 6, "heldout": 2}, seed=3, frames=8, height=48, width=48)
    return path


def test_index_lists_the_splits(root):
    index = read_index(root)
    assert set(index["splits"]) == {"train", "heldout"}
    assert [e["task"] for e in index["splits"]["train"]] == ["object_addition", "background_change"] * 3
    assert index["generator"]["seed"] == 3 and index["generator"]["bits"] == 8
    meta = json.loads((root / "train" / "000000" / "meta.json").read_text())
    assert meta["instruction"] and meta["fields"]["direction"]


@pytest.mark.parametrize("bits", [8, 16])
def test_round_trip_is_bit_exact(tmp_path, bits):
    for i, task in enumerate(("object_addition", "background_change")):
        clip = generate_clip(task, 40 + i, frames=4, height=32, width=40, bits=bits, clip_id=f"c{i}")
        save_clip(clip, tmp_path / f"c{i}", bits=bits)
        loaded = load_clip(tmp_path / f"c{i}")
        for key in ("input", "edit", "alpha", "composite", "mask"):
            assert np.array_equal(getattr(loaded, key), getattr(clip, key)), key
        assert np.array_equal(loaded.composite, eq2(loaded.input, loaded.edit, loaded.alpha))
        assert (loaded.instruction, loaded.task, loaded.fields, loaded.seed) == (
            clip.instruction,
            clip.task,
            clip.fields,
            clip.seed,
        )


def test_written_split_matches_the_generator(root):
    clips = list(iter_clips(root, "heldout"))
    assert len(clips) == 2
    for i, clip in enumerate(clips):
        fresh = generate_clip(clip.task, clip_seed(3, "heldout", i), frames=8, height=48, width=48)
        assert clip.seed == fresh.seed and np.array_equal(clip.composite, fresh.composite)


def test_damaged_file_is_refused(tmp_path):
    clip = generate_clip("object_addition", 0, frames=2, height=16, width=16)
    save_clip(clip, tmp_path / "c")
    path = tmp_path / "c" / "clip.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["edit"] = arrays["edit"].copy()
    arrays["edit"][arrays["alpha"] > 30000] //= 2  # an edit layer that no longer makes the stored composite
    np.savez_compressed(path, **arrays)
    with pytest.raises(ValueError, match="stored composite differs"):
        load_clip(tmp_path / "c")


def test_inconsistent_clip_is_not_saved(tmp_path):
    clip = generate_clip("background_change", 0, frames=2, height=16, width=16)
    clip.composite = clip.composite + np.float32(0.1)
    with pytest.raises(ValueError, match="composite deviates"):
        save_clip(clip, tmp_path / "c")


def test_wrong_version_and_missing_files(tmp_path):
    clip = generate_clip("object_addition", 0, frames=2, height=16, width=16)
    save_clip(clip, tmp_path / "c")
    meta_path = tmp_path / "c" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        load_clip(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match=r"clip\.npz"):
        load_clip(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"index\.json"):
        LayeredVideoDataset(tmp_path)


def test_item_shapes_and_types(root):
    ds = LayeredVideoDataset(root, frames=5, size=(32, 40), seed=0)
    item = ds[1]
    for key in ("input", "edit", "composite"):
        assert item[key].shape == (3, 5, 32, 40) and item[key].dtype == torch.float32
    for key in ("alpha", "mask"):
        assert item[key].shape == (1, 5, 32, 40) and item[key].dtype == torch.float32
    assert item["task"] == "background_change" and isinstance(item["instruction"], str)
    assert item["has_mask"] is True


def cut(x, crop, f, h, w, flipped):
    t0, y0, x0 = crop
    x = x[t0 : t0 + f, y0 : y0 + h, x0 : x0 + w]
    return x[:, :, ::-1] if flipped else x


def to_fhwc(t):
    return t.numpy().transpose(1, 2, 3, 0)


def test_crops_and_flips_keep_layers_aligned(root):
    ds = LayeredVideoDataset(root, frames=6, size=(40, 36), seed=1)
    flips, crops = set(), set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item, clip = ds[i], ds.clip(i)
            flips.add(item["flipped"])
            crops.add(item["crop"])
            for key in ("input", "edit", "composite"):
                expected = cut(getattr(clip, key), item["crop"], 6, 40, 36, item["flipped"])
                assert np.array_equal(to_fhwc(item[key]), expected), key
            for key in ("alpha", "mask"):
                expected = cut(getattr(clip, key), item["crop"], 6, 40, 36, item["flipped"])
                assert np.array_equal(item[key].numpy()[0], expected), key
            # The composite equation survives cropping and flipping, bit for bit.
            alpha = item["alpha"].numpy()[0]
            assert np.array_equal(
                to_fhwc(item["composite"]), eq2(to_fhwc(item["input"]), to_fhwc(item["edit"]), alpha)
            )
    assert flips == {True, False} and len(crops) > 10


def test_flip_mirrors_the_words_and_they_stay_true(root):
    ds = LayeredVideoDataset(root, hflip=True, random_crop=False, seed=0)
    checked = 0
    for epoch in range(8):
        ds.set_epoch(epoch)
        for i in range(0, len(ds), 2):  # object addition clips
            item, clip = ds[i], ds.clip(i)
            if item["flipped"]:
                assert item["instruction"] == mirror_text(clip.instruction)
                assert item["fields"] == mirror_fields(clip.fields)
                checked += 1
            else:
                assert item["instruction"] == clip.instruction
            alpha = item["alpha"].numpy()[0]
            assert centroid_direction(alpha) == item["fields"]["direction"]
            assert position_matches(alpha, item["fields"]["position"])
    assert checked > 0


def test_object_addition_crops_keep_the_instruction_true(root):
    ds = LayeredVideoDataset(root, frames=5, size=(32, 32), seed=2)
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(0, len(ds), 2):
            item = ds[i]
            alpha = item["alpha"].numpy()[0]
            assert (alpha > 0.5).any(axis=(1, 2)).all()
            assert centroid_direction(alpha) == item["fields"]["direction"]
            assert position_matches(alpha, item["fields"]["position"])


def test_draws_depend_only_on_seed_epoch_and_index(root):
    a = LayeredVideoDataset(root, frames=4, size=(24, 24), seed=5)
    b = LayeredVideoDataset(root, frames=4, size=(24, 24), seed=5)
    assert [(a[i]["crop"], a[i]["flipped"]) for i in range(6)] == [
        (b[i]["crop"], b[i]["flipped"]) for i in range(6)
    ]
    draws = [(a[i]["crop"], a[i]["flipped"]) for i in range(6)]
    a.set_epoch(1)
    assert [(a[i]["crop"], a[i]["flipped"]) for i in range(6)] != draws


def test_without_augmentation_the_window_is_centred(root):
    ds = LayeredVideoDataset(root, frames=4, size=(24, 30), random_crop=False, hflip=False)
    item = ds[0]
    assert item["crop"] == (2, 12, 9) and item["flipped"] is False
    assert item["instruction"] == ds.clip(0).instruction


def test_collate_into_a_batch(root):
    ds = LayeredVideoDataset(root, "heldout", frames=4, size=(16, 16))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_layered)
    batch = next(iter(loader))
    assert batch["input"].shape == (2, 3, 4, 16, 16) and batch["alpha"].shape == (2, 1, 4, 16, 16)
    assert batch["has_mask"].dtype == torch.bool and batch["has_mask"].all()
    assert batch["task"] == ["object_addition", "background_change"]
    assert len(batch["instruction"]) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"frames": 9}, "frames=9"),
        ({"size": (64, 8)}, r"size=\(64, 8\)"),
        ({"frames": 0}, "frames=0"),
    ],
)
def test_bad_loader_arguments_are_named(root, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayeredVideoDataset(root, **kwargs)
    with pytest.raises(KeyError, match="nosuch"):
        LayeredVideoDataset(root, "nosuch")


@pytest.mark.parametrize(
    ("text", "mirrored"),
    [
        (
            "add a red circle moving from left to right on the left side",
            "add a red circle moving from right to left on the right side",
        ),
        ("Leftwards, then RIGHT", "Rightwards, then LEFT"),
        ("left_to_right", "right_to_left"),
        ("upper_left in the top-left corner, leftmost", "upper_right in the top-right corner, rightmost"),
        ("a bright light, frightened", "a bright light, frightened"),
    ],
)
def test_mirror_text(text, mirrored):
    assert mirror_text(text) == mirrored
    assert mirror_text(mirrored) == text


def test_mirror_fields_keeps_keys_and_non_strings():
    fields = {
        "direction": "left_to_right",
        "left_count": 2,
        "colours": ["red", "left"],
        "nested": {"pan": "right"},
    }
    assert mirror_fields(fields) == {
        "direction": "right_to_left",
        "left_count": 2,
        "colours": ["red", "right"],
        "nested": {"pan": "left"},
    }
