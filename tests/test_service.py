"""The engine service in-process on a loopback port, with a model-free runner doing real, simple work.

Covers the queue, spool, store and validation mechanics; tests/test_service_e2e.py runs the real tiny
pipeline in real engine processes (kill -9, concurrency).
"""

from __future__ import annotations

import datetime
import ipaddress
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.service_helpers import (
    P,
    raw_chunks,
    read_exr_all,
    uniform_frame,
    wait_for,
    wait_running,
    write_plate,
)
from vera_engine.service import Engine, auth, serve_main
from vera_engine.service.store import JobStore
from vera_engine.service.testing import PassThroughRunner
from vera_plugin.client import EngineClient, EngineError
from vera_proto.vera.v1 import engine_pb2 as pb
from vera_proto.vera.v1 import engine_pb2_grpc

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------------------------------------------------
# Info, health, reflection


def test_info_serves_the_options_schema(make_harness) -> None:
    h = make_harness(queue_capacity=5)
    h.client.wait_until_serving(10)
    info = h.client.info()
    assert info.engine_version and info.model_loaded and info.queue_capacity == 5
    assert info.chunk_bytes < info.max_message_bytes
    model = info.models[0]
    assert model.is_default and model.name == "passthrough"
    assert (model.native_width, model.native_height, model.frame_window) == (32, 32, 4)
    assert list(model.tasks) == ["object_addition", "background_change"]
    options = {o.name: o for o in model.options}
    assert set(options) >= {"task", "prompt", "negative_prompt", "seed", "steps", "guidance", "colorspace"}
    assert set(options) >= {"bit_depth", "compression", "hdr"}
    # Every option names a JobHeader field, so a host can fill a header generically from its UI.
    header_fields = set(pb.JobHeader.DESCRIPTOR.fields_by_name)
    assert set(options) <= header_fields
    assert all(o.help and o.label for o in model.options)
    assert options["steps"].type == pb.OPTION_TYPE_INT and options["steps"].default.int_value == 3
    assert (options["steps"].min, options["steps"].max) == (1, 200)
    assert options["guidance"].type == pb.OPTION_TYPE_FLOAT and options["guidance"].HasField("max")
    assert (
        options["task"].type == pb.OPTION_TYPE_CHOICE
        and options["task"].default.string_value == "object_addition"
    )
    assert options["prompt"].required and not options["prompt"].HasField("default")
    assert "b44" not in options["compression"].choices and "zip" in options["compression"].choices
    assert options["hdr"].type == pb.OPTION_TYPE_BOOL


def test_health_goes_serving_after_load_and_reflection_lists_services(make_harness) -> None:
    runner = PassThroughRunner(hold_load=True)
    h = make_harness(runner)
    channel = grpc.insecure_channel(h.address)
    stub = health_pb2_grpc.HealthStub(channel)
    first = stub.Check(health_pb2.HealthCheckRequest(service="vera.v1.Engine"), timeout=5)
    assert first.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert h.client.health() == "NOT_SERVING"
    runner.loaded.set()
    h.client.wait_until_serving(10)
    assert (
        stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "vera.v1.Engine" in services and "grpc.health.v1.Health" in services
    channel.close()


# ---------------------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_exr_bytes(make_harness, tmp_path: Path) -> None:
    # The job holds after step 1 until the watcher has seen it running: progress is observed whatever the load.
    runner = PassThroughRunner(gate_step=1)
    h = make_harness(runner)
    frames = [1001, 1002, 1003]
    pattern, pixels = write_plate(tmp_path / "plate", frames)
    job = h.client.submit_files(pattern, frames, prompt="add a red ball", steps=2, seed=7, name="sh010")
    statuses = []

    def follow(status: pb.JobStatus) -> None:
        statuses.append(status)
        if status.state == pb.JOB_STATE_RUNNING and status.step == 1:
            runner.gate.set()

    final = h.client.wait(job, callback=follow, previews=True)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert final.seed == 7 and final.header.steps == 2 and final.header.name == "sh010"
    assert final.output_files == [f"vera_edit.{f}.exr" for f in frames]
    assert 1 in [s.step for s in statuses if s.state == pb.JOB_STATE_RUNNING]
    assert [s.step for s in statuses if s.step][-1] == 2
    previews = [s.preview for s in statuses if s.HasField("preview")]
    assert previews and len(previews[0].rgb8) == previews[0].width * previews[0].height * 3
    files = h.client.fetch(job, tmp_path / "out")
    assert [f.name for f in files] == list(final.output_files)
    got, channels, spec = read_exr_all(files[1])
    assert channels == ("R", "G", "B", "A", "edit.R", "edit.G", "edit.B", "edit.A", "matte.A")
    half = pixels[1].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got[..., :4], half)
    assert spec.getattribute("vera/job_id") == job
    # Inputs are dropped when a job finishes; results stay.
    assert not (h.spool / "jobs" / job / "inputs").exists()
    assert not list((h.spool / "incoming").iterdir())


