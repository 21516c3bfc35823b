"""Compositing at plate resolution, in the working space: ``comp = plate·(1−a) + edit_premult``.

Where ``a == 0`` the composite *is* the plate: those pixels are selected, not computed, so they come back bit
for bit (negative values, values above 1, -0.0, inf and NaN included). :func:`layers_like_model` chooses the
delivered matte and premultiplied edit so that this linear ``over`` gives the composite the model made in its own
(sRGB-encoded) space. The edit colour where ``a == 0`` is
undefined; :func:`fill_unmatted` replaces it with a smooth extension of the matted colour so premultiplied
edges and upsampling filters never pull in garbage. Eq. 3 of the Vera paper recovers preserved content
under semi-transparent alpha (:func:`recover_preserved`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vera_engine.imaging.resize import box_filter, upsample_bilinear

__all__ = [
    "DEFAULT_CLIP_BLACK",
    "DEFAULT_CLIP_WHITE",
    "clip_matte",
    "composite_over_plate",
    "fill_unmatted",
    "layers_like_model",
    "premultiply",
    "recover_preserved",
    "snap_matte",
]


def _check_alpha(alpha: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    alpha = np.asarray(alpha, np.float32)
    if alpha.shape != shape:
        raise ValueError(f"alpha has shape {alpha.shape}; expected {shape} to match {what}")
    return alpha


def snap_matte(alpha: np.ndarray, threshold: float = 1.0 / 512.0) -> np.ndarray:
    """Clamp the matte to [0, 1] and snap values within ``threshold`` of 0 or 1 to exactly 0 or 1.

    Generated and filtered mattes carry tiny residues everywhere; snapping them is what makes the untouched
    area really untouched (and the opaque core really opaque).
    """
    alpha = np.clip(np.asarray(alpha, np.float32), 0.0, 1.0)
    alpha = np.where(alpha <= threshold, np.float32(0.0), alpha)
    return np.where(alpha >= 1.0 - threshold, np.float32(1.0), alpha).astype(np.float32)


# The engine's default clip black / clip white (JobHeader.clip_black / clip_white). A model's matte carries a faint
# residue where it meant "nothing here" (the first vera-tiny left it exactly 0 on 63 % of the pixels outside an added
# object); a keyer's clip black at 0.05 snaps that residue to 0 so the plate is kept bit for bit there, and clip white
# at 0.95 makes the near-opaque core opaque. docs/BENCHMARKS.md gives the measurement (bench/bench_matte_clip.py).
DEFAULT_CLIP_BLACK = 0.05
DEFAULT_CLIP_WHITE = 0.95


def clip_matte(
    alpha: np.ndarray, black: float = DEFAULT_CLIP_BLACK, white: float = DEFAULT_CLIP_WHITE
) -> np.ndarray:
    """A keyer's clip black / clip white: ``(alpha - black) / (white - black)`` clamped to [0, 1].

    Every value at or below ``black`` becomes exactly 0 and every value at or above ``white`` exactly 1; values
    between are stretched linearly, so the matte stays continuous. ``black=0, white=1`` only clamps.
    """
    if not 0.0 <= black < white <= 1.0:
        raise ValueError(f"clip black {black} and clip white {white}; expected 0 <= black < white <= 1")
    alpha = np.asarray(alpha, np.float32)
    if black == 0.0 and white == 1.0:
        return np.clip(alpha, 0.0, 1.0)
    scaled = (alpha - np.float32(black)) / np.float32(white - black)
    out = np.clip(scaled, 0.0, 1.0).astype(np.float32)
    # Exact ends whatever the float rounding of the division.
    out[alpha <= black] = 0.0
    out[alpha >= white] = 1.0
    return out


def premultiply(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """RGBA premultiplied by ``alpha``: (…, 3) colour and (…) alpha -> (…, 4); exactly 0 where ``alpha == 0``."""
    rgb = np.asarray(rgb, np.float32)
    alpha = _check_alpha(alpha, rgb.shape[:-1], "the colour")
    a = alpha[..., None]
    # np.where, not a product: x·0 is -0.0 for negative x and NaN for inf.
    with np.errstate(invalid="ignore"):
        premult = np.where(a > 0, rgb * a, np.float32(0.0))
    return np.concatenate([premult, a], axis=-1).astype(np.float32)


def _halve(x: np.ndarray) -> np.ndarray:
    """2×2 sum of (H, W, ...) with odd edges padded by repetition."""
    h, w = x.shape[:2]
    x = np.pad(x, ((0, h % 2), (0, w % 2)) + ((0, 0),) * (x.ndim - 2), mode="edge")
    return x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]


def _push_pull(colour: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Fill (H, W, C) ``colour`` where ``weight`` (H, W) is low from a weighted image pyramid (push-pull)."""
    if weight.max() <= 0:
        return np.zeros_like(colour)
    if min(weight.shape) <= 1 or weight.min() >= 1:
        return colour
    w = np.minimum(weight, 1.0)
    coarse_w = np.minimum(_halve(w), 1.0)  # one fully known child makes the parent known
    coarse_c = _halve(colour * w[..., None]) / np.maximum(_halve(w), 1e-12)[..., None]
    coarse = _push_pull(coarse_c.astype(np.float32), coarse_w.astype(np.float32))
    up = upsample_bilinear(coarse, weight.shape)
    return (colour * w[..., None] + up * (1.0 - w[..., None])).astype(np.float32)


