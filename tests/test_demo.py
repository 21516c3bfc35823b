"""`vera-engine demo`, the README's main command, end to end on the shipped checkpoint (real processes)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from vera_engine.imaging.exr import find_frames, read_layers, read_plate
from vera_engine.pipelines.model_store import resolve_model_dir


@pytest.mark.slow
def test_demo_runs_the_whole_product_on_the_shipped_checkpoint(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "vera_engine", "demo", "--out", str(out), "--steps", "6"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "contact sheet" in run.stdout and "succeeded" in run.stdout
    assert str(resolve_model_dir("default")) in run.stdout

    index = json.loads((resolve_model_dir("default") / "model_index.json").read_text())
    frames = find_frames(str(out / "plate" / "plate.####.exr"))
    assert frames == list(range(1001, 1001 + index["native_frames"]))
    plate = read_plate(str(out / "plate" / "plate.####.exr"), frames).pixels
    results = sorted((out / "results").glob("vera_edit.*.exr"))
    assert [int(p.name.split(".")[1]) for p in results] == frames
    matte_peaks = []
    for position, path in enumerate(results):
        layers = read_layers(path)
        # The plate is 4x the model's native size: the results come back at plate resolution.
        assert (
            layers["composite"].shape[:2]
            == plate.shape[1:3]
            == (4 * index["native_height"], 4 * index["native_width"])
        )
        untouched = layers["matte"] == 0
        # Outside the matte the composite is the plate, bit for bit (both half-float on disk).
        assert np.array_equal(layers["composite"][..., :3][untouched], plate[position][..., :3][untouched])
        matte_peaks.append(float(layers["matte"].max()))
    # The shipped model puts something in the shot (an opaque matte somewhere in the sequence).
    assert max(matte_peaks) > 0.5, matte_peaks
    assert (out / "contact_sheet.png").stat().st_size > 10_000
