"""End to end: the Resolve adapter (on the fake Resolve object model) against a real engine process on
loopback running a real Vera pipeline: the right frames are sent, the results land in the "Vera" bin and on a
new track at the clip's record frame, layered and aligned to the plate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import OpenImageIO as oiio
import pytest

from tests.resolve_fake import FakeResolve, media_pixels
from vera_engine.service.testing import EngineProcess, tiny_model_dir
from vera_plugin.client import EngineClient
from vera_plugin.hosts import resolve as vera_resolve

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# The model the engine runs. Until the trained checkpoint ships this is a tiny random-weight pipeline;
# The engine runs the shipped checkpoint (`--model default`).
SHIPPED_MODEL: str | None = "default"

T0 = 86400


@pytest.fixture(scope="module")
def engine_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return SHIPPED_MODEL or str(tiny_model_dir(tmp_path_factory.getbasetemp()))


def test_resolve_clip_round_trip_through_a_real_engine(engine_model: str, tmp_path: Path) -> None:
    app = FakeResolve()
    plate = app.media_pool.add_exr_sequence(tmp_path / "media", "plate", 1001, 1012)
    other = app.media_pool.add_movie("/media/wide.mov", 200)
    app.timeline.add_item(other, track=1, start=T0, duration=24)
    app.timeline.add_item(plate, track=1, start=T0 + 24, duration=5, left_offset=3)  # shows 1004-1008
    app.timeline.playhead = T0 + 26

    with EngineProcess(tmp_path / "spool", engine_model) as engine, EngineClient(engine.address) as client:
        client.wait_until_serving(240)
        model = client.info().models[0]
        steps: list[str] = []
        (placed,) = vera_resolve.run_vera_edit(
            client,
            {"prompt": "add a red ball", "steps": 2, "seed": 7, "colorspace": "ACEScg"},
            resolve=app,
            work_dir=tmp_path / "cache",
            progress=lambda f, m: steps.append(m),
        )
        job = client.list_jobs()[-1]

    assert list(job.header.frames) == [1004, 1005, 1006, 1007, 1008]
    assert job.header.model == model.name and job.header.seed == 7
    # Per-step progress reached the host (Watch coalesces changes: a 2-step job may end before step 2 is sent).
    assert any(m.startswith("sampling step ") for m in steps), steps
    # In the Vera bin, on a new track above V1, at the clip's record frame, for its length.
    vera_bin = next(f for f in app.media_pool.root.subfolders if f.name == "Vera")
    assert vera_bin.GetClipList() == [placed.media_pool_item]
    assert placed.track_index == 2 and app.timeline.GetTrackCount("video") == 2
    (item,) = app.timeline.GetItemListInTrack("video", 2)
    assert (item.GetStart(), item.GetEnd()) == (T0 + 24, T0 + 29)
    assert placed.media_pool_item.GetClipProperty("File Path").endswith("vera_edit.[1004-1008].exr")
    # Layered results, at the plate's size, aligned frame for frame; outside the matte, the plate itself.
    files = [placed.sequence.path(f) for f in range(1004, 1009)]
    composites = []
    for path in files:
        spec = oiio.ImageInput.open(path).spec()
        assert (spec.width, spec.height) == (24, 16) and spec.getattribute("vera/job_id") == job.job_id
        names = spec.channelnames
        assert names == ("R", "G", "B", "A", "edit.R", "edit.G", "edit.B", "edit.A", "matte.A")
        layers = np.asarray(oiio.ImageBuf(path).get_pixels(oiio.FLOAT)).reshape(16, 24, len(names))
        assert np.isfinite(layers).all()
        composites.append(layers)
    # comp = plate·(1−a) + edit, with the plate of the same frame number: a neighbouring frame's plate is
    # 0.5·(1−a) away in green, far outside the half-float tolerance.
    for frame, layers in zip(range(1004, 1009), composites, strict=True):
        alpha, edit = layers[..., 8:9], layers[..., 4:7]
        for candidate in range(1003, 1010):
            plate_px = media_pixels(plate.media_id, candidate).astype(np.float16).astype(np.float32)
            # Half floats: 2e-3 relative (the plate holds values up to ~70, where a half's step is 0.03).
            matches = np.allclose(layers[..., :3], plate_px * (1 - alpha) + edit, rtol=2e-3, atol=0.02)
            assert matches == (candidate == frame), (frame, candidate)
    # The clip matte: per frame, a grey EXR holding exactly the result's matte.A.
    mattes = app.media_pool.GetClipMatteList(placed.media_pool_item)
    assert placed.matte_attached and len(mattes) == 5
    for matte, layers in zip(mattes, composites, strict=True):
        grey = np.asarray(oiio.ImageBuf(matte).get_pixels(oiio.FLOAT))
        np.testing.assert_array_equal(grey[..., 0], layers[..., 8])
        np.testing.assert_array_equal(grey[..., 3], layers[..., 8])
