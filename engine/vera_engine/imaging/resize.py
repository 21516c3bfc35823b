"""Resolution: fit plates of any size and aspect to the model's resolution and map results back.

:func:`fit_mapping` records how a plate was scaled (aspect kept) and padded (to the codec's multiple) so the
model's output can be cropped and upsampled back exactly onto the plate's pixel grid. Colour goes through
OpenImageIO's antialiased resize; the matte is upsampled edge-aware with a colour guided filter
(He, Sun & Tang 2013, in its fast form: coefficients solved at the matte's resolution, applied at the
plate's) guided by the full-resolution plate.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import OpenImageIO as oiio
import torch

__all__ = [
    "FitMapping",
    "box_filter",
    "fit_frames",
    "fit_mapping",
    "guided_upsample",
    "resample_tensor",
    "resize_frames",
    "unfit_frames",
    "upsample_bilinear",
]


@dataclass(frozen=True)
class FitMapping:
    """How a plate of ``source_size`` (H, W) maps onto the model's ``canvas_size``.

    The plate is scaled to ``scaled_size`` (aspect kept) and placed at ``offset`` (top, left) on the canvas;
    the rest of the canvas is edge padding, cropped away on the way back.
    """

    source_size: tuple[int, int]
    scaled_size: tuple[int, int]
    canvas_size: tuple[int, int]
    offset: tuple[int, int]

    def to_dict(self) -> dict[str, list[int]]:
        """The mapping as plain lists, for metadata and logs."""
        return {k: list(v) for k, v in asdict(self).items()}

    @property
    def scale(self) -> float:
        """Model pixels per plate pixel (the mean of both axes; they differ by rounding only)."""
        return (self.scaled_size[0] / self.source_size[0] + self.scaled_size[1] / self.source_size[1]) / 2


def fit_mapping(
    source_size: tuple[int, int],
    target_size: tuple[int, int],
    *,
    multiple: int = 16,
    pad_to_target: bool = False,
) -> FitMapping:
    """Fit ``source_size`` (H, W) inside ``target_size`` (H, W) keeping the aspect ratio.

    The canvas is the scaled size rounded up to ``multiple`` (what the latent codec needs), or the whole
    target with ``pad_to_target=True``. The scaled image is centred on the canvas.
    """
    (src_h, src_w), (tgt_h, tgt_w) = (int(v) for v in source_size), (int(v) for v in target_size)
    if min(src_h, src_w) < 1:
        raise ValueError(f"source_size={source_size!r}: expected a positive (height, width)")
    if min(tgt_h, tgt_w) < multiple or multiple < 1:
        raise ValueError(f"target_size={target_size!r}: expected (height, width) of at least {multiple}")
    scale = min(tgt_h / src_h, tgt_w / src_w)
    scaled = (min(tgt_h, max(1, round(src_h * scale))), min(tgt_w, max(1, round(src_w * scale))))
    if pad_to_target:
        canvas = (-(-tgt_h // multiple) * multiple, -(-tgt_w // multiple) * multiple)
    else:
        canvas = (-(-scaled[0] // multiple) * multiple, -(-scaled[1] // multiple) * multiple)
    offset = ((canvas[0] - scaled[0]) // 2, (canvas[1] - scaled[1]) // 2)
    return FitMapping((src_h, src_w), scaled, canvas, offset)


def _as_channels(frames: np.ndarray) -> tuple[np.ndarray, bool]:
    frames = np.asarray(frames, np.float32)
    if frames.ndim == 3:
        return frames[..., None], True
    if frames.ndim == 4:
        return frames, False
    raise ValueError(f"frames have shape {frames.shape}; expected (F, H, W) or (F, H, W, C)")


def resize_frames(frames: np.ndarray, size: tuple[int, int], *, filter: str = "") -> np.ndarray:
    """Resize (F, H, W[, C]) frames to ``size`` (H, W) with OpenImageIO's antialiased filters.

    ``filter`` "" picks OIIO's default (a sharp antialiasing filter when shrinking, lanczos3 when growing).
    Values are not clamped, so scene-linear data keeps its range (filters may ring slightly).
    """
    data, squeeze = _as_channels(frames)
    height, width = int(size[0]), int(size[1])
    out = np.empty((data.shape[0], height, width, data.shape[-1]), np.float32)
    roi = oiio.ROI(0, width, 0, height, 0, 1, 0, data.shape[-1])
    for i, frame in enumerate(data):
        if frame.shape[:2] == (height, width):
            out[i] = frame
            continue
        buf = oiio.ImageBufAlgo.resize(oiio.ImageBuf(np.ascontiguousarray(frame)), filter, 0.0, roi)
        if buf.has_error:
            raise RuntimeError(f"OpenImageIO resize to {width}x{height} failed: {buf.geterror()}")
        out[i] = buf.get_pixels(oiio.FLOAT).reshape(height, width, -1)
    return out[..., 0] if squeeze else out


def _kernel(name: str) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    if name == "lanczos3":
        return (lambda x: np.sinc(x) * np.sinc(x / 3.0) * (np.abs(x) < 3.0)), 3.0
    if name == "triangle":
        return (lambda x: np.maximum(0.0, 1.0 - np.abs(x))), 1.0
    raise ValueError(f"filter={name!r}; expected 'lanczos3' or 'triangle'")


@functools.lru_cache(maxsize=64)
def resample_weights(n_out: int, n_in: int, filter: str = "lanczos3") -> np.ndarray:
    """The (n_out, n_in) matrix of a separable resampling along one axis, pixel centres aligned.

    Upsampling interpolates with the kernel; shrinking widens it by the factor (antialiasing). Taps beyond the
    edge are dropped and each row renormalised to sum to 1, so the edge pixel extends outwards (like clamping).
    """
    kernel, support = _kernel(filter)
    scale = n_in / n_out
    width = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    taps = np.arange(n_in)[None, :] - centres[:, None]
    weights = kernel(taps / width) * (np.abs(taps) < support * width)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights.astype(np.float32)


def resample(
    x: np.ndarray, size: tuple[int, int], filter: str = "lanczos3", rows: slice | None = None
) -> np.ndarray:
    """Resize (H, W[, C]) ``x`` to ``size`` (H, W) as two matrix products (rows, then columns).

    The same separable filter OpenImageIO applies, computed with BLAS: upsampling a model-size layer to 4K is a
    fraction of a second instead of tens of seconds of per-pixel filtering. Values are not clamped. ``rows``: only
    that band of output rows (what the full result holds there), so a 4K frame can be made a band at a time.
    """
    x = np.asarray(x, np.float32)
    in_h, in_w = x.shape[:2]
    row_weights = resample_weights(int(size[0]), in_h, filter)
    rows_out = row_weights if rows is None else row_weights[rows]
    cols = resample_weights(int(size[1]), in_w, filter)
    out_h, out_w = rows_out.shape[0], int(size[1])
    rows = rows_out
    tall = (rows @ x.reshape(in_h, -1)).reshape(out_h, in_w, -1)  # out_h, in_w, C
    # einsum picks one large BLAS product and a cheap layout, not out_h small products.
    out = np.einsum("hjc,wj->hwc", tall, cols, optimize=True)
    return out.reshape(out_h, out_w, *x.shape[2:])


@functools.lru_cache(maxsize=16)
def _transposed_weights(n_out: int, n_in: int, filter: str) -> np.ndarray:
    return np.ascontiguousarray(resample_weights(n_out, n_in, filter).T)


@functools.lru_cache(maxsize=64)
def _column_blocks(n_out: int, n_in: int, filter: str, block: int) -> tuple[tuple[int, int, int, int], ...]:
    """Blocks ``(out_start, out_stop, in_start, in_stop)`` of ``block`` output pixels and the input pixels their
    weights reach: the resampling matrix is banded, so each block is a small dense product."""
    weights = resample_weights(n_out, n_in, filter)
    blocks = []
    for start in range(0, n_out, block):
        stop = min(n_out, start + block)
        reached = np.flatnonzero(weights[start:stop].any(axis=0))
        blocks.append((start, stop, int(reached[0]), int(reached[-1]) + 1))
    return tuple(blocks)


def resample_tensor(
    x: torch.Tensor,
    size: tuple[int, int],
    filter: str = "lanczos3",
    rows: slice | None = None,
    block: int = 256,
) -> torch.Tensor:
    """:func:`resample` on a torch tensor (H, W, C) -> channel-planar (C, rows, W), on the tensor's device.

    The same weights as :func:`resample`, applied as banded matrix products: each band of output rows and each
    block of ``block`` output columns multiplies only the input pixels its filter reaches (a 6-tap Lanczos from a
    model-size layer to 4K is a few multiply-adds per output value, not one per input pixel). Rows first, then
    columns, as :func:`resample` does, so the sums round alike: where a matte is exactly 1 there, it is here too
    (the guided filter redraws only where the bilinear matte is strictly between 0 and 1, so a value of 1 rounded
    to 0.99999994 would be redrawn). Equal to :func:`resample` up to float32 summation order.
    """
    if x.ndim != 3:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (H, W, C)")
    in_h, in_w, channels = x.shape
    out_h, out_w = int(size[0]), int(size[1])
    rows = rows or slice(0, out_h)
    row_weights = resample_weights(out_h, in_h, filter)[rows]
    reached = np.flatnonzero(row_weights.any(axis=0))
    top, bottom = int(reached[0]), int(reached[-1]) + 1
    band = torch.from_numpy(np.ascontiguousarray(row_weights[:, top:bottom])).to(x.device)
    # Rows first (few input rows per band), then the columns block by block, channels leading so each block's
    # product writes a contiguous (C * rows, block) slab.
    tall = (band @ x[top:bottom].reshape(bottom - top, in_w * channels)).reshape(-1, in_w, channels)
    tall = tall.permute(2, 0, 1).reshape(channels * tall.shape[0], in_w)
    columns = torch.from_numpy(_transposed_weights(out_w, in_w, filter)).to(x.device)
    out = torch.empty((tall.shape[0], out_w), dtype=x.dtype, device=x.device)
    for start, stop, first, last in _column_blocks(out_w, in_w, filter, block):
        out[:, start:stop] = tall[:, first:last] @ columns[first:last, start:stop]
    return out.reshape(channels, -1, out_w)


def resample_at(
    x: np.ndarray, size: tuple[int, int], ys: np.ndarray, xs: np.ndarray, filter: str
) -> np.ndarray:
    """``resample(x, size, filter)[ys, xs]`` for the listed output pixels only (N,) -> (N[, C]), without making
    the whole output: the engine needs full-resolution values only where the matte is."""
    x = np.asarray(x, np.float32)
    if not len(ys):
        return np.empty((0, *x.shape[2:]), np.float32)
    top, bottom = int(ys.min()), int(ys.max()) + 1
    if len(ys) > 0.1 * (bottom - top) * size[1]:  # most of the rows' pixels: the rows' product and a gather
        return resample(x, size, filter, rows=slice(top, bottom))[ys - top, xs]
    rows = resample_weights(int(size[0]), x.shape[0], filter)
    cols = resample_weights(int(size[1]), x.shape[1], filter)
    out = np.empty((len(ys), *x.shape[2:]), np.float32)
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    # Row by output row: each shares one row of weights, and a frame's matte covers few rows compared with pixels.
    order = np.argsort(ys, kind="stable")
    ys_sorted = ys[order]
    bounds = np.flatnonzero(np.diff(ys_sorted)) + 1
    for chunk in np.split(np.arange(len(ys)), bounds):
        if not len(chunk):
            continue
        row = rows[ys_sorted[chunk[0]]] @ flat.reshape(x.shape[0], -1)  # in_w * C
        picked = cols[xs[order[chunk]]] @ row.reshape(x.shape[1], -1)  # n, C
        out[order[chunk]] = picked.reshape(len(chunk), *x.shape[2:])
    return out


def fit_frames(frames: np.ndarray, mapping: FitMapping, *, filter: str = "") -> np.ndarray:
    """Scale (F, H, W[, C]) plate frames onto the model canvas of ``mapping``, edge-padding the border."""
    data, squeeze = _as_channels(frames)
    if data.shape[1:3] != mapping.source_size:
        raise ValueError(f"frames are {data.shape[1:3]}, but the mapping was made for {mapping.source_size}")
    scaled = resize_frames(data, mapping.scaled_size, filter=filter)
    top, left = mapping.offset
    bottom = mapping.canvas_size[0] - mapping.scaled_size[0] - top
    right = mapping.canvas_size[1] - mapping.scaled_size[1] - left
    # Edge padding rather than black: a black bar is content a generative model would try to explain.
    out = np.pad(scaled, ((0, 0), (top, bottom), (left, right), (0, 0)), mode="edge")
    return out[..., 0] if squeeze else out


def _crop(data: np.ndarray, mapping: FitMapping) -> np.ndarray:
    if data.shape[1:3] != mapping.canvas_size:
        raise ValueError(f"frames are {data.shape[1:3]}, but the mapping's canvas is {mapping.canvas_size}")
    top, left = mapping.offset
    return data[:, top : top + mapping.scaled_size[0], left : left + mapping.scaled_size[1]]


def unfit_frames(frames: np.ndarray, mapping: FitMapping, *, filter: str = "lanczos3") -> np.ndarray:
    """Crop the model-resolution frames to the plate's area and resample them (antialiased) to plate size."""
    data, squeeze = _as_channels(frames)
    cropped = _crop(data, mapping)
    out = np.stack([resample(frame, mapping.source_size, filter) for frame in cropped])
    return out[..., 0] if squeeze else out


