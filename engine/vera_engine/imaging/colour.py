"""Colour management with OpenColorIO: the plate's working space to the model's space and back.

The config comes from an explicit path, else ``$OCIO``, else :data:`BUILTIN_CONFIG`, a versioned built-in
studio config (``ocio://default`` is avoided because it points at a newer config with each OCIO release).
The model sees sRGB-encoded Rec.709 in [0, 1]. By default the plate is converted colorimetrically and
clamped; ``hdr=True`` goes through the ACES SDR view transform instead, which rolls highlights into [0, 1]
and whose inverse brings them back. Alpha is data: it is passed through untouched.
"""

from __future__ import annotations

import difflib
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import PyOpenColorIO as ocio

__all__ = [
    "BUILTIN_CONFIG",
    "DEFAULT_WORKING_SPACE",
    "MODEL_SPACE",
    "ColourConverter",
    "apply_in_place",
    "chromaticities",
    "load_config",
]

# The oldest studio config that every OCIO >= 2.2 ships, so results do not depend on the installed version.
BUILTIN_CONFIG = "ocio://studio-config-v1.0.0_aces-v1.3_ocio-v2.1"
DEFAULT_WORKING_SPACE = "ACEScg"
# sRGB-encoded Rec.709: the space Wan-class models were trained on.
MODEL_SPACE = "sRGB - Texture"
HDR_DISPLAY = "sRGB - Display"
HDR_VIEW = "ACES 1.0 - SDR Video"

# Standard OpenEXR chromaticities (red, green, blue, white xy) of common spaces, keyed by canonical name.
_AP0 = (0.7347, 0.2653, 0.0, 1.0, 0.0001, -0.077, 0.32168, 0.33767)
_AP1 = (0.713, 0.293, 0.165, 0.830, 0.128, 0.044, 0.32168, 0.33767)
_REC709 = (0.64, 0.33, 0.30, 0.60, 0.15, 0.06, 0.3127, 0.3290)
_REC2020 = (0.708, 0.292, 0.170, 0.797, 0.131, 0.046, 0.3127, 0.3290)
_P3D65 = (0.680, 0.320, 0.265, 0.690, 0.150, 0.060, 0.3127, 0.3290)
_CHROMATICITIES = {
    "ACES2065-1": _AP0,
    "ACEScg": _AP1,
    "ACEScct": _AP1,
    "ACEScc": _AP1,
    "Linear Rec.709 (sRGB)": _REC709,
    "sRGB - Texture": _REC709,
    "Gamma 2.2 Rec.709 - Texture": _REC709,
    "Gamma 2.4 Rec.709 - Texture": _REC709,
    "Camera Rec.709": _REC709,
    "Linear Rec.2020": _REC2020,
    "Linear P3-D65": _P3D65,
}


def load_config(path: str | os.PathLike[str] | None = None) -> ocio.Config:
    """The OCIO config to use: ``path`` if given, else ``$OCIO``, else :data:`BUILTIN_CONFIG`."""
    source = os.fspath(path) if path is not None else os.environ.get("OCIO") or BUILTIN_CONFIG
    return _load_config_cached(source)


@lru_cache(maxsize=8)
def _load_config_cached(source: str) -> ocio.Config:
    if not source.startswith("ocio://") and not os.path.exists(source):
        raise ValueError(
            f"OCIO config {source!r} does not exist; point $OCIO (or the config argument) at a .ocio file, "
            f"or unset it to use the built-in {BUILTIN_CONFIG}"
        )
    try:
        config = ocio.Config.CreateFromFile(source)
        config.validate()
    except ocio.Exception as exc:
        raise ValueError(f"OCIO config {source!r} cannot be loaded: {exc}") from exc
    return config


def _resolve(config: ocio.Config, name: str, what: str) -> str:
    """Canonical colour space name for ``name`` (a name, an alias or a role)."""
    space = config.getColorSpace(name) if name else None
    if space is None:
        names = [cs.getName() for cs in config.getColorSpaces()]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"{what} {name!r} is not a colour space, alias or role of the OCIO config "
            f"{config.getName() or config.getCacheID()}{hint} (e.g. 'ACEScg', 'lin_rec709_srgb', 'scene_linear')"
        )
    return space.getName()


def chromaticities(space: str, config: ocio.Config | None = None) -> tuple[float, ...] | None:
    """OpenEXR ``chromaticities`` (R, G, B, white xy) of ``space``, or None where they are not tabulated."""
    config = config or load_config()
    return _CHROMATICITIES.get(_resolve(config, space, "colour space"))


CHUNK_PIXELS = (
    1 << 18
)  # pixels per OpenColorIO call: its temporaries stay small, and chunks spread over threads


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    # OpenColorIO's applyRGB releases the GIL: chunks of one buffer run on every core at once.
    return ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="vera-ocio")


def apply_in_place(processor: ocio.CPUProcessor, rgb: np.ndarray) -> np.ndarray:
    """Apply ``processor`` to contiguous float32 (..., 3) ``rgb`` in place, in chunks on every core; returns it."""
    if rgb.dtype != np.float32 or not rgb.flags.c_contiguous or rgb.shape[-1] != 3:
        raise ValueError(f"pixels are {rgb.dtype} {rgb.shape}; expected contiguous float32 (..., 3)")
    flat = rgb.reshape(-1, 3)
    starts = range(0, flat.shape[0], CHUNK_PIXELS)
    if len(starts) <= 1:
        processor.applyRGB(flat)
    else:
        list(_pool().map(lambda start: processor.applyRGB(flat[start : start + CHUNK_PIXELS]), starts))
    return rgb


