"""The real job runner: a :class:`~vera_engine.VeraPipeline` driven through :mod:`vera_engine.pipelines.edit_plate`
and :mod:`vera_engine.imaging.plate_layers`.

Reads the spooled plate, converts and fits it (`sample_plate`), samples with per-step progress,
rate-bounded previews and cancellation, and writes ``vera_edit.####.exr`` with the plate's frame numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vera_engine.pipelines.model_store import (
    check_attention_backend,
    check_safetensors_only,
    max_window_frames,
    resolve_model_dir,
    vocabulary,
)
from vera_engine.service.errors import JobCancelled
from vera_engine.service.schema import STEP_CACHES, ModelDefaults, model_info
from vera_engine.service.worker import JobContext
from vera_proto.vera.v1 import engine_pb2 as pb

if TYPE_CHECKING:
    from vera_engine.acceleration.memory import MemoryOptions
    from vera_engine.pipelines.pipeline_vera import VeraPipeline

DEFAULT_STEPS = 30

log = logging.getLogger(__name__)


def weights_hash(files: list[Path], root: Path) -> str:
    """sha256 over the weight files (names and contents): identifies the exact model in output metadata."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def plate_colour_spaces() -> list[str]:
    """The colour spaces a plate may be in: the OCIO config's scene-linear spaces (the default working space first),
    then its display-referred video spaces ("sdr-video": what Resolve renders a clip in, Rec.709 Gamma 2.4 in a
    default SDR project), so a host can declare a rendered clip as what it is and get results in the same space."""
    from vera_engine.imaging.colour import DEFAULT_WORKING_SPACE, load_config

    config = load_config()
    spaces = list(config.getColorSpaces())
    linear = [cs.getName() for cs in spaces if cs.getEncoding() == "scene-linear"]
    video = [cs.getName() for cs in spaces if cs.getEncoding() == "sdr-video"]
    return [DEFAULT_WORKING_SPACE] + [n for n in linear if n != DEFAULT_WORKING_SPACE] + video


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _device_name(device: str) -> str:
    return "cuda" if device.startswith("cuda") else device.split(":")[0]