def box_filter(x: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)² window of (H, W[, ...]) ``x``, windows clipped at the border (summed-area tables)."""
    if radius < 1:
        return np.asarray(x, np.float32)
    x = np.asarray(x, np.float64)

    def along(a: np.ndarray, axis: int) -> np.ndarray:
        n = a.shape[axis]
        csum = np.cumsum(a, axis=axis)
        zero = np.zeros_like(np.take(csum, [0], axis=axis))
        csum = np.concatenate([zero, csum], axis=axis)
        hi = np.minimum(np.arange(n) + radius + 1, n)
        lo = np.maximum(np.arange(n) - radius, 0)
        return np.take(csum, hi, axis=axis) - np.take(csum, lo, axis=axis)

    ones = np.ones(x.shape[:2], np.float64)
    count = along(along(ones, 0), 1)
    summed = along(along(x, 0), 1)
    count = count.reshape(count.shape + (1,) * (x.ndim - 2))
    return (summed / count).astype(np.float32)


def upsample_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (H, W[, ...]) ``x`` to ``size`` with pixel centres aligned (the plain baseline)."""
    return resample(x, size, "triangle")


def guided_coefficients(guide: np.ndarray, src: np.ndarray, radius: int, eps: float):
    """Colour guided filter coefficients (A: (H, W, 3), b: (H, W)), box-averaged, at the guide's resolution."""
    mean_i = box_filter(guide, radius)  # H, W, 3
    mean_p = box_filter(src, radius)  # H, W
    mean_ip = box_filter(guide * src[..., None], radius)
    cov_ip = mean_ip - mean_i * mean_p[..., None]
    outer = guide[..., :, None] * guide[..., None, :]  # H, W, 3, 3
    var_i = box_filter(outer.reshape(*outer.shape[:2], 9), radius).reshape(outer.shape)
    var_i = var_i - mean_i[..., :, None] * mean_i[..., None, :] + eps * np.eye(3, dtype=np.float32)
    a = np.linalg.solve(var_i.astype(np.float64), cov_ip[..., None].astype(np.float64))[..., 0]
    b = mean_p - np.einsum("hwc,hwc->hw", a, mean_i)
    return box_filter(a.astype(np.float32), radius), box_filter(b.astype(np.float32), radius)