def _apply(processor: ocio.CPUProcessor, rgb: np.ndarray) -> np.ndarray:
    return apply_in_place(processor, np.array(rgb, np.float32, order="C", copy=True))


def _split_alpha(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    pixels = np.asarray(pixels)
    if pixels.shape[-1] == 3:
        return pixels, None
    if pixels.shape[-1] == 4:
        return pixels[..., :3], pixels[..., 3:]
    raise ValueError(f"pixels have {pixels.shape[-1]} channels (shape {pixels.shape}); expected RGB or RGBA")


def _join_alpha(rgb: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    return rgb if alpha is None else np.concatenate([rgb, alpha.astype(np.float32)], axis=-1)


class ColourConverter:
    """Converts between a plate's working space and the model's sRGB-encoded Rec.709 [0, 1] space.

    ``working_space`` accepts names, aliases and roles of the config. ``hdr=True`` maps through the view
    transform ``display``/``view`` (default ``sRGB - Display`` / ``ACES 1.0 - SDR Video``) and its inverse, so
    highlights above display white survive the round trip instead of being clamped; the same view renders
    previews (:meth:`to_display`). ``model_space`` names the model's space in configs that call it otherwise.
    RGBA input keeps its alpha untouched.
    """

    def __init__(
        self,
        working_space: str = DEFAULT_WORKING_SPACE,
        *,
        config: ocio.Config | str | os.PathLike[str] | None = None,
        hdr: bool = False,
        model_space: str = MODEL_SPACE,
        display: str = HDR_DISPLAY,
        view: str = HDR_VIEW,
    ) -> None:
        self.config = config if isinstance(config, ocio.Config) else load_config(config)
        self.working_space = _resolve(self.config, working_space, "working colour space")
        self.model_space = _resolve(self.config, model_space, "model colour space")
        self.hdr = bool(hdr)
        self.display, self.view = display, view
        has_view = display in self.config.getDisplays() and view in self.config.getViews(display)
        self._display_transform = (
            ocio.DisplayViewTransform(src=self.working_space, display=display, view=view)
            if has_view
            else None
        )
        if self.hdr:
            if not has_view:
                raise ValueError(
                    f"hdr=True needs display {display!r} with view {view!r} in the OCIO config "
                    f"(displays: {list(self.config.getDisplays())}); pick display/view or use hdr=False"
                )
            forward = ocio.DisplayViewTransform(src=self.working_space, display=display, view=view)
            inverse = ocio.DisplayViewTransform(
                src=self.working_space, display=display, view=view, direction=ocio.TRANSFORM_DIR_INVERSE
            )
            self._to_model = self.config.getProcessor(forward).getDefaultCPUProcessor()
            self._from_model = self.config.getProcessor(inverse).getDefaultCPUProcessor()
        else:
            self._to_model = self._processor(self.working_space, self.model_space)
            self._from_model = self._processor(self.model_space, self.working_space)

    @property
    def to_model_processor(self) -> ocio.CPUProcessor:
        """OpenColorIO's CPU processor of working space -> model space (unclamped), for :func:`apply_in_place`."""
        return self._to_model

    @property
    def from_model_processor(self) -> ocio.CPUProcessor:
        """OpenColorIO's CPU processor of model space -> working space, for :func:`apply_in_place`."""
        return self._from_model

    def _processor(self, src: str, dst: str) -> ocio.CPUProcessor:
        return self.config.getProcessor(src, dst).getDefaultCPUProcessor()

    def __repr__(self) -> str:
        return f"ColourConverter(working_space={self.working_space!r}, hdr={self.hdr}, view={self.view!r})"

    def to_model(self, pixels: np.ndarray, *, clamp: bool = True) -> np.ndarray:
        """Working space -> model space (sRGB-encoded Rec.709, clamped to [0, 1] unless ``clamp=False``); alpha
        passes through."""
        rgb, alpha = _split_alpha(pixels)
        converted = _apply(self._to_model, rgb)
        return _join_alpha(np.clip(converted, 0.0, 1.0, out=converted) if clamp else converted, alpha)

    def from_model(self, pixels: np.ndarray) -> np.ndarray:
        """Model space -> working space (the inverse of :meth:`to_model` up to its clamp); alpha untouched."""
        rgb, alpha = _split_alpha(pixels)
        return _join_alpha(_apply(self._from_model, rgb), alpha)

    def convert(self, pixels: np.ndarray, src: str, dst: str) -> np.ndarray:
        """Convert RGB(A) ``pixels`` between any two colour spaces of the config; alpha untouched."""
        src_name = _resolve(self.config, src, "source colour space")
        dst_name = _resolve(self.config, dst, "destination colour space")
        rgb, alpha = _split_alpha(pixels)
        return _join_alpha(_apply(self._processor(src_name, dst_name), rgb), alpha)

    def to_working(self, pixels: np.ndarray, src: str) -> np.ndarray:
        """Bring pixels declared in colour space ``src`` (e.g. a movie's) into the working space."""
        return self.convert(pixels, src, self.working_space)

    def to_display(self, pixels: np.ndarray) -> np.ndarray:
        """Working space -> display code values in [0, 1] for previews (the display/view; without one, the
        model space)."""
        rgb, alpha = _split_alpha(pixels)
        processor = (
            self.config.getProcessor(self._display_transform).getDefaultCPUProcessor()
            if self._display_transform is not None
            else self._processor(self.working_space, self.model_space)
        )
        return _join_alpha(np.clip(_apply(processor, rgb), 0.0, 1.0), alpha)

    def chromaticities(self) -> tuple[float, ...] | None:
        """OpenEXR ``chromaticities`` of the working space (None if not tabulated)."""
        return chromaticities(self.working_space, self.config)