def fill_unmatted(
    rgb: np.ndarray, alpha: np.ndarray, *, threshold: float = 1.0 / 255.0, smooth_radius: int = 2
) -> np.ndarray:
    """Replace the colour of (F, H, W, 3) ``rgb`` where ``alpha <= threshold`` by a smooth fill from the rest.

    Colour under visible alpha is kept as is; elsewhere it is a smooth extension (pull-push pyramid) of
    the nearby matted colour, so edge pixels premultiply and upsample cleanly. Frames with no alpha at all
    come back black.
    """
    rgb = np.asarray(rgb, np.float32)
    if rgb.ndim != 4:
        raise ValueError(f"rgb has shape {rgb.shape}; expected (F, H, W, C)")
    alpha = _check_alpha(alpha, rgb.shape[:-1], "the colour")
    out = np.empty_like(rgb)
    for i in range(rgb.shape[0]):
        known = (alpha[i] > threshold).astype(np.float32)
        # Push-pull extends the colour everywhere; two box passes (≈ a Gaussian) smooth its block seams.
        filled = box_filter(box_filter(_push_pull(rgb[i], known), smooth_radius), smooth_radius)
        out[i] = np.where(known[..., None] > 0, rgb[i], filled)
    return out


def recover_preserved(
    model_composite: np.ndarray,
    edit: np.ndarray,
    alpha: np.ndarray,
    source: np.ndarray,
    *,
    max_alpha: float = 0.95,
) -> np.ndarray:
    """Eq. 3: preserved content under semi-transparent alpha, ``(V_composite − A·V_edit) / (1 − A)``.

    All inputs at one resolution and in one space (the model's): colours (F, H, W, 3), ``alpha`` (F, H, W),
    ``edit`` not premultiplied. Where ``alpha`` is 0, or above ``max_alpha`` (the division is unstable and
    the preserved layer barely shows), the ``source`` is returned unchanged. Result clipped to [0, 1].
    """
    comp = np.asarray(model_composite, np.float32)
    edit = np.asarray(edit, np.float32)
    source = np.asarray(source, np.float32)
    if not comp.shape == edit.shape == source.shape:
        raise ValueError(f"shapes differ: composite {comp.shape}, edit {edit.shape}, source {source.shape}")
    alpha = _check_alpha(alpha, comp.shape[:-1], "the composite")
    a = alpha[..., None]
    valid = (a > 0) & (a <= max_alpha)
    recovered = (comp - a * edit) / np.where(valid, 1.0 - a, 1.0)
    return np.where(valid, np.clip(recovered, 0.0, 1.0), source).astype(np.float32)


def composite_over_plate(
    plate: np.ndarray,
    edit_premult: np.ndarray,
    alpha: np.ndarray,
    *,
    preserved: np.ndarray | None = None,
) -> np.ndarray:
    """``plate·(1−a) + edit_premult`` as RGBA (…, 4); the plate's own pixels wherever ``a == 0``.

    ``plate`` (…, 3 or 4; without alpha it counts as opaque), ``edit_premult`` (…, 3 or 4, premultiplied),
    ``alpha`` (…). ``preserved`` (…, 3), e.g. from Eq. 3, replaces the plate's colour under the matte
    (0 < a); it never touches pixels where ``a == 0``.
    """
    plate = np.asarray(plate, np.float32)
    edit_premult = np.asarray(edit_premult, np.float32)
    if plate.shape[-1] not in (3, 4) or edit_premult.shape[-1] not in (3, 4):
        raise ValueError(f"plate {plate.shape} and edit {edit_premult.shape} must be RGB or RGBA")
    if plate.shape[:-1] != edit_premult.shape[:-1]:
        raise ValueError(f"plate {plate.shape} and edit {edit_premult.shape} differ in size")
    alpha = _check_alpha(alpha, plate.shape[:-1], "the plate")
    a = alpha[..., None]
    plate_rgb = plate[..., :3]
    plate_a = plate[..., 3:] if plate.shape[-1] == 4 else np.ones_like(a)
    under = plate_rgb
    if preserved is not None:
        preserved = np.asarray(preserved, np.float32)
        if preserved.shape != plate_rgb.shape:
            raise ValueError(f"preserved has shape {preserved.shape}; expected {plate_rgb.shape}")
        under = preserved
    touched = a > 0
    rgb = np.where(touched, under * (1.0 - a) + edit_premult[..., :3], plate_rgb)
    comp_a = np.where(touched, plate_a * (1.0 - a) + a, plate_a)
    return np.concatenate([rgb, comp_a], axis=-1).astype(np.float32)


