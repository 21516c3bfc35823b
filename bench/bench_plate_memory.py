"""Engine memory and post-model throughput on big plates: `vera-engine serve` + `vera edit` on the shipped model.

Writes a half-float RGBA plate (default 100 frames of 4096x2160), starts a real engine, runs `vera edit` on it
(the TD's command: upload, job, fetch), and reports:

- the engine's peak resident memory above its idle resident memory (kernel's VmHWM minus VmRSS once the model is
  loaded), i.e. what editing the plate cost in RAM;
- the post-model stage (from the job's WRITING stage to its end: read each plate frame again, upsample the matte
  and edit, composite, write the layered EXR) in frames per second, against a plain OpenImageIO read + write of the
  same frames (same compression) measured in the same run.

    python bench/bench_plate_memory.py --frames 100 --width 4096 --height 2160
    python bench/bench_plate_memory.py --frames 1 --width 8192 --height 4320

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
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="vera-bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        pattern = write_plate(work / "plate", args.frames, args.width, args.height)
        print(
            f"plate: {args.frames} frames of {args.width}x{args.height} half RGBA ({time.perf_counter() - started:.0f} s)"
        )
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
        result = {
            "frames": args.frames,
            "size": f"{args.width}x{args.height}",
            "engine_idle_rss_gb": round(idle / 1e9, 2),
            "engine_peak_above_idle_gb": round((peak - idle) / 1e9, 2),
            "post_model_frames_per_s": round(args.frames / post_seconds, 3),
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
