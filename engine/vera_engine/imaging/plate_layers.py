"""Layers at plate resolution from what the model made, with no model involved (the sampling around the model is
`vera_engine.pipelines.edit_plate`).

:func:`finish_frames` reads each plate frame again and makes its layers at plate resolution: the matte upsampled
edge-aware (guided by the full-resolution plate), the edit colour brought back to the working space, and the
composite over the *original* plate pixels, which stay bit-exact wherever the matte is 0. The layers are torch tensor
work on the engine's device (:func:`finish_frame`) with OpenColorIO's CPU processors on whole buffers; frames go
through a bounded pipeline: the next frame is read while one is made, and each frame's layers go to a sink (the engine
writes them as an EXR at once) on writer threads meanwhile.

The delivered layers composite like the model (:func:`~vera_engine.imaging.composite.layers_like_model`): a
compositor's linear ``plate·(1−a) + edit_premult`` gives the model's own composite, which it learned in its
sRGB-encoded space.

:func:`write_result_sequence` writes the layered EXRs of ARCHITECTURE.md; :func:`write_result_previews` the
contact sheet and MP4.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from vera_engine.imaging.colour import ColourConverter
from vera_engine.imaging.composite import recover_preserved
from vera_engine.imaging.exr import Window, frame_path, write_exr, write_layered_exr
from vera_engine.imaging.preview import contact_sheet, preview_frames, write_contact_sheet, write_preview_mp4
from vera_engine.imaging.resize import FitMapping, guided_coefficients

__all__ = [
    "FrameLayers",
    "LayeredResult",
    "ModelLayers",
    "PlateFrames",
    "finish_frame",
    "finish_frames",
    "write_result_previews",
    "write_result_sequence",
]


class PlateFrames(Protocol):
    """Frames read on demand: ``len()`` and ``[i]`` -> (H, W, C) float32. A (F, H, W, C) numpy array is one."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


@dataclass
class FrameLayers:
    """One frame's layers at plate resolution in the working space: ``composite`` (H, W, 4), ``edit`` (H, W, 4)
    premultiplied, ``matte`` (H, W); :func:`finish_frame` makes them as views of one packed ``channels`` array."""

    composite: np.ndarray
    edit: np.ndarray
    matte: np.ndarray
    channels: np.ndarray | None = (
        None  # (H, W, 9) float32 holding all three in EXR channel order, when packed
    )


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
    composite: np.ndarray | None  # None when sampled without it (layers=)
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
    model_composite: np.ndarray | None
    mapping: FitMapping
    metadata: dict[str, object] = field(default_factory=dict)


