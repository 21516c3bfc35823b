"""`vera-engine dataset from-elements`: layered training tuples from a studio's own RGBA elements and clean plates.

Inputs (docs/DATASET.md, "Your own elements")::

    ELEMENTS/<name>/<name>.####.exr|png     an RGBA element sequence (EXR: premultiplied, scene-linear; PNG: straight
    ELEMENTS/<name>/caption.txt             alpha, sRGB) and what it is ("a white swan"); or ELEMENTS/<name>.txt,
                                            or an entry in --captions FILE (JSON {name: caption})
    PLATES/<name>/<name>.####.exr|png|jpg   a clean plate as an image sequence, or PLATES/<name>.mp4
    PLATES/<name>/caption.txt               what the plate shows ("a dirt path through a misty forest"), needed
                                            for background change, where it is the new background

Colour: every layer is brought into the model's space (sRGB-encoded Rec.709 in [0, 1]) with OpenColorIO
(`imaging/colour.py`). The colour space is ``--element-colorspace`` / ``--plate-colorspace`` when given; else an
EXR's header (``oiio:ColorSpace``, when the OCIO config knows it), else ACEScg for EXR; PNG, JPEG and MP4 are taken
as already sRGB unless a flag names another space. An EXR element is unpremultiplied in its own (linear) space
before conversion, so its edges keep their colour.

Two kinds of tuple, each seeded by (``seed``, index) so the same call writes the same dataset:

* **object addition**: the element scaled, placed and (with probability ``motion_probability``) moving across a
  plate: input = plate, edit = the element's colour, alpha = its matte, composite = Eq. 2; the instruction
  "Add <caption> entering from the left edge and moving smoothly to the right." or "Add <caption> in the
  lower-right of the frame.";
* **background change**: the element over plate A is the source; the edit is plate B, ``alpha = 1 − element
  alpha``, the composite Eq. 2 over the source; "Change the background to <caption of B>. Keep <caption> intact."

As in the synthetic generator, the layers are snapped to the stored grid and the undefined edit (alpha 0) is the
Gaussian-smoothed composite (METHOD.md), so every tuple passes the format's own checks (the composite equation
exact on load). A mask (the edit's region, dilated 2 px) is written with every tuple.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vera_engine.training.data.dataset import (
    ALPHA_BITS,
    TASKS,
    LayeredClip,
    compose_layers,
    save_clip,
    snap,
    write_index,
)

ELEMENT_EXTENSIONS = (".exr", ".png")
PLATE_IMAGE_EXTENSIONS = (".exr", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
PLATE_VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv")
CAPTION_FILE = "caption.txt"
MASK_DILATION_PX = 2


@dataclass(frozen=True)
class Source:
    """One element or plate: its frames (image files) or video, and its caption."""

    name: str
    frames: tuple[Path, ...]
    video: Path | None
    caption: str | None


def _caption(root: Path, name: str, folder: Path | None, captions: dict[str, str]) -> str | None:
    for path in ([folder / CAPTION_FILE] if folder else []) + [root / f"{name}.txt"]:
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
    return captions.get(name)


def find_sources(
    root: str | os.PathLike[str], kind: str, captions: dict[str, str] | None = None
) -> list[Source]:
    """The elements (``kind`` "element") or plates ("plate") under ``root``, sorted by name."""
    root = Path(root)
    captions = captions or {}
    if not root.is_dir():
        raise FileNotFoundError(f"--{kind}s {root} is not a folder")
    extensions = ELEMENT_EXTENSIONS if kind == "element" else PLATE_IMAGE_EXTENSIONS
    found = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            frames = tuple(sorted(p for p in entry.iterdir() if p.suffix.lower() in extensions))
            if not frames:
                raise ValueError(f"{kind} {entry}: no {'/'.join(extensions)} frames in the folder")
            found.append(Source(entry.name, frames, None, _caption(root, entry.name, entry, captions)))
        elif kind == "plate" and entry.suffix.lower() in PLATE_VIDEO_EXTENSIONS:
            found.append(Source(entry.stem, (), entry, _caption(root, entry.stem, None, captions)))
    if not found:
        raise ValueError(
            f"--{kind}s {root} holds no {kind}s; expected a folder per {kind} with its frames"
            + (" (or an MP4 per plate)" if kind == "plate" else "")
        )
    if kind == "element":
        missing = [s.name for s in found if not s.caption]
        if missing:
            raise ValueError(
                f"elements {missing} have no caption: write ELEMENTS/<name>/{CAPTION_FILE} (e.g. 'a white swan'), "
                "ELEMENTS/<name>.txt, or give --captions FILE with {name: caption}"
            )
    return found


# ---------------------------------------------------------------------------------------------------------
# Reading, in the model's colour space


# OpenImageIO reports a file's colour space as a colour-interop id (`oiio:ColorSpace`, e.g. "lin_rec709_scene");
# the ACES studio config names the same spaces so.
OIIO_INTEROP_SPACES = {
    "lin_ap1_scene": "ACEScg",
    "lin_ap0_scene": "ACES2065-1",
    "lin_rec709_scene": "Linear Rec.709 (sRGB)",
    "lin_rec2020_scene": "Linear Rec.2020",
    "lin_p3d65_scene": "Linear P3-D65",
    "srgb_rec709_scene": "sRGB - Texture",
}


def _file_colorspace(spec: Any, converter_config: Any) -> str | None:
    """The colour space an image's header names, if the OCIO config knows it (directly or by its interop id)."""
    name = spec.get_string_attribute("oiio:ColorSpace")
    if not name:
        return None
    for candidate in (name, OIIO_INTEROP_SPACES.get(name, "")):
        if candidate and converter_config.getCanonicalName(candidate):
            return str(converter_config.getCanonicalName(candidate))
    return None


