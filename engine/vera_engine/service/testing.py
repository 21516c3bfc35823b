"""Helpers for testing the service and its clients: a simple real runner, engine processes, a tiny model.

:class:`PassThroughRunner` does real, cheap work (reads the spooled plate, writes layered EXRs with an
empty edit layer and the plate as composite) in a configurable number of "steps", reporting progress and
honouring cancellation exactly like the pipeline runner; it lets queue, spool, restart and cancellation
tests run without a model. :class:`EngineProcess` runs ``python -m vera_engine.service`` as a real process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vera_engine.service.runner import take_name
from vera_engine.service.schema import ModelDefaults, model_info
from vera_engine.service.worker import JobContext
from vera_proto.vera.v1 import engine_pb2 as pb


class PassThroughRunner:
    """A model-free runner: ``steps`` timed steps, then the plate written back as Vera's layered EXRs."""

    def __init__(
        self,
        step_seconds: float = 0.0,
        load_seconds: float = 0.0,
        fail_prompt: str = "",
        gate_step: int = 0,
        hold_load: bool = False,
    ) -> None:
        self.step_seconds = step_seconds
        self.load_seconds = load_seconds
        # hold_load: load() waits until the test sets `loaded` (NOT_SERVING for exactly as long as the test needs).
        self.loaded = threading.Event()
        if not hold_load:
            self.loaded.set()
        self.fail_prompt = fail_prompt
        self.started: list[str] = []
        self.steps_done: dict[str, int] = {}
        # gate_step > 0: after that step the runner waits for `gate` (set by the test), with `at_gate` set,
        # so a test can act (e.g. cancel) at an exact point of a job.
        self.gate_step = gate_step
        self.gate = threading.Event()
        self.at_gate = threading.Event()

    def load(self) -> None:
        """Pretend-free load: waits ``load_seconds``, then for ``loaded``, so tests can observe NOT_SERVING."""
        time.sleep(self.load_seconds)
        self.loaded.wait(60)

    def models(self) -> list[pb.ModelInfo]:
        """One model called 'passthrough' with the standard schema."""
        from vera_engine.imaging.exr import COLOUR_COMPRESSIONS

        defaults = ModelDefaults(
            name="passthrough", native_height=32, native_width=32, frame_window=4, steps=3
        )
        return [model_info(defaults, ["ACEScg", "Linear Rec.709 (sRGB)"], COLOUR_COMPRESSIONS)]

    def device_info(self) -> pb.DeviceInfo:
        """The CPU."""
        return pb.DeviceInfo(name="test cpu", kind="cpu")

    def run(self, ctx: JobContext) -> list[Path]:
        """Step through ``header.steps`` steps, then write composite = plate, empty edit and matte."""
        from vera_engine.imaging.exr import frame_path, write_layered_exr

        self.started.append(ctx.job_id)
        if self.fail_prompt and ctx.header.prompt == self.fail_prompt:
            raise RuntimeError(f"told to fail on prompt {self.fail_prompt!r}")
        plate = ctx.inputs.plate()
        ctx.stage(pb.STAGE_SAMPLING, "sampling")
        for step in range(ctx.header.steps):
            ctx.check_cancelled()
            time.sleep(self.step_seconds)
            self.steps_done[ctx.job_id] = step + 1
            ctx.preview(
                plate[len(plate) // 2, ..., :3], frame=ctx.inputs.frames[0], step=step + 1, notify=False
            )
            ctx.progress(step + 1, ctx.header.steps)
            if step + 1 == self.gate_step:
                self.at_gate.set()
                self.gate.wait(30)
        ctx.check_cancelled()
        if not ctx.lead:
            return []
        ctx.stage(pb.STAGE_WRITING, "writing")
        paths = []
        # Takes (JobHeader.takes): take k is named vera_edit_take<k>.<frame>.exr (k > 1) and has seed + k - 1; its
        # edit layer is a flat (k - 1) / 8 with alpha 0 (so composite = plate + edit), telling the takes apart.
        for take in range(1, max(1, ctx.header.takes) + 1):
            prefix = take_name(take)
            for frame, pixels in zip(ctx.inputs.frames, plate, strict=True):
                rgba = (
                    pixels
                    if pixels.shape[-1] == 4
                    else np.concatenate([pixels, np.ones_like(pixels[..., :1])], -1)
                )
                edit = np.zeros_like(rgba)
                edit[..., :3] = (take - 1) / 8
                paths.append(
                    write_layered_exr(
                        frame_path(str(ctx.output_dir / f"{prefix}.####.exr"), frame),  # vera_edit.-003.exr
                        rgba + edit,
                        edit,
                        np.zeros_like(rgba[..., 0]),
                        pixel_type=ctx.header.bit_depth,
                        compression=ctx.header.compression,
                        metadata={
                            "job_id": ctx.job_id,
                            "prompt": ctx.header.prompt,
                            "seed": str(ctx.header.seed + take - 1),
                        },
                    )
                )
        return paths


def tiny_model_dir(root: Path) -> Path:
    """A tiny random-weight Vera pipeline saved under ``root/tiny-vera`` (built once, then reused)."""
    target = Path(root) / "tiny-vera"
    if not (target / "model_index.json").is_file():
        from vera_engine.pipelines.presets import build_random_pipeline

        tmp = Path(root) / f".tiny-vera-{os.getpid()}"
        build_random_pipeline("tiny", seed=0).save_pretrained(tmp)
        os.replace(tmp, target)
    return target


class EngineProcess:
    """``python -m vera_engine.service`` in a child process, on a free loopback port.

    Use as a context manager; :meth:`kill` sends SIGKILL (a crash), :meth:`stop` SIGTERM (a clean stop).
    """

    def __init__(
        self,
        spool: Path,
        model: Path | str,
        extra: Sequence[str] = (),
        start_timeout: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.env = {**os.environ, **(env or {})}
        self.spool = Path(spool)
        self.model = str(model)
        self.extra = list(extra)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.log: list[str] = []

    @property
    def address(self) -> str:
        """host:port of the running engine."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> EngineProcess:
        """Start and wait for the 'listening on' line."""
        cmd = [sys.executable, "-m", "vera_engine.service", "--model", self.model, "--spool", str(self.spool)]
        cmd += ["--host", "127.0.0.1", "--port", "0", *self.extra]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env
        )
        deadline = time.monotonic() + self.start_timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.log.append(line)
            if line.startswith("vera-engine listening on "):
                self.port = int(line.rsplit(":", 1)[1])
                threading.Thread(target=self._drain, daemon=True).start()
                return self
        self.kill()
        raise RuntimeError("engine did not start:\n" + "".join(self.log))

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)

    def kill(self) -> None:
        """SIGKILL: the engine dies without any clean-up, like a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code (SIGKILL after ``timeout``)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def __enter__(self) -> EngineProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
