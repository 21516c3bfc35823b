"""`vera-engine demo`: the whole product on the shipped checkpoint, end to end, in about a minute on a CPU.

1. writes a sample plate: a synthetic shot, scene-linear ACEScg EXRs at 4x the model's native size, frames 1001+;
2. starts a real engine (`vera-engine serve`) on a free loopback port;
3. submits the plate through the TD client (`vera_plugin.EngineClient`) and shows the job's progress;
4. fetches the layered EXRs (composite, edit layer, matte) and writes a contact sheet PNG;
5. prints where everything is and stops the engine.
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEMO_SEED = 7
FIRST_FRAME = 1001


@dataclass
class DemoPlate:
    """The sample shot: its EXR pattern, frame numbers, instruction and task."""

    pattern: str
    frames: list[int]
    prompt: str
    task: str
    size: tuple[int, int]


def write_sample_plate(out: Path, native: tuple[int, int], frames: int, seed: int = DEMO_SEED) -> DemoPlate:
    """A synthetic object-addition shot at 4x `native`, written as ACEScg half-float EXRs."""
    from vera_engine.imaging.colour import ColourConverter
    from vera_engine.imaging.exr import write_sequence
    from vera_engine.training.data.synthetic import generate_clip

    height, width = native[0] * 4, native[1] * 4
    clip = generate_clip("object_addition", seed, frames=frames, height=height, width=width)
    # The generator draws in the model's display-referred space; a plate is scene-linear.
    linear = ColourConverter("ACEScg").from_model(clip.input).astype(np.float32)
    numbers = list(range(FIRST_FRAME, FIRST_FRAME + frames))
    pattern = str(out / "plate" / "plate.####.exr")
    (out / "plate").mkdir(parents=True, exist_ok=True)
    write_sequence(pattern, linear, numbers, ("R", "G", "B"), pixel_type="half")
    return DemoPlate(pattern, numbers, clip.instruction, clip.task, (height, width))


class _Engine:
    """A `vera-engine serve` subprocess on a free loopback port."""

    def __init__(self, model: str, spool: Path) -> None:
        command = [
            sys.executable,
            "-m",
            "vera_engine",
            "serve",
            "--model",
            model,
            "--port",
            "0",
            "--spool",
            str(spool),
            "--log-level",
            "WARNING",
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.address = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.process.stdout.readline() if self.process.stdout else ""
            if not line:
                if self.process.poll() is not None:
                    error = self.process.stderr.read() if self.process.stderr else ""
                    raise RuntimeError(f"the engine did not start:\n{error.strip()}")
                continue
            if line.startswith("vera-engine listening on "):
                self.address = line.rsplit(" ", 1)[1].strip()
                return
        self.stop()
        raise RuntimeError("the engine did not report its address within 120 s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _progress_printer(stream=sys.stdout):
    started = time.monotonic()
    shown: list[tuple[str, int]] = [("", -1)]

    def show(status) -> None:
        from vera_plugin.client import state_name

        state = state_name(status.state)
        if status.total_steps:
            done = int(24 * status.step / status.total_steps)
            bar = "#" * done + "-" * (24 - done)
            eta = f", ETA {status.eta_seconds:.0f} s" if status.HasField("eta_seconds") else ""
            text = f"\r  {state:<9} [{bar}] step {status.step}/{status.total_steps}{eta}   "
        else:
            text = f"\r  {state:<9} {time.monotonic() - started:5.1f} s   "
        # A terminal redraws the line in place; a log or pipe gets one line per change of step or state.
        key = (state, status.step)
        if stream.isatty():
            stream.write(text)
            stream.flush()
        elif key != shown[-1]:
            shown.append(key)
            print(text.strip(), file=stream, flush=True)

    return show


def run_demo(
    out: "str | os.PathLike[str]" = "vera_demo",
    model: str = "default",
    steps: int | None = None,
    seed: int = 0,
) -> dict[str, Path]:
    """Run the demo into `out`; returns the paths it wrote."""
    from vera_engine.imaging.colour import ColourConverter
    from vera_engine.imaging.exr import read_layers, read_plate
    from vera_engine.imaging.preview import contact_sheet, write_contact_sheet
    from vera_engine.pipelines.model_store import resolve_model_dir
    from vera_plugin.client import EngineClient

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(model)
    index = __import__("json").loads((model_dir / "model_index.json").read_text())
    native = (int(index.get("native_height", 64)), int(index.get("native_width", 64)))
    frames = int(index.get("native_frames", 8))

    print(f"1. sample plate: {frames} frames of {native[1] * 4}x{native[0] * 4}, ACEScg half EXR")
    plate = write_sample_plate(out, native, frames)
    print(f"   {plate.pattern} (frames {plate.frames[0]}-{plate.frames[-1]})")
    print(f"   instruction: {plate.prompt!r}")

    print(f"2. starting the engine on model {str(model_dir)!r}")
    engine = _Engine(str(model_dir), out / "spool")
    try:
        print(f"   listening on {engine.address}")
        with EngineClient(engine.address) as client:
            client.wait_until_serving(timeout=120)
            print("3. submitting through vera_plugin.EngineClient")
            job = client.submit_files(
                plate.pattern,
                plate.frames,
                prompt=plate.prompt,
                task=plate.task,
                seed=seed,
                steps=steps,
                colorspace="ACEScg",
                name="vera-demo",
            )
            final = client.wait(job, _progress_printer())
            if sys.stdout.isatty():
                print()
            from vera_plugin.client import state_name

            if state_name(final.state) != "succeeded":
                raise RuntimeError(f"job {job} ended {state_name(final.state)}: {final.error}")
            print(f"4. fetching job {job}")
            results = client.fetch(job, out / "results")
    finally:
        engine.stop()

    layers = [read_layers(path) for path in sorted(results) if path.suffix == ".exr"]
    source = read_plate(plate.pattern, plate.frames).pixels
    composite, edit, matte = (
        np.stack([layer[name] for layer in layers]) for name in ("composite", "edit", "matte")
    )
    sheet_path = write_contact_sheet(
        out / "contact_sheet.png",
        contact_sheet(source, edit, matte, composite, colour=ColourConverter("ACEScg"), panel_height=256),
    )
    print("5. done:")
    print(f"   plate          {plate.pattern}")
    print(f"   layered EXRs   {out / 'results'} ({len(layers)} frames: R,G,B,A composite; edit.*; matte.A)")
    print(f"   contact sheet  {sheet_path}  (source | edit over checkerboard | matte | composite)")
    return {"plate": Path(plate.pattern).parent, "results": out / "results", "contact_sheet": sheet_path}
