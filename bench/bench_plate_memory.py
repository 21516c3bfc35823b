"""Engine memory and post-model throughput on big plates: `vera-engine serve` + `vera edit` on the shipped model.

Writes a half-float RGBA plate (default 100 frames of 4096x2160), starts a real engine, runs `vera edit` on it
(the TD's command: upload, job, fetch), and reports:

- the engine's peak resident memory above its idle resident memory (kernel's VmHWM minus VmRSS once the model is
  loaded), i.e. what editing the plate cost in RAM;
- the post-model stage (from the job's WRITING stage to its end: read each plate frame again, upsample the matte
  and edit, composite, write the layered EXR) in frames per second, against, measured in the same run:
  - the same I/O with no compute (the target's reference): reading the same plate frames and writing the same
    nine-channel layered EXRs the engine wrote (same half pixels, same compression), the next frame read while one
    is written, as the stage does;
  - a plain OpenImageIO copy of the plate (four channels in, four out), so the cost of the layered output itself
    stays visible.

    python bench/bench_plate_memory.py --frames 100 --width 4096 --height 2160
    python bench/bench_plate_memory.py --frames 1 --width 8192 --height 4320
    python bench/bench_plate_memory.py --profile --width 4096 --height 2160   # one frame's parts, timed
    python bench/bench_plate_memory.py --in-process --frames 8 --repeats 2   # the stage alone, no engine

``--in-process`` runs the stage itself (``finish_frames`` into the engine's ``ResultWriter``) in this process on
the shipped model's layers, without the gRPC upload and download, so a short run fits a shared machine; each
repeat times the stage, then the layered I/O with no compute and the plain copy, and reports its own ratios and
the stage's peak resident memory above the process's resident memory before it.

Figures with the command and the machine go in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import OpenImageIO as oiio

FIRST = 1001
# The layered EXR's channels (ARCHITECTURE.md), spelled here so the bench also runs against an engine before them.
LAYER_CHANNELS = ("R", "G", "B", "A", "edit.R", "edit.G", "edit.B", "edit.A", "matte.A")


def write_plate(folder: Path, frames: int, width: int, height: int) -> str:
    """A compressible but not trivial half RGBA plate: gradients, a moving pattern and mild noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    noise = rng.normal(0, 0.01, (height, width)).astype(np.float32)
    for i in range(frames):
        base = 0.18 + 0.3 * x * y + 0.05 * np.sin(40 * x + i * 0.1) * np.cos(25 * y) + noise
        rgba = np.stack([base, base * 0.9, base * 0.7, np.ones_like(base)], axis=-1).astype(np.float16)
        spec = oiio.ImageSpec(width, height, 4, oiio.HALF)
        spec.attribute("compression", "zip")
        out = oiio.ImageOutput.create(str(folder / f"plate.{FIRST + i}.exr"))
        out.open(str(folder / f"plate.{FIRST + i}.exr"), spec)
        out.write_image(rgba)
        out.close()
    return str(folder / "plate.####.exr")


