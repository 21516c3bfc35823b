"""Issue 28, client side: an engine that lies cannot make EngineClient hand a host a dangerous job id, write
outside the output folder or under a name that is not a Vera result; a token never leaves in plain text."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from vera_plugin import cache
from vera_plugin import client as client_module
from vera_plugin.client import EngineClient, EngineError
from vera_proto.vera.v1 import engine_pb2 as pb
from vera_proto.vera.v1 import engine_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)

GOOD_ID = "0123456789abcdef0123456789abcdef"
TCL = "[python -exec {open('/tmp/pwned','w').write('x')}]"


class LyingEngine(pb_grpc.EngineServicer):
    """An engine that answers whatever the test says: the job id of Submit, the status, the files of Fetch."""

    def __init__(self) -> None:
        self.job_id = GOOD_ID
        self.status_id: str | None = None
        self.outputs: list[str] = ["vera_edit.1001.exr"]
        self.sent: list[tuple[str, bytes]] = [("vera_edit.1001.exr", b"exr bytes")]
        self.requests: list[str] = []
        self.fetch_chunks: list[pb.FetchChunk] | None = None  # sent as they are, when set

    def Submit(self, request_iterator: Iterator[pb.SubmitRequest], context: Any) -> pb.SubmitResponse:
        for _ in request_iterator:
            pass
        self.requests.append("Submit")
        return pb.SubmitResponse(job_id=self.job_id)

    def _status(self) -> pb.JobStatus:
        return pb.JobStatus(
            job_id=self.status_id if self.status_id is not None else self.job_id,
            state=pb.JOB_STATE_SUCCEEDED,
            output_files=self.outputs,
        )

    def Watch(self, request: pb.WatchRequest, context: Any) -> Iterator[pb.JobStatus]:
        self.requests.append(f"Watch {request.job_id}")
        yield self._status()

    def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:
        return pb.ListJobsResponse(jobs=[self._status()])

    def Cancel(self, request: pb.CancelRequest, context: Any) -> pb.JobStatus:
        self.requests.append(f"Cancel {request.job_id}")
        return self._status()

    def Fetch(self, request: pb.FetchRequest, context: Any) -> Iterator[pb.FetchChunk]:
        self.requests.append(f"Fetch {request.job_id}")
        if self.fetch_chunks is not None:
            yield from self.fetch_chunks
            return
        for index, (name, data) in enumerate(self.sent):
            yield pb.FetchChunk(
                file_name=name,
                file_size=len(data),
                offset=0,
                data=data,
                file_index=index,
                file_count=len(self.sent),
            )


@pytest.fixture
def lying_engine() -> Iterator[tuple[LyingEngine, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    fake = LyingEngine()
    pb_grpc.add_EngineServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def _submit(client: EngineClient) -> str:
    return client.submit(pb.JobHeader(prompt="x", frames=[1]), iter(()))


@pytest.mark.parametrize(
    "bad_id",
    [TCL, "../../../../x", "..", GOOD_ID + "\n", GOOD_ID.upper(), GOOD_ID[:-1], GOOD_ID + "0", ""],
)
def test_a_job_id_from_the_engine_that_is_not_32_hex_digits_is_refused(
    lying_engine: tuple[LyingEngine, str], bad_id: str
) -> None:
    fake, address = lying_engine
    fake.job_id = bad_id
    with EngineClient(address, timeout=10) as client:
        with pytest.raises(EngineError, match="not 32 lower-case hexadecimal") as err:
            _submit(client)
        assert err.value.code == "INTERNAL"
        with pytest.raises(EngineError, match="not 32 lower-case hexadecimal"):
            client.list_jobs()
        fake.job_id = GOOD_ID
        assert _submit(client).job_id == GOOD_ID  # a genuine id passes
        fake.status_id = bad_id
        with pytest.raises(EngineError, match="not 32 lower-case hexadecimal"):
            client.status(GOOD_ID)


def test_a_status_about_a_malformed_id_is_refused(lying_engine: tuple[LyingEngine, str]) -> None:
    fake, address = lying_engine
    for bad_id in ("../x", GOOD_ID + "\n", TCL):
        fake.status_id = bad_id
        with EngineClient(address, timeout=10) as client:
            for call in (client.status, client.cancel):
                with pytest.raises(EngineError, match="not 32 lower-case hexadecimal") as err:
                    call(bad_id)
                assert err.value.code == "INTERNAL"
    assert client_module.check_job_id(GOOD_ID) == GOOD_ID


def test_a_status_about_another_job_is_refused(lying_engine: tuple[LyingEngine, str]) -> None:
    fake, address = lying_engine
    fake.status_id = "f" * 32
    with EngineClient(address, timeout=10) as client, pytest.raises(EngineError, match="answered about"):
        client.status(GOOD_ID)


@pytest.mark.parametrize(
    ("listed", "sent"),
    [
        ([".bashrc"], ".bashrc"),  # listed, but not a Vera result name
        (["vera_edit.1001.exr"], ".bashrc"),  # not listed
        (["vera_edit.1001.exr"], "vera_edit.1002.exr"),  # a result name, but not one the status lists
        (["vera_edit.1001.exr\n"], "vera_edit.1001.exr\n"),  # a trailing newline is not a result name
    ],
)
def test_fetch_accepts_only_the_listed_vera_results(
    lying_engine: tuple[LyingEngine, str], tmp_path: Path, listed: list[str], sent: str
) -> None:
    fake, address = lying_engine
    fake.outputs, fake.sent = listed, [(sent, b"evil")]
    out = tmp_path / "out"
    with EngineClient(address, timeout=10) as client, pytest.raises(EngineError) as err:
        client.fetch(GOOD_ID, out)
    assert err.value.code == "INTERNAL"
    assert not any(tmp_path.rglob(".bashrc")) and not any(p.is_file() for p in tmp_path.rglob("*"))


def test_fetch_writes_the_listed_results_and_never_through_a_planted_link(
    lying_engine: tuple[LyingEngine, str], tmp_path: Path
) -> None:
    _fake, address = lying_engine
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (out / "vera_edit.1001.exr.part").symlink_to(victim)  # planted where the download is first written
    with EngineClient(address, timeout=10) as client:
        written = client.fetch(GOOD_ID, out)
    assert written == [out / "vera_edit.1001.exr"]
    assert (out / "vera_edit.1001.exr").read_bytes() == b"exr bytes"
    assert victim.read_bytes() == b"precious"
    with (
        EngineClient(address, timeout=10) as client,
        pytest.raises(ValueError, match="not a Vera result name"),
    ):
        client.fetch(GOOD_ID, out, files=["../x.exr"])


def test_fetch_refuses_more_data_than_declared(lying_engine: tuple[LyingEngine, str], tmp_path: Path) -> None:
    fake, address = lying_engine
    fake.fetch_chunks = [
        pb.FetchChunk(file_name="vera_edit.1001.exr", file_size=2, offset=0, data=b"far too long")
    ]
    with EngineClient(address, timeout=10) as client, pytest.raises(EngineError, match="more data than"):
        client.fetch(GOOD_ID, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_token_is_never_sent_in_plain_text_to_another_machine() -> None:
    for address in ("gpu-box:50051", "10.0.0.5:50051", "dns:///gpu-box:50051", "[2001:db8::1]:50051"):
        with pytest.raises(ValueError, match=r"refusing to send the token to .* without TLS"):
            EngineClient(address, token="s3cret")
    # Loopback, a unix socket, TLS, no token or the explicit opt-out are fine.
    for address in ("127.0.0.1:50051", "localhost:1", "[::1]:50051", "127.1.2.3:5", "unix:/tmp/vera.sock"):
        EngineClient(address, token="s3cret").close()
    EngineClient("gpu-box:50051", token="s3cret", tls=True).close()
    EngineClient("gpu-box:50051").close()
    EngineClient("gpu-box:50051", token="s3cret", allow_plaintext_token=True).close()


def test_result_names_and_cache_folders_take_no_trailing_newline(tmp_path: Path) -> None:
    assert cache.take_and_frame("vera_edit.1001.exr") == (1, 1001)
    assert cache.take_and_frame("vera_edit.1001.exr\n") is None
    with pytest.raises(ValueError, match="not a plain name"):
        cache.job_dir(tmp_path, "job\n")


def test_the_unsaved_script_cache_is_the_users_own(tmp_path: Path) -> None:
    if sys.platform.startswith("linux"):
        root = cache.cache_root("", env={"XDG_CACHE_HOME": str(tmp_path)})
        assert root == tmp_path / "vera_cache" / "untitled"
        assert cache.cache_root("", env={}) == Path.home() / ".cache" / "vera_cache" / "untitled"
    assert not str(cache.cache_root("", env={})).startswith(tempfile.gettempdir())
