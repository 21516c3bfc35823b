"""Plates in, layers out: the path around one sampling call, frame by frame so a 4K shot fits in memory.

1. :func:`sample_plate` reads each plate frame once, converts it to the model's space and fits it to the
   checkpoint's resolution (frames in parallel), then samples. Only this model-size clip is held whole.
2. :func:`finish_frames` reads each plate frame again and makes its layers at plate resolution: the matte
   upsampled edge-aware (guided by the full-resolution plate), the edit colour brought back to the working space,
   and the composite over the *original* plate pixels, which stay bit-exact wherever the matte is 0. Each frame's
   layers go to a sink (the engine writes them as an EXR at once) on a thread pool: OpenImageIO, OpenColorIO and
   numpy release the GIL.

The delivered layers composite like the model (:func:`layers_like_model`): a compositor's linear
``plate·(1−a) + edit_premult`` gives the model's own composite, which it learned in its sRGB-encoded space.

:func:`edit_plate` runs both for an in-memory plate and returns every layer (:class:`LayeredResult`);
:func:`write_result_sequence` writes the layered EXRs of ARCHITECTURE.md; :func:`write_result_previews` the
contact sheet and MP4.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from vera_engine import __version__
from vera_engine.imaging.colour import ColourConverter
from vera_engine.imaging.composite import fill_unmatted, layers_like_model, recover_preserved, snap_matte
from vera_engine.imaging.exr import Window, frame_path, write_layered_exr
from vera_engine.imaging.preview import contact_sheet, preview_frames, write_contact_sheet, write_preview_mp4
from vera_engine.imaging.resize import (
    FitMapping,
    fit_frames,
    fit_mapping,
    guided_coefficients,
    guided_matte,
    resample,
    resample_at,
)

__all__ = [
    "FrameLayers",
    "LayeredResult",
    "ModelLayers",
    "PlateFrames",
    "edit_plate",
    "finish_frames",
    "sample_plate",
    "write_result_previews",
    "write_result_sequence",
]

StepCallback = Callable[[Any, int, Any, dict], dict]


class PlateFrames(Protocol):
    """Frames read on demand: ``len()`` and ``[i]`` -> (H, W, C) float32. A (F, H, W, C) numpy array is one."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


@dataclass
class FrameLayers:
    """One frame's layers at plate resolution in the working space: ``composite`` (H, W, 4), ``edit`` (H, W, 4)
    premultiplied, ``matte`` (H, W)."""

    composite: np.ndarray
    edit: np.ndarray
    matte: np.ndarray


@dataclass
class ModelLayers:
    """What the model made, at model resolution in model space, and what finishing needs from sampling.

    ``edit`` (F, h, w, 3) straight colour with the unmatted area filled smoothly, ``alpha`` (F, h, w), ``composite``
    the model's own composite (diagnostics, and Eq. 3), ``raw_edit`` the edit as sampled, ``video`` the model-size
    plate, ``guides`` the plate in model space at the matte's scaled size (the guided filter's low-resolution guide,
    computed once on the first read), ``mapping`` how the plate was fitted.
    """

    edit: np.ndarray
    alpha: np.ndarray
    composite: np.ndarray
    raw_edit: np.ndarray
    video: np.ndarray
    guides: np.ndarray
    mapping: FitMapping
    metadata: dict[str, object] = field(default_factory=dict)


@dataclass
class LayeredResult:
    """Vera's layers at plate resolution, in the working space.

    ``composite`` (F, H, W, 4), ``edit`` (F, H, W, 4) premultiplied, ``matte`` (F, H, W); ``model_composite``
    is the model's own composite (F, h, w, 3) in model space at model resolution (for diagnostics);
    ``mapping`` how the plate was fitted; ``metadata`` what produced it (goes under ``vera/`` in the EXRs).
    """

    composite: np.ndarray
    edit: np.ndarray
    matte: np.ndarray
    model_composite: np.ndarray
    mapping: FitMapping
    metadata: dict[str, object] = field(default_factory=dict)


def default_workers() -> int:
    """Frames finished at once: every core, at most 4 (each 4K frame in flight holds about a gigabyte)."""
    return max(1, min(4, os.cpu_count() or 1))


def _plate_frame(plate: PlateFrames, index: int) -> np.ndarray:
    frame = plate[index]
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[-1] not in (3, 4):
        shape = getattr(frame, "shape", type(frame).__name__)
        raise ValueError(
            f"plate frame {index} has shape {shape}; expected (H, W, 3 or 4) working-space pixels"
        )
    if frame.dtype != np.float32:
        raise ValueError(
            f"plate frame {index} has dtype {frame.dtype}; expected float32 (read it with vera_engine.imaging.exr)"
        )
    return frame


