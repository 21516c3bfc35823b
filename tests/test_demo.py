"""`vera-engine demo`, the README's main command, end to end on the shipped checkpoint (real processes): both shots
come back as layers, and each shows the edit its instruction asks for (two shots on one plate with opposite
motions: the words steer the edit)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from vera_engine.imaging.colour import ColourConverter
from vera_engine.imaging.exr import find_frames, read_layers, read_plate
from vera_engine.pipelines.model_store import resolve_model_dir
from vera_engine.tools.demo import DEMO_SCENES, demo_clip
from vera_engine.training.metrics import (
    background_matches,
    centroid_direction,
    matte_iou,
    nearest_colour_name,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run `vera-engine demo` once; every test of this file reads what it wrote."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "vera_engine", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    index = json.loads((resolve_model_dir("default") / "model_index.json").read_text())
    size = (4 * index["native_height"], 4 * index["native_width"])
    colour = ColourConverter("ACEScg")
    layers_of = {}
    for name, task, seed, mirrored in DEMO_SCENES:
        frames = find_frames(str(out / name / "plate.####.exr"))
        assert frames == list(range(1001, 1001 + index["native_frames"]))
        plate = read_plate(str(out / name / "plate.####.exr"), frames).pixels
        results = sorted((out / name / "results").glob("vera_edit.*.exr"))
        assert [int(p.name.split(".")[1]) for p in results] == frames
        layers = [read_layers(path) for path in results]
        for position, layer in enumerate(layers):
            # The plate is 4x the model's native size: the results come back at plate resolution.
            assert layer["composite"].shape[:2] == plate.shape[1:3] == size
            untouched = layer["matte"] == 0
            # Outside the matte the composite is the plate, bit for bit (both half-float on disk).
            assert np.array_equal(layer["composite"][..., :3][untouched], plate[position][..., :3][untouched])
        matte = np.stack([layer["matte"] for layer in layers])
        premult = np.stack([layer["edit"][..., :3] for layer in layers])
        straight = np.divide(
            premult, matte[..., None], out=np.zeros_like(premult), where=matte[..., None] > 0
        )
        clip, _, fields = demo_clip(task, seed, mirrored, len(frames), size[0], size[1])
        layers_of[name] = (colour.to_model(straight), matte, clip, fields)
    return run, out, layers_of


@pytest.mark.slow
def test_demo_runs_the_whole_product_and_shows_every_edit(demo):
    run, out, layers_of = demo
    assert "contact sheet" in run.stdout and run.stdout.count("succeeded") >= len(DEMO_SCENES)
    assert str(resolve_model_dir("default")) in run.stdout
    # Object addition, both shots on the same plate: the object is there in every frame, in the colour asked for,
    # about its size.
    for name in ("object-addition", "object-addition-mirrored"):
        edit, matte, truth, fields = layers_of[name]
        body = matte > 0.5
        assert body.any(axis=(1, 2)).all(), (name, body.sum(axis=(1, 2)))
        assert nearest_colour_name(edit[body].mean(axis=0)) == fields["colour"], name
        assert 0.25 <= body.sum() / (truth.alpha > 0.5).sum() <= 4, name
    # Background change: the matte is the background, and the new one has the named colours, laid out as named.
    edit, matte, truth, fields = layers_of["background-change"]
    assert matte_iou(matte, truth.alpha) > 0.85
    assert background_matches(edit, matte, fields["new_background"]) == (True, True)
    assert (out / "contact_sheet.png").stat().st_size > 10_000
    # Every shot is on the sheet: shots are separated by a 12-row dark grey band (rows within a shot by 4 rows).
    from PIL import Image

    sheet = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB")).astype(int)
    grey = np.all(sheet == sheet[:, :1], axis=(1, 2)) & (np.abs(sheet[:, 0, 0] - 26) <= 1)
    edges = np.diff(np.concatenate([[0], grey.astype(int), [0]]))
    runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    assert int(np.sum(runs >= 12)) == len(DEMO_SCENES) - 1, runs


@pytest.mark.slow
def test_demo_shots_on_one_plate_move_the_way_their_words_say(demo):
    _, _, layers_of = demo
    directions = []
    for name in ("object-addition", "object-addition-mirrored"):
        _, matte, _, fields = layers_of[name]
        directions.append(fields["direction"])
        assert centroid_direction(matte) == fields["direction"], name
    assert set(directions) == {"left_to_right", "right_to_left"}
