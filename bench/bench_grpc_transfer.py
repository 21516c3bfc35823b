"""Upload and download of a plate through the engine's gRPC service against a plain TCP copy of the same bytes.

Both run over loopback between two processes and land in files on the same disk:

- gRPC upload: ``EngineClient.submit_arrays`` (raw half RGBA, chunked Submit stream) into a real ``Engine``
  (spooled to disk, every sample checked for NaN/Inf as it streams), until the job is queued.
- gRPC download: ``EngineClient.fetch`` of the job's results (the bench runner hard-links the spooled frames
  as the job's output files, so the same bytes come back) into a folder.
- TCP: ``socket.sendall`` of the same bytes, frame by frame, received with ``recv_into`` and written to
  one file per frame; and the reverse for the download.

``--exr`` also uploads the plate as EXR files (ZIP), which the engine decodes to validate, against a TCP copy
of the same files. Run from the repository root: ``python bench/bench_grpc_transfer.py``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

FRAME_HEADER = 16


def make_plate(frames: int, height: int, width: int) -> np.ndarray:
    """Film-like half RGBA: gradients plus grain (random data would not compress, flat data too well)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, 0.5 * (x + y) / (width + height), np.ones_like(x)], axis=-1)
    plate = np.empty((frames, height, width, 4), np.float16)
    for i in range(frames):
        grain = rng.normal(0.0, 0.02, (height, width, 1)).astype(np.float32)
        plate[i] = base * (0.5 + 0.5 * i / frames) + grain
    return plate


# ---------------------------------------------------------------------------------------------------------
# The engine side (a child process)


class LinkRunner:
    """Bench runner: the job's results are the spooled input frames themselves (hard links, no work)."""

    def load(self) -> None:
        pass

    def models(self):
        from vera_engine.service.testing import PassThroughRunner

        return PassThroughRunner().models()

    def device_info(self):
        from vera_proto.vera.v1 import engine_pb2 as pb

        return pb.DeviceInfo(name="bench", kind="cpu")

    def run(self, ctx) -> list[Path]:
        out = []
        for frame in ctx.inputs.frames:
            entry = ctx.inputs.manifest["plate"][str(frame)]
            target = ctx.output_dir / f"vera_edit.{frame:04d}.{entry['file'].rsplit('.', 1)[1]}"
            os.link(ctx.inputs.dir / entry["file"], target)
            out.append(target)
        return out


def engine_process(spool: str, port_queue: mp.Queue, stop: mp.Event) -> None:
    from vera_engine.service import Engine, create_server

    engine = Engine(spool, LinkRunner(), retention_seconds=3600)
    # Keep the spooled inputs: the results are hard links to them.
    engine.spool.remove_inputs = lambda job_id: None  # type: ignore[method-assign]
    server, port = create_server(engine, "127.0.0.1", 0)
    engine.start()
    server.start()
    port_queue.put(port)
    stop.wait()
    server.stop(0).wait()
    engine.stop()


def tcp_sink(port_queue: mp.Queue, folder: str, sizes: list[int]) -> None:
    """Receive frames (sizes known) and write each to its own file."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port_queue.put(listener.getsockname()[1])
        conn, _ = listener.accept()
        buffer = bytearray(4 << 20)
        view = memoryview(buffer)
        with conn:
            for i, size in enumerate(sizes):
                with open(os.path.join(folder, f"frame.{i}"), "wb") as out:
                    left = size
                    while left:
                        n = conn.recv_into(view, min(left, len(buffer)))
                        if not n:
                            raise ConnectionError("sender closed early")
                        out.write(view[:n])
                        left -= n
            conn.sendall(b"k")


def tcp_source(port_queue: mp.Queue, files: list[str]) -> None:
    """Serve files over one connection (the download baseline)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port_queue.put(listener.getsockname()[1])
        conn, _ = listener.accept()
        with conn:
            for path in files:
                with open(path, "rb") as handle:
                    while block := handle.read(4 << 20):
                        conn.sendall(block)
            conn.recv(1)


def tcp_upload(frames: list[memoryview], folder: str) -> float:
    q: mp.Queue = mp.Queue()
    proc = mp.Process(target=tcp_sink, args=(q, folder, [len(f) for f in frames]))
    proc.start()
    port = q.get(timeout=30)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for frame in frames:
            sock.sendall(frame)
        sock.recv(1)
    elapsed = time.perf_counter() - start
    proc.join(30)
    return elapsed


