"""Issue 25 (Resolve items 1, 2 and 4-8) and issue 28 item 2, against the fake Resolve, whose modelled behaviour
(the UIManager's timers and GIL, the pages, render layouts, dead AppendToTimeline items, free Resolve) is cited
beside each faked method in tests/resolve_fake.py. Engine: the pass-through runner on loopback."""

from __future__ import annotations

import io
import re
import runpy
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from tests.resolve_fake import FakeDispatcher, FakeFusion, FakeResolve, FakeUI, GilBoundClient
from vera_plugin.client import EngineClient
from vera_plugin.hosts import resolve as vera_resolve
from vera_plugin.hosts.resolve.window import VeraEditWindow

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
T0 = 86400


def _resolve(tmp_path: Path, page: str = "edit") -> FakeResolve:
    app = FakeResolve(page=page)
    plate = app.media_pool.add_exr_sequence(tmp_path / "media", "plate", 1001, 1010)
    movie = app.media_pool.add_movie("/media/interview.mov", 300)
    app.timeline.add_item(plate, track=1, start=T0 + 48, duration=4, left_offset=2)
    app.timeline.add_item(movie, track=1, start=T0 + 100, duration=3, left_offset=10)
    app.timeline.playhead = T0 + 50
    return app


def _window_in_run_loop(
    tmp_path: Path, app: FakeResolve, address: str, **kwargs: Any
) -> tuple[VeraEditWindow, FakeDispatcher]:
    ui = FakeUI()
    dispatcher = FakeDispatcher(ui, max_seconds=30)

    def factory(address: str, **options: Any) -> Any:
        return GilBoundClient(EngineClient(address, **options), dispatcher.gil)

    window = VeraEditWindow(ui, dispatcher, app, address=address, work_dir=tmp_path / "cache",
                            client_factory=factory, close_when_done=True, **kwargs)  # fmt: skip

    def generate(_: FakeDispatcher) -> None:
        window.items["opt_prompt"].PlainText = "add a paper boat"
        window.items["opt_steps"].Value = 1
        window.window.On.Generate.Clicked({})

    dispatcher.at(0.05, generate)
    return window, dispatcher


@pytest.mark.parametrize("track", ["top", "V1 movie"])
def test_the_window_finishes_inside_resolves_run_loop(
    tmp_path: Path, passthrough_engine: str, track: str
) -> None:
    """Items 1 and 2: timer timeouts reach only On.Timeout, and RunLoop holds the GIL between callbacks. The
    window must still tick, and its engine thread must get to run: the job is placed well before the fake
    loop's 30 s safety net (without yielding, the worker only runs when it wins a race for the GIL)."""
    app = _resolve(tmp_path)
    if track != "top":
        app.timeline.playhead = T0 + 101  # the movie: rendered through the queue by the timer first
    window, dispatcher = _window_in_run_loop(tmp_path, app, passthrough_engine)
    window.run()
    assert not dispatcher.timed_out, "\n".join(window.log_lines)
    assert window.results == ["placed"], "\n".join(window.log_lines)
    assert window.ticks >= 1 and dispatcher.exited


def test_free_resolve_without_a_uimanager_says_studio_is_needed(tmp_path: Path) -> None:
    """Item 7: free Resolve 19.1+ has fusion.UIManager None; the script says so in its own words."""
    out = io.StringIO()
    with redirect_stdout(out):
        runpy.run_path(
            str(REPO / "resolve_scripts" / "Utility" / "Vera Edit.py"),
            init_globals={"resolve": _resolve(tmp_path), "fusion": FakeFusion(ui_manager=False), "bmd": None},
        )
    text = out.getvalue()
    assert text.startswith("Vera Edit: Vera Edit needs DaVinci Resolve Studio") and "UIManager" in text, text
    assert "Traceback" not in text


def test_the_clip_is_found_from_the_fusion_or_media_page(tmp_path: Path) -> None:
    """Item 6: the playhead can be read only on the Cut, Edit, Color, Fairlight and Deliver pages."""
    app = _resolve(tmp_path, page="fusion")
    clip = vera_resolve.current_clip(app, track=1)
    assert clip.frames == [1003, 1004, 1005, 1006] and app.GetCurrentPage() == "edit"
    app.OpenPage("media")
    assert vera_resolve.current_clip(app).name.startswith("plate.")


def test_results_of_any_take_are_refused_as_a_source(tmp_path: Path) -> None:
    """Item 8: a take-2 result (vera_edit_take2.*) on the timeline is a result, not a source."""
    app = _resolve(tmp_path)
    take2 = app.media_pool.add_exr_sequence(tmp_path / "res", "vera_edit_take2", 1001, 1004)
    app.timeline.add_item(take2, track=2, start=T0 + 48, duration=4)
    with pytest.raises(vera_resolve.ResolveError, match=r"is a Vera result \(vera_edit_take2\."):
        vera_resolve.current_clip(app)