def plain_read_write(pattern: str, frames: int, out: Path) -> float:
    """Seconds for OpenImageIO to read every frame and write it back (zip, half): the I/O floor per frame."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for i in range(frames):
        path = pattern.replace("####", str(FIRST + i))
        buf = oiio.ImageBuf(path)
        buf.read(force=True)
        buf.set_write_format(oiio.HALF)
        buf.specmod().attribute("compression", "zip")
        if not buf.write(str(out / f"copy.{FIRST + i}.exr")):
            raise RuntimeError(buf.geterror())
    return time.perf_counter() - started


def layered_read_write(pattern: str, frames: int, outputs: list[Path], out: Path, cached: int = 8) -> float:
    """Seconds to read every plate frame and write a nine-channel layered EXR per frame with no compute: the I/O
    the post-model stage cannot avoid. The layers written are the engine's own (the first ``cached`` output frames,
    loaded beforehand and reused in turn, so loading them is not timed); the next plate frame is read on a thread
    while one is written, as the stage overlaps them."""
    from concurrent.futures import ThreadPoolExecutor

    from vera_engine.imaging.exr import write_exr

    out.mkdir(parents=True, exist_ok=True)
    layers = []
    for path in outputs[:cached]:
        buf = oiio.ImageBuf(str(path))
        buf.read(force=True)
        names = list(buf.spec().channelnames)
        pixels = buf.get_pixels(oiio.HALF)
        layers.append(np.ascontiguousarray(pixels[..., [names.index(c) for c in LAYER_CHANNELS]]))

    def read(i: int) -> np.ndarray:
        buf = oiio.ImageBuf(pattern.replace("####", str(FIRST + i)))
        buf.read(force=True)
        return buf.get_pixels(oiio.FLOAT)

    started = time.perf_counter()
    with ThreadPoolExecutor(1) as reader:
        pending = reader.submit(read, 0)
        for i in range(frames):
            frame = pending.result()
            if i + 1 < frames:
                pending = reader.submit(read, i + 1)
            del frame
            write_exr(
                out / f"layers.{FIRST + i}.exr", layers[i % len(layers)], LAYER_CHANNELS, compression="zip"
            )
    return time.perf_counter() - started


def profile_one_frame(width: int, height: int, work: Path) -> dict[str, float]:
    """One frame of the bench plate through the stage's parts in this process, each timed (the second run of
    each, after a warm-up): reading the frame, making its layers, writing the layered EXR."""
    from vera_engine.imaging.colour import ColourConverter
    from vera_engine.imaging.exr import read_exr
    from vera_engine.imaging.plate_layers import ResultWriter, finish_frame
    from vera_engine.pipelines.edit_plate import sample_plate
    from vera_engine.pipelines.model_store import load_pipeline

    pattern = write_plate(work / "plate", 1, width, height)
    path = pattern.replace("####", str(FIRST))
    colour = ColourConverter("ACEScg")
    frame = read_exr(path)[0]
    model = sample_plate(
        load_pipeline("default"), frame[None], prompt="add a red ball", colour=colour, steps=4
    )
    writer = ResultWriter(work / "out", [FIRST])
    parts: dict[str, float] = {}
    for _ in range(2):
        started = time.perf_counter()
        frame = read_exr(path)[0]
        parts["read_s"] = time.perf_counter() - started
        started = time.perf_counter()
        layers = finish_frame(model, 0, frame, colour)
        parts["make_layers_s"] = time.perf_counter() - started
        started = time.perf_counter()
        writer(0, layers)
        parts["write_layered_s"] = time.perf_counter() - started
    parts["matte_covers"] = float((layers.matte > 0).mean())
    return {key: round(value, 3) for key, value in parts.items()}


class PlateReader:
    """The bench plate read frame by frame on demand, as the engine's spool does (a ``PlateFrames``)."""

    def __init__(self, pattern: str, frames: int) -> None:
        self.pattern, self.frames = pattern, frames

    def __len__(self) -> int:
        return self.frames

    def __getitem__(self, index: int) -> np.ndarray:
        from vera_engine.imaging.exr import read_exr

        return read_exr(self.pattern.replace("####", str(FIRST + index)))[0]


def in_process(pattern: str, frames: int, repeats: int, work: Path) -> dict[str, object]:
    """The post-model stage alone (see the module doc), ``repeats`` times, each against the I/O in the same run."""
    from vera_engine.imaging.colour import ColourConverter
    from vera_engine.imaging.plate_layers import ResultWriter, finish_frames
    from vera_engine.pipelines.edit_plate import sample_plate
    from vera_engine.pipelines.model_store import load_pipeline

    colour = ColourConverter("ACEScg")
    plate = PlateReader(pattern, frames)
    model = sample_plate(load_pipeline("default"), plate, prompt="add a red ball", colour=colour, steps=4)
    runs = []
    for _ in range(repeats):
        shutil.rmtree(work / "out", ignore_errors=True)
        Path("/proc/self/clear_refs").write_text("5")  # the kernel's peak (VmHWM) restarts from now
        before = _status(os.getpid())["VmRSS"]
        started = time.perf_counter()
        writer = ResultWriter(work / "out", [FIRST + i for i in range(frames)])
        finish_frames(model, plate, colour, writer)
        stage = time.perf_counter() - started
        peak = _status(os.getpid())["VmHWM"] - before
        layered = layered_read_write(pattern, frames, writer.paths, work / "layered")
        shutil.rmtree(work / "layered")
        plain = plain_read_write(pattern, frames, work / "plain")
        shutil.rmtree(work / "plain")
        matte = oiio.ImageBuf(str(writer.paths[0]))
        names = list(matte.spec().channelnames)
        covers = float((matte.get_pixels(oiio.FLOAT)[..., names.index("matte.A")] > 0).mean())
        runs.append(
            {
                "post_model_frames_per_s": round(frames / stage, 3),
                "layered_io_no_compute_frames_per_s": round(frames / layered, 3),
                "post_model_vs_layered_io": round(layered / stage, 2),
                "plain_oiio_read_write_frames_per_s": round(frames / plain, 3),
                "post_model_vs_plain": round(plain / stage, 2),
                "stage_peak_rss_above_start_gb": round(peak / 1e9, 2),
                "matte_covers": round(covers, 2),
            }
        )
    return {"runs": runs}


