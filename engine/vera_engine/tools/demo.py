"""`vera-engine demo`: the whole product on the shipped checkpoint, end to end, in about a minute on a CPU.

1. writes the sample shots, scene-linear ACEScg EXRs at 4x the model's native size, frames 1001+: one plate to add
   an object to, twice, with opposite motions asked for, and a shot whose background is replaced (with the
   artist's mask of the background);
2. starts a real engine (`vera-engine serve`) on a free loopback port;
3. submits them through the TD client (`vera_plugin.EngineClient`) and shows the jobs' progress;
4. fetches the layered EXRs (composite, edit layer, matte) and writes a contact sheet PNG;
5. prints where everything is and stops the engine.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FIRST_FRAME = 1001
# The sample shots: the synthetic generator's scenes (docs/DATASET.md) for these seeds, with their instructions in
# words the shipped model knows. Two object-addition shots share one plate and ask for opposite motions (the second
# shot's instruction is the first's with left and right swapped), meant to show the words steering the edit; the
# third replaces a background. Seeds picked among 0-39 where the shipped model makes the edits asked for (it does not
# on every scene: its model card gives the rates; the object-addition seed is one whose object moves sideways, so the
# mirrored words ask for the opposite motion); a new checkpoint may need new picks, and tests/test_demo.py says so
# when it does. (name, task, seed, mirrored instruction)
DEMO_SCENES: tuple[tuple[str, str, int, bool], ...] = (
    ("object-addition", "object_addition", 20, False),
    ("object-addition-mirrored", "object_addition", 20, True),
    ("background-change", "background_change", 0, False),
)


@dataclass
class DemoPlate:
    """One sample shot: its EXR pattern (and mask pattern), frame numbers, instruction, task and size."""

    name: str
    pattern: str
    frames: list[int]
    prompt: str
    task: str
    size: tuple[int, int]
    mask: str | None = None


def demo_clip(task: str, seed: int, mirrored: bool, frames: int, height: int, width: int):
    """A demo shot's scene (the generator's clip) and the instruction and facts the shot asks for.

    `mirrored`: the same plate, the instruction with left and right swapped (the opposite horizontal motion).
    """
    from vera_engine.training.data.dataset import mirror_fields, mirror_text
    from vera_engine.training.data.synthetic import generate_clip

    clip = generate_clip(task, seed, frames=frames, height=height, width=width)
    if not mirrored:
        return clip, clip.instruction, clip.fields
    return clip, mirror_text(clip.instruction), mirror_fields(clip.fields)


def write_sample_plates(out: Path, native: tuple[int, int], frames: int) -> list[DemoPlate]:
    """The demo's shots at 4x `native`, written as ACEScg half-float EXRs (and a mask sequence where the task
    takes one)."""
    from vera_engine.imaging.colour import ColourConverter
    from vera_engine.imaging.exr import write_sequence

    height, width = native[0] * 4, native[1] * 4
    numbers = list(range(FIRST_FRAME, FIRST_FRAME + frames))
    plates = []
    for name, task, seed, mirrored in DEMO_SCENES:
        clip, prompt, _ = demo_clip(task, seed, mirrored, frames, height, width)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        # The generator draws in the model's display-referred space; a plate is scene-linear.
        linear = ColourConverter("ACEScg").from_model(clip.input).astype(np.float32)
        pattern = str(folder / "plate.####.exr")
        write_sequence(pattern, linear, numbers, ("R", "G", "B"), pixel_type="half")
        mask = None
        if task == "background_change":  # the background to replace: the inverse of a roto of the subject
            mask = str(folder / "mask.####.exr")
            write_sequence(mask, clip.mask[..., None].astype(np.float32), numbers, ("A",), pixel_type="half")
        plates.append(DemoPlate(name, pattern, numbers, prompt, task, (height, width), mask))
    return plates


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


def _progress_printer(label: str, stream=sys.stdout):
    started = time.monotonic()
    shown: list[tuple[str, int]] = [("", -1)]

    def show(status) -> None:
        from vera_plugin.client import state_name

        state = state_name(status.state)
        if status.total_steps:
            done = int(24 * status.step / status.total_steps)
            bar = "#" * done + "-" * (24 - done)
            eta = f", ETA {status.eta_seconds:.0f} s" if status.HasField("eta_seconds") else ""
            text = f"\r  {label:<18} {state:<9} [{bar}] step {status.step}/{status.total_steps}{eta}   "
        else:
            text = f"\r  {label:<18} {state:<9} {time.monotonic() - started:5.1f} s   "
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
    """Run the demo into `out`; returns the paths it wrote (each shot's results folder, and the contact sheet)."""
    from vera_engine.imaging.colour import ColourConverter
    from vera_engine.imaging.exr import read_layers, read_plate
    from vera_engine.imaging.preview import contact_sheet, write_contact_sheet
    from vera_engine.pipelines.model_store import resolve_model_dir
    from vera_plugin.client import EngineClient, state_name

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(model)
    index = json.loads((model_dir / "model_index.json").read_text())
    native = (int(index.get("native_height", 64)), int(index.get("native_width", 64)))
    frames = int(index.get("native_frames", 8))

    print(f"1. sample plates: {frames} frames of {native[1] * 4}x{native[0] * 4}, ACEScg half EXR")
    plates = write_sample_plates(out, native, frames)
    for plate in plates:
        mask = f", mask {plate.mask}" if plate.mask else ""
        print(f"   {plate.name}: {plate.pattern}{mask}")
        print(f"   instruction: {plate.prompt!r}")

    print(f"2. starting the engine on model {str(model_dir)!r}")
    engine = _Engine(str(model_dir), out / "spool")
    results: dict[str, list[Path]] = {}
    try:
        print(f"   listening on {engine.address}")
        with EngineClient(engine.address) as client:
            client.wait_until_serving(timeout=120)
            print("3. submitting both shots through vera_plugin.EngineClient")
            jobs = {
                plate.name: client.submit_files(
                    plate.pattern,
                    plate.frames,
                    prompt=plate.prompt,
                    task=plate.task,
                    mask=plate.mask,
                    seed=seed,
                    steps=steps,
                    colorspace="ACEScg",
                    name=f"vera-demo {plate.name}",
                )
                for plate in plates
            }
            for plate in plates:  # the engine runs them one after the other, in submission order
                final = client.wait(jobs[plate.name], _progress_printer(plate.name))
                if sys.stdout.isatty():
                    print()
                if state_name(final.state) != "succeeded":
                    raise RuntimeError(
                        f"job {jobs[plate.name]} ended {state_name(final.state)}: {final.error}"
                    )
            print("4. fetching the layers")
            for plate in plates:
                results[plate.name] = client.fetch(jobs[plate.name], out / plate.name / "results")
    finally:
        engine.stop()

    sheets = []
    for plate in plates:
        layers = [read_layers(path) for path in sorted(results[plate.name]) if path.suffix == ".exr"]
        source = read_plate(plate.pattern, plate.frames).pixels
        composite, edit, matte = (
            np.stack([layer[name] for layer in layers]) for name in ("composite", "edit", "matte")
        )
        sheets.append(
            contact_sheet(source, edit, matte, composite, colour=ColourConverter("ACEScg"), panel_height=192)
        )
    gap = np.full((12, sheets[0].shape[1], 3), 0.1, np.float32)
    stacked = [part for sheet in sheets for part in (sheet, gap)][:-1]  # every shot, a gap between shots
    sheet_path = write_contact_sheet(out / "contact_sheet.png", np.concatenate(stacked))
    print("5. done:")
    for plate in plates:
        print(
            f"   {plate.name:<24} layered EXRs in {out / plate.name / 'results'} ({len(results[plate.name])} frames)"
        )
    print(f"   contact sheet  {sheet_path}")
    print(
        f"                  rows: first, middle, last frame of each shot ({', '.join(plate.name for plate in plates)})"
    )
    print("                  columns: source | edit over checkerboard | matte | composite")
    return {**{plate.name: out / plate.name / "results" for plate in plates}, "contact_sheet": sheet_path}