def test_a_dead_item_from_append_to_timeline_is_retried_inclusively(tmp_path: Path) -> None:
    """Item 5: builds reading endFrame inclusively, answering a refusal with a dead item (getters None)."""
    app = _resolve(tmp_path)
    app.media_pool.end_frame_inclusive = True
    app.media_pool.dead_items = True
    media = app.media_pool.add_exr_sequence(tmp_path / "four", "four", 1, 4)
    app.timeline.AddTrack("video")
    item = vera_resolve.append_checked(app.media_pool, app.timeline, media, 1, 4, 2, T0 + 200)
    assert item is not None and item.GetDuration() == 4 and item.GetStart() == T0 + 200


def test_rendered_frames_are_found_in_sub_folders_whatever_their_numbers(
    tmp_path: Path, passthrough_engine: str
) -> None:
    """Item 4: Deliver presets can nest the files and number them from another start than the timeline's."""
    app = _resolve(tmp_path)
    app.project.render_subfolder = "interview/v001"
    app.project.render_first_number = 0
    app.timeline.playhead = T0 + 101
    clip = vera_resolve.current_clip(app)
    frames = vera_resolve.exr_frames(clip, tmp_path / "work", app, poll_seconds=0.0)
    assert [Path(p).parent.name for p in frames.paths] == ["v001"] * 3
    assert frames.frames == [T0 + 100, T0 + 101, T0 + 102] and app.project.jobs == {}


def test_a_stopped_render_leaves_no_job_in_the_queue(tmp_path: Path) -> None:
    """Item 13 (the stop): StopRendering returns before the render stops; the job is deleted once it has."""
    app = _resolve(tmp_path)
    app.timeline.playhead = T0 + 101
    clip = vera_resolve.current_clip(app)
    render = vera_resolve.ExrRender(app.project, clip, tmp_path / "r")
    render.start()
    render.stop()
    assert app.project.jobs == {} and render.restore_problems == []


def test_results_go_to_the_jobs_folder_and_only_vera_names_are_fetched(
    tmp_path: Path, passthrough_engine: str
) -> None:
    """Issue 28 item 2: a job id that is not a plain name never becomes a folder; names the engine lists that are
    not Vera results are refused before anything is written."""
    from vera_proto.vera.v1 import engine_pb2 as pb

    with pytest.raises(vera_resolve.ResolveError, match="not a plain name"):
        vera_resolve.results_folder(tmp_path, "../../../..")
    assert vera_resolve.results_folder(tmp_path, "a" * 32) == tmp_path / "results" / ("a" * 32)
    with EngineClient(passthrough_engine) as client:
        final = pb.JobStatus(
            job_id="a" * 32, state=pb.JOB_STATE_SUCCEEDED, output_files=["vera_edit.1001.exr", ".bashrc"]
        )
        with pytest.raises(vera_resolve.ResolveError, match=r"\['.bashrc'\].*Not fetched"):
            vera_resolve.fetch_results(client, "a" * 32, tmp_path / "out", final=final)
    assert not (tmp_path / "out").exists()


def test_the_window_connects_with_the_panels_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 28 item 2: the window takes $VERA_TOKEN_FILE (and $VERA_CA_CERT, $VERA_SERVER_NAME) as the panel."""
    from .test_nuke import InProcessEngine

    eng = InProcessEngine(tmp_path / "spool", tokens=("s3cret-token-for-the-window",))
    try:
        token = tmp_path / "token"
        token.write_text("s3cret-token-for-the-window\n")
        token.chmod(0o600)
        monkeypatch.setenv("VERA_TOKEN_FILE", str(token))
        ui = FakeUI()
        window = VeraEditWindow(ui, FakeDispatcher(ui), _resolve(tmp_path), address=eng.address)
        window.connect()
        assert window.client is not None, window.log_lines
        window.client.close()
    finally:
        eng.stop()


def test_every_host_follows_a_job_one_way_with_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 15: the Resolve adapter, Nuke's Generate (run_generate), the panel's job list and ``vera edit`` follow
    a job through vera_plugin.generate.follow_job, and a failed job reads the same everywhere."""
    import threading

    from vera_engine.service.testing import PassThroughRunner
    from vera_plugin import cli, generate, panel
    from vera_proto.vera.v1 import engine_pb2 as pb

    from .test_nuke import InProcessEngine, write_plate

    followed: list[str] = []
    real = generate.follow_job

    def spy(client: Any, job_id: str, *args: Any, **kwargs: Any) -> Any:
        followed.append(job_id)
        return real(client, job_id, *args, **kwargs)

    for module in (generate, cli, panel):
        monkeypatch.setattr(module, "follow_job", spy)
    eng = InProcessEngine(tmp_path / "spool", PassThroughRunner(fail_prompt="break"))
    try:
        pattern = write_plate(tmp_path / "plate")
        sentences = {}
        with EngineClient(eng.address) as client:
            job = client.submit_files(pattern, [1001, 1002, 1003], prompt="break")
            with pytest.raises(vera_resolve.ResolveError) as resolve_error:
                vera_resolve.follow_job(client, job)
            sentences["resolve"] = (job, str(resolve_error.value))
            # The panel's list, watching the same kind of job to its end.
            job = client.submit_files(pattern, [1001, 1002, 1003], prompt="break")
            seen: list[pb.JobStatus] = []
            with pytest.raises(generate.GenerateError) as panel_error:
                generate.follow_job(
                    client, job, panel._QuietSink(), on_status=seen.append, stop=threading.Event().is_set
                )
            sentences["panel"] = (job, str(panel_error.value))
        request = generate.GenerateRequest(
            eng.address, "break", {}, [1001, 1002, 1003], pattern, tmp_path / "c"
        )
        with pytest.raises(generate.GenerateError) as nuke_error:
            generate.run_generate(request, panel._QuietSink())
        sentences["nuke"] = (followed[-1], str(nuke_error.value))
        code = cli.main(["edit", "--engine", eng.address, "--plate", pattern, "--frames", "1001-1003",
                         "--prompt", "break", "--out", str(tmp_path / "out"), "--quiet"])  # fmt: skip
        err = capsys.readouterr().err
        assert code == cli.EXIT_JOB_FAILED
        sentences["cli"] = (followed[-1], err.strip().splitlines()[-1].removeprefix("vera edit: "))
    finally:
        eng.stop()
    assert len(followed) == 4
    for host, (job, sentence) in sentences.items():
        assert re.fullmatch(rf"job {job} failed on the engine: .*told to fail on prompt 'break'", sentence), (
            host,
            sentence,
        )