def test_round_trip_raw_arrays_with_mask_and_frame_over_4mib(make_harness, tmp_path: Path) -> None:
    h = make_harness()
    rng = np.random.default_rng(1)
    plate = rng.random((2, 480, 640, 4), dtype=np.float32)  # 4.9 MB per frame: several chunks
    assert plate[0].nbytes > 4 * 1024 * 1024
    mask = (rng.random((2, 480, 640)) > 0.5).astype(np.float32)
    job = h.client.submit_arrays(plate, [7, 8], prompt="x", mask=mask, steps=1, bit_depth="float")
    final = h.client.wait(job)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    files = h.client.fetch(job, tmp_path / "out")
    assert [f.name for f in files] == ["vera_edit.0007.exr", "vera_edit.0008.exr"]
    got, _, _ = read_exr_all(files[0])
    np.testing.assert_array_equal(got[..., :4], plate[0])  # float32 output: bit-exact


def test_path_input_only_under_allowed_roots(make_harness, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    h = make_harness(allowed_roots=[shared])
    pattern, _ = write_plate(shared / "sh010", [1, 2])
    job = h.client.submit_files(pattern, [1, 2], prompt="x", send_paths=True, steps=1)
    assert h.client.wait(job).state == pb.JOB_STATE_SUCCEEDED
    outside, _ = write_plate(tmp_path / "elsewhere", [1, 2])
    with pytest.raises(EngineError) as err:
        h.client.submit_files(outside, [1, 2], prompt="x", send_paths=True)
    assert err.value.code == "INVALID_ARGUMENT" and "plate frame 1.path" in err.value.details
    assert "outside the allowed roots" in err.value.details
    # A symlink inside the root pointing outside is outside.
    (shared / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(EngineError, match="outside the allowed roots"):
        h.client.submit_files(str(shared / "link" / "plate.####.exr"), [1, 2], prompt="x", send_paths=True)
    # An engine without --allow-root takes no paths at all.
    closed = make_harness(spool=tmp_path / "closed")
    with pytest.raises(EngineError, match=r"plate frame 1\.path: path input is disabled on this engine"):
        closed.client.submit_files(pattern, [1, 2], prompt="x", send_paths=True)


class _WindowsFirstRunner(PassThroughRunner):
    """Reads the plate's windows before its pixels, as PipelineRunner does (results carry the plate's windows)."""

    def run(self, ctx):
        ctx.inputs.windows()
        return super().run(ctx)


def test_a_deleted_first_path_frame_fails_its_job_naming_the_frame(
    make_harness, tmp_path: Path, caplog
) -> None:
    root = tmp_path / "shared"
    runner = _WindowsFirstRunner(gate_step=1)
    h = make_harness(runner, allowed_roots=[root])
    pattern, _ = write_plate(root / "sh010", [7, 8])
    blocker = h.client.submit(
        pb.JobHeader(prompt="x", frames=[1], steps=2), raw_chunks(P, 1, uniform_frame())
    ).job_id
    assert runner.at_gate.wait(20)  # the worker is busy: the path job waits in the queue
    job = h.client.submit_files(pattern, [7, 8], prompt="x", send_paths=True, steps=1)
    (root / "sh010" / "plate.0007.exr").unlink()
    runner.gate_step = 0
    runner.gate.set()
    assert h.client.wait(blocker).state == pb.JOB_STATE_SUCCEEDED
    final = h.client.wait(job)
    assert final.state == pb.JOB_STATE_FAILED
    assert final.error.startswith(
        f"plate frame 7.path: {root / 'sh010' / 'plate.0007.exr'} cannot be read any more"
    )
    assert not [
        r for r in caplog.records if r.levelname == "ERROR"
    ]  # the client's doing: no traceback logged


def test_a_path_frame_must_be_an_exr_and_carry_no_data(make_harness, tmp_path: Path) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    h = make_harness(allowed_roots=[root])
    not_exr = root / "notes.exr"
    not_exr.write_text("not an image")
    with pytest.raises(EngineError) as err:
        h.client.submit_files([not_exr], [1], prompt="x", send_paths=True)
    assert err.value.code == "INVALID_ARGUMENT"
    assert err.value.details.startswith(f"plate frame 1.path: '{not_exr}' is not a usable OpenEXR frame")
    pattern, _ = write_plate(root / "sh010", [1])
    chunk = pb.FrameChunk(layer=P, frame=1, encoding=pb.ENCODING_PATH, path=pattern.replace("####", "0001"))
    chunk.data = b"ignored?"
    with pytest.raises(EngineError) as err:
        h.client.submit(pb.JobHeader(prompt="x", frames=[1]), [pb.SubmitRequest(chunk=chunk)])
    assert err.value.code == "INVALID_ARGUMENT"
    assert err.value.details.startswith("plate frame 1.data: a frame sent by path carries no data")


# ---------------------------------------------------------------------------------------------------------
# Validation


def test_client_disconnect_mid_upload_leaves_nothing(make_harness) -> None:
    h = make_harness()
    release = threading.Event()
    requests = raw_chunks(P, 1, uniform_frame(h=200, w=200), chunk=10000)

    def stream():
        yield pb.SubmitRequest(header=pb.JobHeader(prompt="x", frames=[1]))
        yield from requests[:3]
        release.wait(20)  # hold the stream open mid-frame until the test hangs up

    channel = grpc.insecure_channel(h.address)  # a raw stream, as a client dying mid-upload leaves it
    future = engine_pb2_grpc.EngineStub(channel).Submit.future(stream())
    incoming = h.spool / "incoming"
    wait_for(lambda: any(p.is_dir() and any(p.iterdir()) for p in incoming.iterdir()), what="upload on disk")
    future.cancel()
    release.set()
    wait_for(lambda: not list(incoming.iterdir()), what="upload removed")
    channel.close()
    assert h.client.list_jobs() == []
    assert not list((h.spool / "jobs").iterdir())


# ---------------------------------------------------------------------------------------------------------
# Queue, cancel, failures


def test_queue_full_is_resource_exhausted(make_harness) -> None:
    runner = PassThroughRunner(step_seconds=0.05)
    h = make_harness(runner, queue_capacity=1)
    header = pb.JobHeader(prompt="x", frames=[1], steps=200)
    running = h.client.submit(header, raw_chunks(P, 1, uniform_frame())).job_id
    wait_running(h.client, running)
    queued = h.client.submit(header, raw_chunks(P, 1, uniform_frame())).job_id
    with pytest.raises(EngineError) as err:
        h.client.submit(header, raw_chunks(P, 1, uniform_frame()))
    assert err.value.code == "RESOURCE_EXHAUSTED" and "queue is full" in err.value.details
    assert len(h.client.list_jobs()) == 2 and not list((h.spool / "incoming").iterdir())
    # Cancelling the queued job at once frees the slot; it never starts.
    assert h.client.cancel(queued).state == pb.JOB_STATE_CANCELLED
    assert queued not in runner.started
    assert h.client.cancel(running).state == pb.JOB_STATE_CANCELLED


def test_cancel_running_job_stops_within_a_step(make_harness) -> None:
    runner = PassThroughRunner(gate_step=3)
    h = make_harness(runner)
    requests = raw_chunks(P, 1, uniform_frame()) + raw_chunks(P, 2, uniform_frame())
    job = h.client.submit(pb.JobHeader(prompt="x", frames=[1, 2], steps=50), requests).job_id
    assert runner.at_gate.wait(20)  # the job is inside step 3
    answer: list[pb.JobStatus] = []
    canceller = threading.Thread(target=lambda: answer.append(h.client.cancel(job)))
    canceller.start()
    wait_for(lambda: h.engine.cancel_requested(job), what="the cancel on record")
    waiting = h.client.status(job)  # the job is still inside step 3: RUNNING, with the cancel on record
    assert waiting.state == pb.JOB_STATE_RUNNING and waiting.cancel_requested
    runner.gate.set()  # step 3 ends; the job must not start step 4
    canceller.join(20)
    assert answer[0].state == pb.JOB_STATE_CANCELLED
    assert runner.steps_done[job] == 3
    final = h.client.wait(job)
    assert final.state == pb.JOB_STATE_CANCELLED and final.output_files == []
    # It keeps where it stopped: 3 of 50 steps (and the stage says it is over).
    assert (final.step, final.total_steps, final.progress) == (3, 50, pytest.approx(3 / 50))
    assert final.stage == pb.STAGE_DONE and final.stage_detail == "cancelled"
    assert not (h.spool / "jobs" / job / "out").exists()
    assert not (h.spool / "jobs" / job / "inputs").exists()
    with pytest.raises(EngineError) as err:
        h.client.fetch(job, h.spool.parent / "x")
    assert err.value.code == "FAILED_PRECONDITION"
    # Cancelling again is FAILED_PRECONDITION (the job already ended), or its final status when a UI allows that.
    with pytest.raises(EngineError) as err:
        h.client.cancel(job)
    assert (
        err.value.code == "FAILED_PRECONDITION" and "already ended (JOB_STATE_CANCELLED)" in err.value.details
    )
    assert h.client.cancel(job, ended_ok=True).state == pb.JOB_STATE_CANCELLED
    # The engine runs the next job.
    runner.gate_step = 0
    nxt = h.client.submit(
        pb.JobHeader(prompt="x", frames=[1], steps=1), raw_chunks(P, 1, uniform_frame())
    ).job_id
    assert h.client.wait(nxt).state == pb.JOB_STATE_SUCCEEDED


def test_failed_job_reports_error_and_engine_continues(make_harness) -> None:
    h = make_harness(PassThroughRunner(fail_prompt="boom"))
    bad = h.client.submit(pb.JobHeader(prompt="boom", frames=[1]), raw_chunks(P, 1, uniform_frame())).job_id
    good = h.client.submit(pb.JobHeader(prompt="fine", frames=[1]), raw_chunks(P, 1, uniform_frame())).job_id
    final = h.client.wait(bad)
    assert final.state == pb.JOB_STATE_FAILED and "told to fail" in final.error
    assert h.client.wait(good).state == pb.JOB_STATE_SUCCEEDED
    with pytest.raises(EngineError, match="JOB_STATE_FAILED"):
        h.client.fetch(bad, h.spool.parent / "x")


def test_unknown_job_is_not_found(make_harness) -> None:
    h = make_harness()
    for call in (lambda: list(h.client.watch("nope")), lambda: h.client.cancel("nope"),
                 lambda: h.client.fetch("nope", h.spool.parent / "x")):  # fmt: skip
        with pytest.raises(EngineError) as err:
            call()
        assert err.value.code == "NOT_FOUND"


def test_fifo_order_with_concurrent_clients(make_harness) -> None:
    runner = PassThroughRunner(step_seconds=0.01)
    h = make_harness(runner, queue_capacity=20)
    submitted: list[str] = []
    errors: list[BaseException] = []

    def client_thread(index: int) -> None:
        try:
            with EngineClient(h.address) as client:
                for j in range(3):
                    header = pb.JobHeader(prompt=f"client {index} job {j}", frames=[1], steps=2)
                    submitted.append(client.submit(header, raw_chunks(P, 1, uniform_frame())).job_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    finals = [h.client.wait(job) for job in submitted]
    assert all(f.state == pb.JOB_STATE_SUCCEEDED for f in finals)
    by_sequence = [f.job_id for f in sorted(finals, key=lambda f: f.sequence)]
    assert runner.started == by_sequence  # run in submission order
    finished = [f.finished_at for f in sorted(finals, key=lambda f: f.sequence)]
    assert finished == sorted(finished)
    assert [j.job_id for j in h.client.list_jobs()] == by_sequence


# ---------------------------------------------------------------------------------------------------------
# Restart, retention


def test_restart_resumes_interrupted_and_queued_jobs(make_harness, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    first = make_harness(PassThroughRunner(step_seconds=0.05), spool=spool)
    header = pb.JobHeader(prompt="x", frames=[1], steps=40)
    a = first.client.submit(header, raw_chunks(P, 1, uniform_frame())).job_id
    b = first.client.submit(header, raw_chunks(P, 1, uniform_frame())).job_id
    wait_running(first.client, a)
    first.stop()  # a clean stop requeues the running job
    # Simulate a crash too: mark `a` RUNNING again as a kill -9 would leave it.
    store = JobStore(spool / "jobs.sqlite")
    store.claim_next()
    assert store.get(a).state == pb.JOB_STATE_RUNNING
    store.close()
    (spool / "incoming" / "leftover").mkdir()
    (spool / "incoming" / "leftover" / "plate.1.raw").write_bytes(b"partial")

    runner = PassThroughRunner()
    second = make_harness(runner, spool=spool)
    assert not list((spool / "incoming").iterdir())  # half-finished uploads from before are gone
    final_a, final_b = second.client.wait(a), second.client.wait(b)
    assert final_a.state == final_b.state == pb.JOB_STATE_SUCCEEDED
    assert runner.started == [a, b]
    assert final_a.attempts == 2
    assert len(second.client.fetch(a, tmp_path / "out")) == 1


def test_one_engine_per_spool(make_harness, tmp_path: Path) -> None:
    from vera_engine.service.errors import SpoolInUse

    first = make_harness(spool=tmp_path / "shared")
    with pytest.raises(SpoolInUse, match=r"in use by another engine \(pid \d+\)"):
        Engine(tmp_path / "shared", PassThroughRunner())
    first.stop()
    second = Engine(tmp_path / "shared", PassThroughRunner())  # free again once the first stopped
    second.close()


def test_job_crashing_the_engine_repeatedly_is_given_up(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    store.add("j1", pb.JobHeader(prompt="x", frames=[1]), capacity=5)
    for _ in range(3):
        assert store.claim_next().id == "j1"
        requeued, failed = store.recover(max_attempts=3)
    assert failed == ["j1"] and requeued == []
    record = store.get("j1")
    assert record.state == pb.JOB_STATE_FAILED and "3 times" in record.error
    store.close()


def test_finished_results_served_until_retention_expires(make_harness, tmp_path: Path) -> None:
    h = make_harness(retention_seconds=3600)
    job = h.client.submit(pb.JobHeader(prompt="x", frames=[1]), raw_chunks(P, 1, uniform_frame())).job_id
    assert h.client.wait(job).state == pb.JOB_STATE_SUCCEEDED
    assert h.engine.purge_expired() == []
    assert len(h.client.fetch(job, tmp_path / "a")) == 1
    h.engine.retention_seconds = 0.0
    assert h.engine.purge_expired() == [job]
    assert not (h.spool / "jobs" / job).exists()
    with pytest.raises(EngineError) as err:
        h.client.fetch(job, tmp_path / "b")
    assert err.value.code == "NOT_FOUND"


# ---------------------------------------------------------------------------------------------------------
# Security


def test_token_required_when_configured(make_harness) -> None:
    h = make_harness(tokens=["s3cret", "next-token"])
    assert h.client.info().models
    for token in (None, "wrong"):
        with EngineClient(h.address, token=token, timeout=5) as client:
            with pytest.raises(EngineError) as err:
                client.info()
            assert err.value.code == "UNAUTHENTICATED"
            with pytest.raises(EngineError) as err:
                client.submit(pb.JobHeader(prompt="x", frames=[1]), raw_chunks(P, 1, uniform_frame()))
            assert err.value.code == "UNAUTHENTICATED"
            with pytest.raises(EngineError) as err:
                list(client.watch("anything"))
            assert err.value.code == "UNAUTHENTICATED"
            assert client.health() == "SERVING"  # health checks stay open for load balancers
    with EngineClient(h.address, token="next-token", timeout=5) as client:
        assert client.list_jobs() == []


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vera-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_tls_with_token(make_harness, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    h = make_harness(tokens=["t0ken"], tls=(cert, key))
    with EngineClient(h.address, token="t0ken", ca_cert=cert, timeout=10) as client:
        job = client.submit(pb.JobHeader(prompt="x", frames=[1]), raw_chunks(P, 1, uniform_frame())).job_id
        assert client.wait(job).state == pb.JOB_STATE_SUCCEEDED
    with EngineClient(h.address, token="t0ken", ca_cert=cert, timeout=10) as client:
        assert client.info().models
    with EngineClient(h.address, token="t0ken", timeout=3) as plain:
        with pytest.raises(EngineError) as err:
            plain.info()
        assert err.value.code == "UNAVAILABLE"
    with (
        EngineClient(h.address, token="wrong", ca_cert=cert, timeout=10) as client,
        pytest.raises(EngineError, match="UNAUTHENTICATED"),
    ):
        client.info()


def test_bind_policy(tmp_path: Path) -> None:
    token, cert, key = tmp_path / "token", *_self_signed(tmp_path)
    token.write_text("# comment\nabc\n")
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert auth.is_loopback(host)
        auth.check_bind_policy(host, None, None, None, insecure=False)
    for host in ("0.0.0.0", "192.168.1.10", "::", "render-01"):
        assert not auth.is_loopback(host)
        with pytest.raises(auth.PolicyError, match="--token-file and --tls-cert/--tls-key"):
            auth.check_bind_policy(host, None, None, None, insecure=False)
        with pytest.raises(auth.PolicyError, match="--tls-cert/--tls-key"):
            auth.check_bind_policy(host, token, None, None, insecure=False)
        auth.check_bind_policy(host, token, cert, key, insecure=False)
        auth.check_bind_policy(host, None, None, None, insecure=True)
    with pytest.raises(auth.PolicyError, match="go together"):
        auth.check_bind_policy("127.0.0.1", None, cert, None, insecure=False)
    with pytest.raises(auth.PolicyError, match="file not found"):
        auth.check_bind_policy("127.0.0.1", tmp_path / "missing", None, None, insecure=False)
    assert auth.read_tokens(token) == ["abc"]
    # The command refuses before binding anything.
    assert serve_main(["--host", "0.0.0.0", "--port", "0", "--spool", str(tmp_path / "s")]) == 2
    assert not (tmp_path / "s").exists()


def test_serve_refuses_pickle_weights_and_missing_models(tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"
    (model / "transformer").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (model / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    assert serve_main(["--model", str(model), "--port", "0", "--spool", str(tmp_path / "s")]) == 2
    assert "safetensors only" in capsys.readouterr().err
    assert (
        serve_main(["--model", str(tmp_path / "nothing"), "--port", "0", "--spool", str(tmp_path / "s")]) == 2
    )
    assert "not a Vera pipeline folder" in capsys.readouterr().err


def test_upload_memory_stays_bounded(make_harness) -> None:
    """Chunks go to disk as they arrive: peak Python memory during a 160 MiB upload is a few chunks."""
    import tracemalloc

    h = make_harness(PassThroughRunner(gate_step=1))  # the job waits at its first step: no result writing
    plate = np.random.default_rng(0).random((40, 512, 512, 4), dtype=np.float32)  # 4 MiB per frame
    tracemalloc.start()
    try:
        job = h.client.submit_arrays(plate, prompt="x", steps=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        h.runner.gate.set()
    assert peak < plate.nbytes / 8, f"peak {peak / 2**20:.0f} MiB for a {plate.nbytes / 2**20:.0f} MiB plate"
    assert h.client.wait(job).state == pb.JOB_STATE_SUCCEEDED


def test_serve_parser_plugs_into_a_cli(tmp_path: Path) -> None:
    import argparse

    from vera_engine.service import add_serve_parser, run_serve
    from vera_engine.service.serve import ServeConfig
    from vera_engine.tools.config_cli import config_from_arguments

    parser = argparse.ArgumentParser(prog="vera-engine")
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["serve", "--spool", str(tmp_path), "--port", "0", "--allow-root", str(tmp_path)]
    )
    assert args.handler is run_serve
    # The flags parse to ServeConfig (run_serve converts them the same way); what was not given is its default.
    config = config_from_arguments(ServeConfig, args)
    assert config.host == "127.0.0.1" and config.model == "default"
    assert config.allowed_roots == [tmp_path] and config.queue_size == 32 and not config.insecure


def test_serve_speed_and_memory_flags_are_checked(tmp_path: Path, capsys) -> None:
    import argparse

    from vera_engine.acceleration.memory import TEXT_ENCODER_OFFLOAD, MemoryOptions
    from vera_engine.service.serve import ServeConfig, add_serve_parser, memory_options, run_serve
    from vera_engine.tools.config_cli import config_from_arguments

    parser = add_serve_parser(argparse.ArgumentParser().add_subparsers())

    def parse(*flags: str) -> ServeConfig:
        return config_from_arguments(
            ServeConfig, parser.parse_args(["--spool", str(tmp_path / "spool"), *flags])
        )

    # The flag's default is MemoryOptions()'s ("auto": swapped in to encode on CUDA, resident elsewhere), so no
    # options are passed and load_pipeline places the pipeline with its defaults (issue 27 item 6).
    assert memory_options(parse()) is None
    assert memory_options(parse("--text-encoder-offload", "none")) == MemoryOptions(
        text_encoder_offload="none"
    )
    choices = next(a for a in parser._actions if a.dest == "text_encoder_offload").choices
    assert tuple(choices) == TEXT_ENCODER_OFFLOAD  # written beside the flag so --help does not load torch
    assert memory_options(parse("--group-offload", "2", "--text-encoder-offload", "cpu", "--vae-tiling")) == (
        MemoryOptions(
            text_encoder_offload="cpu", group_offload="block", num_blocks_per_group=2, vae_tiling=True
        )
    )
    for flags, message in (
        (("--offload-to-disk", str(tmp_path)), "--offload-to-disk needs --group-offload"),
        (("--offload-stream",), "--offload-stream needs --group-offload 1"),
        (
            ("--group-offload", "1", "--model-cpu-offload"),
            "--model-cpu-offload moves whole components itself",
        ),
        (("--group-offload", "0"), "--group-offload 0: expected 1 or more"),
        (("--group-offload", "1", "--offload-stream"), "--offload-stream needs a CUDA device"),
        (("--group-offload", "1", "--compile"), "--compile cannot be combined with --group-offload"),
        (("--attention-backend", "flash"), "attention backend 'flash' cannot run here"),
        (("--attention-backend", "fastest"), "attention backend 'fastest' is not known to diffusers"),
    ):
        assert run_serve(parse(*flags)) == 2, flags
        assert message in capsys.readouterr().err, flags


def test_runner_loads_with_the_chosen_attention_backend() -> None:
    from vera_engine.service.runner import PipelineRunner

    runner = PipelineRunner("default", device="cpu", attention_backend="_native_math")
    runner.load()
    backends = {
        getattr(block, branch).attn1.processor._attention_backend.value
        for block in runner.pipe.transformer.blocks
        for branch in ("edit", "alpha", "composite")
    }
    assert backends == {"_native_math"}


def test_disk_offload_folder_is_per_model_and_compiled_engines_offer_exact_sampling_only(
    tmp_path: Path,
) -> None:
    import numpy as np
    import torch

    from vera_engine.acceleration.memory import MemoryOptions
    from vera_engine.pipelines.presets import build_random_pipeline
    from vera_engine.service.runner import PipelineRunner

    # Two checkpoints of the same shape (same block names) sharing one --offload-to-disk folder.
    models = []
    for seed in (0, 1):
        build_random_pipeline("tiny", seed=seed).save_pretrained(tmp_path / f"model{seed}")
        models.append(str(tmp_path / f"model{seed}"))
    video = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)

    def sample(model: str, memory: MemoryOptions | None) -> np.ndarray:
        runner = PipelineRunner(model, device="cpu", memory=memory)
        runner.load()
        out = runner.pipe(
            video, "add a red ball", num_inference_steps=2, generator=torch.Generator().manual_seed(1)
        )
        return out.composite

    disk = MemoryOptions(group_offload="block", offload_to_disk=str(tmp_path / "offload"))
    sample(models[0], disk)
    assert np.array_equal(sample(models[1], disk), sample(models[1], None))
    assert len(list((tmp_path / "offload").iterdir())) == 2  # one folder per model

    compiled = PipelineRunner(models[0], device="cpu", compile_blocks=True).models()[0]
    assert list(next(o for o in compiled.options if o.name == "step_cache").choices) == ["none"]
    plain = PipelineRunner(models[0], device="cpu").models()[0]
    assert "taylorseer:2" in next(o for o in plain.options if o.name == "step_cache").choices


# ---------------------------------------------------------------------------------------------------------
# The Engine as a program embeds it (no gRPC)


def test_engine_embedded_without_grpc_submits_cancels_fetches_and_closes(tmp_path: Path) -> None:
    from vera_engine.service.errors import InputError, JobNotFound, QueueFull, WrongJobState

    runner = PassThroughRunner(gate_step=1)
    header = pb.JobHeader(prompt="x", frames=[1], steps=2)
    chunk = raw_chunks(P, 1, uniform_frame())[0].chunk
    with Engine(tmp_path / "spool", runner, queue_capacity=1) as engine:
        first = engine.submit(header, [chunk])
        assert first.state == pb.JOB_STATE_QUEUED and len(first.job_id) == 32
        assert runner.at_gate.wait(20)
        queued = engine.submit(header, [chunk]).job_id
        with pytest.raises(QueueFull, match="the queue is full"):
            engine.submit(header, [chunk])
        assert engine.cancel(queued).state == pb.JOB_STATE_CANCELLED
        with pytest.raises(WrongJobState, match=r"already ended \(JOB_STATE_CANCELLED\)"):
            engine.cancel(queued)
        with pytest.raises(JobNotFound):
            engine.status("nope")
        with pytest.raises(InputError, match="plate frame 2: frame 2 is not in the header's frames list"):
            engine.submit(pb.JobHeader(prompt="x", frames=[1]), [pb.FrameChunk(layer=P, frame=2)])
        runner.gate.set()
        final = next(s for s in engine.watch(first.job_id) if s.state == pb.JOB_STATE_SUCCEEDED)
        assert [p.name for p in engine.fetch_paths(final.job_id)] == list(final.output_files)
        assert engine.fetch_paths(final.job_id)[0].is_file()
    # Closed: the spool is free for another engine, which sees the finished job.
    with Engine(tmp_path / "spool", PassThroughRunner()) as again:
        assert again.status(first.job_id).state == pb.JOB_STATE_SUCCEEDED


def test_closing_waits_for_the_running_step_then_requeues_the_job(tmp_path: Path) -> None:
    runner = PassThroughRunner(gate_step=1)
    engine = Engine(tmp_path / "spool", runner)
    engine.start()
    job = engine.submit(
        pb.JobHeader(prompt="x", frames=[1], steps=3), [raw_chunks(P, 1, uniform_frame())[0].chunk]
    )
    assert runner.at_gate.wait(20)  # inside the job's first step
    closing = threading.Thread(target=engine.close)
    closing.start()
    wait_for(lambda: engine.cancel_requested(job.job_id), what="the shutdown's cancel")
    closing.join(0.2)
    assert closing.is_alive()  # the step has not ended: the store stays open under it
    assert engine.store.get(job.job_id).state == pb.JOB_STATE_RUNNING
    runner.gate.set()
    closing.join(20)
    assert not closing.is_alive()
    store = JobStore(tmp_path / "spool" / "jobs.sqlite")
    assert store.get(job.job_id).state == pb.JOB_STATE_QUEUED  # resumes at the next start
    store.close()


def test_previews_are_bounded_by_steps_as_well_as_by_time(tmp_path) -> None:
    # Issue 27 item 5: a watched job decoded a preview whenever the 1 s interval had passed, i.e. at nearly every
    # ~3 s GPU step. At most PREVIEWS_PER_JOB previews now, however fast the steps.
    from vera_engine.service.worker import PREVIEWS_PER_JOB, Events, JobContext, LiveState

    events = Events()
    ctx = JobContext(
        "a" * 32,
        pb.JobHeader(),
        None,
        tmp_path,
        LiveState("a" * 32),
        events,
        threading.Event(),
        preview_interval=0.0,
    )
    events.set_previews_watched("a" * 32, True)
    made = 0
    for step in range(1, 51):
        if ctx.wants_preview(step, 50):
            ctx.preview(np.zeros((4, 4, 3), np.float32), frame=1, step=step, notify=False)
            made += 1
    assert made == PREVIEWS_PER_JOB
    events.set_previews_watched("a" * 32, False)
    assert not ctx.wants_preview(100, 50)  # nobody watches: none