def tcp_download(files: list[str], folder: str) -> float:
    q: mp.Queue = mp.Queue()
    proc = mp.Process(target=tcp_source, args=(q, files))
    proc.start()
    port = q.get(timeout=30)
    buffer = bytearray(4 << 20)
    view = memoryview(buffer)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for i, path in enumerate(files):
            left = os.path.getsize(path)
            with open(os.path.join(folder, f"frame.{i}"), "wb") as out:
                while left:
                    n = sock.recv_into(view, min(left, len(buffer)))
                    out.write(view[:n])
                    left -= n
        sock.sendall(b"k")
    elapsed = time.perf_counter() - start
    proc.join(30)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--exr", action="store_true", help="also upload the plate as ZIP EXR files")
    parser.add_argument("--tmp", default=None, help="scratch folder (default: system temp)")
    args = parser.parse_args()

    from vera_plugin.client import EngineClient
    from vera_proto.vera.v1 import engine_pb2 as pb

    scratch = Path(tempfile.mkdtemp(prefix="vera-bench-", dir=args.tmp))
    try:
        plate = make_plate(args.frames, args.height, args.width)
        total = plate.nbytes
        print(f"plate: {args.frames} frames {args.width}x{args.height} half RGBA, {total / 1e9:.2f} GB raw")

        q: mp.Queue = mp.Queue()
        stop = mp.Event()
        engine = mp.Process(target=engine_process, args=(str(scratch / "spool"), q, stop))
        engine.start()
        port = q.get(timeout=60)
        rows = []
        try:
            with EngineClient(f"127.0.0.1:{port}", timeout=60) as client:
                client.wait_until_serving(60)
                start = time.perf_counter()
                job = client.submit_arrays(plate, range(1, args.frames + 1), prompt="bench", steps=1)
                grpc_up = time.perf_counter() - start
                assert client.wait(job).state == pb.JOB_STATE_SUCCEEDED
                start = time.perf_counter()
                fetched = client.fetch(job, scratch / "fetched")
                grpc_down = time.perf_counter() - start
                assert sum(f.stat().st_size for f in fetched) == total

                (scratch / "tcp_up").mkdir()
                tcp_up = tcp_upload([memoryview(f).cast("B") for f in plate], str(scratch / "tcp_up"))
                (scratch / "tcp_down").mkdir()
                tcp_down = tcp_download([str(f) for f in fetched], str(scratch / "tcp_down"))
                rows += [
                    ("upload, raw half", total, grpc_up, tcp_up),
                    ("download", total, grpc_down, tcp_down),
                ]

                if args.exr:
                    from vera_engine.imaging.exr import write_sequence

                    exr_dir = scratch / "exr"
                    paths = write_sequence(
                        str(exr_dir / "plate.####.exr"),
                        plate.astype(np.float32),
                        list(range(1, args.frames + 1)),
                    )
                    exr_total = sum(p.stat().st_size for p in paths)
                    start = time.perf_counter()
                    exr_job = client.submit_files(
                        str(exr_dir / "plate.####.exr"), range(1, args.frames + 1), prompt="b"
                    )
                    grpc_exr = time.perf_counter() - start
                    client.cancel(exr_job)
                    (scratch / "tcp_exr").mkdir()
                    views = [memoryview(p.read_bytes()) for p in paths]
                    tcp_exr = tcp_upload(views, str(scratch / "tcp_exr"))
                    rows.append(("upload, ZIP EXR files (decoded to validate)", exr_total, grpc_exr, tcp_exr))
        finally:
            stop.set()
            engine.join(60)
        print()
        print("| transfer | bytes | gRPC | TCP copy | gRPC / TCP throughput |")
        print("| --- | --- | --- | --- | --- |")
        for name, size, grpc_s, tcp_s in rows:
            print(
                f"| {name} | {size / 1e9:.2f} GB | {grpc_s:.2f} s ({size / grpc_s / 1e6:.0f} MB/s) | "
                f"{tcp_s:.2f} s ({size / tcp_s / 1e6:.0f} MB/s) | **{tcp_s / grpc_s:.2f}×** |"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
