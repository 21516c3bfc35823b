"""Issue 28, engine side: tokens and TLS (items 9, 13), Ray (item 6), RPC exhaustion (item 8)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.service_helpers import P, raw_chunks, uniform_frame, wait_for
from vera_engine.service import auth, rpc_guard
from vera_engine.service.pool import ray_backend
from vera_engine.service.serve import serve_main
from vera_plugin.client import EngineError
from vera_proto.vera.v1 import engine_pb2 as pb
from vera_proto.vera.v1 import engine_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

LONG_TOKEN = "0123456789abcdef" * 4


def _token_file(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


# ---------------------------------------------------------------------------------------------------------
# Tokens and TLS


def test_plain_text_tokens_on_the_network_are_refused(tmp_path: Path) -> None:
    token = _token_file(tmp_path / "token", LONG_TOKEN + "\n", 0o600)
    with pytest.raises(auth.PolicyError, match="would accept bearer tokens in plain text"):
        auth.check_bind_policy("0.0.0.0", token, None, None, insecure=True)
    auth.check_bind_policy(
        "127.0.0.1", token, None, None, insecure=True
    )  # loopback: nothing crosses a network
    auth.check_bind_policy(
        "0.0.0.0", None, None, None, insecure=True
    )  # no token to leak: the operator's call
    args = ["--host", "0.0.0.0", "--port", "0", "--insecure", "--token-file", str(token)]
    assert serve_main([*args, "--spool", str(tmp_path / "s")]) == 2
    assert not (tmp_path / "s").exists()


def test_token_files_must_be_private_and_tokens_long(tmp_path: Path) -> None:
    good = _token_file(tmp_path / "good", f"# rotation\n{LONG_TOKEN}\n{LONG_TOKEN[::-1]}\n", 0o600)
    assert auth.load_tokens(good) == [LONG_TOKEN, LONG_TOKEN[::-1]]
    for mode in (0o644, 0o640, 0o604, 0o620):
        loose = _token_file(tmp_path / f"loose{mode:o}", LONG_TOKEN, mode)
        with pytest.raises(
            auth.PolicyError, match=rf"readable or writable by others \(mode 0{mode:o}\).*chmod 600"
        ):
            auth.load_tokens(loose)
    short = _token_file(tmp_path / "short", f"{LONG_TOKEN}\ns3cret\n", 0o600)
    with pytest.raises(auth.PolicyError, match="token 2 is shorter than 32 characters"):
        auth.load_tokens(short)
    loose = _token_file(tmp_path / "world", LONG_TOKEN, 0o644)
    assert serve_main(["--port", "0", "--token-file", str(loose), "--spool", str(tmp_path / "s")]) == 2


# ---------------------------------------------------------------------------------------------------------
# Ray


def test_ray_without_token_authentication_is_refused() -> None:
    for old in ("2.40.0", "2.51.1", "1.13.0"):
        with pytest.raises(ray_backend.ClusterError, match=r"no token authentication \(Ray 2\.52 added it\)"):
            ray_backend.check_ray_version(old)
    for new in ("2.52.0", "2.60.0", "3.0.0.dev0"):
        ray_backend.check_ray_version(new)


def test_a_remote_ray_cluster_needs_an_explicit_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    remote = "ray://203.0.113.7:10001"  # TEST-NET-3: never this machine
    with pytest.raises(
        ray_backend.ClusterError, match=r"on another machine.*RAY_AUTH_MODE=token.*--allow-remote-ray"
    ):
        ray_backend.check_remote(remote, allow_remote=False)
    with pytest.raises(ray_backend.ClusterError, match="on another machine"):
        ray_backend.check_remote("203.0.113.7:6379", allow_remote=False)
    ray_backend.check_remote(remote, allow_remote=True)
    for local in ("auto", "ray://127.0.0.1:10001", "localhost:6379", "[::1]:6379"):
        ray_backend.check_remote(local, allow_remote=False)
    # The engine refuses before it connects to anything.
    with pytest.raises(ray_backend.ClusterError, match="--allow-remote-ray"):
        ray_backend.RayBackend(remote, runner=None)  # type: ignore[arg-type]
    assert serve_main(["--port", "0", "--spool", str(tmp_path / "s"), "--cluster", remote]) == 2
    assert "--allow-remote-ray" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# RPC slots


def _idle_submit(stub: pb_grpc.EngineStub, release: threading.Event, header: bool = True) -> grpc.Future:
    def stream():
        if header:
            yield pb.SubmitRequest(header=pb.JobHeader(prompt="x", frames=[1]))
        release.wait(60)

    return stub.Submit.future(stream())


def test_one_client_cannot_take_every_rpc_slot(make_harness) -> None:
    h = make_harness()
    release = threading.Event()
    channel = grpc.insecure_channel(h.address)
    stub = pb_grpc.EngineStub(channel)
    try:
        held = [_idle_submit(stub, release) for _ in range(rpc_guard.STREAMS_PER_CLIENT)]
        wait_for(lambda: len(list((h.spool / "incoming").iterdir())) == len(held), what="idle uploads open")
        extra = _idle_submit(stub, release)
        with pytest.raises(grpc.RpcError) as err:
            extra.result(timeout=20)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "this client already has 16 open streams" in err.value.details()
        assert h.client.info().models  # short calls still answered
        with pytest.raises(grpc.RpcError) as err:
            next(iter(stub.Watch(pb.WatchRequest(job_id="0" * 32), timeout=20)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        release.set()
        channel.close()
    # Once the streams end, their slots are free again.
    wait_for(lambda: not list((h.spool / "incoming").iterdir()), what="idle uploads removed")
    job = h.client.submit(pb.JobHeader(prompt="x", frames=[1]), raw_chunks(P, 1, uniform_frame())).job_id
    assert h.client.wait(job).state == pb.JOB_STATE_SUCCEEDED


def test_an_idle_upload_is_cancelled(make_harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rpc_guard, "UPLOAD_IDLE_SECONDS", 0.5)
    h = make_harness()
    release = threading.Event()
    channel = grpc.insecure_channel(h.address)
    try:
        started = time.monotonic()
        future = _idle_submit(pb_grpc.EngineStub(channel), release)
        with pytest.raises(grpc.RpcError) as err:
            future.result(timeout=20)
        assert err.value.code() == grpc.StatusCode.CANCELLED
        assert time.monotonic() - started < 15
        wait_for(lambda: not list((h.spool / "incoming").iterdir()), what="idle upload removed")
    finally:
        release.set()
        channel.close()
    # An upload that keeps sending is not cut, however long it takes in all: 2 s in all against a 1.5 s limit, each
    # gap 0.25 s (a margin of over a second, so a loaded machine does not turn a gap into an idle upload).
    monkeypatch.setattr(rpc_guard, "UPLOAD_IDLE_SECONDS", 1.5)
    frames = list(range(1, 9))

    def slow():
        for f in frames:
            time.sleep(0.25)
            yield from raw_chunks(P, f, uniform_frame())

    job = h.client.submit(pb.JobHeader(prompt="x", frames=frames), slow()).job_id
    assert len(job) == 32


def test_server_options_keepalive_and_connection_age() -> None:
    options = dict(rpc_guard.SERVER_OPTIONS)
    assert options["grpc.keepalive_time_ms"] == 60_000 and options["grpc.keepalive_timeout_ms"] == 20_000
    assert options["grpc.max_connection_age_ms"] == 24 * 3600 * 1000
    assert rpc_guard.client_of("ipv4:10.0.0.5:41234") == "ipv4:10.0.0.5"
    assert rpc_guard.client_of("ipv6:[::1]:5000") == "ipv6:[::1]"


# ---------------------------------------------------------------------------------------------------------
# Results: only Vera's names, only inside the job's output folder (item 12); the rendezvous opens no port


def test_worker_reported_result_names_must_be_vera_results() -> None:
    from vera_engine.service import safe_files

    assert safe_files.check_result_names(["vera_edit.1001.exr", "vera_edit_take2.-5.exr"])
    for bad in (
        "../../etc/passwd",
        "vera_edit.1001.exr\n",
        "/abs/vera_edit.1.exr",
        "sub/vera_edit.1.exr",
        ".bashrc",
    ):
        with pytest.raises(ValueError, match="not a Vera result name"):
            safe_files.check_result_names(["vera_edit.1.exr", bad])


def test_fetch_never_follows_a_link_out_of_the_output_folder(make_harness, tmp_path: Path) -> None:
    h = make_harness()
    job = h.client.submit(pb.JobHeader(prompt="x", frames=[1]), raw_chunks(P, 1, uniform_frame())).job_id
    final = h.client.wait(job)
    assert final.state == pb.JOB_STATE_SUCCEEDED
    secret = tmp_path / "secret"
    secret.write_bytes(b"the engine user's private key")
    result = h.spool / "jobs" / job / "out" / final.output_files[0]
    result.unlink()
    result.symlink_to(secret)
    with pytest.raises(EngineError):
        h.client.fetch(job, tmp_path / "fetched")
    assert not any(
        p.is_file() and p.read_bytes() == secret.read_bytes() for p in (tmp_path / "fetched").rglob("*")
    )


def test_an_embedded_engine_never_hands_out_a_result_replaced_by_a_link(tmp_path: Path) -> None:
    # The lifecycle moved Fetch's checks into Engine.fetch_paths (the API a program embeds): the paths it returns
    # are the job's own result files, never a link out of the output folder.
    from vera_engine.service.engine import Engine
    from vera_engine.service.errors import ResultRemoved
    from vera_engine.service.testing import PassThroughRunner

    secret = tmp_path / "secret"
    secret.write_bytes(b"the engine user's private key")
    chunk = raw_chunks(P, 1, uniform_frame())[0].chunk
    with Engine(tmp_path / "spool", PassThroughRunner()) as engine:
        job = engine.submit(pb.JobHeader(prompt="x", frames=[1]), [chunk]).job_id
        final = next(s for s in engine.watch(job) if s.state == pb.JOB_STATE_SUCCEEDED)
        (result,) = engine.fetch_paths(job)
        assert result.name == final.output_files[0] and result.is_file()
        result.unlink()
        result.symlink_to(secret)
        with pytest.raises(ResultRemoved, match="not a regular file"):
            engine.fetch_paths(job)


def test_the_rendezvous_of_a_group_is_a_private_file_store() -> None:
    import stat as stat_module
    from urllib.parse import urlparse

    from vera_engine.service import safe_files

    init = safe_files.rendezvous_file()
    assert init.startswith("file://")
    folder = Path(urlparse(init).path).parent
    assert stat_module.S_IMODE(folder.stat().st_mode) == 0o700
    folder.rmdir()


# ---------------------------------------------------------------------------------------------------------
# Ray without --shared-spool: one frame in memory at a time (item 11)


def _committed_raw_job(tmp_path: Path, frames: int, side: int) -> Path:
    import numpy as np

    from vera_engine.service.spool import Spool

    spool = Spool(tmp_path / "spool")
    upload = spool.new_upload(pb.JobHeader(prompt="x", frames=list(range(1, frames + 1))), [])
    for frame in range(1, frames + 1):
        for request in raw_chunks(P, frame, np.full((side, side, 4), 0.5, np.float32), chunk=1 << 20):
            upload.add_chunk(request.chunk)
    upload.finish()
    upload.commit(spool.inputs_dir("job"))
    return spool.inputs_dir("job")


def test_pack_inputs_reads_each_frame_only_when_asked_for(tmp_path: Path) -> None:
    import tracemalloc

    from vera_engine.service.pool.host import pack_inputs

    inputs = _committed_raw_job(tmp_path, frames=12, side=256)  # 1 MiB a frame
    frame_bytes = 256 * 256 * 4 * 4
    tracemalloc.start()
    try:
        files = pack_inputs(inputs)
        sizes = {name: len(files[name]) for name in files}  # as the Ray backend walks it: put, then drop
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(sizes.values()) > 12 * frame_bytes
    assert peak < 3 * frame_bytes, f"{peak} bytes at the peak: more than one frame held at a time"
    # Lazy: a frame removed after packing is missed when it is read, not before.
    files = pack_inputs(inputs)
    (inputs / "plate.2.raw").unlink()
    assert len(files["plate.1.raw"]) == frame_bytes
    with pytest.raises(FileNotFoundError):
        files["plate.2.raw"]


# ---------------------------------------------------------------------------------------------------------
# Job errors carry no server paths (item 13)


def test_a_failed_jobs_error_names_the_exception_but_not_the_engines_paths(make_harness) -> None:
    from vera_engine.service.limits import job_error
    from vera_engine.service.testing import PassThroughRunner

    class LeakyRunner(PassThroughRunner):
        def run(self, ctx):  # type: ignore[no-untyped-def]
            missing = Path(ctx.output_dir) / "model" / "weights.safetensors"
            raise FileNotFoundError(2, "No such file or directory", str(missing))

    h = make_harness(LeakyRunner())
    job = h.client.submit(pb.JobHeader(prompt="x", frames=[1]), raw_chunks(P, 1, uniform_frame())).job_id
    final = h.client.wait(job)
    assert final.state == pb.JOB_STATE_FAILED
    assert final.error == "FileNotFoundError: [Errno 2] No such file or directory: '<path>'"
    assert str(h.spool) not in final.error
    assert job_error(RuntimeError("told to fail on prompt 'x'")) == "RuntimeError: told to fail on prompt 'x'"
    assert job_error(OSError(r"cannot open C:\models\w.bin: bad")) == "OSError: cannot open <path>: bad"