def default_workers() -> int:
    """Sample reads in parallel, and finished frames written at once: every core, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def plate_frame(plate: PlateFrames, index: int) -> np.ndarray:
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


BAND_ROWS = 256  # rows of a frame made at once: a 4K frame's temporaries stay at a tenth of the frame
LAYER_CHANNELS = ("R", "G", "B", "A", "edit.R", "edit.G", "edit.B", "edit.A", "matte.A")  # ARCHITECTURE.md
HALF_MAX = 65504.0  # the largest finite half float


def default_device() -> str:
    """Where the layers are made: the GPU when there is one, else the CPU (torch's threads)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _convert(processor: Any, pixels: Any, *, in_place: bool = False) -> Any:
    """OpenColorIO ``processor`` on (N, 3) float32 tensor ``pixels``, on the same device: the CPU processor on the
    whole buffer, chunked over every core. ``in_place``: ``pixels`` (a contiguous CPU temporary) is overwritten."""
    import torch

    from vera_engine.imaging.colour import apply_in_place

    on_host = pixels.device.type == "cpu" and pixels.dtype == torch.float32 and pixels.is_contiguous()
    host = pixels if in_place and on_host else pixels.detach().to("cpu", torch.float32).contiguous().clone()
    apply_in_place(processor, host.numpy())
    return host if host.device == pixels.device else host.to(pixels.device)


def _finite(pixels: Any) -> Any:
    import torch

    if bool(torch.isfinite(pixels).all()):
        return pixels
    return torch.nan_to_num(pixels, nan=0.0, posinf=0.0, neginf=0.0)


def _as_stored(values: Any, half: bool) -> Any:
    """``values`` as the EXR stores them: float32, or half with finite values beyond its range held at +-65504
    (as :func:`~vera_engine.imaging.exr.write_exr` does) and infinities and NaNs kept."""
    import torch

    if not half:
        return values
    stored = values.half()
    low, high = torch.aminmax(values)  # one pass; a NaN anywhere makes both NaN and takes the careful path
    if not (float(low) >= -HALF_MAX and float(high) <= HALF_MAX):
        overflow = torch.isfinite(values) & (values.abs() > HALF_MAX)
        stored[overflow] = (torch.sign(values[overflow]) * HALF_MAX).half()
    return stored


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
    device: str | None = None,
    half: bool = False,
) -> FrameLayers:
    """Frame ``index``'s layers at plate resolution from the model's layers and the plate frame itself.

    Tensor work on ``device`` (default :func:`default_device`), a band of rows at a time, and within a band only
    where the matte is: the layers at model resolution are upsampled as banded matrix products (the guided
    filter's matte and coefficients in one triangle-filtered product, the edit colour in one Lanczos product),
    the plate's pixels under the matte are gathered into one buffer, converted by OpenColorIO's CPU processors on
    every core, and solved as :func:`~vera_engine.imaging.composite.layers_like_model` does, then scattered into
    the frame's nine channels. Elsewhere the composite is a copy of the plate's pixels (bit for bit) and the edit
    layer and matte are zero. ``half``: the layers come as the half floats a half EXR stores (values beyond half's
    range held at +-65504), ready to write.
    """
    import torch

    from vera_engine.imaging.resize import resample_tensor

    target_device = torch.device(device or default_device())
    mapping = model.mapping
    height, width = size = mapping.source_size
    top, left = mapping.offset
    crop = (slice(top, top + mapping.scaled_size[0]), slice(left, left + mapping.scaled_size[1]))
    low_alpha, low_edit = model.alpha[index][crop], model.edit[index][crop]
    # Every triangle-filtered layer in one product: the matte, then the guided filter's coefficients A and b.
    triangle_layers = [low_alpha[..., None]]
    if matte_filter == "guided":
        coefficient_a, coefficient_b = guided_coefficients(
            model.guides[index], low_alpha, guided_radius, guided_eps
        )
        triangle_layers += [coefficient_a, coefficient_b[..., None]]
    lanczos_layers = [low_edit]
    if recover:
        if model.composite is None:
            raise ValueError("recover needs the model's composite: sample with layers including 'composite'")
        preserved_low = recover_preserved(
            model.composite[index : index + 1],
            model.raw_edit[index : index + 1],
            model.alpha[index : index + 1],
            model.video[index : index + 1],
        )[0]
        # A working-space correction of the plate under the matte: exactly 0 wherever Eq. 3 did not apply.
        lanczos_layers.append(
            (colour.from_model(preserved_low) - colour.from_model(model.video[index]))[crop]
        )

    def on_device(layers: list[np.ndarray]) -> torch.Tensor:
        stacked = np.ascontiguousarray(np.concatenate(layers, axis=-1), np.float32)
        return torch.from_numpy(stacked).to(target_device)

    low_triangle, low_lanczos = on_device(triangle_layers), on_device(lanczos_layers)
    plate = torch.from_numpy(frame).to(target_device)
    plate_channels = frame.shape[-1]
    # One pass over the plate tells both whether it is finite (the usual case needs no per-pixel repair below)
    # and whether it fits half's range (the usual case converts as it is copied into the output).
    low, high = (float(v) for v in torch.aminmax(plate))
    plate_finite = math.isfinite(low) and math.isfinite(high)
    channels = torch.zeros(
        (height, width, 9), dtype=torch.float16 if half else torch.float32, device=target_device
    )
    if half and not (plate_finite and low >= -HALF_MAX and high <= HALF_MAX):
        channels[..., :plate_channels] = _as_stored(plate, half)
    else:
        channels[..., :plate_channels] = plate
    if plate_channels == 3:
        channels[..., 3] = 1.0  # a plate without alpha is opaque
    threshold = float(matte_threshold)
    for start in range(0, height, BAND_ROWS):
        rows = slice(start, min(height, start + BAND_ROWS))
        upsampled = resample_tensor(low_triangle, size, "triangle", rows=rows)
        upsampled = upsampled.reshape(low_triangle.shape[-1], -1)  # (channels, band pixels)
        covered = torch.nonzero(upsampled[0] > 0).squeeze(1)
        if not len(covered):
            continue
        plate_pixels = plate[rows].reshape(-1, plate_channels).index_select(0, covered)
        rgb = plate_pixels[:, :3]
        # One conversion serves the guide (the plate as the model sees it, clamped) and the layer solve.
        # A copy (converted in place): ``rgb`` itself is the plate's pixels, needed as they are.
        model_input = rgb.clone(memory_format=torch.contiguous_format)
        if not plate_finite:
            torch.nan_to_num_(model_input, nan=0.0, posinf=0.0, neginf=0.0)  # for the model only
        unclamped = _convert(colour.to_model_processor, model_input, in_place=True)
        model_plate = unclamped.clamp(0.0, 1.0)
        upsampled = upsampled.index_select(1, covered).t()  # (N, channels)
        alpha = upsampled[:, 0].clone()
        if matte_filter == "guided":
            # The guided filter redraws only the bilinear matte's transition zone (0 < a < 1).
            refined = (upsampled[:, 1:4] * model_plate).sum(dim=1) + upsampled[:, 4]
            alpha = torch.where(alpha < 1.0, refined, alpha)
        alpha.clamp_(0.0, 1.0)
        alpha.masked_fill_(alpha <= threshold, 0.0)
        alpha.masked_fill_(alpha >= 1.0 - threshold, 1.0)
        untouched = alpha == 0
        if bool(untouched.all()):
            continue
        lanczos = resample_tensor(low_lanczos, size, "lanczos3", rows=rows).reshape(low_lanczos.shape[-1], -1)
        lanczos = lanczos.index_select(1, covered).t()
        edit_model = lanczos[:, :3].clamp(0.0, 1.0)
        base, base_finite = rgb, plate_finite
        if recover:
            base = rgb + lanczos[:, 3:]
            base_finite = bool(torch.isfinite(base).all())
            unclamped = _convert(colour.to_model_processor, base if base_finite else _finite(base))
            model_plate = unclamped.clamp(0.0, 1.0)
        plate_alpha = plate_pixels[:, 3] if plate_channels == 4 else None
        solved = _solve_layers(
            base, base_finite, unclamped, model_plate, edit_model, alpha, plate_alpha, colour
        )
        if bool(untouched.any()):
            # Pixels the snap emptied are solved too (no gathering), then given back the plate's own values, bit
            # for bit, and no edit: what they would be had they never been covered.
            solved[:, :plate_channels] = torch.where(
                untouched[:, None], plate_pixels, solved[:, :plate_channels]
            )
            if plate_channels == 3:
                solved[:, 3].masked_fill_(untouched, 1.0)
            solved[:, 4:].masked_fill_(untouched[:, None], 0.0)
        channels[rows].reshape(-1, 9).index_copy_(0, covered, _as_stored(solved, half))
    packed = channels.cpu().numpy()
    return FrameLayers(
        composite=packed[..., :4], edit=packed[..., 4:8], matte=packed[..., 8], channels=packed
    )


