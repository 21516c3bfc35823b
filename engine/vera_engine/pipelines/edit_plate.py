"""Plates in, layers out, around one sampling call: the plate read into the model's space and size and sampled
(:func:`sample_plate`), then made into layers at plate resolution (`vera_engine.imaging.plate_layers`).

:func:`sample_plate` reads each plate frame once, converts it to the model's space and fits it to the checkpoint's
resolution (frames in parallel), then samples the pipeline. Only this model-size clip is held whole; the engine then
streams :func:`~vera_engine.imaging.plate_layers.finish_frames`. :func:`edit_plate` runs both for an in-memory
plate and returns every layer (:class:`~vera_engine.imaging.plate_layers.LayeredResult`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from vera_engine import __version__
from vera_engine.imaging.colour import ColourConverter
from vera_engine.imaging.composite import fill_unmatted
from vera_engine.imaging.plate_layers import (
    FrameLayers,
    LayeredResult,
    ModelLayers,
    PlateFrames,
    default_workers,
    finish_frames,
    plate_frame,
)
from vera_engine.imaging.resize import fit_frames, fit_mapping

if TYPE_CHECKING:
    from vera_engine.pipelines.pipeline_vera import VeraPipeline

__all__ = ["edit_plate", "sample_plate"]

StepCallback = Callable[[Any, int, Any, dict], dict]


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
    pipe: VeraPipeline,
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
    layers: Sequence[str] = ("edit", "alpha", "composite"),
) -> ModelLayers:
    """Read ``plate`` into the model's space and size and sample ``pipe`` on it (steps 1-2 of the module doc).

    ``mask`` (frames of (H, W) in [0, 1] at plate resolution) is optional. ``callback`` is passed to the pipeline
    as ``callback_on_step_end``; ``window_frames`` / ``window_overlap`` as they are (None: the checkpoint's).
    ``layers``: what the pipeline decodes; the model's composite is needed only by ``recover`` (Eq. 3) and for
    diagnostics, so an engine job asks for edit and alpha alone (one decode fewer; issue 27).
    """
    import torch

    frames = len(plate)
    if frames < 1:
        raise ValueError("plate has no frames; expected at least one (H, W, 3 or 4) frame")
    if mask is not None and len(mask) != frames:
        raise ValueError(f"mask has {len(mask)} frames; expected {frames} like the plate")
    first = plate_frame(plate, 0)
    height, width = first.shape[:2]
    if min(height, width) < 2:
        raise ValueError(f"plate is {width}x{height} pixels; expected at least 2x2")
    workers = workers or default_workers()
    mapping = fit_mapping((height, width), tuple(pipe.native_size), multiple=16, pad_to_target=pad_to_native)

    already_read = {0: first}  # frame 0 was read for its size: not read twice

    def read(index: int) -> tuple[np.ndarray, np.ndarray]:
        frame = already_read.pop(index, None)
        frame = plate_frame(plate, index) if frame is None else frame
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
        layers=tuple(layers),
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
        composite=np.asarray(out.composite, np.float32) if "composite" in layers else None,
        raw_edit=raw_edit,
        video=video,
        guides=guides,
        mapping=mapping,
        metadata=metadata,
    )


def edit_plate(
    pipe: VeraPipeline,
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