class PipelineRunner:
    """Runs jobs with a VeraPipeline loaded from a local safetensors folder onto one device."""

    def __init__(
        self,
        model: str,
        device: str | None = None,
        *,
        memory: MemoryOptions | None = None,
        loras: dict[str, str] | None = None,
        attention_backend: str | None = None,
        compile_blocks: bool | None = None,
    ) -> None:
        import torch

        if attention_backend is not None:
            check_attention_backend(attention_backend)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if memory is not None and memory.use_stream and not device.startswith("cuda"):
            raise ValueError(f"--offload-stream needs a CUDA device; this engine runs on {device!r}")
        if compile_blocks and memory is not None and (memory.group_offload or memory.model_cpu_offload):
            # Offload hooks call code torch.compile cannot put in the compiled block's graph: every job would fail.
            raise ValueError(
                "--compile cannot be combined with --group-offload or --model-cpu-offload (their hooks break the "
                "compiled block); choose one"
            )
        self.memory = memory
        self.attention_backend = attention_backend
        self.compile_blocks = compile_blocks
        self.model_dir = resolve_model_dir(model)
        self.weights = check_safetensors_only(self.model_dir)
        self.config: dict[str, Any] = json.loads((self.model_dir / "model_index.json").read_text())
        self.name = self.model_dir.resolve().name
        self.device = device
        self.pipe: VeraPipeline | None = None  # loaded by load(), in the worker that runs the jobs
        self.hash = ""
        self._models: list[pb.ModelInfo] | None = None
        # LoRA adapters (`serve --lora NAME=PATH`): checked against this model now, so a wrong one stops `serve`.
        self.loras = dict(loras or {})
        if self.loras:
            from vera_engine.training.lora import check_adapter_base

            if compile_blocks:
                raise ValueError(
                    "--lora switches adapters per job, which a --compile'd block cannot follow; choose one"
                )
            for name, path in self.loras.items():
                check_adapter_base(path, name, self.model_dir)

    def load(self) -> None:
        """Load the pipeline onto the device (called once on the worker thread)."""

        from vera_engine.acceleration.compile import compiled_blocks
        from vera_engine.pipelines.model_store import load_pipeline

        self.hash = weights_hash(self.weights, self.model_dir)
        memory = self.memory
        if memory is not None and memory.offload_to_disk:
            # diffusers names the offload files after the block only and reuses files that exist: a folder per model
            # (by weights hash) keeps another checkpoint's blocks, or an older version's, from being loaded.
            folder = Path(memory.offload_to_disk) / f"{self.name}-{self.hash[:16]}"
            memory = dataclasses.replace(memory, offload_to_disk=str(folder))
        self.pipe = load_pipeline(
            self.model_dir,
            device=self.device,
            memory=memory,
            attention_backend=self.attention_backend,
            compile_blocks=self.compile_blocks,
        )
        if self.loras:
            from vera_engine.training.lora import load_adapter_for_model

            for name, path in self.loras.items():
                load_adapter_for_model(self.pipe.transformer, path, name, self.model_dir)
            log.info("adapters loaded: %s", ", ".join(f"{n}={p}" for n, p in self.loras.items()))
        log.info(
            "loaded %s on %s: attention backend %s, compiled blocks %s",
            self.name,
            self.device,
            self.pipe.transformer.attention_backend,
            "yes" if compiled_blocks(self.pipe.transformer) else "no",
        )
        self._models = None

    def models(self) -> list[pb.ModelInfo]:
        """This runner's one model with its options schema."""
        if self._models is None:
            from vera_engine.imaging.exr import COLOUR_COMPRESSIONS

            defaults = ModelDefaults(
                name=self.name,
                native_height=int(self.config.get("native_height", 0)),
                native_width=int(self.config.get("native_width", 0)),
                frame_window=int(self.config.get("native_frames", 0)),
                steps=int(self.config.get("default_steps", DEFAULT_STEPS)),
                guidance=float(self.config.get("default_guidance", 5.0)),
                # Step caches' hooks cannot run inside a compiled block: a compiled engine offers exact sampling only.
                step_caches=("none",) if self.compile_blocks else STEP_CACHES,
                description=f"Vera pipeline from {self.model_dir}",
                weights_hash=self.hash,
                max_window_frames=max_window_frames(self.model_dir),
                vocabulary=vocabulary(self.model_dir),
                loras=tuple(self.loras),
            )
            self._models = [model_info(defaults, plate_colour_spaces(), COLOUR_COMPRESSIONS)]
        return [pb.ModelInfo.FromString(m.SerializeToString()) for m in self._models]

    def device_info(self) -> pb.DeviceInfo:
        """The device and its memory (GPU memory for CUDA, system memory for CPU)."""
        device = self.device or "cpu"
        if device.startswith("cuda"):
            import torch

            index = torch.device(device).index or 0
            free, total = torch.cuda.mem_get_info(index)
            return pb.DeviceInfo(
                name=torch.cuda.get_device_name(index),
                kind="cuda",
                memory_total_bytes=total,
                memory_free_bytes=free,
            )
        page = os.sysconf("SC_PAGE_SIZE")
        return pb.DeviceInfo(
            name=_cpu_name(),
            kind=_device_name(device),
            memory_total_bytes=page * os.sysconf("SC_PHYS_PAGES"),
            memory_free_bytes=page * os.sysconf("SC_AVPHYS_PAGES"),
        )

    def run(self, ctx: JobContext) -> list[Path]:
        """Edit the spooled plate as the header asks and write the layered EXRs, take after take.

        Memory stays bounded at any plate size and length: the plate is read frame by frame (once for the model's
        copy, again for the layers), and each frame's layers are written as soon as they exist.
        """
        from vera_engine.acceleration.step_cache import step_cache
        from vera_engine.imaging.colour import ColourConverter
        from vera_engine.imaging.composite import clip_matte
        from vera_engine.imaging.plate_layers import ResultWriter, finish_frames
        from vera_engine.models.word_tokenizer import unknown_words
        from vera_engine.pipelines.edit_plate import sample_plate
        from vera_engine.pipelines.pipeline_vera import VeraInterrupted
        from vera_engine.training.lora import adapter_in_use

        header = ctx.header
        pipe = self.pipe
        colour = ColourConverter(header.colorspace, hdr=header.hdr)
        frames = list(header.frames)
        steps = header.steps
        takes = max(1, header.takes)
        plate, mask = ctx.inputs.plate_frames(), ctx.inputs.mask_frames()
        data_window, display_window = ctx.inputs.windows() or (None, None)
        # A word-level checkpoint reads unknown words as <unk>: the edit still runs, and the artist is told which
        # words had no effect (in the progress stage and in the result's header).
        unknown = unknown_words(pipe.tokenizer, header.prompt)
        if unknown:
            log.warning("job %s: the model does not know the words %s", ctx.job_id, ", ".join(unknown))
        # Progress over the whole job: 5% reading, then each take's sampling (85%) and writing (15%) in turn.
        share = 0.95 / takes

        def progress(take: int, fraction: float) -> float:
            return 0.05 + share * (take + fraction)

        outputs: list[Path] = []
        for take in range(takes):
            ctx.check_cancelled()
            seed = header.seed + take
            of_takes = f" (take {take + 1} of {takes})" if takes > 1 else ""
            ctx.stage(pb.STAGE_READING, f"reading plate{of_takes}", progress(take, 0.0))

            def on_step(pipeline: Any, index: int, _timestep: Any, kwargs: dict, take: int = take) -> dict:
                if ctx.cancelled():
                    pipeline.interrupt = True  # the pipeline raises VeraInterrupted before the next step
                # A preview costs a decode: only while someone watches, at a bounded rate, and only its frame.
                if ctx.wants_preview(take * steps + index + 1, takes * steps) and "composite_x0" in kwargs:
                    middle = len(frames) // 2
                    image = pipeline.decode_preview(kwargs["composite_x0"], frame=middle)[0]
                    ctx.preview(image, frame=frames[middle], step=take * steps + index + 1, notify=False)
                ctx.progress(
                    take * steps + index + 1, takes * steps, progress(take, 0.85 * (index + 1) / steps)
                )
                return {}

            detail = f"sampling{of_takes}" + (f" (unknown words: {', '.join(unknown)})" if unknown else "")
            try:
                lora_scale = header.lora_scale if header.HasField("lora_scale") else 1.0
                with (
                    adapter_in_use(pipe.transformer, header.lora, lora_scale),
                    step_cache(
                        pipe, header.step_cache, num_inference_steps=steps, guidance_scale=header.guidance
                    ) as cache,
                ):
                    # Recorded in the result: a MagCache calibration job skipped nothing (its result is exact).
                    cache_used = (
                        f"{cache.spec} (calibration run: exact)" if cache.calibrating else str(cache.spec)
                    )
                    if cache.calibrating:
                        log.info(
                            "job %s: calibrating %s for this model (this run skips nothing)",
                            ctx.job_id,
                            cache.spec,
                        )
                    ctx.stage(pb.STAGE_SAMPLING, detail, progress(take, 0.0))
                    model = sample_plate(
                        pipe,
                        plate,
                        prompt=header.prompt,
                        colour=colour,
                        mask=mask,
                        negative_prompt=header.negative_prompt or None,
                        steps=steps,
                        guidance=header.guidance,
                        seed=seed,
                        callback=on_step,
                        window_frames=header.window_frames if header.HasField("window_frames") else None,
                        window_overlap=header.window_overlap if header.HasField("window_overlap") else None,
                        # The layers a job writes come from edit and alpha: the composite decode is skipped.
                        layers=("edit", "alpha"),
                    )
            except VeraInterrupted:
                raise JobCancelled(ctx.job_id) from None
            finally:
                pipe.interrupt = False
            ctx.check_cancelled()
            if not ctx.lead:
                continue  # another rank of a job over several devices: rank 0 writes the layers
            # The keyer's clip black / white on the model's matte, before any layer is made from it: where the
            # model meant "nothing here" the matte is exactly 0 and the plate is kept bit for bit.
            model.alpha = clip_matte(model.alpha, header.clip_black, header.clip_white)
            ctx.stage(pb.STAGE_WRITING, f"writing{of_takes}", progress(take, 0.85))
            writer = ResultWriter(
                ctx.output_dir,
                frames,
                name=take_name(take + 1),
                pixel_type=header.bit_depth,
                compression=header.compression,
                metadata={
                    **model.metadata,
                    "matte_filter": "guided",
                    "job_id": ctx.job_id,
                    "task": header.task,
                    "take": take + 1,
                    "takes": takes,
                    "model": self.name,
                    "model_hash": self.hash,
                    "step_cache": cache_used,
                    "lora": f"{header.lora} x{lora_scale:g}" if header.lora not in ("", "none") else "none",
                    "matte_clip": f"black {header.clip_black:.4g}, white {header.clip_white:.4g}",
                    "unknown_words": ", ".join(unknown) or "none",
                },
                chromaticities=colour.chromaticities(),
                data_window=data_window,
                display_window=display_window,
                on_written=lambda count, take=take, of_takes=of_takes: ctx.stage(
                    pb.STAGE_WRITING,
                    f"writing{of_takes}: {count}/{len(frames)} frames",
                    progress(take, 0.85 + 0.15 * count / len(frames)),
                ),
            )
            finish_frames(model, plate, colour, writer, cancelled=ctx.cancelled_here)
            del model
            if ctx.cancelled_here():
                raise JobCancelled(ctx.job_id)
            outputs += writer.paths
        return outputs


def take_name(take: int) -> str:
    """The file name stem of take ``take``, numbered from 1 as JobHeader.takes counts them and the results' ``take``
    metadata, the plugin's cache and the Resolve adapter read them: ``vera_edit``, then ``vera_edit_take<k>``."""
    if take < 1:
        raise ValueError(f"take {take}: takes are numbered from 1")
    return "vera_edit" if take == 1 else f"vera_edit_take{take}"