def _mask_frame(mask: PlateFrames, index: int, size: tuple[int, int]) -> np.ndarray:
    frame = np.asarray(mask[index], np.float32)
    if frame.ndim == 3 and frame.shape[-1] == 1:
        frame = frame[..., 0]
    if frame.shape != size:
        raise ValueError(f"mask frame {index} has shape {frame.shape}; expected {size} (H, W) like the plate")
    if not np.isfinite(frame).all() or frame.min() < 0 or frame.max() > 1:
        raise ValueError(f"mask frame {index} must hold finite values in [0, 1]")
    return frame


def _model_rgb(pixels: np.ndarray, colour: ColourConverter) -> np.ndarray:
    """Plate pixels' colour in model space, (..., 3) in [0, 1]. Non-finite values become 0 for the model only;
    the plate itself is never modified."""
    rgb = pixels[..., :3]
    if not np.isfinite(rgb).all():
        rgb = np.nan_to_num(rgb, nan=0.0, posinf=0.0, neginf=0.0)
    return colour.to_model(rgb)


def _in_order(function: Callable[[int], Any], count: int, workers: int) -> list[Any]:
    """``[function(i) for i in range(count)]`` on a thread pool."""
    if workers <= 1 or count <= 1:
        return [function(i) for i in range(count)]
    with ThreadPoolExecutor(workers, thread_name_prefix="vera-read") as pool:
        return list(pool.map(function, range(count)))


def sample_plate(
    pipe: Any,
    plate: PlateFrames,
    *,
    prompt: str,
    colour: ColourConverter,
    mask: PlateFrames | None = None,
    negative_prompt: str | None = None,
    steps: int = 50,
    guidance: float = 5.0,
    seed: int = 0,
    callback: StepCallback | None = None,
    callback_tensor_inputs: Sequence[str] = ("composite_x0",),
    window_frames: int | None = None,
    window_overlap: int | None = None,
    pad_to_native: bool = False,
    workers: int | None = None,
) -> ModelLayers:
    """Read ``plate`` into the model's space and size and sample ``pipe`` on it (steps 1-2 of the module doc).

    ``mask`` (frames of (H, W) in [0, 1] at plate resolution) is optional. ``callback`` is passed to the pipeline
    as ``callback_on_step_end``; ``window_frames`` / ``window_overlap`` as they are (None: the checkpoint's).
    """
    import torch

    frames = len(plate)
    if frames < 1:
        raise ValueError("plate has no frames; expected at least one (H, W, 3 or 4) frame")
    if mask is not None and len(mask) != frames:
        raise ValueError(f"mask has {len(mask)} frames; expected {frames} like the plate")
    first = _plate_frame(plate, 0)
    height, width = first.shape[:2]
    if min(height, width) < 2:
        raise ValueError(f"plate is {width}x{height} pixels; expected at least 2x2")
    workers = workers or default_workers()
    mapping = fit_mapping((height, width), tuple(pipe.native_size), multiple=16, pad_to_target=pad_to_native)

    already_read = {0: first}  # frame 0 was read for its size: not read twice

    def read(index: int) -> tuple[np.ndarray, np.ndarray]:
        frame = already_read.pop(index, None)
        frame = _plate_frame(plate, index) if frame is None else frame
        if frame.shape[:2] != (height, width):
            raise ValueError(
                f"plate frame {index} is {frame.shape[1]}x{frame.shape[0]}; frame 0 is {width}x{height}"
            )
        # Converted first (to [0, 1]), then resized: bright scene-linear highlights would ring across the frame
        # in the resampling filter otherwise.
        fitted = np.clip(fit_frames(_model_rgb(frame, colour)[None], mapping), 0.0, 1.0)[0]
        top, left = mapping.offset
        guide = fitted[top : top + mapping.scaled_size[0], left : left + mapping.scaled_size[1]]
        return fitted, guide

    read_frames = _in_order(read, frames, workers)
    video = np.stack([f for f, _ in read_frames])
    guides = np.stack([g for _, g in read_frames])
    del read_frames, first
    mask_small = None
    if mask is not None:
        mask_small = np.stack(
            [
                np.clip(fit_frames(_mask_frame(mask, i, (height, width))[None], mapping), 0.0, 1.0)[0]
                for i in range(frames)
            ]
        )

    out = pipe(
        video,
        prompt=prompt,
        mask=mask_small,
        negative_prompt=negative_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(int(seed)),
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=tuple(callback_tensor_inputs),
        **{
            key: value
            for key, value in (("window_frames", window_frames), ("window_overlap", window_overlap))
            if value is not None
        },
    )
    raw_edit = np.asarray(out.edit, np.float32)
    alpha = np.clip(np.asarray(out.alpha, np.float32), 0.0, 1.0)
    metadata: dict[str, object] = {
        "prompt": prompt,
        "negative_prompt": negative_prompt or "",
        "seed": int(seed),
        "steps": int(steps),
        "guidance": float(guidance),
        "working_colorspace": colour.working_space,
        "hdr": bool(colour.hdr),
        "fit": mapping.to_dict(),
        "engine_version": __version__,
    }
    return ModelLayers(
        # Clean edit colour where the matte is empty, so upsampling and premultiplication see no garbage.
        edit=fill_unmatted(raw_edit, alpha),
        alpha=alpha,
        composite=np.asarray(out.composite, np.float32),
        raw_edit=raw_edit,
        video=video,
        guides=guides,
        mapping=mapping,
        metadata=metadata,
    )