def guided_matte(
    low_matte: np.ndarray,
    low_guide: np.ndarray,
    size: tuple[int, int],
    guide_at: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    radius: int = 2,
    eps: float = 1e-3,
    rows: slice | None = None,
    coefficients: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """One frame's matte (h, w) upsampled to ``size`` with its edges following the full-resolution guide.

    ``low_guide`` (h, w, 3) is the guide at the matte's resolution; ``guide_at(ys, xs)`` returns the
    full-resolution guide (N, 3) at the listed pixels. The guided filter (fast form: coefficients solved at the
    matte's resolution, applied at the plate's) only redraws the model's transition zone: where the plain bilinear
    upsampling is exactly 0 or 1 the result is too, so no halo leaks into untouched plate, and the guide is
    read only where the matte is in between (a small part of a 4K frame). Returns (H, W) in [0, 1].

    ``rows``: only that band of rows (H becomes its height; ``guide_at`` still gets frame coordinates), with the
    filter's ``coefficients`` (:func:`guided_coefficients`, the same for every band) passed in.
    """
    top = 0 if rows is None else rows.start
    plain = resample(low_matte, size, "triangle", rows=rows)
    ys, xs = np.nonzero((plain > 0.0) & (plain < 1.0))
    if len(ys):
        a, b = (
            coefficients
            if coefficients is not None
            else guided_coefficients(low_guide, low_matte, radius, eps)
        )
        frame_ys = ys + top
        refined = np.einsum(
            "nc,nc->n", resample_at(a, size, frame_ys, xs, "triangle"), guide_at(frame_ys, xs)
        )
        plain[ys, xs] = refined + resample_at(b, size, frame_ys, xs, "triangle")
    return np.clip(plain, 0.0, 1.0)


def guided_upsample(
    matte: np.ndarray,
    guide: np.ndarray,
    mapping: FitMapping,
    *,
    radius: int = 2,
    eps: float = 1e-3,
    low_guide: np.ndarray | None = None,
) -> np.ndarray:
    """Upsample a model-resolution matte (F, canvas H, canvas W) to plate size, edges following ``guide``.

    ``guide`` is the full-resolution plate (F, H, W, 3), best in a perceptual [0, 1] encoding (the model
    space). ``radius`` is in model pixels, ``eps`` the guided filter's regulariser (larger = smoother).
    ``low_guide`` (F, scaled H, scaled W, 3): the guide already resized to the matte's scale (the plate as the
    model saw it, before padding), which saves resizing the full-resolution guide again. See
    :func:`guided_matte`. Returns (F, H, W) in [0, 1].
    """
    matte = np.asarray(matte, np.float32)
    guide = np.asarray(guide, np.float32)
    if matte.ndim != 3:
        raise ValueError(f"matte has shape {matte.shape}; expected (F, H, W)")
    if guide.ndim != 4 or guide.shape[-1] < 3 or guide.shape[1:3] != mapping.source_size:
        raise ValueError(f"guide has shape {guide.shape}; expected (F, {mapping.source_size}, 3)")
    if guide.shape[0] != matte.shape[0]:
        raise ValueError(f"guide has {guide.shape[0]} frames but the matte has {matte.shape[0]}")
    if low_guide is not None and low_guide.shape[:3] != (matte.shape[0], *mapping.scaled_size):
        raise ValueError(f"low_guide has shape {low_guide.shape}; expected (F, {mapping.scaled_size}, 3)")
    low = _crop(matte[..., None], mapping)[..., 0]
    out = np.empty(guide.shape[:3], np.float32)
    for i in range(matte.shape[0]):
        full_guide = guide[i, ..., :3]
        # The guide at the matte's resolution, by the same filter the plate took on the way in.
        small = resize_frames(full_guide[None], mapping.scaled_size)[0] if low_guide is None else low_guide[i]
        out[i] = guided_matte(
            low[i], small, mapping.source_size, lambda ys, xs, g=full_guide: g[ys, xs], radius=radius, eps=eps
        )
    return out
