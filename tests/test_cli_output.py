"""What the `vera` CLI shows a user: its version, quiet runs, the model's words, a pool's workers, the progress
bar's ETA through the writing stage and the upload's progress, frame ranges from negative frames."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from vera_engine.imaging.exr import write_exr
from vera_engine.service import Engine, create_server
from vera_engine.service.testing import PassThroughRunner
from vera_plugin import cli
from vera_proto.vera.v1 import engine_pb2 as pb

from .test_nuke import SchemaRunner

pytestmark = pytest.mark.timeout(120)

GIB = 1024**3


@pytest.fixture
def make_engine(tmp_path: Path):
    started = []

    def make(runner=None) -> str:
        engine = Engine(tmp_path / f"spool{len(started)}", runner or PassThroughRunner())
        server, port = create_server(engine, "127.0.0.1", 0)
        engine.start()
        server.start()
        started.append((engine, server))
        return f"127.0.0.1:{port}"

    yield make
    for engine, server in started:
        server.stop(0).wait()
        engine.stop()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"vera {cli._version()}"
    assert cli._version()[0].isdigit()


def test_info_lists_the_words_a_word_level_model_reads(
    make_engine, capsys: pytest.CaptureFixture[str]
) -> None:
    address = make_engine(SchemaRunner(vocabulary=("add", "ball", "red")))
    assert cli.main(["info", "--engine", address]) == cli.EXIT_OK
    assert "    words it reads (3): add ball red\n" in capsys.readouterr().out
    address = make_engine(PassThroughRunner())  # a free-text model: no word list
    assert cli.main(["info", "--engine", address]) == cli.EXIT_OK
    assert "words it reads" not in capsys.readouterr().out


def _worker(name, node, kind, free, total, state=pb.WORKER_STATE_IDLE, device="cpu", job=""):
    return pb.WorkerInfo(
        name=name,
        node=node,
        device=pb.DeviceInfo(name=device, kind=kind, memory_free_bytes=free, memory_total_bytes=total),
        model="vera-tiny",
        state=state,
        job_id=job,
        devices=1,
    )


def test_pool_memory_counts_each_machine_and_gpu_once() -> None:
    workers = [
        # Two CPU workers on one 23.5 GiB machine: each reports the whole machine's memory.
        _worker("ray:1", "node-a", "cpu", int(16.5 * GIB), int(23.5 * GIB)),
        _worker("ray:2", "node-a", "cpu", int(16.6 * GIB), int(23.5 * GIB)),
        # Two GPUs of one node: each its own memory.
        _worker("ray:3", "node-b", "cuda", 70 * GIB, 80 * GIB, device="NVIDIA H100"),
        _worker("ray:4", "node-b", "cuda", 60 * GIB, 80 * GIB, device="NVIDIA H100"),
        _worker("ray:5", "node-c", "cpu", GIB, 2 * GIB, state=pb.WORKER_STATE_LOST),
        pb.WorkerInfo(name="ray:6", state=pb.WORKER_STATE_STARTING),
    ]
    free, total = cli.pool_memory(workers)
    assert total == int(23.5 * GIB) + 160 * GIB
    assert free == int(16.5 * GIB) + 130 * GIB


def test_worker_lines_read_plainly() -> None:
    assert cli.worker_line(pb.WorkerInfo(name="ray:1", state=pb.WORKER_STATE_STARTING)) == (
        "ray:1: starting (no node or device reported yet)"
    )
    busy = _worker("local:0", "render-01", "cuda", 1, 2, pb.WORKER_STATE_BUSY, "NVIDIA H100", job="j1")
    assert cli.worker_line(busy) == "local:0 on render-01: NVIDIA H100 x1, vera-tiny, busy j1"
    busy.devices = 4
    assert cli.worker_line(busy) == "local:0 on render-01: NVIDIA H100 x4, vera-tiny, busy j1"


def _status(stage, progress, detail, eta=None, step=0, total=0):
    status = pb.JobStatus(
        job_id="j",
        state=pb.JOB_STATE_RUNNING,
        stage=stage,
        stage_detail=detail,
        progress=progress,
        step=step,
        total_steps=total,
    )
    if eta is not None:
        status.eta_seconds = eta
    return status


def test_eta_through_the_writing_stage_comes_from_its_own_pace() -> None:
    stream, now = io.StringIO(), [0.0]
    progress = cli.Progress(stream, clock=lambda: now[0])
    progress.update(_status(pb.STAGE_SAMPLING, 0.5, "sampling", eta=12.0, step=5, total=10))
    now[0] = 12.0
    progress.update(_status(pb.STAGE_SAMPLING, 0.9, "sampling", eta=0.0, step=10, total=10))
    now[0] = 13.0
    progress.update(_status(pb.STAGE_WRITING, 0.9, "writing: 0/10 frames", eta=0.0))
    now[0] = 23.0  # 0.02 of the job in 10 s: the 0.08 left take 40 s more
    progress.update(_status(pb.STAGE_WRITING, 0.92, "writing: 2/10 frames", eta=0.0))
    lines = stream.getvalue().splitlines()
    assert "ETA 12s" in lines[0]
    assert "ETA" not in lines[2]  # writing has just begun: not measured yet, rather than a wrong 0 s
    assert lines[-1].endswith("writing: 2/10 frames  ETA 40s")


def test_upload_shows_its_progress() -> None:
    stream = io.StringIO()
    progress = cli.Progress(stream)
    for sent in range(1, 11):
        progress.upload(sent, 10, sent * 3 * 1024 * 1024, 30 * 1024 * 1024)
    lines = stream.getvalue().splitlines()
    # Without a terminal, one line per tenth (logs stay short).
    assert len(lines) == 10
    assert lines[-1].endswith("uploading  10/10 files, 30.0 MiB of 30.0 MiB")
    assert cli.Progress(io.StringIO(), quiet=True).upload(1, 1, 1, 1) is None


def _write_printf_sequence(folder: Path, frames) -> str:
    """A sequence named as printf's %04d names it (Nuke, oiiotool): frame -2 is plate.-002.exr."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for frame in frames:
        write_exr(
            folder / f"plate.{frame:04d}.exr", rng.random((20, 24, 3), dtype=np.float32), ("R", "G", "B")
        )
    return str(folder / "plate.%04d.exr")