BAND_ROWS = 256  # rows of a frame made at once: a 4K frame's temporaries stay at a tenth of the frame


def finish_frame(
    model: ModelLayers,
    index: int,
    frame: np.ndarray,
    colour: ColourConverter,
    *,
    matte_filter: Literal["guided", "bilinear"] = "guided",
    matte_threshold: float = 1.0 / 512.0,
    guided_radius: int = 2,
    guided_eps: float = 1e-3,
    recover: bool = False,
) -> FrameLayers:
    """Frame ``index``'s layers at plate resolution from the model's layers and the plate frame itself.

    Made a band of rows at a time (the temporaries of a band, not of the frame, are what memory holds), and within
    a band only where the matte is: the guide is read where the matte is in transition, the edit colour and the
    compositing where it is above zero. Elsewhere the composite is a copy of the plate's pixels (bit for bit) and
    the edit layer and matte are zero.
    """
    mapping = model.mapping
    size = mapping.source_size
    top, left = mapping.offset
    crop = (slice(top, top + mapping.scaled_size[0]), slice(left, left + mapping.scaled_size[1]))
    rgb = frame[..., :3]

    def model_rgb_at(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        return _model_rgb(rgb[ys, xs], colour)

    low_alpha, low_edit = model.alpha[index][crop], model.edit[index][crop]
    coefficients = (
        guided_coefficients(model.guides[index], low_alpha, guided_radius, guided_eps)
        if matte_filter == "guided"
        else None
    )
    delta_low = None
    if recover:
        preserved_low = recover_preserved(
            model.composite[index : index + 1],
            model.raw_edit[index : index + 1],
            model.alpha[index : index + 1],
            model.video[index : index + 1],
        )[0]
        # A working-space correction of the plate under the matte: exactly 0 wherever Eq. 3 did not apply.
        delta_low = (colour.from_model(preserved_low) - colour.from_model(model.video[index]))[crop]

    height, width = size
    composite = np.empty((height, width, 4), np.float32)
    composite[..., : frame.shape[-1]] = frame
    if frame.shape[-1] == 3:
        composite[..., 3] = 1.0  # a plate without alpha is opaque
    edit = np.zeros((height, width, 4), np.float32)
    matte = np.zeros((height, width), np.float32)
    for start in range(0, height, BAND_ROWS):
        rows = slice(start, min(height, start + BAND_ROWS))
        if coefficients is not None:
            alpha = guided_matte(
                low_alpha, model.guides[index], size, model_rgb_at, rows=rows, coefficients=coefficients
            )
        else:
            alpha = np.clip(resample(low_alpha, size, "triangle", rows=rows), 0.0, 1.0)
        alpha = snap_matte(alpha, matte_threshold)
        ys, xs = np.nonzero(alpha > 0)
        if not len(ys):
            continue
        alpha = alpha[ys, xs]
        ys += start
        edit_model = np.clip(resample_at(low_edit, size, ys, xs, "lanczos3"), 0.0, 1.0)
        under = None if delta_low is None else rgb[ys, xs] + resample_at(delta_low, size, ys, xs, "lanczos3")
        edit[ys, xs], matte[ys, xs], composite[ys, xs] = layers_like_model(
            frame[ys, xs], None, edit_model, alpha, colour, under=under
        )
    return FrameLayers(composite=composite, edit=edit, matte=matte)


def finish_frames(
    model: ModelLayers,
    plate: PlateFrames,
    colour: ColourConverter,
    sink: Callable[[int, FrameLayers], None],
    *,
    workers: int | None = None,
    cancelled: Callable[[], bool] | None = None,
    **options: Any,
) -> None:
    """Make every frame's layers (:func:`finish_frame`) and hand each to ``sink(index, layers)`` as soon as it
    exists, ``workers`` frames at a time (the sink runs on the worker thread). At most ``workers`` frames are in
    memory at once. ``cancelled()`` is checked before each frame; options go to :func:`finish_frame`.
    """
    frames = len(plate)
    if frames != len(model.alpha):
        raise ValueError(f"plate has {frames} frames but the model made {len(model.alpha)}")
    workers = workers or default_workers()
    slots = threading.Semaphore(workers)
    stop = threading.Event()

    def one(index: int) -> None:
        try:
            if stop.is_set() or (cancelled is not None and cancelled()):
                stop.set()
                return
            frame = _plate_frame(plate, index)
            if frame.shape[:2] != model.mapping.source_size:
                raise ValueError(
                    f"plate frame {index} is {frame.shape[1]}x{frame.shape[0]}; expected "
                    f"{model.mapping.source_size[1]}x{model.mapping.source_size[0]} like the first frame"
                )
            layers = finish_frame(model, index, frame, colour, **options)
            del frame
            sink(index, layers)
        finally:
            slots.release()

    pending: list[Future] = []
    with ThreadPoolExecutor(workers, thread_name_prefix="vera-finish") as pool:
        for index in range(frames):
            slots.acquire()  # back-pressure: no frame is read before a slot is free
            if stop.is_set():
                slots.release()
                break
            future = pool.submit(one, index)
            # A failed frame stops the rest: nothing more is read or written after an error.
            future.add_done_callback(lambda f: stop.set() if f.exception() is not None else None)
            pending.append(future)
    for future in pending:
        future.result()  # the first failure, in frame order


def edit_plate(
    pipe: Any,
    plate: PlateFrames,
    *,
    prompt: str,
    colour: ColourConverter,
    mask: PlateFrames | None = None,
    negative_prompt: str | None = None,
    steps: int = 50,
    guidance: float = 5.0,
    seed: int = 0,
    callback: StepCallback | None = None,
    callback_tensor_inputs: Sequence[str] = ("composite_x0",),
    matte_filter: Literal["guided", "bilinear"] = "guided",
    matte_threshold: float = 1.0 / 512.0,
    guided_radius: int = 2,
    guided_eps: float = 1e-3,
    recover: bool = False,
    pad_to_native: bool = False,
    window_frames: int | None = None,
    window_overlap: int | None = None,
    workers: int | None = None,
) -> LayeredResult:
    """Edit ``plate`` (frames of (H, W, 3|4) float32 in ``colour.working_space``) and return all its layers.

    The in-memory form of :func:`sample_plate` + :func:`finish_frames` (the engine streams instead).
    ``matte_filter`` picks the edge-aware guided upsampling (default) or plain bilinear; mattes within
    ``matte_threshold`` of 0/1 snap to 0/1. ``recover`` applies Eq. 3 to recover preserved content under
    semi-transparent alpha. ``pad_to_native`` letterboxes to the full native size instead of the nearest
    multiple of 16.
    """
    if matte_filter not in ("guided", "bilinear"):
        raise ValueError(f"matte_filter={matte_filter!r} is not one of 'guided', 'bilinear'")
    model = sample_plate(
        pipe,
        plate,
        prompt=prompt,
        colour=colour,
        mask=mask,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance=guidance,
        seed=seed,
        callback=callback,
        callback_tensor_inputs=callback_tensor_inputs,
        window_frames=window_frames,
        window_overlap=window_overlap,
        pad_to_native=pad_to_native,
        workers=workers,
    )
    frames = len(plate)
    height, width = model.mapping.source_size
    composite = np.empty((frames, height, width, 4), np.float32)
    edit = np.empty((frames, height, width, 4), np.float32)
    matte = np.empty((frames, height, width), np.float32)

    def keep(index: int, layers: FrameLayers) -> None:
        composite[index], edit[index], matte[index] = layers.composite, layers.edit, layers.matte

    finish_frames(
        model,
        plate,
        colour,
        keep,
        workers=workers,
        matte_filter=matte_filter,
        matte_threshold=matte_threshold,
        guided_radius=guided_radius,
        guided_eps=guided_eps,
        recover=recover,
    )
    metadata = {**model.metadata, "matte_filter": matte_filter, "recover": bool(recover)}
    return LayeredResult(composite, edit, matte, model.composite, model.mapping, metadata)


def write_result_sequence(
    result: LayeredResult,
    out_dir: str | os.PathLike[str],
    frame_numbers: Sequence[int],
    *,
    name: str = "vera_edit",
    pixel_type: str = "half",
    compression: str = "zip",
    metadata: Mapping[str, object] | None = None,
    chromaticities: Sequence[float] | None = None,
    data_window: Window | None = None,
    display_window: Window | None = None,
) -> list[Path]:
    """Write ``result`` as ``out_dir/<name>.####.exr``, one layered EXR per plate frame number.

    ``metadata`` (job id, model name and hash, task, ...) is merged over ``result.metadata`` and written under
    ``vera/``; pass the plate's windows to keep its overscan placement and the working space's
    ``chromaticities`` (:meth:`ColourConverter.chromaticities`).
    """
    frame_numbers = [int(f) for f in frame_numbers]
    if len(frame_numbers) != result.matte.shape[0]:
        raise ValueError(
            f"{len(frame_numbers)} frame numbers for {result.matte.shape[0]} frames; pass one per frame"
        )
    writer = ResultWriter(
        out_dir,
        frame_numbers,
        name=name,
        pixel_type=pixel_type,
        compression=compression,
        metadata={**result.metadata, **(metadata or {})},
        chromaticities=chromaticities,
        data_window=data_window,
        display_window=display_window,
    )
    for i in range(len(frame_numbers)):
        writer(i, FrameLayers(result.composite[i], result.edit[i], result.matte[i]))
    return writer.paths


class ResultWriter:
    """A :func:`finish_frames` sink that writes each frame as ``out_dir/<name>.<frame number>.exr`` at once.

    Thread-safe (each frame is its own file, written then renamed by :func:`write_layered_exr`); ``paths``
    lists the files in frame order once every frame is written; ``on_written(count)`` reports progress.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        frame_numbers: Sequence[int],
        *,
        name: str = "vera_edit",
        pixel_type: str = "half",
        compression: str = "zip",
        metadata: Mapping[str, object] | None = None,
        chromaticities: Sequence[float] | None = None,
        data_window: Window | None = None,
        display_window: Window | None = None,
        on_written: Callable[[int], None] | None = None,
    ) -> None:
        self.pattern = os.path.join(os.fspath(out_dir), f"{name}.####.exr")
        self.frame_numbers = [int(f) for f in frame_numbers]
        self.options: dict[str, Any] = dict(
            pixel_type=pixel_type,
            compression=compression,
            metadata=dict(metadata or {}),
            chromaticities=chromaticities,
            data_window=data_window,
            display_window=display_window,
        )
        self.on_written = on_written
        self._written: dict[int, Path] = {}
        self._lock = threading.Lock()

    def __call__(self, index: int, layers: FrameLayers) -> None:
        path = write_layered_exr(
            frame_path(self.pattern, self.frame_numbers[index]),
            layers.composite,
            layers.edit,
            layers.matte,
            **self.options,
        )
        with self._lock:
            self._written[index] = path
            count = len(self._written)
        if self.on_written is not None:
            self.on_written(count)

    @property
    def paths(self) -> list[Path]:
        """The written files in frame order (raises if a frame is missing)."""
        missing = [self.frame_numbers[i] for i in range(len(self.frame_numbers)) if i not in self._written]
        if missing:
            raise RuntimeError(f"frames {missing[:5]} were not written")
        return [self._written[i] for i in range(len(self.frame_numbers))]


def write_result_previews(
    result: LayeredResult,
    plate: np.ndarray,
    out_dir: str | os.PathLike[str],
    *,
    colour: ColourConverter,
    name: str = "vera_edit",
    fps: float = 24.0,
    panel_height: int = 270,
) -> tuple[Path, Path]:
    """Write ``<name>_contact.png`` and ``<name>_preview.mp4`` (source | edit | matte | composite) to ``out_dir``."""
    out_dir = Path(out_dir)
    layers = (plate, result.edit, result.matte, result.composite)
    sheet = contact_sheet(*layers, colour=colour, panel_height=panel_height)
    png = write_contact_sheet(out_dir / f"{name}_contact.png", sheet)
    movie = write_preview_mp4(
        out_dir / f"{name}_preview.mp4",
        preview_frames(*layers, colour=colour, panel_height=panel_height),
        fps=fps,
    )
    return png, movie
