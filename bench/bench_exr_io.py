"""EXR I/O benchmark: vera_engine.imaging.exr reading + writing a half RGBA sequence against ``oiiotool`` doing the same.

Generates ``--frames`` frames (default 81) of ``--width`` x ``--height`` (2048x1080) half RGBA, ZIP-compressed,
with film-like content (smooth gradients plus grain, so compression does real work), then times in one run:

* vera: ``exr.read_plate`` of the whole sequence into (F, H, W, 4) float32, then ``exr.write_sequence`` as half ZIP;
* oiiotool: ``oiiotool --frames 1-N in.#.exr -d half --compression zip -o out.#.exr`` (frames one after another,
  each frame multithreaded inside OpenImageIO), and again with ``--parallel-frames``.

Prints throughput (frames/s) and the ratio vera / oiiotool. Usage::

    python bench/bench_exr_io.py [--frames 81] [--width 2048] [--height 1080] [--workdir DIR] [--oiiotool PATH]
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
import time
from pathlib import Path

import numpy as np
import OpenImageIO as oiio

from vera_engine.imaging import exr


def make_sequence(directory: Path, frames: int, width: int, height: int) -> str:
    """Write the source sequence (not timed) and return its pattern."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            0.18 + 0.5 * (xx / width),
            0.10 + 0.8 * (yy / height) ** 2,
            0.05 + 2.0 * np.exp(-(((xx - width * 0.6) / 300.0) ** 2 + ((yy - height * 0.4) / 200.0) ** 2)),
            np.ones_like(xx),
        ],
        axis=-1,
    )
    pattern = str(directory / "src.####.exr")
    for f in range(1, frames + 1):
        grain = rng.normal(0.0, 0.01, (height, width, 4)).astype(np.float32)
        grain[..., 3] = 0.0
        shifted = np.roll(base, f * 3, axis=1) + grain
        exr.write_exr(exr.frame_path(pattern, f), shifted, ("R", "G", "B", "A"), pixel_type="half")
    return pattern


def find_oiiotool(explicit: str | None) -> str:
    """``--oiiotool``, else the one beside this Python (the OpenImageIO wheel ships it), else on ``$PATH``."""
    candidates = [explicit, str(Path(sys.executable).with_name("oiiotool")), shutil.which("oiiotool")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit(
        "oiiotool not found: pass --oiiotool, or install openimageio-tools / the OpenImageIO wheel"
    )


def warm_cache(pattern: str, frames: int) -> None:
    """Read every source file once so both contenders start from the page cache."""
    for f in range(1, frames + 1):
        Path(exr.frame_path(pattern, f)).read_bytes()


def main() -> None:
    """Run the benchmark and print a Markdown table row plus JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--oiiotool", default=None)
    args = parser.parse_args()

    tool = find_oiiotool(args.oiiotool)
    workdir = Path(tempfile.mkdtemp(prefix="vera_bench_exr_", dir=args.workdir))
    try:
        source = make_sequence(workdir, args.frames, args.width, args.height)
        frame_range = range(1, args.frames + 1)
        warm_cache(source, args.frames)

        start = time.perf_counter()
        plate = exr.read_plate(source, frame_range)
        read_s = time.perf_counter() - start
        exr.write_sequence(str(workdir / "vera.####.exr"), plate.pixels, list(frame_range), plate.channels)
        vera_s = time.perf_counter() - start
        write_s = vera_s - read_s
        del plate

        def run_oiiotool(parallel: bool, name: str) -> float:
            command = [tool, "--frames", f"1-{args.frames}"]
            command += ["--parallel-frames"] if parallel else []
            command += [source.replace("####", "#"), "-d", "half", "--compression", "zip"]
            command += ["-o", str(workdir / f"{name}.#.exr")]
            begin = time.perf_counter()
            subprocess.run(command, check=True)
            return time.perf_counter() - begin

        oiio_s = run_oiiotool(False, "oiio")
        oiio_par_s = run_oiiotool(True, "oiiopar")

        # Same pixels out of both: a conversion benchmark is only fair if the outputs agree.
        check = exr.frame_path(str(workdir / "vera.####.exr"), args.frames)
        other = exr.frame_path(str(workdir / "oiio.####.exr"), args.frames)
        same = np.array_equal(exr.read_exr(check)[0], exr.read_exr(other)[0])

        fps = {
            "vera": args.frames / vera_s,
            "oiiotool": args.frames / oiio_s,
            "oiiotool_par": args.frames / oiio_par_s,
        }
        result = {
            "frames": args.frames,
            "size": f"{args.width}x{args.height}",
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "openimageio": oiio.__version__,
            "vera_read_s": round(read_s, 2),
            "vera_write_s": round(write_s, 2),
            "vera_s": round(vera_s, 2),
            "oiiotool_s": round(oiio_s, 2),
            "oiiotool_parallel_frames_s": round(oiio_par_s, 2),
            "vera_fps": round(fps["vera"], 2),
            "oiiotool_fps": round(fps["oiiotool"], 2),
            "ratio_vs_oiiotool": round(fps["vera"] / fps["oiiotool"], 2),
            "ratio_vs_oiiotool_parallel_frames": round(fps["vera"] / fps["oiiotool_par"], 2),
            "outputs_identical": bool(same),
        }
        print(
            f"| {args.frames} x {args.width}x{args.height} half RGBA ZIP | vera {vera_s:.1f} s "
            f"({fps['vera']:.1f} fps) | oiiotool {oiio_s:.1f} s ({fps['oiiotool']:.1f} fps) | "
            f"ratio {result['ratio_vs_oiiotool']:.2f}x |"
        )
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
