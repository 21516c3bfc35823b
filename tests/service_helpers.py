"""Helpers shared by the service tests: an in-process engine harness, plate writers, Submit request builders."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import OpenImageIO as oiio

from vera_engine.imaging.exr import write_exr
from vera_engine.service import Engine, create_server
from vera_engine.service.testing import PassThroughRunner
from vera_plugin.client import EngineClient
from vera_proto.vera.v1 import engine_pb2 as pb


class Harness:
    """An Engine + gRPC server on a free loopback port, and a client."""

    def __init__(self, spool: Path, runner: PassThroughRunner, tokens=(), tls=None, **engine_kw) -> None:
        self.spool = spool
        self.runner = runner
        self.engine = Engine(spool, runner, **engine_kw)
        self.server, self.port = create_server(self.engine, "127.0.0.1", 0, tokens=tokens, tls=tls)
        self.engine.start()
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"
        self.client = EngineClient(self.address, token=tokens[0] if tokens else None, timeout=10)

    def stop(self) -> None:
        self.client.close()
        self.server.stop(0).wait()
        self.engine.stop()


@contextlib.contextmanager
def vera_edit_args(runner, tmp_path: Path, frames: str = "1-2") -> Iterator[list[str]]:
    """A real engine over `runner` on a free loopback port, and the `vera edit` arguments every CLI round-trip test
    shares (a two-frame plate, a fixed seed, two steps, float output, quiet); the engine stops afterwards."""
    from tests.test_cli_vera import write_sequence

    engine = Engine(tmp_path / "spool", runner)
    server, port = create_server(engine, "127.0.0.1", 0)
    engine.start()
    server.start()
    try:
        plate = write_sequence(tmp_path / "plate", [1, 2])
        yield [
            "--engine", f"127.0.0.1:{port}", "--plate", plate, "--frames", frames, "--prompt", "add a ball",
            "--seed", "3", "--steps", "2", "--bit-depth", "float", "--quiet",
        ]  # fmt: skip
    finally:
        server.stop(0).wait()
        engine.stop()


def write_plate(
    folder: Path, frames, size=(48, 40), channels=("R", "G", "B", "A"), seed=0, pixel_type="half"
):
    """Random plate EXRs folder/plate.####.exr; returns the pattern and the pixels written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = rng.random((len(frames), size[1], size[0], len(channels)), dtype=np.float32)
    for frame, px in zip(frames, pixels, strict=True):
        write_exr(folder / f"plate.{frame:04d}.exr", px, channels, pixel_type=pixel_type)
    return str(folder / "plate.####.exr"), pixels


def read_exr_all(path: Path) -> tuple[np.ndarray, tuple[str, ...], oiio.ImageSpec]:
    inp = oiio.ImageInput.open(str(path))
    spec = inp.spec()
    px = inp.read_image(0, 0, 0, spec.nchannels, "float")
    inp.close()
    return np.asarray(px).reshape(spec.height, spec.width, spec.nchannels), tuple(spec.channelnames), spec


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def wait_running(client: EngineClient, job: str, min_step: int = 1) -> pb.JobStatus:
    for status in client.watch(job):
        if status.state == pb.JOB_STATE_RUNNING and status.step >= min_step:
            return status
        assert status.state not in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED), (
            status
        )
    raise AssertionError("watch ended before the job ran")


def raw_chunks(
    layer, frame, array, sample_type=pb.SAMPLE_TYPE_FLOAT32, total=None, channels=None, chunk=1 << 20
):
    data = np.ascontiguousarray(array, "<f4" if sample_type == pb.SAMPLE_TYPE_FLOAT32 else "<f2").tobytes()
    h, w = array.shape[:2]
    c = channels if channels is not None else array.shape[2]
    size = total if total is not None else len(data)
    out = []
    for off in range(0, max(len(data), 1), chunk):
        fc = pb.FrameChunk(
            layer=layer, frame=frame, total_size=size, offset=off, data=data[off : off + chunk]
        )
        if off == 0:
            fc.encoding = pb.ENCODING_RAW
            fc.raw.CopyFrom(pb.RawFormat(width=w, height=h, channels=c, sample_type=sample_type))
        out.append(pb.SubmitRequest(chunk=fc))
    return out


def exr_chunks(layer, frame, data: bytes):
    fc = pb.FrameChunk(
        layer=layer, frame=frame, total_size=len(data), offset=0, data=data, encoding=pb.ENCODING_EXR
    )
    return [pb.SubmitRequest(chunk=fc)]


def uniform_frame(h=20, w=24, c=3, value=0.5):
    return np.full((h, w, c), value, np.float32)


P, M = pb.LAYER_PLATE, pb.LAYER_MASK


def exr_bytes(tmp_path: Path, channels=("R", "G", "B"), size=(24, 20)) -> bytes:
    path = tmp_path / f"f{len(channels)}.exr"
    write_exr(path, np.full((size[1], size[0], len(channels)), 0.25, np.float32), channels)
    return path.read_bytes()


def assert_split_equals_one_process(split: list[np.ndarray], single: list[np.ndarray]) -> None:
    """Layered results of a job split over several processes (context parallelism) against one process.

    Channels R,G,B,A, edit.R,G,B,A, matte.A. The composite agrees to 1e-5. The matte, and the premultiplied edit
    that carries it, agree to 1e-4: the guided filter that upsamples the matte solves a 3x3 system per pixel, which
    amplifies the last-bit differences of attention computed in parts (measured on vera-tiny: composite 7.7e-6,
    edit 4.0e-5, matte 5.9e-5). 1e-4 is a fifth of half float's step just below 1.0 (4.9e-4), so in the default
    half-float results the two runs' files differ by at most one step. The model's own output is compared
    tighter in tests/test_parallel.py.
    """
    assert len(split) == len(single)
    worst = np.max(
        [np.abs(a - b).reshape(-1, a.shape[-1]).max(axis=0) for a, b in zip(split, single, strict=True)],
        axis=0,
    )
    assert worst[[0, 1, 2, 3]].max() < 1e-5 and worst[[4, 5, 6, 7, 8]].max() < 1e-4, worst