def test_a_rendered_clip_is_declared_in_the_projects_output_space(tmp_path: Path) -> None:
    """Item 3: Resolve renders in the project's output space (Rec.709 Gamma 2.4 by default). With an engine that
    offers that space the frames are sent as it and the results' clip declares it; with one that offers only
    scene-linear spaces the window says the colours will be off instead of sending them silently as ACEScg."""
    from vera_engine.imaging.exr import COLOUR_COMPRESSIONS
    from vera_engine.service.schema import ModelDefaults, model_info
    from vera_engine.service.testing import PassThroughRunner

    from .test_nuke import InProcessEngine

    class DisplaySpaces(PassThroughRunner):
        def models(self) -> list[Any]:
            defaults = ModelDefaults(
                name="passthrough", native_height=32, native_width=32, frame_window=4, steps=1
            )
            spaces = ["ACEScg", "Linear Rec.709 (sRGB)", "Gamma 2.4 Rec.709 - Texture"]
            return [model_info(defaults, spaces, COLOUR_COMPRESSIONS)]

    for runner, sent in ((DisplaySpaces(), "Gamma 2.4 Rec.709 - Texture"), (PassThroughRunner(), "ACEScg")):
        eng = InProcessEngine(tmp_path / f"spool-{sent[:5]}", runner)
        try:
            app = _resolve(tmp_path)
            app.project.SetSetting("colorScienceMode", "davinciYRGBColorManagedv2")
            app.timeline.playhead = T0 + 101  # the movie: rendered
            window, _ = _window_in_run_loop(tmp_path, app, eng.address)
            window.run()
            log = "\n".join(window.log_lines)
            assert window.results == ["placed"], log
            with EngineClient(eng.address) as client:
                job = client.list_jobs()[-1]
            assert job.header.colorspace == sent, log
            placed = window.placements[0].media_pool_item
            if sent.startswith("Gamma"):
                assert "Colour: rendered frames are Rec.709 Gamma 2.4 (sent as" in log
                assert placed.GetClipProperty("Input Color Space") == "Rec.709 Gamma 2.4"
            else:
                assert "which this engine does not offer as a plate colour space" in log, log
        finally:
            eng.stop()


def test_the_selftest_render_checks_hold_whatever_the_deliver_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 13: the self-test's render check must not assume timeline frame numbers or flat output, and its stop
    check must see the queue empty once StopRendering has taken effect."""
    from tests import resolve_fake
    from vera_plugin.hosts.resolve.selftest import SelfTest

    original = resolve_fake.FakeProject.__init__

    def nested(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.render_subfolder, self.render_first_number = "Vera self-test/v001", 0

    monkeypatch.setattr(resolve_fake.FakeProject, "__init__", nested)
    lines: list[str] = []
    test = SelfTest(FakeResolve(), tmp_path / "st", out=lines.append).run()
    verdicts = {line.split(":")[0].split(None, 1)[1]: line.split()[0] for line in lines}
    assert verdicts["render 3 frames"] == "PASS" and verdicts["render stopped half way"] == "PASS", lines
    assert test.failures == 0, "\n".join(lines)