def test_quiet_edit_of_negative_frames(
    make_engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = make_engine()
    plate = _write_printf_sequence(tmp_path / "plate", range(-2, 2))
    assert (tmp_path / "plate" / "plate.-002.exr").is_file()
    out = tmp_path / "out"
    # `--frames -2-1` (not only `--frames=-2-1`), a %04d pattern holding negative frames, and -q: nothing on
    # stderr, the result files on stdout.
    code = cli.main(
        [
            "edit",
            "-q",
            "--engine",
            address,
            "--plate",
            plate,
            "--frames",
            "-2-1",
            "--prompt",
            "x",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == cli.EXIT_OK, captured.err
    assert captured.err == ""
    assert sorted(Path(line).name for line in captured.out.split()) == [
        "vera_edit.-001.exr",
        "vera_edit.-002.exr",
        "vera_edit.0000.exr",
        "vera_edit.0001.exr",
    ]
    # Without -q: the upload and the job are reported on stderr.
    code = cli.main(
        [
            "edit",
            "--engine",
            address,
            "--plate",
            plate,
            "--frames",
            "-2--1",
            "--prompt",
            "x",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == cli.EXIT_OK
    assert "uploading  2/2 files" in err and "\njob " in err


def test_panel_without_pyside_says_how_to_install_it_from_the_checkout(monkeypatch, capsys) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "vera_plugin.panel", None)  # as if PySide6 were missing
    assert cli.main(["panel"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "pip install -e '.[ui]'" in err and "vera-edit[ui]" not in err