class ColourReader:
    """Reads frames into the model space, one OCIO converter per source colour space."""

    def __init__(self, element_space: str | None, plate_space: str | None) -> None:
        from vera_engine.imaging.colour import load_config

        self.flags = {"element": element_space, "plate": plate_space}
        self.config = load_config()
        self._converters: dict[str, Any] = {}

    def _converter(self, space: str) -> Any:
        from vera_engine.imaging.colour import ColourConverter

        if space not in self._converters:
            self._converters[space] = ColourConverter(space, config=self.config)
        return self._converters[space]

    def space_of(self, path: Path, spec: Any, kind: str) -> str | None:
        """The colour space to convert from (None: already the model's sRGB)."""
        if self.flags[kind]:
            return self.flags[kind]
        if path.suffix.lower() == ".exr":
            return _file_colorspace(spec, self.config) or "ACEScg"
        return None

    def read(self, path: Path, kind: str) -> tuple[np.ndarray, str]:
        """RGBA (H, W, 4) straight colour in model space (alpha 1 when the file has none), and the source space."""
        import OpenImageIO as oiio

        buf = oiio.ImageBuf(str(path))
        if buf.has_error:
            raise ValueError(f"{kind} frame {path} cannot be read: {buf.geterror()}")
        spec = buf.spec()
        pixels = np.asarray(buf.get_pixels(oiio.FLOAT), dtype=np.float32).reshape(spec.height, spec.width, -1)
        names = list(spec.channelnames)
        if pixels.shape[-1] < 3:
            pixels = np.repeat(pixels[..., :1], 3, axis=-1)
            names = ["R", "G", "B"]
        rgb = pixels[..., :3]
        alpha = pixels[..., names.index("A")] if "A" in names else np.ones(rgb.shape[:2], np.float32)
        space = self.space_of(path, spec, kind)
        if path.suffix.lower() == ".exr" and "A" in names:
            # EXR colour is premultiplied by convention: straight colour before any non-linear conversion.
            rgb = np.where(alpha[..., None] > 0, rgb / np.maximum(alpha[..., None], 1e-8), 0.0)
        if space is not None:
            rgb = self._converter(space).to_model(np.ascontiguousarray(rgb, dtype=np.float32))
        out = np.concatenate([np.clip(rgb, 0, 1), np.clip(alpha, 0, 1)[..., None]], axis=-1)
        return out.astype(np.float32), space or "sRGB (model space)"


def read_source(source: Source, kind: str, reader: ColourReader, count: int) -> tuple[np.ndarray, str]:
    """``count`` frames of a source, (F, H, W, 4) in model space; a shorter image sequence loops."""
    if source.video is not None:
        from vera_engine.training.data.released import decode_video, probe_video

        frames = min(count, probe_video(source.video)[0])
        rgb = decode_video(source.video, 0, frames).astype(np.float32) / np.float32(255.0)
        if reader.flags[kind]:
            rgb = reader._converter(reader.flags[kind]).to_model(rgb)
        rgba = np.concatenate([rgb, np.ones((*rgb.shape[:-1], 1), np.float32)], axis=-1)
        return rgba, reader.flags[kind] or "sRGB (model space)"
    frames, spaces = [], set()
    for index in range(count):
        pixels, space = reader.read(source.frames[index % len(source.frames)], kind)
        frames.append(pixels)
        spaces.add(space)
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise ValueError(f"{kind} {source.name}: frames of different sizes {sorted(shapes)}")
    return np.stack(frames), ", ".join(sorted(spaces))


# ---------------------------------------------------------------------------------------------------------
# Geometry


