"""vera_plugin.hosts.resolve against the fake Resolve object model and a real engine (pass-through runner) on
loopback: which clip, which frames, the render queue, the engine, and the results on the timeline."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import OpenImageIO as oiio
import pytest

from tests.resolve_fake import FakeResolve, frame_code
from vera_engine.imaging.exr import read_exr
from vera_engine.service import Engine, create_server
from vera_engine.service.testing import PassThroughRunner
from vera_plugin.client import EngineClient
from vera_plugin.hosts import resolve as vera_resolve

pytestmark = pytest.mark.timeout(120)

T0 = 86400  # 01:00:00:00 at 24 fps: the timeline's first frame


@pytest.fixture
def runner() -> PassThroughRunner:
    return PassThroughRunner()


@pytest.fixture
def client(tmp_path: Path, runner: PassThroughRunner):
    engine = Engine(tmp_path / "spool", runner)
    server, port = create_server(engine, "127.0.0.1", 0)
    engine.start()
    server.start()
    with EngineClient(f"127.0.0.1:{port}") as c:
        c.wait_until_serving(30)
        yield c
    server.stop(0).wait()
    engine.stop()


def _exr_timeline(tmp_path: Path) -> FakeResolve:
    """V1: plate.[1001-1010].exr trimmed to 1003-1006 at 00:00:02:00; V2: a movie elsewhere; playhead on V1."""
    app = FakeResolve()
    plate = app.media_pool.add_exr_sequence(tmp_path / "media", "plate", 1001, 1010)
    movie = app.media_pool.add_movie("/media/other.mov", 100)
    app.timeline.add_item(plate, track=1, start=T0 + 48, duration=4, left_offset=2)
    app.timeline.add_item(movie, track=2, start=T0 + 200, duration=10)
    app.timeline.playhead = T0 + 50
    return app


def _pixels(files: list[Path]) -> np.ndarray:
    return np.stack([read_exr(f)[0] for f in files])


def test_exr_sequence_is_sent_as_is_and_lands_above_at_the_record_frame(
    tmp_path: Path, client: EngineClient
) -> None:
    app = _exr_timeline(tmp_path)
    clip = vera_resolve.current_clip(app)
    assert (clip.track_index, clip.range.record_start, clip.range.duration) == (1, T0 + 48, 4)
    assert clip.reads_files_directly and clip.frames == [1003, 1004, 1005, 1006]
    assert clip.describe() == "plate.[1001-1010].exr on V1 at 01:00:02:00, 4 frames"

    progress: list[tuple[float, str]] = []
    (placed,) = vera_resolve.run_vera_edit(
        client,
        {"prompt": "add a paper boat", "steps": 2, "seed": 3, "colorspace": "ACEScg"},
        clip=clip,
        resolve=app,
        work_dir=tmp_path / "cache",
        progress=lambda f, m: progress.append((f, m)),
    )
    assert app.project.render_calls == []  # EXR media: no render
    job = client.list_jobs()[-1]
    assert list(job.header.frames) == [1003, 1004, 1005, 1006] and job.header.prompt == "add a paper boat"
    assert job.header.name == "plate.[1001-1010].exr" and job.header.seed == 3

    # The results: a "Vera" bin holding one clip, imported with StartIndex/EndIndex = the plate's frames.
    vera_bin = next(f for f in app.media_pool.root.subfolders if f.name == "Vera")
    assert vera_bin.GetClipList() == [placed.media_pool_item]
    assert placed.media_pool_item.first_frame == 1003 and placed.media_pool_item.frames == 4
    assert placed.media_pool_item.GetClipProperty("Start") == "1003"
    assert app.media_pool.current is app.media_pool.root  # the artist's bin is current again
    # ... on a new top track, at the item's record frame, for its duration.
    assert app.timeline.GetTrackCount("video") == 3 and placed.track_index == 3
    assert app.timeline.GetTrackName("video", 3) == "Vera"
    (item,) = app.timeline.GetItemListInTrack("video", 3)
    assert (item.GetStart(), item.GetEnd(), item.GetLeftOffset()) == (T0 + 48, T0 + 52, 0)
    # Defect 3: the media is addressed in its own frame numbers (GetClipProperty("Start") = 1003), not from 0.
    (call,) = app.media_pool.append_calls[-1]
    assert (call["startFrame"], call["endFrame"], call["recordFrame"]) == (1003, 1007, T0 + 48)
    assert item.GetSourceStartFrame() == 1003
    # The composite of the pass-through engine is the plate: the right frames went, in order.
    files = sorted((tmp_path / "cache" / "results" / job.job_id).glob("vera_edit.*.exr"))
    assert [f.name for f in files] == [f"vera_edit.{f}.exr" for f in (1003, 1004, 1005, 1006)]
    pixels = _pixels(files)
    assert (pixels[..., 0] == app.media_pool.root.clips[0].media_id).all()
    assert list(pixels[:, 0, 0, 1]) == [frame_code(f) for f in (1003, 1004, 1005, 1006)]
    # The matte travels with the result clip: one grey EXR per frame, its matte.A channel.
    mattes = app.media_pool.GetClipMatteList(placed.media_pool_item)
    assert placed.matte_attached and [Path(m).name for m in mattes] == [f.name for f in files]
    for matte, result in zip(mattes, files, strict=True):
        grey = read_exr(matte)[0]
        layers = np.asarray(oiio.ImageBuf(str(result)).get_pixels(oiio.FLOAT))
        np.testing.assert_array_equal(grey[..., 0], layers[..., 8])  # pass-through: an all-zero matte
    assert progress[-1][0] == 1.0 and "Placed 4 frames: take 1 on V3" in progress[-1][1]
    assert placed.colour_space == "" and "davinciYRGB has no per-clip colour space" in placed.colour_note
    assert all(0.0 <= f <= 1.0 for f, _ in progress)

    # Quirk: the playhead's "current item" is now the Vera result on top; the adapter says so.
    with pytest.raises(
        vera_resolve.ResolveError, match=r"is a Vera result .* choose the source clip's track"
    ):
        vera_resolve.current_clip(app)
    assert vera_resolve.current_clip(app, track=1).frames == [1003, 1004, 1005, 1006]


def test_movie_is_rendered_through_the_render_queue_isolated_to_its_track(
    tmp_path: Path, client: EngineClient
) -> None:
    app = FakeResolve()
    movie = app.media_pool.add_movie("/media/interview.mov", 500)
    cover = app.media_pool.add_movie("/media/cutaway.mov", 500)
    app.timeline.add_item(movie, track=1, start=T0 + 10, duration=3, left_offset=40)
    app.timeline.add_item(cover, track=2, start=T0, duration=100)  # covers the interview on the viewer
    app.timeline.playhead = T0 + 11

    assert vera_resolve.current_clip(app).name == "cutaway.mov"  # quirk: the top track's item
    clip = vera_resolve.current_clip(app, track=1)
    assert clip.name == "interview.mov" and not clip.reads_files_directly
    assert clip.frames == [T0 + 10, T0 + 11, T0 + 12]  # movies: the record frames

    app.timeline.SetMarkInOut(5, 30)  # the artist's In/Out
    deliver = app.project.deliver_page()
    (placed,) = vera_resolve.run_vera_edit(
        client, {"prompt": "add a plant", "steps": 1}, clip=clip, resolve=app, work_dir=tmp_path / "cache"
    )
    # Defect 4: the codec was looked up and set by the format's extension ("exr"), not its display name.
    (rendered,) = app.project.rendered_jobs
    assert (rendered["format"], rendered["codec"], rendered["mode"]) == ("exr", "RGBHalfZIP", 1)
    assert rendered["frames"] == [T0 + 10, T0 + 11, T0 + 12]
    # Defect 6: the Deliver page, the marks and the clip switches are as the artist left them; no job is left.
    deliver["track_enables"].append(True)  # the new Vera track
    deliver["clip_enables"].append(True)  # its clip
    assert app.project.deliver_page() == deliver
    job = client.list_jobs()[-1]
    assert list(job.header.frames) == [T0 + 10, T0 + 11, T0 + 12]
    files = sorted((tmp_path / "cache" / "results" / job.job_id).glob("*.exr"))
    pixels = _pixels(files)
    assert (pixels[..., 0] == movie.media_id).all()  # the interview, not the cutaway above it
    assert list(pixels[:, 0, 0, 1]) == [frame_code(f) for f in (40, 41, 42)]  # at the left offset
    assert placed.track_index == 3 and placed.record_frame == T0 + 10
    (item,) = app.timeline.GetItemListInTrack("video", 3)
    assert (item.GetStart(), item.GetDuration()) == (T0 + 10, 3)


def test_builds_reading_end_frame_inclusively_are_corrected(tmp_path: Path, client: EngineClient) -> None:
    app = _exr_timeline(tmp_path)
    app.media_pool.end_frame_inclusive = True
    (placed,) = vera_resolve.run_vera_edit(
        client, {"prompt": "x", "steps": 1}, resolve=app, work_dir=tmp_path / "c"
    )
    assert (placed.timeline_item.GetStart(), placed.timeline_item.GetDuration()) == (T0 + 48, 4)
    assert len(app.timeline.GetItemListInTrack("video", placed.track_index)) == 1
    # Refused with the exclusive end (one past the media for such a build), accepted one shorter.
    assert [call[0]["endFrame"] for call in app.media_pool.append_calls] == [1007, 1006]
    # With handles the exclusive end lies inside the media: placed one frame too long, read back, taken away
    # and placed again.
    app.timeline.playhead = T0 + 50
    (placed,) = vera_resolve.run_vera_edit(
        client, {"prompt": "x", "steps": 1}, track=1, resolve=app, work_dir=tmp_path / "c", handles=2
    )
    item = placed.timeline_item
    assert (item.GetStart(), item.GetDuration(), item.GetLeftOffset(), item.GetRightOffset()) == (
        T0 + 48,
        4,
        2,
        2,
    )
    assert [call[0]["endFrame"] for call in app.media_pool.append_calls[-2:]] == [1007, 1006]
    assert app.timeline.GetItemListInTrack("video", placed.track_index) == [item]


def test_errors_name_the_clip_and_what_to_do(tmp_path: Path, client: EngineClient) -> None:
    app = _exr_timeline(tmp_path)
    app.timeline.playhead = T0 + 100
    with pytest.raises(vera_resolve.ResolveError, match=r"no video clip under the playhead \(01:00:04:04\)"):
        vera_resolve.current_clip(app)
    with pytest.raises(vera_resolve.ResolveError, match=r"track V5 does not exist; .* has V1-V2"):
        vera_resolve.current_clip(app, track=5)
    with pytest.raises(vera_resolve.ResolveError, match=r"no clip on V1 under the playhead \(01:00:04:04\)"):
        vera_resolve.current_clip(app, track=1)
    app.timeline.playhead = T0 + 205
    clip = vera_resolve.current_clip(app)
    app.project.formats.pop("OpenEXR")
    with pytest.raises(vera_resolve.ResolveError, match=r"no EXR render format .* Studio"):
        vera_resolve.exr_frames(clip, tmp_path / "c", app)
    app.timeline.playhead = T0 + 50
    with pytest.raises(vera_resolve.ResolveError, match="the prompt is empty"):
        vera_resolve.run_vera_edit(client, {"prompt": "  "}, resolve=app, work_dir=tmp_path / "c")
    # A clip trimmed past its media on disk.
    plate = app.timeline.item_at(1, T0 + 50)
    plate.left_offset = 8
    with pytest.raises(vera_resolve.ResolveError, match="sequence on disk is 1001-1010; trim the clip"):
        vera_resolve.current_clip(app)


def test_cancel_during_the_render_stops_it_and_restores_the_tracks(tmp_path: Path) -> None:
    app = FakeResolve()
    movie = app.media_pool.add_movie("/media/a.mov", 100)
    app.timeline.add_item(movie, track=1, start=T0, duration=20)
    app.timeline.add_item(app.media_pool.add_movie("/media/b.mov", 100), track=2, start=T0 + 50, duration=5)
    clip = vera_resolve.current_clip(app)
    cancel = threading.Event()

    def progress(fraction: float, message: str) -> None:
        assert message.startswith("Rendering a.mov to EXR (RGB Half (ZIP))")
        if fraction >= 0.2:
            cancel.set()

    deliver = app.project.deliver_page()
    with pytest.raises(vera_resolve.VeraCancelled, match=r"cancelled while rendering a\.mov on V1"):
        vera_resolve.exr_frames(clip, tmp_path, app, progress=progress, cancel=cancel, poll_seconds=0)
    assert app.project.rendering == [] and app.project.deliver_page() == deliver  # defect 6, on cancel


def test_cancel_during_the_engine_job_cancels_it_on_the_engine(tmp_path: Path) -> None:
    runner = PassThroughRunner(step_seconds=0.5, gate_step=1)
    engine = Engine(tmp_path / "spool", runner)
    server, port = create_server(engine, "127.0.0.1", 0)
    engine.start()
    server.start()
    try:
        with EngineClient(f"127.0.0.1:{port}") as client:
            app = _exr_timeline(tmp_path)
            cancel = threading.Event()

            def progress(fraction: float, message: str) -> None:
                if re.search(r"step \d+/\d+", message) and runner.at_gate.wait(10):
                    cancel.set()  # the job was held at step 1; two slow steps remain when it goes on
                    runner.gate.set()

            with pytest.raises(vera_resolve.VeraCancelled, match=r"job \w+ was cancelled"):
                vera_resolve.run_vera_edit(
                    client, {"prompt": "x", "steps": 3}, resolve=app, work_dir=tmp_path / "c",
                    progress=progress, cancel=cancel,
                )  # fmt: skip
            job = client.list_jobs()[-1]
            assert client.wait(job.job_id).state == 5  # JOB_STATE_CANCELLED
            assert app.timeline.GetTrackCount("video") == 2  # nothing placed
    finally:
        runner.gate.set()
        server.stop(0).wait()
        engine.stop()


def test_retimed_clips_are_refused_and_other_rates_rendered(tmp_path: Path, client: EngineClient) -> None:
    app = _exr_timeline(tmp_path)
    item = app.timeline.item_at(1, T0 + 50)
    item.speed = 2.0  # 200%: the timeline shows every other plate frame
    with pytest.raises(vera_resolve.ResolveError, match=r"is retimed: .* \(speed 200%\)\. .* 100% speed"):
        vera_resolve.current_clip(app)
    item.speed = 1.0
    plate = app.media_pool.root.clips[0]
    plate.fps = 25.0  # a 25 fps plate in a 24 fps timeline: Resolve's frame-rate conversion, rendered
    clip = vera_resolve.current_clip(app, track=1)
    assert not clip.reads_files_directly and clip.frames == [T0 + 48 + i for i in range(4)]
    vera_resolve.run_vera_edit(
        client, {"prompt": "x", "steps": 1}, clip=clip, resolve=app, work_dir=tmp_path / "c"
    )
    job = client.list_jobs()[-1]
    files = sorted((tmp_path / "c" / "results" / job.job_id).glob("*.exr"))
    assert list(_pixels(files)[:, 0, 0, 1]) == [frame_code(f) for f in (1003, 1004, 1005, 1006)]


def test_a_failed_render_puts_the_deliver_page_back(tmp_path: Path) -> None:
    app = FakeResolve()
    app.timeline.add_item(app.media_pool.add_movie("/media/a.mov", 100), track=1, start=T0, duration=6)
    app.timeline.add_item(app.media_pool.add_movie("/media/b.mov", 100), track=2, start=T0 + 2, duration=2)
    app.timeline.SetMarkInOut(0, 99)
    app.project.fail_renders = True
    deliver = app.project.deliver_page()
    with pytest.raises(vera_resolve.ResolveError, match=r"render of a\.mov on V1 .* ended Failed: disk full"):
        vera_resolve.exr_frames(vera_resolve.current_clip(app, track=1), tmp_path, app, poll_seconds=0)
    assert app.project.deliver_page() == deliver


def test_deliver_page_is_left_alone_when_it_cannot_be_kept(tmp_path: Path) -> None:
    app = FakeResolve()
    app.timeline.add_item(app.media_pool.add_movie("/media/a.mov", 100), track=1, start=T0, duration=6)
    app.project.presets["taken"] = {}
    deliver = app.project.deliver_page()
    app.project.SaveAsNewRenderPreset = lambda name: False  # e.g. a read-only preset folder
    with pytest.raises(
        vera_resolve.ResolveError, match="could not be put back after rendering; nothing was changed"
    ):
        vera_resolve.exr_frames(vera_resolve.current_clip(app), tmp_path, app, poll_seconds=0)
    assert app.project.deliver_page() == deliver and not app.project.rendered_jobs


@pytest.mark.parametrize(
    ("science", "expected"),
    [
        ("davinciYRGBColorManagedv2", ("Input Color Space", "ACEScg")),
        ("acescct", ("IDT", "ACEScg - CSC")),
    ],
)
def test_the_results_colour_space_is_set_on_their_clip(
    tmp_path: Path, client: EngineClient, science: str, expected: tuple[str, str]
) -> None:
    app = _exr_timeline(tmp_path)
    app.project.SetSetting("colorScienceMode", science)
    before = app.project.GetSetting()
    (placed,) = vera_resolve.run_vera_edit(
        client, {"prompt": "x", "steps": 1, "colorspace": "ACEScg"}, resolve=app, work_dir=tmp_path / "c"
    )
    key, name = expected
    assert placed.media_pool_item.GetClipProperty(key) == name and placed.colour_space == name
    assert placed.colour_note == f"clip {key} set to {name!r}"
    assert app.project.GetSetting() == before  # nothing project-wide changed
    # A space the project does not know by any of its names: said, with what to do.
    app.timeline.playhead = T0 + 50
    (placed,) = vera_resolve.run_vera_edit(
        client,
        {"prompt": "x", "steps": 1, "colorspace": "Linear Rec.709 (sRGB)"},
        track=1,
        resolve=app,
        work_dir=tmp_path / "c",
    )
    if key == "Input Color Space":
        assert placed.colour_space == "Rec.709 Linear"
    else:
        assert placed.colour_space == "sRGB (Linear) - CSC"


def test_handles_come_from_the_media_when_it_has_them(tmp_path: Path, client: EngineClient) -> None:
    app = _exr_timeline(tmp_path)  # plate 1001-1010, the item shows 1003-1006
    (placed,) = vera_resolve.run_vera_edit(
        client, {"prompt": "x", "steps": 1}, resolve=app, work_dir=tmp_path / "c", handles=5
    )
    job = client.list_jobs()[-1]
    assert list(job.header.frames) == list(range(1001, 1011))  # 2 before (all there is), 4 after
    item = placed.timeline_item
    assert (item.GetStart(), item.GetDuration(), item.GetLeftOffset(), item.GetRightOffset()) == (
        T0 + 48,
        4,
        2,
        4,
    )
    assert placed.media_pool_item.GetClipProperty("Start") == "1001"
    # A movie has no frames beyond the item on the timeline: no handles, frames as shown.
    movie = app.media_pool.add_movie("/media/m.mov", 200)
    app.timeline.add_item(movie, track=1, start=T0 + 300, duration=3, left_offset=20)
    app.timeline.playhead = T0 + 301
    clip = vera_resolve.current_clip(app, track=1)
    assert clip.with_handles(5) == ([T0 + 300, T0 + 301, T0 + 302], 0, 0)


def test_takes_are_placed_one_or_all_stacked(tmp_path: Path) -> None:
    from .test_nuke import SchemaRunner

    engine = Engine(tmp_path / "spool", SchemaRunner())
    server, port = create_server(engine, "127.0.0.1", 0)
    engine.start()
    server.start()
    try:
        with EngineClient(f"127.0.0.1:{port}") as client:
            app = _exr_timeline(tmp_path)
            (placed,) = vera_resolve.run_vera_edit(
                client, {"prompt": "x", "steps": 1, "takes": 3, "seed": 10}, resolve=app, work_dir=tmp_path / "c",
                take=2,
            )  # fmt: skip
            assert placed.take == 2 and placed.track_index == 3
            assert placed.sequence.pattern.endswith("vera_edit_take2.%04d.exr")
            assert app.timeline.GetTrackName("video", 3) == "Vera take 2"
            app.timeline.playhead = T0 + 50
            placements = vera_resolve.run_vera_edit(
                client, {"prompt": "x", "steps": 1, "takes": 3}, track=1, resolve=app, work_dir=tmp_path / "c",
                take="all",
            )  # fmt: skip
            assert [(p.take, p.track_index) for p in placements] == [(1, 6), (2, 5), (3, 4)]  # take 1 on top
            assert [app.timeline.GetTrackName("video", t) for t in (4, 5, 6)] == [
                "Vera take 3",
                "Vera take 2",
                "Vera take 1",
            ]
            assert all(p.timeline_item.GetStart() == T0 + 48 for p in placements)
            with pytest.raises(vera_resolve.ResolveError, match="the job has takes 1, 2, 3, not take 5"):
                job = client.list_jobs()[-1].job_id
                files = sorted((tmp_path / "c" / "results" / job).glob("vera_edit*.exr"))
                vera_resolve.place_takes(vera_resolve.current_clip(app, track=1), files, 5, app)
    finally:
        server.stop(0).wait()
        engine.stop()
