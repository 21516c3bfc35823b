"""bench/probe_instructions.py: the word-swap probe runs on any checkpoint folder and its figures mean what they say."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from vera_engine.pipelines.presets import build_random_pipeline
from vera_engine.training.data import generate_dataset, iter_clips

REPO = Path(__file__).resolve().parents[1]


def _load_probe():
    spec = importlib.util.spec_from_file_location(
        "probe_instructions", REPO / "bench" / "probe_instructions.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


probe_instructions = _load_probe()


def moving_square(frames=5, size=32, start=(4, 12), step=(5, 0), side=6):
    alpha = np.zeros((frames, size, size), np.float32)
    for t in range(frames):
        x, y = start[0] + step[0] * t, start[1] + step[1] * t
        alpha[t, y : y + side, x : x + side] = 1
    return alpha


def test_travel_and_centroid_shift_on_hand_made_mattes():
    right = moving_square(start=(4, 4))  # 5 px a frame over 4 steps: 20 / 32 of the frame
    assert probe_instructions.travel(right, 0) == pytest.approx(20 / 32)
    assert probe_instructions.travel(right[::-1], 0) == pytest.approx(-20 / 32)
    assert probe_instructions.travel(right, 1) == pytest.approx(0.0)
    # A faint level over the plate (at or below the frame's median) does not pull the centroid to the middle.
    assert probe_instructions.travel(np.maximum(right, 0.05), 0) == pytest.approx(20 / 32)
    assert np.isnan(probe_instructions.travel(np.zeros((3, 8, 8)), 0))
    # Frames 0 and 4 are 20 px apart, 1 and 3 10 px, 2 in place: mean (20 + 10 + 0 + 10 + 20) / 5 / 32.
    assert probe_instructions.centroid_shift(right, right[::-1]) == pytest.approx(12 / 32)
    # A model that follows the words: the swap moves the travel by twice the path.
    lower = np.roll(right, 16, axis=1)
    figures = probe_instructions.compare(
        {"forward": right, "backward": right[::-1], "place_a": right, "place_b": lower}, "horizontal"
    )
    assert figures["travel_swap"] == pytest.approx(40 / 32)
    assert figures["position_shift"] == pytest.approx(16 / 32)
    # A model that ignores them: nothing moves.
    deaf = probe_instructions.compare(
        {"forward": right, "backward": right, "place_a": right, "place_b": right}, "horizontal"
    )
    assert (
        deaf["travel_swap"] == 0.0
        and deaf["direction_centroid_shift"] == 0.0
        and deaf["position_shift"] == 0.0
    )


@pytest.fixture(scope="module")
def moving_clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe-data")
    generate_dataset(root, {"heldout": 12}, frames=8, height=32, width=32, seed=3)
    clips = [clip for clip in iter_clips(root, "heldout") if probe_instructions.path_orientation(clip)]
    assert len(clips) >= 2, "the seed should give at least two moving object-addition clips"
    return root, clips


def _vocabulary(root, clips):
    texts = [clip.instruction for clip in iter_clips(root, "heldout")]
    return texts + [p for clip in clips for p in probe_instructions.probe_prompts(clip).values()]


def test_the_one_pass_prediction_decodes_the_clips_own_matte_at_low_noise(moving_clips):
    # At sigma -> 0 the noisy layers are the clip's own and x_0 = x_sigma - sigma v is them whatever the model says:
    # the probe's encoding, layer order and decoding are checked against the true matte.
    root, clips = moving_clips
    pipe = build_random_pipeline("vera-tiny-v2", vocabulary=_vocabulary(root, clips))
    clip = clips[0]
    forward_probe = probe_instructions.ForwardProbe(pipe, clip, seed=0, guidance=2.5)
    predicted = forward_probe.predicted_alpha(probe_instructions.probe_prompts(clip)["backward"], 1e-5)
    assert predicted.shape == clip.alpha.shape
    np.testing.assert_allclose(predicted, clip.alpha, atol=1e-3)
    # At sigma 1 the clip's layers are gone: the prediction is the model's, not the truth.
    assert np.abs(forward_probe.predicted_alpha("add a red ball", 1.0) - clip.alpha).max() > 0.1


@pytest.mark.parametrize("preset", ["vera-tiny-v2", "vera-tiny"])
def test_probe_runs_on_a_checkpoint_folder_and_prints_both_figures(moving_clips, tmp_path, capsys, preset):
    root, clips = moving_clips
    pipe = build_random_pipeline(preset, vocabulary=_vocabulary(root, clips))
    assert pipe.config.get("instruction_format", "text") == ("slots" if preset == "vera-tiny-v2" else "text")
    pipe.save_pretrained(tmp_path / "model")
    report_path = tmp_path / "probe.json"
    argv = ["--model", str(tmp_path / "model"), "--data", str(root), "--clips", "2", "--sigmas", "1,0.75"]
    assert probe_instructions.main([*argv, "--report", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "sigma 1.00: direction swap moves the centroid by" in out and "sigma 0.75:" in out
    assert "and the predicted travel by" in out and "target >= 0.5" in out
    report = json.loads(report_path.read_text())
    assert report["clips"] == 2 and report["unknown_words"] == []
    for level in ("sigma 1.00", "sigma 0.75"):
        figures = report["means"][level]
        assert set(figures) == {
            "direction_centroid_shift",
            "travel_forward",
            "travel_backward",
            "travel_swap",
            "position_shift",
        }
        assert all(np.isfinite(v) for v in figures.values()), figures
        assert figures["travel_swap"] == pytest.approx(figures["travel_forward"] - figures["travel_backward"])


def test_probe_rejects_noise_levels_outside_0_1(moving_clips):
    _, clips = moving_clips
    with pytest.raises(ValueError, match="noise levels are in"):
        probe_instructions.probe(object(), clips, sigmas=[1.5])