def _resize(video: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(F, H, W, C) float frames resized to ``size`` (h, w), antialiased bilinear."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2)
    shrink = size[0] < video.shape[1] or size[1] < video.shape[2]
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return x.permute(0, 2, 3, 1).clamp(0, 1).numpy()


def _dilate(region: np.ndarray, pixels: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(region.astype(np.float32))[:, None]
    return F.max_pool2d(x, 2 * pixels + 1, stride=1, padding=pixels)[:, 0].numpy() > 0


def place_element(
    element: np.ndarray, size: tuple[int, int], height_fraction: float, xs: np.ndarray, y: float
) -> tuple[np.ndarray, np.ndarray]:
    """The element (F, h, w, 4) scaled to ``height_fraction`` of the frame height and placed with its centre at
    (``xs[t]``, ``y``) (fractions of the frame; it may hang off the edges); returns colour (F, H, W, 3) and alpha."""
    frames = element.shape[0]
    height, width = size
    eh = max(2, round(height * height_fraction))
    ew = max(2, round(element.shape[2] * eh / element.shape[1]))
    if ew > width:  # a wide element fits the frame's width instead
        ew, eh = width, max(2, round(element.shape[1] * width / element.shape[2]))
    # Scale premultiplied colour (no dark fringes from the transparent pixels), then unpremultiply.
    premultiplied = np.concatenate([element[..., :3] * element[..., 3:], element[..., 3:]], axis=-1)
    scaled = _resize(premultiplied, (eh, ew))
    colour = np.zeros((frames, height, width, 3), np.float32)
    alpha = np.zeros((frames, height, width), np.float32)
    top = round(y * height - eh / 2)
    for t in range(frames):
        left = round(xs[t] * width - ew / 2)
        y0, y1 = max(0, top), min(height, top + eh)
        x0, x1 = max(0, left), min(width, left + ew)
        if y1 <= y0 or x1 <= x0:
            continue
        patch = scaled[t, y0 - top : y1 - top, x0 - left : x1 - left]
        a = patch[..., 3]
        alpha[t, y0:y1, x0:x1] = a
        colour[t, y0:y1, x0:x1] = np.where(
            a[..., None] > 0, patch[..., :3] / np.maximum(a[..., None], 1e-8), 0.0
        )
    return np.clip(colour, 0, 1), np.clip(alpha, 0, 1)


def position_phrase(alpha: np.ndarray) -> str:
    """Where the matte sits, in the paper's words ("in the lower-left of the frame")."""
    ys, xs = np.nonzero(alpha.mean(axis=0) > 0)
    if len(xs) == 0:
        return "in the frame"
    h, w = alpha.shape[1:]
    cy, cx = ys.mean() / h, xs.mean() / w
    vertical = "upper" if cy < 0.4 else "lower" if cy > 0.6 else ""
    horizontal = "left" if cx < 0.4 else "right" if cx > 0.6 else ""
    if not vertical and not horizontal:
        return "in the centre of the frame"
    return f"in the {'-'.join(p for p in (vertical, horizontal) if p)} of the frame"


def _phrase(caption: str) -> str:
    return caption.rstrip(".")


# ---------------------------------------------------------------------------------------------------------
# Tuples


def _finish(
    source: np.ndarray,
    edit: np.ndarray,
    alpha: np.ndarray,
    task: str,
    instruction: str,
    fields: dict[str, Any],
    clip_id: str,
    bits: int,
) -> LayeredClip:
    """Snap to the stored grid, fill the undefined edit (METHOD.md), compose (Eq. 2), add the dilated mask."""
    from vera_engine.training.data.synthetic import gaussian_blur

    alpha = snap(alpha.astype(np.float32), ALPHA_BITS)
    source = snap(source.astype(np.float32), bits)
    defined = alpha[..., None] > 0
    composite = compose_layers(source, np.where(defined, edit, 0.0).astype(np.float32), alpha)
    sigma = max(1.0, 0.04 * min(alpha.shape[1:]))
    edit = snap(np.where(defined, edit, gaussian_blur(composite, sigma)).astype(np.float32), bits)
    return LayeredClip(
        input=source,
        edit=edit,
        alpha=alpha,
        composite=compose_layers(source, edit, alpha),
        mask=_dilate(alpha > 0, MASK_DILATION_PX).astype(np.float32),
        instruction=instruction,
        task=task,
        fields={**fields, "mask": {"region": "edit", "dilation_px": MASK_DILATION_PX}},
        clip_id=clip_id,
    )


def make_tuple(
    index: int,
    task: str,
    elements: Sequence[Source],
    plates: Sequence[Source],
    reader: ColourReader,
    *,
    frames: int,
    size: tuple[int, int],
    seed: int,
    scale: tuple[float, float],
    motion_probability: float,
    bits: int,
) -> LayeredClip:
    """Tuple ``index`` of ``task``; everything random is drawn from (``seed``, ``index``)."""
    rng = np.random.default_rng([seed, index])
    element = elements[int(rng.integers(len(elements)))]
    plate = plates[int(rng.integers(len(plates)))]
    element_px, element_space = read_source(element, "element", reader, frames)
    plate_px, plate_space = read_source(plate, "plate", reader, frames)
    count = min(frames, plate_px.shape[0])
    element_px = element_px[:count]
    background = _resize(plate_px[:count, ..., :3], size)
    fraction = float(rng.uniform(*scale))
    clip_id = f"{task}_{index:05d}"
    fields: dict[str, Any] = {
        "element": element.name,
        "element_colorspace": element_space,
        "plate": plate.name,
        "plate_colorspace": plate_space,
        "scale": round(fraction, 4),
        "seed": [seed, index],
    }
    if task == "object_addition":
        y = float(rng.uniform(0.35, 0.7))
        if rng.random() < motion_probability:
            rightwards = bool(rng.random() < 0.5)
            start, end = (-0.05, 0.75) if rightwards else (1.05, 0.25)
            xs = np.linspace(start, end, count)
            edge, towards = ("left", "right") if rightwards else ("right", "left")
            motion = f"entering from the {edge} edge and moving smoothly to the {towards}"
            fields["motion"] = f"{edge}_to_{towards}"
        else:
            xs = np.full(count, float(rng.uniform(0.25, 0.75)))
            motion = ""
            fields["motion"] = "static"
        colour, alpha = place_element(element_px, size, fraction, xs, y)
        where = motion or position_phrase(alpha)
        instruction = f"Add {_phrase(element.caption or element.name)} {where}."
        return _finish(background, colour, alpha, task, instruction, fields, clip_id, bits)
    # Background change: keep the element (over plate A), a new background from plate B.
    others = [p for p in plates if p.name != plate.name and p.caption]
    if not others:
        raise ValueError(
            "background change needs a second plate with a caption (the new background): add one, with "
            f"PLATES/<name>/{CAPTION_FILE}, or ask only for --tasks object_addition"
        )
    new = others[int(rng.integers(len(others)))]
    new_px, _ = read_source(new, "plate", reader, count)
    new_background = _resize(new_px[:count, ..., :3], size)
    xs = np.full(count, float(rng.uniform(0.35, 0.65)))
    colour, element_alpha = place_element(element_px, size, fraction, xs, float(rng.uniform(0.45, 0.6)))
    source = compose_layers(background, colour, element_alpha)
    fields["new_background"] = new.name
    instruction = (
        f"Change the background to {_phrase(new.caption or new.name)}. "
        f"Keep {_phrase(element.caption or element.name)} intact."
    )
    alpha = np.float32(1.0) - element_alpha
    return _finish(source, new_background, alpha, task, instruction, fields, clip_id, bits)


def build_from_elements(
    elements_dir: str | os.PathLike[str],
    plates_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    count: int = 100,
    heldout: int = 0,
    tasks: Sequence[str] = TASKS,
    frames: int = 16,
    size: tuple[int, int] = (480, 832),
    seed: int = 0,
    scale: tuple[float, float] = (0.3, 0.6),
    motion_probability: float = 0.5,
    element_colorspace: str | None = None,
    plate_colorspace: str | None = None,
    captions: str | os.PathLike[str] | None = None,
    bits: int = 8,
) -> dict[str, Any]:
    """Write ``count`` training tuples (and ``heldout`` held-out ones) to ``out`` in the layered format."""
    unknown = set(tasks) - set(TASKS)
    if unknown or not tasks:
        raise ValueError(f"--tasks {list(tasks)}; expected some of {TASKS}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(
            f"--scale {scale[0]} {scale[1]}; expected 0 < MIN <= MAX <= 1 (fractions of frame height)"
        )
    out = Path(out)
    if (out / "index.json").exists():
        raise FileExistsError(f"--out {out} already holds a dataset; choose another folder")
    caption_map = json.loads(Path(captions).read_text()) if captions else {}
    elements = find_sources(elements_dir, "element", caption_map)
    plates = find_sources(plates_dir, "plate", caption_map)
    reader = ColourReader(element_colorspace, plate_colorspace)
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, amount, offset in (("train", count, 0), ("heldout", heldout, count)):
        if amount == 0:
            continue
        entries = []
        for i in range(amount):
            index = offset + i
            task = tasks[index % len(tasks)]
            clip = make_tuple(
                index,
                task,
                elements,
                plates,
                reader,
                frames=frames,
                size=size,
                seed=seed,
                scale=scale,
                motion_probability=motion_probability,
                bits=bits,
            )
            entries.append(save_clip(clip, out / split / clip.clip_id, bits=bits))
        splits[split] = entries
    write_index(
        out,
        splits,
        generator="from-elements",
        seed=seed,
        elements=[e.name for e in elements],
        plates=[p.name for p in plates],
    )
    return {"splits": {k: len(v) for k, v in splits.items()}, "out": str(out)}