def _solve_layers(
    base, base_finite: bool, unclamped, model_plate, edit_model, alpha, plate_alpha, colour: ColourConverter
):
    """:func:`~vera_engine.imaging.composite.layers_like_model` on gathered pixels (N, ...) as tensors: the nine
    output channels (N, 9) of pixels whose matte is above 0 (the same operations in the same order, in place where
    a temporary allows). ``base_finite``: ``base`` is known to hold finite values only."""
    import torch

    # Where the model's clamp changed the plate (highlights, out-of-gamut or non-finite values); usually nowhere.
    if bool((model_plate != unclamped).any()):
        clamped = (model_plate != unclamped).any(dim=1)
    else:
        clamped = torch.zeros(len(base), dtype=torch.bool, device=base.device)
    if not base_finite:
        clamped |= ~torch.isfinite(base).all(dim=1)
    a = alpha[:, None]
    uncovered = 1.0 - a
    model_over = model_plate * uncovered
    model_over += edit_model * a
    target = _convert(colour.from_model_processor, model_over, in_place=True)
    if bool(clamped.any()):
        beyond = _finite(base[clamped]) - _convert(colour.from_model_processor, model_plate[clamped])
        target[clamped] += uncovered[clamped] * beyond
    out = torch.empty((len(base), 9), dtype=torch.float32, device=base.device)
    ratio = torch.div(target, base, out=out[:, :3])  # out[:, :3] as scratch: overwritten below
    ratio.masked_fill_(~(base > 1e-6), float("inf"))  # NaN plate values too, as np.divide(where=) leaves
    matte = torch.maximum(alpha, 1.0 - ratio.amin(dim=1)).clamp_(0.0, 1.0)
    out[:, 7] = matte
    out[:, 8] = matte
    m = out[:, 7:8]
    uncovered = 1.0 - m
    premult = out[:, 4:7]
    torch.mul(uncovered, base, out=premult)
    torch.sub(target, premult, out=premult)
    premult.clamp_(min=0.0)  # NaN stays NaN here, and becomes 0 below
    if not base_finite:  # a finite plate under a target in OpenColorIO's range gives a finite edit
        premult.masked_fill_(~torch.isfinite(premult), 0.0)
    torch.mul(base, uncovered, out=out[:, :3])
    out[:, :3] += premult
    if plate_alpha is None:
        out[:, 3] = 1.0 - m[:, 0] + m[:, 0]
    else:
        out[:, 3] = plate_alpha * uncovered[:, 0] + m[:, 0]
    return out


