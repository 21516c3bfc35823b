"""The engine's contract as an outside integrator meets it: every bad request gets the code the proto promises.

One table runs each bad request against a real engine on a loopback port and checks the exact status code, that
the message names the field (or the job) and stays under 1 KiB, that it never shows the engine's spool, and that
the engine still answers GetInfo afterwards. The other tests cover what the proto says beyond errors: published
limits, ListJobs pages, reflection v1, one engine per port, path frames that change before their job runs.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import OpenImageIO as oiio
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from tests.service_helpers import (
    M,
    P,
    exr_bytes,
    exr_chunks,
    raw_chunks,
    read_exr_all,
    uniform_frame,
)
from vera_engine.imaging.exr import write_exr
from vera_engine.service import Engine, create_server, limits
from vera_engine.service.store import JobStore
from vera_engine.service.testing import PassThroughRunner
from vera_plugin.client import EngineClient, EngineError
from vera_proto.vera.v1 import engine_pb2 as pb
from vera_proto.vera.v1 import engine_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

HUGE = 20_000  # characters: repeated in full, such a value pushed replies over gRPC's metadata limit
GOOD_HEADER = {"prompt": "add a ball", "frames": [1, 2]}


def _header(fields: dict) -> pb.JobHeader:
    values = {**GOOD_HEADER, **fields}
    return pb.JobHeader(**values)


def _png(path: Path) -> Path:
    oiio.ImageBuf(oiio.ImageSpec(24, 20, 3, "uint8")).write(str(path.with_suffix(".png")))
    path.with_suffix(".png").rename(path)  # named .exr, but a PNG inside
    return path


def _path_chunk(path: str, frame: int = 1) -> list[pb.SubmitRequest]:
    return [pb.SubmitRequest(chunk=pb.FrameChunk(layer=P, frame=frame, encoding=pb.ENCODING_PATH, path=path))]


def _submit_cases(tmp_path: Path, root: Path) -> dict[str, tuple[dict, list, str | tuple[str, ...]]]:
    """Submit streams: (header fields over GOOD_HEADER, the requests after the header, expected message parts)."""
    good = raw_chunks(P, 1, uniform_frame()) + raw_chunks(P, 2, uniform_frame())
    nan = uniform_frame()
    nan[3, 4, 1] = np.nan
    inf = uniform_frame()
    inf[0, 0, 0] = np.inf
    exr = exr_bytes(tmp_path)
    write_exr(tmp_path / "nan.exr", nan, ("R", "G", "B"), pixel_type="float")
    nan_exr = (tmp_path / "nan.exr").read_bytes()
    big = uniform_frame()
    big[2, 5, 0] = 1e38  # finite in float32, infinite in half
    write_exr(tmp_path / "big.exr", big, ("R", "G", "B"), pixel_type="float")
    big_exr = (tmp_path / "big.exr").read_bytes()
    png_bytes = _png(tmp_path / "png.exr").read_bytes()
    return {
        "empty prompt": ({"prompt": "  "}, good, "header.prompt"),
        "unknown task": ({"task": "paint"}, good, "header.task"),
        "steps out of range": ({"steps": 0}, good, "header.steps"),
        "guidance NaN": ({"guidance": float("nan")}, good, "header.guidance"),
        "unknown model": ({"model": "nope"}, good, "header.model"),
        "unknown colorspace": ({"colorspace": "Rec.709 video"}, good, "header.colorspace"),
        "lossy matte compression": ({"compression": "b44"}, good, "header.compression"),
        "unknown step cache": ({"step_cache": "taylorseer:7"}, good, "header.step_cache"),
        "no frames in header": ({"frames": []}, [], "header.frames"),
        "duplicate frame in header": ({"frames": [1, 2, 1]}, good, "header.frames"),
        "missing frame": ({}, raw_chunks(P, 1, uniform_frame()), "plate frame 2: missing frames: 2"),
        "duplicate frame": ({}, good + raw_chunks(P, 2, uniform_frame()), "plate frame 2: duplicate frame"),
        "frame not in header": ({}, good + raw_chunks(P, 9, uniform_frame()), "plate frame 9"),
        "wrong size between frames": (
            {},
            raw_chunks(P, 1, uniform_frame()) + raw_chunks(P, 2, uniform_frame(h=22)),
            "plate frame 2: is 24x22 but earlier frames are 24x20",
        ),
        "mask size differs from plate": (
            {"has_mask": True},
            good + raw_chunks(M, 1, uniform_frame(c=1, h=30)) + raw_chunks(M, 2, uniform_frame(c=1)),
            "mask frame 1: is 24x30",
        ),
        "NaN samples": (
            {},
            raw_chunks(P, 1, nan) + raw_chunks(P, 2, uniform_frame()),
            "plate frame 1: contains NaN or infinite samples (the first at pixel x=4, y=3, channel 1)",
        ),
        "NaN in an EXR": ({"frames": [1]}, exr_chunks(P, 1, nan_exr), "plate frame 1: contains NaN or infinite samples"),
        "NaN straddling chunks": (
            {"frames": [1]},
            raw_chunks(P, 1, nan, chunk=(3 * 24 + 4) * 3 * 4 + 6),  # the NaN's bytes split over two chunks
            "(the first at pixel x=4, y=3, channel 1)",
        ),
        "mask out of range": (
            {"has_mask": True},
            good + raw_chunks(M, 1, uniform_frame(c=1, value=1.5)) + raw_chunks(M, 2, uniform_frame(c=1)),
            "mask frame 1: mask values range 1.5..1.5; expected 0..1",
        ),
        "Inf samples": ({}, raw_chunks(P, 1, uniform_frame()) + raw_chunks(P, 2, inf), "plate frame 2: contains NaN or infinite samples (the first at pixel x=0, y=0"),
        "plate with 2 channels": ({}, raw_chunks(P, 1, uniform_frame(c=2)) + good[1:], "plate frame 1.raw.channels: 2"),
        "mask with 3 channels": (
            {"has_mask": True},
            good + raw_chunks(M, 1, uniform_frame(c=3)),
            "mask frame 1.raw.channels: 3",
        ),
        "mask without has_mask": ({}, good + raw_chunks(M, 1, uniform_frame(c=1)), "has_mask=false"),
        "EXR without RGB": (
            {"frames": [1]},
            exr_chunks(P, 1, exr_bytes(tmp_path, channels=("Y",))),
            "plate frame 1: not a usable OpenEXR frame",
        ),
        "truncated EXR bytes": (
            {"frames": [1]},
            exr_chunks(P, 1, exr[: len(exr) * 2 // 3]),
            "plate frame 1: not a usable OpenEXR frame",
        ),
        "garbage EXR bytes": ({"frames": [1]}, exr_chunks(P, 1, b"not an exr at all" * 10), "plate frame 1"),
        "absurd dimensions": (
            {"frames": [1]},
            [
                pb.SubmitRequest(
                    chunk=pb.FrameChunk(
                        layer=P, frame=1, encoding=pb.ENCODING_RAW, total_size=100000 * 20 * 3 * 4,
                        raw=pb.RawFormat(width=100000, height=20, channels=3, sample_type=pb.SAMPLE_TYPE_FLOAT32),
                    )
                )
            ],
            "plate frame 1.raw: size 100000x20 is out of range",
        ),
        "tiny dimensions": ({"frames": [1]}, raw_chunks(P, 1, uniform_frame(h=4, w=4)), "plate frame 1.raw: size 4x4"),
        "raw size mismatch": (
            {"frames": [1]},
            raw_chunks(P, 1, uniform_frame(), total=100),
            "plate frame 1.total_size: 100 bytes, but 24x20x3 float32 is 5760",
        ),
        "stream ends mid-frame": ({"frames": [1]}, raw_chunks(P, 1, uniform_frame(), chunk=1000)[:2], "plate frame 1: truncated"),
        "chunks out of order": (
            {"frames": [1]},
            [r for i, r in enumerate(raw_chunks(P, 1, uniform_frame(), chunk=1000)) if i != 1],
            "out of order",
        ),
        "path outside the allowed roots": (
            {"frames": [1]},
            [pb.SubmitRequest(chunk=pb.FrameChunk(layer=P, frame=1, encoding=pb.ENCODING_PATH, path="/etc/passwd"))],
            "plate frame 1.path: '/etc/passwd' is outside the allowed roots",
        ),
        "second header": ({}, [pb.SubmitRequest(header=pb.JobHeader(prompt="x"))], "header: sent twice (again in message 2)"),
        "no encoding": (
            {"frames": [1]},
            [pb.SubmitRequest(chunk=pb.FrameChunk(layer=P, frame=1, total_size=4, data=b"abcd"))],
            "plate frame 1.encoding",
        ),
        # -- found by an outside client and a fuzzer (issue 16) --
        "frame path with a NUL byte": ({"frames": [1]}, _path_chunk(f"{root}/plate\0.exr"), ("plate frame 1.path: ", "plate\\x00.exr' contains a NUL character")),
        "10,000-character frame path": (
            {"frames": [1]}, _path_chunk(f"{root}/" + "a" * 10_000), f"plate frame 1.path: is {len(str(root)) + 10_001} characters; at most 4096",
        ),
        "frame path with a 300-character name": (
            {"frames": [1]}, _path_chunk(f"{root}/" + "b" * 300 + "/plate.exr"), ("plate frame 1.path: ", "cannot be read: File name too long"),
        ),
        "relative frame path": ({"frames": [1]}, _path_chunk("shots/plate.0001.exr"), "plate frame 1.path: 'shots/plate.0001.exr' is not absolute"),
        "frame path to a folder": ({"frames": [1]}, _path_chunk(str(root)), ("plate frame 1.path: ", "is not a file")),
        "frame path that does not exist": ({"frames": [1]}, _path_chunk(f"{root}/missing.exr"), "does not exist"),
        "frame path to a PNG": ({"frames": [1]}, _path_chunk(str(_png(root / "plate.0001.exr"))), ("plate frame 1.path: ", "plate.0001.exr' is not a usable OpenEXR frame: is a png image")),
        "PNG bytes sent as EXR": ({"frames": [1]}, exr_chunks(P, 1, png_bytes), "plate frame 1: not a usable OpenEXR frame: is a png image"),
        **{
            f"{HUGE}-character {name}": ({name: "x" * HUGE}, good, f"header.{name}: is {HUGE} characters; at most {limit}")
            for name, limit in (
                ("task", 64), ("colorspace", 64), ("model", 64), ("bit_depth", 64), ("compression", 64),
                ("step_cache", 64), ("prompt", 2000), ("negative_prompt", 2000), ("name", 256), ("submitted_by", 256),
            )
        },
        "unknown task at the length limit": ({"task": "t" * 64}, good, "header.task: 'tttttttttttttttttttttttttttttttttttttttt'... (64 characters) is not one of"),
        "seed above 2^53": ({"seed": 2**53}, good, "header.seed: 9007199254740992 is out of range; expected 0..9007199254740991"),
        "negative seed": ({"seed": -1}, good, "header.seed: -1 is out of range"),
        "too many takes": ({"takes": 9}, good, "header.takes: 9 is out of range; expected 1..8"),
        "window overlap as long as the window": ({"window_frames": 4, "window_overlap": 4}, good, "header.window_overlap"),
        "window beyond the model": ({"window_frames": 10**6}, good, "header.window_frames"),
        "clip black not below clip white": ({"clip_black": 0.5, "clip_white": 0.5}, good, "header.clip_black: 0.5 is not below clip_white 0.5"),
        "clip white out of range": ({"clip_white": 1.5}, good, "header.clip_white: 1.5 is out of range; expected 0.5..1"),
        "float plate beyond half with half output": (
            {"frames": [1]}, raw_chunks(P, 1, big), "plate frame 1: sample 1e+38 (pixel x=5, y=2, channel 0) is beyond +-65504",
        ),
        "float EXR plate beyond half with half output": ({"frames": [1]}, exr_chunks(P, 1, big_exr), "plate frame 1: sample 1e+38"),
        "empty message after the header": ({}, [pb.SubmitRequest()], "chunk: message 2 is empty (neither header nor chunk)"),
        "unknown layer": ({"frames": [1]}, [pb.SubmitRequest(chunk=pb.FrameChunk(layer=7, frame=1, total_size=4, data=b"abcd"))], "frame 1.layer: 7"),
        "frame of zero bytes": (
            {"frames": [1]}, [pb.SubmitRequest(chunk=pb.FrameChunk(layer=P, frame=1, encoding=pb.ENCODING_EXR))], "plate frame 1.total_size: 0 bytes",
        ),
    }  # fmt: skip


def _rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if isinstance(result, Iterator):
            list(result)  # a server stream fails while it is read
    return err.value


@pytest.fixture
def contract(make_harness, tmp_path: Path):
    """An engine whose frames may come by path under `root`, a raw stub on it, and jobs of each final state."""
    root = tmp_path / "shared"
    root.mkdir()
    h = make_harness(PassThroughRunner(fail_prompt="boom"), allowed_roots=[root])
    # A channel that sends what a careless client would: big messages, raw bytes.
    channel = grpc.insecure_channel(h.address, options=[("grpc.max_send_message_length", 64 << 20)])
    stub = pb_grpc.EngineStub(channel)
    succeeded = h.client.submit(_header({"frames": [1]}), raw_chunks(P, 1, uniform_frame())).job_id
    failed = h.client.submit(
        _header({"frames": [1], "prompt": "boom"}), raw_chunks(P, 1, uniform_frame())
    ).job_id
    assert h.client.wait(succeeded).state == pb.JOB_STATE_SUCCEEDED
    assert h.client.wait(failed).state == pb.JOB_STATE_FAILED
    yield h, root, channel, stub, {"succeeded": succeeded, "failed": failed}
    channel.close()


def _table(tmp_path: Path, root: Path, channel: grpc.Channel, stub: pb_grpc.EngineStub, jobs: dict[str, str]):
    """name -> (status code, the part(s) of the message that name the field or job, the call)."""
    table: dict[str, tuple[str, str | tuple[str, ...], Callable[[], object]]] = {}
    for name, (fields, requests, expected) in _submit_cases(tmp_path, root).items():
        stream = [pb.SubmitRequest(header=_header(fields)), *requests]
        table[name] = (
            "INVALID_ARGUMENT",
            expected,
            lambda stream=stream: stub.Submit(iter(stream), timeout=30),
        )
    raw_submit = channel.stream_unary(
        "/vera.v1.Engine/Submit", request_serializer=None, response_deserializer=None
    )
    raw_list = channel.unary_unary(
        "/vera.v1.Engine/ListJobs", request_serializer=None, response_deserializer=None
    )
    header = pb.SubmitRequest(header=_header({"frames": [1]}))
    oversized = pb.SubmitRequest(
        chunk=pb.FrameChunk(layer=P, frame=1, encoding=pb.ENCODING_EXR, total_size=17 << 20)
    )
    oversized.chunk.data = b"x" * (17 << 20)
    invalid_utf8 = b"\x0a\x04\x12\x02\xff\xfe"  # SubmitRequest{header{prompt: bytes that are not UTF-8}}
    long_id = "f" * HUGE
    table.update({
        "empty Submit stream": ("INVALID_ARGUMENT", "header: the first message of a Submit stream must be the JobHeader",
                                lambda: stub.Submit(iter([]), timeout=30)),
        "first message a chunk": ("INVALID_ARGUMENT", "header: the first message of a Submit stream must be the JobHeader",
                                  lambda: stub.Submit(iter(raw_chunks(P, 1, uniform_frame())), timeout=30)),
        "message over the engine's size limit": ("RESOURCE_EXHAUSTED", "larger than max",
                                                 lambda: stub.Submit(iter([header, oversized]), timeout=60)),
        "undecodable ListJobs request": ("INTERNAL", "deserializing", lambda: raw_list(b"\xff\xff\xff", timeout=10)),
        "string field that is not UTF-8": ("INTERNAL", "deserializing", lambda: raw_submit(iter([invalid_utf8]), timeout=10)),
        "Cancel of a finished job": ("FAILED_PRECONDITION", f"job {jobs['succeeded']} already ended (JOB_STATE_SUCCEEDED)",
                                     lambda: stub.Cancel(pb.CancelRequest(job_id=jobs["succeeded"]), timeout=10)),
        "Cancel of a failed job": ("FAILED_PRECONDITION", f"job {jobs['failed']} already ended (JOB_STATE_FAILED)",
                                   lambda: stub.Cancel(pb.CancelRequest(job_id=jobs["failed"]), timeout=10)),
        "Fetch of a failed job": ("FAILED_PRECONDITION", f"job {jobs['failed']} is JOB_STATE_FAILED",
                                  lambda: stub.Fetch(pb.FetchRequest(job_id=jobs["failed"]), timeout=10)),
        "Fetch of a file that is not a result": (
            "INVALID_ARGUMENT", "files: 1 not results of job",
            lambda: stub.Fetch(pb.FetchRequest(job_id=jobs["succeeded"], files=["y" * HUGE]), timeout=10),
        ),
        **{
            f"{rpc} of a {HUGE}-character job id": ("NOT_FOUND", "job 'ffff", call)
            for rpc, call in (
                ("Watch", lambda: stub.Watch(pb.WatchRequest(job_id=long_id), timeout=10)),
                ("Cancel", lambda: stub.Cancel(pb.CancelRequest(job_id=long_id), timeout=10)),
                ("Fetch", lambda: stub.Fetch(pb.FetchRequest(job_id=long_id), timeout=10)),
            )
        },
        "ListJobs with a made-up page token": ("INVALID_ARGUMENT", "page_token: 'z",
                                               lambda: stub.ListJobs(pb.ListJobsRequest(page_token="z" * HUGE), timeout=10)),
    })  # fmt: skip
    return table


def test_every_bad_request_gets_its_code_a_short_message_naming_the_field(contract, tmp_path: Path) -> None:
    h, root, channel, stub, jobs = contract
    table = _table(tmp_path, root, channel, stub, jobs)
    assert len(table) > 70
    for name, (code, expected, call) in table.items():
        error = _rpc_error(call)
        details = error.details() or ""
        assert error.code().name == code, (name, error.code(), details)
        print(f"{name}: {error.code().name}: {details}")  # shown with -s: the messages a client reads
        for part in (expected,) if isinstance(expected, str) else expected:
            assert part in details, (name, details)
        assert len(details.encode()) < 1024, (name, len(details.encode()))
        # Never the engine's own files (spooled uploads are named by frame, not by where they lie).
        assert str(h.spool) not in details and "incoming" not in details, (name, details)
        assert h.client.info().model_loaded, name  # the engine keeps answering
    # Nothing was queued by the bad requests, and no upload was left behind.
    assert [j.job_id for j in h.client.list_jobs()] == [jobs["succeeded"], jobs["failed"]]
    assert not list((h.spool / "incoming").iterdir())
    assert sorted(p.name for p in (h.spool / "jobs").iterdir()) == sorted(jobs.values())


# ---------------------------------------------------------------------------------------------------------
# What the proto says beyond errors


def test_limits_published_in_getinfo_are_the_ones_submit_enforces(contract) -> None:
    h, _root, _channel, _stub, jobs = contract
    info = h.client.info()
    got = info.limits
    assert (got.max_frames, got.min_side, got.max_side) == (10000, 16, 16384)
    assert (got.max_prompt_chars, got.max_label_chars, got.max_choice_chars, got.max_path_chars) == (
        2000,
        256,
        64,
        4096,
    )
    assert got.max_frame_bytes == 2 * 1024**3 and got.max_half_value == 65504.0
    assert (got.seed_min, got.seed_max) == (0, 2**53 - 1) and got.max_takes == 8 and got.max_page_size == 100
    # The seed option's range is the same, and exact in a double (2^63 - 1 as a double was 2^63, past int64).
    seed = next(o for o in info.models[0].options if o.name == "seed")
    assert (seed.min, seed.max) == (got.seed_min, got.seed_max) and int(seed.max) == got.seed_max
    # At the limits a job is accepted; one past them it is refused (the table above), so the numbers are real.
    at_limit = _header({
        "frames": [1], "prompt": "p" * got.max_prompt_chars, "negative_prompt": "n" * got.max_prompt_chars,
        "name": "s" * got.max_label_chars, "submitted_by": "u" * got.max_label_chars, "seed": got.seed_max,
    })  # fmt: skip
    job = h.client.submit(at_limit, raw_chunks(P, 1, uniform_frame(h=got.min_side, w=got.min_side))).job_id
    assert h.client.wait(job).state == pb.JOB_STATE_SUCCEEDED
    # Job ids: 32 lower-case hexadecimal characters.
    assert all(re.fullmatch(r"[0-9a-f]{32}", j) for j in (job, *jobs.values()))


def test_float_plate_beyond_half_is_kept_exactly_with_float_output(make_harness, tmp_path: Path) -> None:
    h = make_harness()
    plate = uniform_frame(c=4)
    plate[2, 5, 0], plate[3, 1, 2] = 1e38, -3e5
    header = _header({"frames": [1], "bit_depth": "float"})
    job = h.client.submit(header, raw_chunks(P, 1, plate)).job_id
    assert h.client.wait(job).state == pb.JOB_STATE_SUCCEEDED
    got, _, _ = read_exr_all(h.client.fetch(job, tmp_path / "out")[0])
    np.testing.assert_array_equal(got[..., :4], plate)


def test_results_named_by_frame_with_negative_numbers_and_stages_as_enum(
    make_harness, tmp_path: Path
) -> None:
    h = make_harness()
    requests = (
        raw_chunks(P, -3, uniform_frame())
        + raw_chunks(P, 7, uniform_frame())
        + raw_chunks(P, 12345, uniform_frame())
    )
    job = h.client.submit(_header({"frames": [-3, 7, 12345]}), requests).job_id
    statuses: list[pb.JobStatus] = []
    final = h.client.wait(job, callback=statuses.append)
    assert list(final.output_files) == ["vera_edit.-003.exr", "vera_edit.0007.exr", "vera_edit.12345.exr"]
    assert [f.name for f in h.client.fetch(job, tmp_path / "out")] == list(final.output_files)
    stages = [s.stage for s in statuses]
    assert pb.STAGE_UNSPECIFIED not in stages and stages[-1] == pb.STAGE_DONE


def test_list_jobs_pages_stay_under_4mib_whatever_is_stored(make_harness, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    store = JobStore(spool / "jobs.sqlite")
    frames = list(range(-10_000, 0))  # 10,000 negative frame numbers: 10 bytes each in the header
    outputs = [f"vera_edit.{f:05d}.exr" for f in frames]
    header = _header(
        {"frames": frames, "prompt": "p" * 2000, "negative_prompt": "n" * 2000, "name": "s" * 256}
    )
    ids = []
    for i in range(40):  # each JobStatus ~0.3 MB: 12 MB in all, three times gRPC's default receive limit
        job_id = f"{i:032x}"
        store.add(job_id, header, capacity=1000)
        store.finish(job_id, pb.JOB_STATE_SUCCEEDED, outputs=outputs)
        ids.append(job_id)
    store.close()
    h = make_harness(spool=spool)
    # A client with gRPC's default 4 MiB receive limit reads every page.
    with grpc.insecure_channel(h.address) as channel:
        stub = pb_grpc.EngineStub(channel)
        request, pages, seen = pb.ListJobsRequest(), [], []
        while True:
            reply = stub.ListJobs(request, timeout=30)
            pages.append(reply.ByteSize())
            seen += [j.job_id for j in reply.jobs]
            if not reply.next_page_token:
                break
            request.page_token = reply.next_page_token
        assert seen == ids and len(pages) > 3 and max(pages) < 2 * limits.PAGE_BYTES < 4 * 1024**2
        small = stub.ListJobs(pb.ListJobsRequest(page_size=3), timeout=30)
        assert [j.job_id for j in small.jobs] == ids[:3] and small.next_page_token
    # The client follows the pages; `limit` keeps the newest jobs over all of them.
    assert [j.job_id for j in h.client.list_jobs()] == ids
    assert [j.job_id for j in h.client.list_jobs(limit=7)] == ids[-7:]
    assert h.client.list_jobs(states=["failed"]) == []


def test_reflection_v1_and_v1alpha_need_the_token_health_does_not(make_harness) -> None:
    h = make_harness(tokens=["s3cret"])
    auth = (("authorization", "Bearer s3cret"),)
    with grpc.insecure_channel(h.address) as channel:
        for version in ("v1", "v1alpha"):
            call = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="vera.v1.Engine"),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="grpc.reflection.v1.ServerReflection"
                ),
            ]
            services, engine_file, reflection_file = call(iter(requests), metadata=auth, timeout=10)
            names = {s.name for s in services.list_services_response.service}
            assert {
                "vera.v1.Engine",
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
            } <= names, version
            assert engine_file.file_descriptor_response.file_descriptor_proto, version
            assert reflection_file.file_descriptor_response.file_descriptor_proto, version
            with pytest.raises(grpc.RpcError) as err:
                list(call(iter(requests[:1]), timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, version
    with EngineClient(h.address, timeout=5) as anonymous:
        assert anonymous.health() == "SERVING"  # health needs no token


def test_two_engines_cannot_share_a_port(make_harness, tmp_path: Path) -> None:
    first = make_harness()
    second = Engine(tmp_path / "second", PassThroughRunner())
    try:
        with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1:{first.port}: the port is in use"):
            create_server(second, "127.0.0.1", first.port)
    finally:
        second.store.close()
        second.spool.unlock()
    # The command a user runs: it refuses, says why, and exits 1 instead of sharing the port.
    serve = subprocess.run(
        [sys.executable, "-m", "vera_engine.service", "--spool", str(tmp_path / "third"), "--port", str(first.port)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert serve.returncode == 1, serve.stderr
    assert f"cannot listen on 127.0.0.1:{first.port}: the port is in use" in serve.stderr
    assert "listening" not in serve.stdout
    assert first.client.info().model_loaded  # the first engine is untouched


def test_path_frame_changed_after_submit_fails_its_job_naming_the_frame(make_harness, tmp_path: Path) -> None:
    root = tmp_path / "shared"
    root.mkdir()
    runner = PassThroughRunner(gate_step=1)
    h = make_harness(runner, allowed_roots=[root])
    blocker = h.client.submit(_header({"frames": [1]}), raw_chunks(P, 1, uniform_frame())).job_id
    assert runner.at_gate.wait(20)  # the worker is busy: the next job waits in the queue
    write_exr(root / "plate.0001.exr", uniform_frame(), ("R", "G", "B"))
    link = root / "current.exr"
    link.symlink_to(root / "plate.0001.exr")
    job = h.client.submit_files([link], [1], prompt="x", send_paths=True)
    write_exr(
        root / "plate.0001.exr", uniform_frame(value=0.75, h=40), ("R", "G", "B")
    )  # re-rendered meanwhile
    runner.gate_step = 0
    runner.gate.set()
    assert h.client.wait(blocker).state == pb.JOB_STATE_SUCCEEDED
    final = h.client.wait(job)
    assert final.state == pb.JOB_STATE_FAILED
    # Named by the frame and the resolved file (the symlink was resolved at Submit).
    assert final.error.startswith(
        f"plate frame 1.path: {root / 'plate.0001.exr'} changed after it was submitted"
    )


def test_a_spool_from_an_older_engine_gains_the_progress_columns(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "jobs.sqlite")
    db.executescript(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, state INTEGER NOT NULL, "
        "header BLOB NOT NULL, created_at REAL NOT NULL, started_at REAL NOT NULL DEFAULT 0, finished_at REAL NOT "
        "NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '', outputs TEXT NOT "
        "NULL DEFAULT '[]');"
    )
    db.execute(
        "INSERT INTO jobs (id, state, header, created_at) VALUES ('old', 5, ?, 1.0)",
        (_header({}).SerializeToString(),),
    )
    db.commit()
    db.close()
    store = JobStore(tmp_path / "jobs.sqlite")
    record = store.get("old")
    assert record is not None and (record.step, record.total_steps, record.progress) == (0, 0, 0.0)
    store.close()


class _BrokenSchemaRunner(PassThroughRunner):
    """A runner whose schema lookup raises while `broken` is set: a stand-in for a bug inside an RPC."""

    broken = False

    def models(self) -> list[pb.ModelInfo]:
        if self.broken:
            raise KeyError("/engine/private/spool/path")
        return super().models()


def test_a_bug_inside_an_rpc_is_internal_and_the_engine_keeps_serving(make_harness, caplog) -> None:
    runner = _BrokenSchemaRunner()
    h = make_harness(runner)
    runner.broken = True
    with pytest.raises(EngineError) as err:
        h.client.submit(_header({"frames": [1]}), raw_chunks(P, 1, uniform_frame()))
    assert err.value.code == "INTERNAL"
    assert (
        err.value.details
        == "the engine failed in Submit (KeyError); it keeps serving, the details are in its log"
    )
    assert (
        "Submit failed" in caplog.text and "/engine/private/spool/path" in caplog.text
    )  # the log has it all
    runner.broken = False
    job = h.client.submit(_header({"frames": [1]}), raw_chunks(P, 1, uniform_frame())).job_id
    assert h.client.wait(job).state == pb.JOB_STATE_SUCCEEDED
    assert not list((h.spool / "incoming").iterdir())
