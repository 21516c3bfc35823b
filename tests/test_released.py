"""The released Vera layout (metadata.jsonl + MP4 layers): reading, checks, and `train` / `eval` on it."""

import json
import shutil

import numpy as np
import pytest

from tests.released_fixtures import (
    make_layers,
    write_metadata,
    write_mp4,
    write_record,
    write_released_dataset,
)
from vera_engine.training.data.released import (
    BadRecordError,
    ReleasedVeraDataset,
    detect_format,
    fit_to_size,
    read_records,
)
from vera_engine.training.data.synthetic import gaussian_blur


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return write_released_dataset(tmp_path_factory.mktemp("released") / "vera", count=4)


def test_records_decode_to_the_layers_written(released):
    dataset = ReleasedVeraDataset(released, "train", random_crop=False, hflip=False)
    assert len(dataset) == 4 and dataset.frames == 5 and dataset.size == (32, 48)
    for index in range(2):
        clip = dataset.clip(index)
        task = ("object_addition", "background_change")[index]
        truth = make_layers(index, 5, 32, 48, task)
        assert clip.task == task and clip.clip_id == f"clip{index:03d}"
        # The grey matte comes back to within H.264's rounding, and its zeros stay zeros.
        assert np.abs(clip.alpha - truth["alpha"]).max() < 3 / 255
        assert np.array_equal(clip.alpha == 0, truth["alpha"] == 0)
        # yuv420p: chroma at half resolution, so colour comes back to a few codes on average.
        assert np.abs(clip.input - truth["input"]).mean() < 4 / 255
        defined = clip.alpha > 0
        assert np.abs(clip.edit[defined] - truth["edit"][defined]).mean() < 4 / 255
        # Undefined edit: the Gaussian-smoothed composite (METHOD.md), not the file's colour there.
        sigma = max(1.0, 0.04 * 32)
        assert np.allclose(clip.edit[~defined], gaussian_blur(clip.composite, sigma)[~defined], atol=1e-6)
    assert dataset.clip(0).mask is None  # no mask_path -> no mask
    mask = dataset.clip(1).mask
    assert mask is not None and np.array_equal(
        mask > 0.5, make_layers(1, 5, 32, 48, "background_change")["alpha"] > 0
    )
    item = dataset[0]
    assert item["has_mask"] is False and item["mask"].abs().sum() == 0
    assert dataset[1]["has_mask"] is True


def test_clips_of_another_size_and_length_are_fitted(released):
    dataset = ReleasedVeraDataset(released, "train", frames=3, size=(16, 16), seed=1)
    item = dataset[0]
    assert tuple(item["input"].shape) == (3, 3, 16, 16) and tuple(item["alpha"].shape) == (1, 3, 16, 16)
    # Scaled to cover (32x48 -> 16x24) and cropped: a half-size frame, not a squashed one.
    frame = np.linspace(0, 1, 48, dtype=np.float32)[None, None, :].repeat(32, axis=1)
    fitted = fit_to_size(frame, (16, 16))
    assert fitted.shape == (1, 16, 16)
    assert np.allclose(fitted[0, 0], fit_to_size(frame, (16, 24))[0, 0, 4:20], atol=1e-6)


def test_detection_and_insisting_on_a_format(released, tmp_path):
    assert detect_format(released) == "vera"
    assert detect_format(released, "vera") == "vera"
    with pytest.raises(ValueError, match=r"--format layered: .* has no index\.json"):
        detect_format(released, "layered")
    with pytest.raises(ValueError, match=r"--format vera: .* has no metadata\.jsonl"):
        detect_format(tmp_path, "vera")


def _broken(root, problem):
    """A copy of a two-record dataset whose second record has ``problem``."""
    root.mkdir(parents=True)
    good = write_record(root, "good", "object_addition", seed=1)
    bad = write_record(root, "bad", "background_change", seed=2)
    if problem == "missing":
        (root / bad["edit_rgb_path"]).unlink()
    elif problem == "frames":
        write_mp4(root / bad["edit_alpha_path"], np.zeros((4, 32, 48, 3), np.uint8))
    elif problem == "size":
        write_mp4(root / bad["target_composite_path"], np.zeros((5, 32, 32, 3), np.uint8))
    elif problem == "colour_alpha":
        colour = np.zeros((5, 32, 48, 3), np.uint8)
        colour[..., 0] = 200  # red: not a grey matte
        write_mp4(root / bad["edit_alpha_path"], colour)
    elif problem == "unreadable":
        (root / bad["input_video_path"]).write_bytes(b"this is not an mp4 file at all" * 10)
    write_metadata(root, [good, bad])
    return root


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("missing", "edit_rgb_path 'bad_edit_rgb.mp4': .* does not exist"),
        ("frames", "edit_alpha_path has 4 frames but the input has 5"),
        ("size", "target_composite_path is 32x32 but the input is 48x32"),
        ("colour_alpha", "edit_alpha_path is not grey"),
        ("unreadable", "input_video_path: bad_input.mp4 is not a readable video"),
    ],
)
def test_a_bad_record_is_named_before_training_or_skipped_and_counted(tmp_path, problem, message):
    root = _broken(tmp_path / problem, problem)
    with pytest.raises(BadRecordError, match=f"metadata.jsonl:2 \\(video_id 'bad'\\): {message}"):
        read_records(root, "train")
    records, skipped = read_records(root, "train", skip_bad=True)
    assert [r.video_id for r in records] == ["good"] and len(skipped) == 1 and "'bad'" in skipped[0]


def test_train_and_eval_cli_read_the_released_layout(released, tmp_path, capsys):
    from vera_engine.tools.cli import main
    from vera_engine.training.train import read_log

    out = tmp_path / "run"
    argv = ["train", "--data", str(released), "--out", str(out), "--steps", "2", "--batch-size", "2"]
    argv += [
        "--warmup-steps",
        "0",
        "--frames",
        "4",
        "--size",
        "32",
        "32",
        "--no-progress",
        "--log-every",
        "1",
    ]
    assert main(argv) == 0
    assert len(read_log(out)) == 2
    # A broken record stops `train` before any step, naming it; --skip-bad trains on the rest.
    broken = tmp_path / "broken"
    shutil.copytree(released, broken)
    lines = (broken / "metadata.jsonl").read_text().splitlines()
    record = json.loads(lines[2])
    (broken / record["edit_alpha_path"]).unlink()
    capsys.readouterr()
    assert main([*argv[:2], str(broken), "--out", str(tmp_path / "r2"), *argv[5:]]) == 2
    assert "video_id 'clip002'): edit_alpha_path" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()
    assert main([*argv[:2], str(broken), "--out", str(tmp_path / "r3"), *argv[5:], "--skip-bad"]) == 0
    assert "left out 1 bad record" in capsys.readouterr().out