def _status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--height", type=int, default=2160)
    parser.add_argument(
        "--steps", type=int, default=4, help="sampling steps (the model is not what is measured)"
    )
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument(
        "--profile", action="store_true", help="time one frame's parts in this process instead"
    )
    parser.add_argument(
        "--in-process", action="store_true", help="time the stage alone in this process instead"
    )
    parser.add_argument("--repeats", type=int, default=2, help="--in-process: runs, each with its own ratios")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="vera-bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.profile:
            print(
                json.dumps(
                    {
                        "size": f"{args.width}x{args.height}",
                        **profile_one_frame(args.width, args.height, work),
                    }
                )
            )
            return
        started = time.perf_counter()
        pattern = write_plate(work / "plate", args.frames, args.width, args.height)
        print(
            f"plate: {args.frames} frames of {args.width}x{args.height} half RGBA ({time.perf_counter() - started:.0f} s)"
        )
        if args.in_process:
            machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
            report = in_process(pattern, args.frames, args.repeats, work)
            print(json.dumps({"frames": args.frames, "size": f"{args.width}x{args.height}", **report,
                              "machine": machine, "load_average": os.getloadavg()}, indent=2))  # fmt: skip
            return
        plain_seconds = plain_read_write(pattern, args.frames, work / "plain")
        shutil.rmtree(work / "plain")

        engine = subprocess.Popen(
            [sys.executable, "-m", "vera_engine", "serve", "--model", "default", "--port", "0",
             "--spool", str(work / "spool"), "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            address = ""
            while not address:
                line = engine.stdout.readline() if engine.stdout else ""
                if not line and engine.poll() is not None:
                    raise RuntimeError(
                        f"the engine did not start: {engine.stderr.read() if engine.stderr else ''}"
                    )
                if line.startswith("vera-engine listening on "):
                    address = line.rsplit(" ", 1)[1].strip()
            from vera_plugin.client import EngineClient

            with EngineClient(address) as client:
                client.wait_until_serving(timeout=300)
            time.sleep(1.0)
            idle = _status(engine.pid)["VmRSS"]
            # The post-model stage, timed from the job's own stages (a second client watching the job).
            stages: dict[str, float] = {}

            def watch() -> None:
                with EngineClient(address) as client:
                    while not client.list_jobs():
                        time.sleep(0.05)
                    job = client.list_jobs()[-1].job_id
                    from vera_proto.vera.v1 import engine_pb2 as pb

                    for status in client.watch(job):
                        name = pb.Stage.Name(status.stage)
                        stages.setdefault(name, time.perf_counter())

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            edit_started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "vera_plugin.cli", "edit", "--engine", address, "--plate", pattern,
                 "--frames", f"{FIRST}-{FIRST + args.frames - 1}", "--prompt", "add a red ball",
                 "--steps", str(args.steps), "--seed", "0", "--out", str(work / "out"), "--quiet"],
                capture_output=True, text=True,
            )  # fmt: skip
            edit_seconds = time.perf_counter() - edit_started
            if done.returncode != 0:
                raise RuntimeError(f"vera edit failed ({done.returncode}): {done.stderr}")
            watcher.join(30)
            peak = _status(engine.pid)["VmHWM"]
        finally:
            engine.terminate()
            engine.wait(30)
        post_seconds = stages["STAGE_DONE"] - stages["STAGE_WRITING"]
        outputs = sorted((work / "out").rglob("vera_edit.*.exr"))
        layered_seconds = layered_read_write(pattern, args.frames, outputs, work / "layered")
        shutil.rmtree(work / "layered")
        result = {
            "frames": args.frames,
            "size": f"{args.width}x{args.height}",
            "engine_idle_rss_gb": round(idle / 1e9, 2),
            "engine_peak_above_idle_gb": round((peak - idle) / 1e9, 2),
            "post_model_frames_per_s": round(args.frames / post_seconds, 3),
            "layered_io_no_compute_frames_per_s": round(args.frames / layered_seconds, 3),
            "post_model_vs_layered_io": round(layered_seconds / post_seconds, 2),
            "plain_oiio_read_write_frames_per_s": round(args.frames / plain_seconds, 3),
            "post_model_vs_plain": round(plain_seconds / post_seconds, 2),
            "vera_edit_seconds": round(edit_seconds, 1),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        }
        print(json.dumps(result, indent=2))
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
