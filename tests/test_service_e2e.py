"""The engine as a real process running the tiny random-weight Vera pipeline: crash recovery, concurrency,
cancellation and the real runner's output."""

from __future__ import annotations

import itertools
import sqlite3
import threading
from pathlib import Path

import numpy as np
import OpenImageIO as oiio
import pytest

from vera_engine.service.testing import EngineProcess, tiny_model_dir
from vera_plugin.client import EngineClient
from vera_proto.vera.v1 import engine_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.getbasetemp())


def _plate(frames: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((frames, 40, 48, 3), dtype=np.float32) * 0.8


def _read(path: Path) -> tuple[np.ndarray, oiio.ImageSpec]:
    inp = oiio.ImageInput.open(str(path))
    spec = inp.spec()
    pixels = np.asarray(inp.read_image(0, 0, 0, spec.nchannels, "float")).reshape(spec.height, spec.width, -1)
    inp.close()
    return pixels, spec


def test_real_runner_info_and_result(tiny_model: Path, tmp_path: Path) -> None:
    with EngineProcess(tmp_path / "spool", tiny_model) as engine, EngineClient(engine.address) as client:
        client.wait_until_serving(120)
        info = client.info()
        model = info.models[0]
        assert (model.native_width, model.native_height, model.frame_window) == (32, 32, 4)
        assert (
            len(model.weights_hash) == 64 and info.device.kind == "cpu" and info.device.memory_total_bytes > 0
        )
        colorspaces = next(o for o in model.options if o.name == "colorspace").choices
        assert colorspaces[0] == "ACEScg" and "Linear Rec.709 (sRGB)" in colorspaces
        plate = _plate()
        mask = np.zeros(plate.shape[:3], np.float32)
        mask[:, 10:30, 10:30] = 1.0
        job = client.submit_arrays(
            plate, [1001, 1002, 1003], prompt="add a red ball", mask=mask, steps=3, seed=5
        )
        statuses: list[pb.JobStatus] = []
        final = client.wait(job, callback=statuses.append, previews=True)
        assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
        assert [s.step for s in statuses if s.total_steps and s.state == pb.JOB_STATE_RUNNING][-1] == 3
        assert any(s.HasField("preview") and s.preview.width > 0 for s in statuses)
        assert any(s.HasField("eta_seconds") for s in statuses)
        files = client.fetch(job, tmp_path / "out")
        assert [f.name for f in files] == ["vera_edit.1001.exr", "vera_edit.1002.exr", "vera_edit.1003.exr"]
        pixels, spec = _read(files[0])
        assert spec.channelnames == ("R", "G", "B", "A", "edit.R", "edit.G", "edit.B", "edit.A", "matte.A")
        assert (spec.width, spec.height) == (48, 40) and np.isfinite(pixels).all()
        assert (
            spec.getattribute("vera/job_id") == job and spec.getattribute("vera/prompt") == "add a red ball"
        )
        assert spec.getattribute("vera/model_hash") == model.weights_hash
        assert spec.getattribute("vera/task") == "object_addition"


def test_kill_9_mid_job_then_restart_completes_the_job(tiny_model: Path, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    plate = _plate(seed=1)
    engine = EngineProcess(spool, tiny_model).start()
    try:
        with EngineClient(engine.address) as client:
            client.wait_until_serving(120)
            finished = client.submit_arrays(plate[:1], [7], prompt="add a boat", steps=1)
            assert client.wait(finished).state == pb.JOB_STATE_SUCCEEDED
            interrupted = client.submit_arrays(plate, [1, 2, 3], prompt="add a boat", steps=12, seed=11)
            queued = client.submit_arrays(plate, [1, 2, 3], prompt="add a boat", steps=12, seed=11)
            # A client following the job keeps following it across the crash and the restart.
            followed: list[pb.JobStatus] = []
            follower = threading.Thread(
                target=lambda: followed.append(EngineClient(engine.address).wait(interrupted))
            )
            follower.start()
            for status in client.watch(interrupted):
                if status.state == pb.JOB_STATE_RUNNING and status.step >= 2:
                    break
            engine.kill()  # SIGKILL mid-job: no clean-up at all
    finally:
        engine.kill()
    port = engine.port
    with sqlite3.connect(spool / "jobs.sqlite") as db:
        states = dict(db.execute("SELECT id, state FROM jobs").fetchall())
    assert states == {
        finished: pb.JOB_STATE_SUCCEEDED,
        interrupted: pb.JOB_STATE_RUNNING,
        queued: pb.JOB_STATE_QUEUED,
    }

    with (
        EngineProcess(spool, tiny_model, extra=["--port", str(port)]) as engine,
        EngineClient(engine.address) as client,
    ):
        first, second = client.wait(interrupted), client.wait(queued)
        follower.join(60)
        assert followed and followed[0].state == pb.JOB_STATE_SUCCEEDED
        assert first.state == second.state == pb.JOB_STATE_SUCCEEDED, (first.error, second.error)
        assert first.attempts == 2 and second.attempts == 1
        resumed = client.fetch(interrupted, tmp_path / "a")
        clean = client.fetch(queued, tmp_path / "b")
        # Results finished before the crash are still served.
        assert [f.name for f in client.fetch(finished, tmp_path / "c")] == ["vera_edit.0007.exr"]
    assert [f.name for f in resumed] == ["vera_edit.0001.exr", "vera_edit.0002.exr", "vera_edit.0003.exr"]
    # Nothing lost: the resumed job's result is exactly what an uninterrupted run of the same job gives.
    for a, b in zip(resumed, clean, strict=True):
        np.testing.assert_array_equal(_read(a)[0], _read(b)[0])


def test_four_clients_three_jobs_each_complete_in_order(tiny_model: Path, tmp_path: Path) -> None:
    with EngineProcess(tmp_path / "spool", tiny_model) as engine:
        with EngineClient(engine.address) as client:
            client.wait_until_serving(120)
        jobs: list[str] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def one_client(index: int) -> None:
            try:
                with EngineClient(engine.address) as client:
                    for j in range(3):
                        job = client.submit_arrays(
                            _plate(2, seed=index), prompt=f"client {index} job {j}", steps=2
                        )
                        with lock:
                            jobs.append(job)
                    for job in list(jobs):
                        client.wait(job)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one_client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors
        with EngineClient(engine.address) as client:
            finals = [client.wait(job) for job in jobs]
    assert len(finals) == 12 and all(f.state == pb.JOB_STATE_SUCCEEDED for f in finals)
    ordered = sorted(finals, key=lambda f: f.sequence)
    starts = [f.started_at for f in ordered]
    assert starts == sorted(starts)  # FIFO: started in submission order
    for earlier, later in itertools.pairwise(ordered):
        assert earlier.finished_at <= later.started_at  # one worker: one job at a time


def test_cancel_mid_run_stops_the_pipeline(tiny_model: Path, tmp_path: Path) -> None:
    # Also `--model default`, which $VERA_MODEL points at a studio's own checkpoint.
    with (
        EngineProcess(tmp_path / "spool", "default", env={"VERA_MODEL": str(tiny_model)}) as engine,
        EngineClient(engine.address) as client,
    ):
        client.wait_until_serving(120)
        job = client.submit_arrays(_plate(), prompt="add a ball", steps=200)
        for status in client.watch(job):
            if status.state == pb.JOB_STATE_RUNNING and status.step >= 2:
                break
        status = client.cancel(job)
        assert status.state == pb.JOB_STATE_CANCELLED
        assert not (tmp_path / "spool" / "jobs" / job / "out").exists()
        # The engine carries on with the next job.
        nxt = client.submit_arrays(_plate(), prompt="add a ball", steps=2)
        assert client.wait(nxt).state == pb.JOB_STATE_SUCCEEDED
        assert client.health() == "SERVING"


def test_exr_plate_with_overscan_keeps_windows_and_plate_pixels(tiny_model: Path, tmp_path: Path) -> None:
    from vera_engine.imaging.exr import Window, write_exr

    rng = np.random.default_rng(3)
    data, display = Window(-8, -4, 64, 48), Window(0, 0, 48, 40)
    plates = rng.random((2, 48, 64, 4), dtype=np.float32)
    for i, frame in enumerate((101, 102)):
        write_exr(
            tmp_path / f"plate.{frame}.exr", plates[i], "RGBA", data_window=data, display_window=display
        )
    with EngineProcess(tmp_path / "spool", tiny_model) as engine, EngineClient(engine.address) as client:
        client.wait_until_serving(120)
        job = client.submit_files(str(tmp_path / "plate.###.exr"), [101, 102], prompt="add a ball", steps=2)
        final = client.wait(job)
        assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
        files = client.fetch(job, tmp_path / "out")
    pixels, spec = _read(files[0])
    assert (spec.x, spec.y, spec.width, spec.height) == tuple(data)
    assert (spec.full_x, spec.full_y, spec.full_width, spec.full_height) == tuple(display)
    matte = pixels[..., 8]
    untouched = matte == 0
    assert untouched.any()
    half_plate = plates[0].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(pixels[..., :4][untouched], half_plate[untouched])


def test_step_cache_is_per_job_and_exact_jobs_stay_exact(tiny_model: Path, tmp_path: Path) -> None:
    with EngineProcess(tmp_path / "spool", tiny_model) as engine, EngineClient(engine.address) as client:
        client.wait_until_serving(120)
        spec = next(o for o in client.info().models[0].options if o.name == "step_cache")
        assert spec.default.string_value == "none" and "taylorseer:2" in spec.choices
        plate = _plate(frames=2)
        results = {}
        for name, options in (("exact", {}), ("cached", {"step_cache": "taylorseer:2"}), ("exact again", {})):
            job = client.submit_arrays(plate, [1, 2], prompt="add a red ball", steps=8, seed=3, **options)
            final = client.wait(job)
            assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
            pixels, exr = _read(client.fetch(job, tmp_path / name.replace(" ", "_"))[0])
            results[name] = pixels
            assert exr.getattribute("vera/step_cache") == options.get("step_cache", "none")
        # The cache skipped work and so changed the result; it was gone again for the next job.
        assert not np.array_equal(results["cached"], results["exact"])
        assert np.array_equal(results["exact again"], results["exact"])


def test_speed_and_memory_flags_reach_the_pipeline_and_keep_results_exact(
    tiny_model: Path, tmp_path: Path
) -> None:
    plate = _plate(frames=2)
    results = []
    flags = (
        [],
        [
            "--attention-backend",
            "native",
            "--group-offload",
            "1",
            "--text-encoder-offload",
            "swap",
            "--vae-tiling",
        ],
    )
    for index, extra in enumerate(flags):
        with (
            EngineProcess(tmp_path / f"spool{index}", tiny_model, extra=extra) as engine,
            EngineClient(engine.address) as client,
        ):
            client.wait_until_serving(120)
            job = client.submit_arrays(plate, [1, 2], prompt="add a red ball", steps=3, seed=3)
            final = client.wait(job)
            assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
            results.append(_read(client.fetch(job, tmp_path / f"out{index}")[0])[0])
            log = "".join(engine.log)
            assert "attention backend native" in log
            if extra:
                assert (
                    "memory: group_offload: transformer blocks live in CPU memory, 1 block(s) at a time"
                    in log
                )
                assert "memory: text_encoder_offload" in log and "memory: vae_tiling: skipped" in log
            else:
                assert "memory:" not in log
    # Group offloading and the text encoder's swap are exact; the space-to-depth codec has nothing to tile.
    assert np.array_equal(results[0], results[1])


def test_words_a_word_level_model_cannot_read_are_reported(tmp_path: Path) -> None:
    import dataclasses

    from vera_engine.pipelines.presets import TINY, build_random_pipeline

    words = dataclasses.replace(TINY, name="tiny-words", tokenizer="word", max_sequence_length=16)
    model = tmp_path / "words-model"
    build_random_pipeline(words, vocabulary=["add a red ball"]).save_pretrained(model)
    with EngineProcess(tmp_path / "spool", model) as engine, EngineClient(engine.address) as client:
        client.wait_until_serving(120)
        stages = {}
        for prompt in ("add a red ball", "add a purple ball quickly"):
            seen: list[str] = []
            job = client.submit_arrays(_plate(frames=1), [1], prompt=prompt, steps=2)
            final = client.wait(job, callback=lambda s, seen=seen: seen.append(s.stage_detail))
            assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
            _, exr = _read(client.fetch(job, tmp_path / f"out{len(stages)}")[0])
            stages[prompt] = (seen, exr.getattribute("vera/unknown_words"))
    assert stages["add a red ball"][1] == "none" and "sampling" in stages["add a red ball"][0]
    seen, unknown = stages["add a purple ball quickly"]
    assert unknown == "purple, quickly"
    assert "sampling (unknown words: purple, quickly)" in seen
