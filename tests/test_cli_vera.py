"""The `vera` CLI as a script would use it: real subprocesses, real engine, exit codes and output."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vera_engine.imaging.exr import write_exr
from vera_engine.service import Engine, create_server
from vera_engine.service.testing import EngineProcess, PassThroughRunner, tiny_model_dir
from vera_plugin import cli
from vera_plugin.client import EngineClient
from vera_proto.vera.v1 import engine_pb2 as pb

pytestmark = pytest.mark.timeout(240)


def vera(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the `vera` command (same entry point as the console script) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "vera_plugin.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_sequence(folder: Path, frames, channels=("R", "G", "B", "A"), seed=0) -> str:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for frame in frames:
        pixels = rng.random((40, 48, len(channels)), dtype=np.float32)
        write_exr(folder / f"{folder.name}.{frame:04d}.exr", pixels, channels)
    return str(folder / f"{folder.name}.####.exr")


@pytest.fixture
def passthrough_engine(tmp_path: Path):
    """A model-free engine in this process, for exit-code tests."""
    made = []

    def make(tokens=(), step_seconds: float = 0.0, **kw) -> str:
        engine = Engine(tmp_path / f"spool{len(made)}", PassThroughRunner(step_seconds=step_seconds), **kw)
        server, port = create_server(engine, "127.0.0.1", 0, tokens=tokens)
        engine.start()
        server.start()
        made.append((engine, server))
        return f"127.0.0.1:{port}"

    yield make
    for engine, server in made:
        server.stop(0).wait()
        engine.stop()


def test_exit_codes_a_script_can_rely_on(passthrough_engine, tmp_path: Path) -> None:
    assert cli.EXIT_UNREACHABLE == 3 and cli.EXIT_NOT_FOUND == 7
    plate = write_sequence(tmp_path / "plate", [1, 2])
    args = ["--plate", plate, "--frames", "1-2", "--prompt", "x", "--out", str(tmp_path / "out")]

    result = vera("edit", "--engine", "127.0.0.1:1", "--timeout", "2", *args)
    assert result.returncode == 3 and "UNAVAILABLE" in result.stderr
    # Says which address was tried and how to start an engine, not only gRPC's own words.
    assert "no Vera engine answers at 127.0.0.1:1" in result.stderr and "vera-engine serve" in result.stderr

    address = passthrough_engine()
    result = vera("edit", "--engine", address, *args[:-4], "--prompt", "", "--out", str(tmp_path / "o"))
    assert result.returncode == 4 and "header.prompt" in result.stderr
    result = vera(
        "edit",
        "--engine",
        address,
        "--plate",
        plate,
        "--frames",
        "1-3",
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2 and "plate: 1 of 3 frames missing" in result.stderr
    assert "uploading" not in result.stderr  # found missing before anything is said about uploading
    result = vera(
        "edit",
        "--engine",
        address,
        "--plate",
        plate,
        "--frames",
        "3-1",
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2 and "--frames" in result.stderr
    result = vera("cancel", "nope", "--engine", address)
    assert result.returncode == 7 and "NOT_FOUND" in result.stderr
    result = vera("fetch", "nope", "--engine", address, "--out", str(tmp_path / "f"))
    assert result.returncode == 7
    assert vera("edit", "--engine", address).returncode == 2  # argparse usage errors: 2 as well

    secured = passthrough_engine(tokens=["s3cret"])
    result = vera("info", "--engine", secured)
    assert result.returncode == 5 and "UNAUTHENTICATED" in result.stderr
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    info = vera("info", "--engine", secured, "--token-file", str(token))
    assert info.returncode == 0
    assert (
        "limits   10000 frames of 16..16384 px a side, 2 GiB a frame; prompt 2000 characters" in info.stdout
    )

    busy = passthrough_engine(queue_capacity=1, step_seconds=0.05)
    first = vera(
        "edit", "--engine", busy, *args[:-2], "--steps", "200", "--detach", "--out", str(tmp_path / "o")
    )
    second = vera(
        "edit", "--engine", busy, *args[:-2], "--steps", "200", "--detach", "--out", str(tmp_path / "o")
    )
    assert first.returncode == 0 and second.returncode in (0, 6)
    if second.returncode == 0:  # the first had already started: the second fills the queue
        second = vera("edit", "--engine", busy, *args[:-2], "--detach", "--out", str(tmp_path / "o"))
    assert second.returncode == 6 and "RESOURCE_EXHAUSTED" in second.stderr
    listed = json.loads(vera("jobs", "--engine", busy, "--json").stdout)
    assert first.stdout.strip() in [j["job_id"] for j in listed]
    for job in listed:
        cancelled = vera("cancel", job["job_id"], "--engine", busy)
        assert cancelled.returncode == 0 and cancelled.stdout.split() == [job["job_id"], "cancelled"]
    # A job that already ended cannot be cancelled (4); fetching a cancelled job says so and exits 8.
    again = vera("cancel", first.stdout.strip(), "--engine", busy)
    assert again.returncode == 4 and "already ended (JOB_STATE_CANCELLED)" in again.stderr
    fetched = vera("fetch", first.stdout.strip(), "--engine", busy, "--out", str(tmp_path / "f"))
    assert fetched.returncode == 8 and "was cancelled" in fetched.stderr


def test_cancel_waits_until_a_running_job_has_stopped(passthrough_engine, tmp_path: Path) -> None:
    # The engine answers Cancel before the job stopped (RUNNING, cancel requested: with a real model a step can
    # outlast the engine's wait); `vera cancel` reports the state it asked for, not "running".
    address = passthrough_engine(step_seconds=0.5, cancel_wait_seconds=0.0)
    plate = write_sequence(tmp_path / "plate", [1])
    job = vera("edit", "--engine", address, "--plate", plate, "--frames", "1", "--prompt", "x", "--steps", "100",
               "--detach", "--out", str(tmp_path / "o")).stdout.strip()  # fmt: skip
    with EngineClient(address) as client:
        for status in client.watch(job):
            if status.state == pb.JOB_STATE_RUNNING and status.step >= 1:
                break
    cancelled = vera("cancel", job, "--engine", address)
    assert cancelled.returncode == 0 and cancelled.stdout.split() == [job, "cancelled"], cancelled.stderr
    with EngineClient(address) as client:
        final = client.status(job)
    assert final.state == pb.JOB_STATE_CANCELLED and 1 <= final.step < 100 and final.total_steps == 100


def test_output_closed_early_is_not_an_error(passthrough_engine) -> None:
    """`vera info --json | head`: the reader leaves early; no traceback, and the exit code a shell gives SIGPIPE."""
    address = passthrough_engine()
    for command in (["info", "--json"], ["jobs"], ["info"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "vera_plugin.cli", *command, "--engine", address],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        proc.stdout.close()  # the reader is gone before anything is written
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
        # `vera jobs` on an empty engine writes nothing, so nothing breaks.
        assert proc.returncode == (0 if command == ["jobs"] else 141), (command, err)


@pytest.mark.slow
def test_full_round_trip_through_the_cli(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    model = tiny_model_dir(tmp_path_factory.getbasetemp())
    plate = write_sequence(tmp_path / "plate", [1001, 1002, 1003])
    mask = write_sequence(tmp_path / "mask", [1001, 1002, 1003], channels=("A",), seed=1)
    with EngineProcess(tmp_path / "spool", model) as engine:
        address = engine.address
        with EngineClient(address) as client:
            client.wait_until_serving(120)

        info = vera("info", "--engine", address)
        assert info.returncode == 0, info.stderr
        # The schema's default steps are the checkpoint's own (model_index.json default_steps).
        default_steps = json.loads((model / "model_index.json").read_text())["default_steps"]
        assert "tiny-vera (default): native 32x32, 4 frames" in info.stdout
        assert f"steps (int) = {default_steps}" in info.stdout
        schema = json.loads(vera("info", "--engine", address, "--json").stdout)
        assert {o["name"] for o in schema["models"][0]["options"]} >= {"prompt", "steps", "colorspace"}

        out = tmp_path / "out"
        edit = vera(
            "edit", "--engine", address, "--plate", plate, "--frames", "1001-1003", "--mask", mask,
            "--prompt", "add a red ball", "--task", "object_addition", "--seed", "4", "--steps", "3",
            "--guidance", "4.5", "--step-cache", "mag:0.06", "--colorspace", "ACEScg", "--out", str(out),
        )  # fmt: skip
        assert edit.returncode == 0, edit.stderr
        files = edit.stdout.split()
        assert [Path(f).name for f in files] == [f"vera_edit.{f}.exr" for f in (1001, 1002, 1003)]
        assert all(Path(f).stat().st_size > 0 for f in files)
        assert "step 3/3" in edit.stderr and "succeeded" in edit.stderr
        job = edit.stderr.split("job ", 1)[1].split()[0]

        jobs = vera("jobs", "--engine", address)
        assert jobs.returncode == 0 and job in jobs.stdout and "succeeded" in jobs.stdout
        listed = json.loads(vera("jobs", "--engine", address, "--json", "--state", "succeeded").stdout)
        assert [j["job_id"] for j in listed] == [job] and listed[0]["header"]["seed"] == "4"
        assert listed[0]["header"]["step_cache"] == "mag:0.06"

        again = vera("fetch", job, "--engine", address, "--out", str(tmp_path / "again"))
        assert again.returncode == 0, again.stderr
        for a, b in zip(files, again.stdout.split(), strict=True):
            assert Path(a).read_bytes() == Path(b).read_bytes()

        # Cancel from another process while `vera edit` follows the job: it exits 8.
        follower = subprocess.Popen(
            [sys.executable, "-m", "vera_plugin.cli", "edit", "--engine", address, "--plate", plate,
             "--frames", "1001-1003", "--prompt", "x", "--steps", "200", "--out", str(tmp_path / "never")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            with EngineClient(address) as client:
                deadline = time.monotonic() + 60
                running = []
                while not running and time.monotonic() < deadline:
                    running = client.list_jobs(states=["running"])
                    time.sleep(0.05)
                assert running
            cancel = vera("cancel", running[0].job_id, "--engine", address)
            assert cancel.returncode == 0 and cancel.stdout.split() == [running[0].job_id, "cancelled"]
            assert follower.wait(60) == 8
            assert "was cancelled" in follower.stderr.read()
        finally:
            follower.kill()
            follower.wait()
        states = {j.job_id: j.state for j in EngineClient(address).list_jobs()}
        assert states[running[0].job_id] == pb.JOB_STATE_CANCELLED and states[job] == pb.JOB_STATE_SUCCEEDED