def half_channels(channels: np.ndarray) -> np.ndarray:
    """(H, W, C) layers as a half EXR stores them (finite values beyond half's range held at +-65504, infinities
    and NaNs kept), converted on torch's threads; half input comes back as is."""
    import torch

    if channels.dtype == np.float16:
        return channels
    return _as_stored(torch.from_numpy(np.ascontiguousarray(channels, np.float32)), True).numpy()


def finish_frames(
    model: ModelLayers,
    plate: PlateFrames,
    colour: ColourConverter,
    sink: Callable[[int, FrameLayers], None],
    *,
    workers: int | None = None,
    prefetch: int = 1,
    compute_threads: int | None = None,
    cancelled: Callable[[], bool] | None = None,
    **options: Any,
) -> None:
    """Make every frame's layers (:func:`finish_frame`) and hand each to ``sink(index, layers)`` as soon as it
    exists, as a pipeline: the next ``prefetch`` frames are read (OpenImageIO's threads) while one is made (the
    engine's device), and ``workers`` sinks (the engine's EXR writer) run on their own threads meanwhile. Memory
    holds at most ``prefetch + 1`` plate frames and ``workers + 1`` finished frames. ``cancelled()`` is checked
    before each frame; a failed read, frame or sink stops the rest (nothing more is read or written) and the first
    failure in frame order is raised. Options go to :func:`finish_frame`; a sink with ``stores_half`` true (the
    :class:`ResultWriter` of a half EXR) gets its layers as half floats.

    The layers are made on a thread of their own whose torch operations use ``compute_threads`` threads (default:
    every core but one, which the reads and writes keep busy; the engine's own thread count is left as it is).
    """
    import torch

    options.setdefault("half", bool(getattr(sink, "stores_half", False)))
    compute_threads = compute_threads or max(1, (os.cpu_count() or 1) - 1)
    frames = len(plate)
    if frames != len(model.alpha):
        raise ValueError(f"plate has {frames} frames but the model made {len(model.alpha)}")
    workers = workers or default_workers()
    stop = threading.Event()
    writing = threading.Semaphore(workers)

    def read(index: int) -> np.ndarray:
        if stop.is_set():
            raise _Stopped
        frame = plate_frame(plate, index)
        if frame.shape[:2] != model.mapping.source_size:
            raise ValueError(
                f"plate frame {index} is {frame.shape[1]}x{frame.shape[0]}; expected "
                f"{model.mapping.source_size[1]}x{model.mapping.source_size[0]} like the first frame"
            )
        return frame

    failed = threading.Event()

    def write(index: int, layers: FrameLayers) -> None:
        try:
            if not failed.is_set():
                sink(index, layers)
        except BaseException:
            failed.set()
            stop.set()
            raise
        finally:
            writing.release()

    written: list[Future] = []
    with (
        ThreadPoolExecutor(1, thread_name_prefix="vera-read") as readers,
        # torch's thread count is per thread: set on this one, it leaves the caller's (the sampler's) alone.
        ThreadPoolExecutor(
            1,
            thread_name_prefix="vera-layers",
            initializer=torch.set_num_threads,
            initargs=(compute_threads,),
        ) as maker,
        ThreadPoolExecutor(workers, thread_name_prefix="vera-write") as writers,
    ):
        reads: dict[int, Future] = {}
        try:
            for index in range(frames):
                for ahead in range(index, min(frames, index + 1 + max(0, prefetch))):
                    if ahead not in reads:
                        reads[ahead] = readers.submit(read, ahead)
                if stop.is_set() or (cancelled is not None and cancelled()):
                    break
                try:
                    frame = reads.pop(index).result()
                except _Stopped:
                    break  # a sink failed meanwhile: its error is raised below
                layers = maker.submit(finish_frame, model, index, frame, colour, **options).result()
                del frame
                writing.acquire()  # back-pressure: at most `workers` frames wait for their sink
                written.append(writers.submit(write, index, layers))
                del layers
        finally:
            stop.set()  # reads still queued are skipped; sinks already handed a frame finish it
            for future in reads.values():
                future.cancel()
    for future in written:
        future.result()  # the first failure, in frame order


class _Stopped(Exception):
    """A read skipped because the stage stopped (cancelled or failed)."""


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
        # finish_frames reads this: frames for this sink are made as half floats, ready to write.
        self.stores_half = pixel_type in ("half", "float16")
        self._written: dict[int, Path] = {}
        self._lock = threading.Lock()

    def __call__(self, index: int, layers: FrameLayers) -> None:
        path = frame_path(self.pattern, self.frame_numbers[index])
        if layers.channels is not None and self.stores_half:
            # Packed by finish_frame (already half when finish_frames saw this writer): written as is.
            path = write_exr(path, half_channels(layers.channels), LAYER_CHANNELS, **self.options)
        else:
            path = write_layered_exr(path, layers.composite, layers.edit, layers.matte, **self.options)
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