def layers_like_model(
    plate: np.ndarray,
    plate_model: np.ndarray | None,
    edit_model: np.ndarray,
    alpha: np.ndarray,
    colour: Any,
    *,
    under: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The edit layer (premultiplied RGBA), matte and composite a compositor's linear ``over`` turns into the
    model's own composite.

    The model learned its alpha on composites formed in its sRGB-encoded space, ``(1−a)·P_m + a·E_m``; the same
    ``a`` and edit colour composited in scene-linear light give something else (a black shadow at a = 0.4 over
    mid-grey: 0.30 in model space, but 0.394 encoded after a linear over). So, per pixel where ``a > 0``:

    1. the target is the model's composite in the working space, ``T = W((1−a)·P_m + a·E_m) + (1−a)·(P − W(P_m))``,
       where ``W`` is :meth:`ColourConverter.from_model` and the last term carries the part of the plate the model
       space cannot hold (highlights above 1, out-of-gamut values) through the uncovered part, as an ``over`` does;
    2. the delivered matte is ``a' = max(a, 1 − min_c T_c / P_c)`` over channels with ``P_c > 0``: the model's
       alpha, raised only where the edit is darker than a linear ``over`` at ``a`` can make (shadows, smoke);
    3. the premultiplied edit is ``T − (1−a')·P``, which is then >= 0 in every channel.

    So ``P·(1−a') + edit = T`` exactly (to float rounding), with one matte for all channels and an edit layer
    with no negative values. The one exception: a plate channel ``P_c <= 0`` under a target ``T_c < (1−a')·P_c``
    (negative working-space values under the edit), where the edit is clipped at 0 and the composite is off by
    at most ``(1−a')·|P_c|``. Where ``a == 1`` this is the edit's own colour ``W(E_m)``; where ``a == 0`` nothing
    is computed and the composite is the plate, bit for bit.

    ``plate`` (H, W, 3|4) working space; ``plate_model`` (H, W, 3) the plate in model space (clamped to [0, 1], as
    the model saw it; None: converted here); ``edit_model`` (H, W, 3) straight edit colour in model space; ``alpha`` (H, W) the model's
    matte; ``colour`` the :class:`~vera_engine.imaging.colour.ColourConverter`; ``under`` (H, W, 3) replaces the
    plate's colour under the matte (Eq. 3). Returns ``(edit (H, W, 4), matte (H, W), composite (H, W, 4))``.
    """
    plate = np.asarray(plate, np.float32)
    alpha = _check_alpha(alpha, plate.shape[:-1], "the plate")
    base = plate[..., :3] if under is None else np.asarray(under, np.float32)
    touched = alpha > 0
    if not touched.all():  # the engine passes the matte's pixels only; other callers may pass whole frames
        edit = np.zeros((*alpha.shape, 4), np.float32)
        matte = np.zeros(alpha.shape, np.float32)
        inside = layers_like_model(
            plate[touched],
            None if plate_model is None else plate_model[touched],
            edit_model[touched],
            alpha[touched],
            colour,
            under=None if under is None else base[touched],
        )
        edit[touched], matte[touched] = inside[0], inside[1]
        return edit, matte, composite_over_plate(plate, edit, matte, preserved=under)

    # One conversion of the plate serves both: the model's view of it (clamped to [0, 1]) and where that clamp
    # changed it (highlights, out-of-gamut or non-finite values), whose remainder the composite must carry.
    finite = np.isfinite(base).all(axis=-1)
    finite_base = base if finite.all() else np.nan_to_num(base, nan=0.0, posinf=0.0, neginf=0.0)
    unclamped = colour.to_model(finite_base, clamp=False)
    clamped = ~finite | ((unclamped < 0.0) | (unclamped > 1.0)).any(axis=-1)
    if plate_model is None:
        plate_model = np.clip(unclamped, 0.0, 1.0, out=unclamped)
    del unclamped
    a = alpha[..., None]
    uncovered = 1.0 - a
    model_over = plate_model * uncovered
    model_over += edit_model * a
    target = colour.from_model(model_over)
    del model_over
    # The plate's own content beyond the model space shows through the uncovered part. Only where the model's clamp
    # changed the plate: elsewhere W(P_m) is the plate itself.
    with np.errstate(invalid="ignore", over="ignore"):
        if clamped.any():
            finite = np.nan_to_num(base[clamped], nan=0.0, posinf=0.0, neginf=0.0)
            target[clamped] += uncovered[clamped] * (finite - colour.from_model(plate_model[clamped]))
        positive = base > 1e-6
        ratio = np.divide(target, base, out=np.full_like(target, np.inf), where=positive).min(axis=-1)
    matte = np.clip(np.maximum(alpha, 1.0 - ratio), 0.0, 1.0).astype(np.float32)
    m = matte[..., None]
    premult = target - (1.0 - m) * base
    np.maximum(premult, 0.0, out=premult, where=np.isfinite(premult))
    premult[~np.isfinite(premult)] = 0.0
    edit = np.concatenate([premult, m], axis=-1)
    plate_a = plate[..., 3:] if plate.shape[-1] == 4 else np.ones_like(m)
    composite = np.concatenate([base * (1.0 - m) + premult, plate_a * (1.0 - m) + m], axis=-1)
    return edit, matte, composite
