"""Plates in, layers out: the glue between a working-space plate and a :class:`~vera_engine.VeraPipeline`.

:func:`edit_plate` converts the plate to the model's space, fits it to the checkpoint's resolution, samples,
maps the edit layer and matte back to plate resolution (matte guided by the full-resolution plate), brings
the edit colour back to the working space, premultiplies it with clean edges and composites it over the
*original* plate pixels, which stay bit-exact wherever the matte is 0. :func:`write_result_sequence` writes
the layered EXRs of ARCHITECTURE.md; :func:`write_result_previews` the contact sheet and MP4.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from vera_engine import __version__
from vera_engine.imaging.colour import ColourConverter
from vera_engine.imaging.composite import (
    composite_over_plate,
    fill_unmatted,
    premultiply,
    recover_preserved,
    snap_matte,
)
from vera_engine.imaging.exr import Window, frame_path, write_layered_exr
from vera_engine.imaging.preview import contact_sheet, preview_frames, write_contact_sheet, write_preview_mp4
from vera_engine.imaging.resize import FitMapping, fit_frames, fit_mapping, guided_upsample, unfit_frames

__all__ = ["LayeredResult", "edit_plate", "write_result_previews", "write_result_sequence"]

StepCallback = Callable[[Any, int, Any, dict], dict]


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


def _check_plate(plate: np.ndarray) -> np.ndarray:
    plate = np.asarray(plate)
    if plate.ndim != 4 or plate.shape[-1] not in (3, 4):
        raise ValueError(f"plate has shape {plate.shape}; expected (F, H, W, 3 or 4) working-space pixels")
    if plate.dtype != np.float32:
        raise ValueError(
            f"plate has dtype {plate.dtype}; expected float32 (read it with vera_engine.imaging.exr)"
        )
    if min(plate.shape[1:3]) < 2:
        raise ValueError(f"plate is {plate.shape[2]}x{plate.shape[1]} pixels; expected at least 2x2")
    return plate


def _check_mask(mask: np.ndarray | None, plate: np.ndarray) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask, np.float32)
    if mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.shape != plate.shape[:3]:
        raise ValueError(f"mask has shape {mask.shape}; expected {plate.shape[:3]} (F, H, W) like the plate")
    if not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError("mask must hold finite values in [0, 1]")
    return mask


def _model_frame(plate: np.ndarray, index: int, colour: ColourConverter) -> np.ndarray:
    """Frame ``index`` of the plate in model space, (1, H, W, 3). Non-finite pixels become 0 for the model
    only; the plate itself is never modified."""
    rgb = np.nan_to_num(plate[index : index + 1, ..., :3], nan=0.0, posinf=0.0, neginf=0.0)
    return colour.to_model(rgb)


def edit_plate(
    pipe: Any,
    plate: np.ndarray,
    *,
    prompt: str,
    colour: ColourConverter,
    mask: np.ndarray | None = None,
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
) -> LayeredResult:
    """Edit ``plate`` (F, H, W, 3|4 float32, ``colour.working_space``) with ``pipe`` and return its layers.

    ``mask`` (F, H, W) in [0, 1] at plate resolution is optional. ``callback`` is passed to the pipeline as
    ``callback_on_step_end``. ``matte_filter`` picks the edge-aware guided upsampling (default) or plain
    bilinear; mattes within ``matte_threshold`` of 0/1 snap to 0/1. ``recover`` applies Eq. 3 to recover
    preserved content under semi-transparent alpha. ``pad_to_native`` letterboxes to the full native size
    instead of the nearest multiple of 16.
    """
    import torch

    plate = _check_plate(plate)
    mask = _check_mask(mask, plate)
    if matte_filter not in ("guided", "bilinear"):
        raise ValueError(f"matte_filter={matte_filter!r} is not one of 'guided', 'bilinear'")
    frames, height, width = plate.shape[:3]

    # 1. Plate -> model space, then down to the model's size. Converting first (clamped to [0, 1]) keeps
    #    bright scene-linear highlights from ringing across the frame in the resampling filter.
    mapping = fit_mapping((height, width), tuple(pipe.native_size), multiple=16, pad_to_target=pad_to_native)
    video = np.empty((frames, *mapping.canvas_size, 3), np.float32)
    for i in range(frames):  # frame by frame: a full-resolution model-space copy of a 4K plate is gigabytes
        video[i] = np.clip(fit_frames(_model_frame(plate, i, colour), mapping), 0.0, 1.0)[0]
    mask_small = None if mask is None else np.clip(fit_frames(mask, mapping), 0.0, 1.0)

    # 2. Sample.
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
    )
    edit_low = np.asarray(out.edit, np.float32)
    alpha_low = np.clip(np.asarray(out.alpha, np.float32), 0.0, 1.0)
    model_composite = np.asarray(out.composite, np.float32)

    # 3. Clean edit colour where the matte is empty, so upsampling and premultiplication see no garbage.
    edit_low = fill_unmatted(edit_low, alpha_low)
    delta_low = None
    if recover:
        preserved_low = recover_preserved(model_composite, np.asarray(out.edit, np.float32), alpha_low, video)
        # A working-space correction: exactly 0 wherever Eq. 3 did not apply.
        delta_low = colour.from_model(preserved_low) - colour.from_model(video)

    # 4. Back to plate resolution and the working space, one frame at a time to bound memory at 4K.
    composite = np.empty((frames, height, width, 4), np.float32)
    edit = np.empty((frames, height, width, 4), np.float32)
    matte = np.empty((frames, height, width), np.float32)
    for i in range(frames):
        if matte_filter == "guided":
            guide = _model_frame(plate, i, colour)
            a = guided_upsample(alpha_low[i : i + 1], guide, mapping, radius=guided_radius, eps=guided_eps)
        else:
            a = unfit_frames(alpha_low[i : i + 1], mapping, filter="triangle")
        a = snap_matte(a, matte_threshold)[0]
        colour_model = np.clip(unfit_frames(edit_low[i : i + 1], mapping), 0.0, 1.0)[0]
        edit[i] = premultiply(colour.from_model(colour_model), a)
        preserved = None
        if delta_low is not None:
            preserved = plate[i, ..., :3] + unfit_frames(delta_low[i : i + 1], mapping)[0]
        composite[i] = composite_over_plate(plate[i], edit[i], a, preserved=preserved)
        matte[i] = a

    metadata: dict[str, object] = {
        "prompt": prompt,
        "negative_prompt": negative_prompt or "",
        "seed": int(seed),
        "steps": int(steps),
        "guidance": float(guidance),
        "working_colorspace": colour.working_space,
        "hdr": bool(colour.hdr),
        "matte_filter": matte_filter,
        "recover": bool(recover),
        "fit": mapping.to_dict(),
        "engine_version": __version__,
    }
    return LayeredResult(composite, edit, matte, model_composite, mapping, metadata)


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
    merged = {**result.metadata, **(metadata or {})}
    pattern = os.path.join(os.fspath(out_dir), f"{name}.####.exr")
    return [
        write_layered_exr(
            frame_path(pattern, number),
            result.composite[i],
            result.edit[i],
            result.matte[i],
            pixel_type=pixel_type,
            compression=compression,
            metadata=merged,
            chromaticities=chromaticities,
            data_window=data_window,
            display_window=display_window,
        )
        for i, number in enumerate(frame_numbers)
    ]


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
