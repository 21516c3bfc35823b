"""The layered video dataset: the on-disk format (see docs/DATASET.md) and a training loader.

A layered clip is the training tuple of the Vera method (METHOD.md, Formulation): the source video, the
edit layer, its alpha matte, the composite, the instruction and the task, and an optional mask video.
Everything is in the model space: sRGB-encoded values in [0, 1], float32, colour as (F, H, W, 3) and
alpha / mask as (F, H, W).

The composite is *defined* by the compositing equation (METHOD Eq. 2, with ``V_preserved = V_src``)::

    composite = (np.float32(1) - alpha[..., None]) * input + alpha[..., None] * edit

evaluated by numpy in float32 on the stored (quantized) layers. :func:`compose_layers` is that expression
and the only place it is written. The loader rebuilds the float32 composite from the loaded layers with it
and checks the result against the rounded composite stored for inspection, so a loaded clip satisfies
Eq. 2 bit for bit and a damaged or inconsistent file is refused.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vera_engine.training.data.geometry import centroid_direction, position_matches

FORMAT_NAME = "vera-layered-video"
FORMAT_VERSION = 1
TASKS = ("object_addition", "background_change")
CLIP_FILE = "clip.npz"
META_FILE = "meta.json"
INDEX_FILE = "index.json"

# Colour layers are stored as 8-bit (default, like the video the method trains on, and about 5x smaller
# compressed) or 16-bit codes; alpha always as 16-bit, since soft edges and faint shadows live in its
# low values.
_CODE_TYPES = {8: np.uint8, 16: np.uint16}
ALPHA_BITS = 16


def code_type(bits: int) -> type[np.unsignedinteger[Any]]:
    """The unsigned integer type that stores ``bits``-bit codes (8 or 16); anything else is an error."""
    if bits not in _CODE_TYPES:
        raise ValueError(f"bits={bits!r}; expected 8 or 16 (the code widths the format stores).")
    return _CODE_TYPES[bits]


def quantize(x: np.ndarray, bits: int = 16) -> np.ndarray:
    """Encode values in [0, 1] as ``bits``-bit unsigned codes (round to nearest); out-of-range values clip."""
    dtype = code_type(bits)
    scale = np.float32(np.iinfo(dtype).max)
    return np.round(np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0) * scale).astype(dtype)


def dequantize(q: np.ndarray) -> np.ndarray:
    """Decode uint8 / uint16 codes to float32 in [0, 1] (code / max code), exactly as the loader does."""
    q = np.asarray(q)
    if q.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"codes have dtype {q.dtype}; expected uint8 or uint16.")
    return q.astype(np.float32) / np.float32(np.iinfo(q.dtype).max)


def snap(x: np.ndarray, bits: int = 16) -> np.ndarray:
    """Round values onto the ``bits``-bit grid the format stores, so saving and loading changes nothing."""
    return dequantize(quantize(x, bits))


def compose_layers(input: np.ndarray, edit: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The compositing equation (METHOD Eq. 2): ``(1 - alpha) * input + alpha * edit``, in float32.

    ``input`` and ``edit`` are (..., 3) colour, ``alpha`` the matching (...) matte. This exact expression
    defines the stored composite; where ``alpha == 0`` the result equals ``input`` bit for bit.
    """
    input = _as_f32("input", input)
    edit = _as_f32("edit", edit)
    a = _as_f32("alpha", alpha)[..., None]
    if input.shape != edit.shape or input.shape[:-1] != a.shape[:-1]:
        raise ValueError(
            f"compose_layers: shapes do not match: input {input.shape}, edit {edit.shape}, alpha {alpha.shape}; "
            "expected input and edit (..., 3) and alpha (...) over the same frames and pixels."
        )
    return (np.float32(1.0) - a) * input + a * edit


def _as_f32(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(
            f"{name} has dtype {x.dtype}; expected float32 (model space). Convert with .astype(np.float32)."
        )
    return x


@dataclass
class LayeredClip:
    """One layered training/evaluation tuple in model space (sRGB-encoded [0, 1] float32).

    ``input`` is the source video, ``edit`` the straight (not premultiplied) edit layer, ``alpha`` its matte,
    ``composite`` = :func:`compose_layers` (input, edit, alpha). ``mask`` is the optional mask video: 1 over
    the region the edit may change (every pixel with ``alpha > 0``, slightly dilated), 0 where the source
    must survive. ``fields`` holds the structured facts behind the instruction (colour, shape, direction,
    position, background kind ...) so evaluation can check them.
    """

    input: np.ndarray
    edit: np.ndarray
    alpha: np.ndarray
    composite: np.ndarray
    instruction: str
    task: str
    mask: np.ndarray | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    clip_id: str = ""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def shape(self) -> tuple[int, int, int]:
        """(frames, height, width)."""
        f, h, w = self.alpha.shape
        return int(f), int(h), int(w)

    def validate(self) -> None:
        """Check dtypes, shapes, value range and task; raise ValueError (TypeError for a dtype) saying why."""
        name = self.clip_id or "clip"
        if self.task not in TASKS:
            raise ValueError(f"{name}: task {self.task!r} is not known; expected one of {TASKS}.")
        if not isinstance(self.instruction, str) or not self.instruction.strip():
            raise ValueError(f"{name}: instruction {self.instruction!r} is empty; every clip needs one.")
        alpha = _as_f32(f"{name}.alpha", self.alpha)
        if alpha.ndim != 3:
            raise ValueError(f"{name}: alpha has shape {alpha.shape}; expected (frames, height, width).")
        for key in ("input", "edit", "composite"):
            arr = _as_f32(f"{name}.{key}", getattr(self, key))
            if arr.shape != (*alpha.shape, 3):
                raise ValueError(
                    f"{name}: {key} has shape {arr.shape}; expected {(*alpha.shape, 3)} (alpha's frames and size, RGB)."
                )
        if self.mask is not None:
            mask = _as_f32(f"{name}.mask", self.mask)
            if mask.shape != alpha.shape:
                raise ValueError(f"{name}: mask has shape {mask.shape}; expected {alpha.shape} like alpha.")
        for key in ("input", "edit", "alpha"):
            arr = getattr(self, key)
            lo, hi = float(arr.min()), float(arr.max())
            if lo < 0.0 or hi > 1.0 or not np.isfinite(arr).all():
                raise ValueError(
                    f"{name}: {key} spans [{lo}, {hi}]; expected finite values in [0, 1] (model space)."
                )


# ---------------------------------------------------------------------------------------------------------
# On-disk format


def save_clip(clip: LayeredClip, folder: str | Path, *, bits: int = 8) -> dict[str, Any]:
    """Write one clip as ``folder/clip.npz`` + ``folder/meta.json``; return its index entry.

    Input, edit and composite are stored as ``bits``-bit codes (8 or 16), alpha as 16-bit codes, the mask
    as uint8. The composite is recomputed with :func:`compose_layers` from the *quantized* layers, then
    rounded, so :func:`load_clip` can rebuild the exact float32 composite and check it against the stored
    codes. A clip already on that grid (the generator's, made with the same ``bits``) loads back bit for bit.
    A clip whose own composite disagrees with Eq. 2 by more than rounding is refused.
    """
    folder = Path(folder)
    q_input, q_edit, q_alpha = (
        quantize(clip.input, bits),
        quantize(clip.edit, bits),
        quantize(clip.alpha, ALPHA_BITS),
    )
    composite = compose_layers(dequantize(q_input), dequantize(q_edit), dequantize(q_alpha))
    deviation = float(np.abs(composite - clip.composite).max())
    tolerance = 2.0 / (2**bits - 1)
    if deviation > tolerance:
        raise ValueError(
            f"{clip.clip_id or folder}: composite deviates from (1 - alpha) * input + alpha * edit by {deviation:.3g}"
            f" (allowed {tolerance:.3g} for {bits}-bit rounding); the format stores only consistent tuples. "
            "Recompute the composite with vera_engine.training.data.compose_layers."
        )
    arrays: dict[str, np.ndarray] = {
        "input": q_input,
        "edit": q_edit,
        "alpha": q_alpha,
        "composite": quantize(composite, bits),
    }
    if clip.mask is not None:
        arrays["mask"] = (clip.mask > 0.5).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / CLIP_FILE, **arrays)
    frames, height, width = clip.shape
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "id": clip.clip_id,
        "task": clip.task,
        "instruction": clip.instruction,
        "fields": clip.fields,
        "seed": clip.seed,
        "frames": frames,
        "height": height,
        "width": width,
        "has_mask": clip.mask is not None,
        "bits": bits,
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return {
        "id": clip.clip_id,
        "path": folder.name,
        "task": clip.task,
        "frames": frames,
        "height": height,
        "width": width,
        "has_mask": clip.mask is not None,
    }


def load_clip(folder: str | Path) -> LayeredClip:
    """Read a clip folder written by :func:`save_clip` back into model-space float32 arrays.

    The float32 composite is rebuilt from the loaded layers with :func:`compose_layers` (so it satisfies
    Eq. 2 bit for bit) and must round to the stored composite codes, else the file is refused.
    """
    folder = Path(folder)
    npz_path, meta_path = folder / CLIP_FILE, folder / META_FILE
    for path in (npz_path, meta_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist; a layered clip folder holds {CLIP_FILE} and {META_FILE} (see docs/DATASET.md)."
            )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('format_version')!r}; expected "
            f"{FORMAT_NAME!r} version {FORMAT_VERSION}. Regenerate the data with this version of vera_engine."
        )
    with np.load(npz_path) as data:
        colour_type = data["input"].dtype if "input" in data.files else None
        expected = {"input": colour_type, "edit": colour_type, "composite": colour_type, "alpha": np.uint16}
        for key, dtype in expected.items():
            if key not in data.files or dtype not in (np.uint8, np.uint16) or data[key].dtype != dtype:
                raise ValueError(
                    f"{npz_path}: array {key!r} is missing or has the wrong code type (colour layers all uint8 or "
                    "all uint16, alpha uint16); the file is not a vera layered clip or is damaged."
                )
        layers = {key: dequantize(data[key]) for key in ("input", "edit", "alpha")}
        composite = compose_layers(layers["input"], layers["edit"], layers["alpha"])
        bits = 8 if colour_type == np.uint8 else 16
        mismatched = int(np.count_nonzero(quantize(composite, bits) != data["composite"]))
        if mismatched:
            raise ValueError(
                f"{npz_path}: the stored composite differs from (1 - alpha) * input + alpha * edit at {mismatched} "
                "samples; the file is damaged or was not written by save_clip. Regenerate it."
            )
        clip = LayeredClip(
            **layers,
            composite=composite,
            mask=data["mask"].astype(np.float32) if "mask" in data.files else None,
            instruction=meta["instruction"],
            task=meta["task"],
            fields=meta.get("fields", {}),
            seed=meta.get("seed"),
            clip_id=meta.get("id", folder.name),
        )
    return clip


def write_index(root: str | Path, splits: Mapping[str, Sequence[Mapping[str, Any]]], **extra: Any) -> Path:
    """Write ``root/index.json`` listing every clip of every split (entries as :func:`save_clip` returns)."""
    root = Path(root)
    index = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **extra,
        "splits": {
            name: [dict(e, path=f"{name}/{e['path']}") for e in entries] for name, entries in splits.items()
        },
    }
    path = root / INDEX_FILE
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


def read_index(root: str | Path) -> dict[str, Any]:
    """Read and check ``root/index.json``."""
    path = Path(root) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; expected a layered dataset root (make one with "
            "`python -m vera_engine.training.data.synthetic --out DIR`)."
        )
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT_NAME or index.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {index.get('format')!r} version {index.get('format_version')!r}; expected "
            f"{FORMAT_NAME!r} version {FORMAT_VERSION}."
        )
    return index


def iter_clips(root: str | Path, split: str) -> Iterator[LayeredClip]:
    """Yield the full-size clips of one split in index order (what evaluation reads)."""
    root = Path(root)
    for entry in _split_entries(read_index(root), split, root):
        yield load_clip(root / entry["path"])


def _split_entries(index: Mapping[str, Any], split: str, root: Path) -> list[dict[str, Any]]:
    splits = index.get("splits", {})
    if split not in splits:
        raise KeyError(f"split {split!r} is not in {root / INDEX_FILE}; it has {sorted(splits)}.")
    return list(splits[split])


# ---------------------------------------------------------------------------------------------------------
# Mirroring the words with the pixels

_LEFT_RIGHT = re.compile(r"(?<![A-Za-z])(left|right)(wards?|most)?(?![A-Za-z])", re.IGNORECASE)


def mirror_text(text: str) -> str:
    """Swap "left" and "right" (any case; also "left_to_right", "leftwards", "leftmost", "upper-left").

    A horizontally flipped clip must carry a mirrored instruction and mirrored fields, or the data lies.
    """

    def swap(m: re.Match[str]) -> str:
        word = m.group(1)
        new = "right" if word.lower() == "left" else "left"
        if word.isupper():
            new = new.upper()
        elif word[0].isupper():
            new = new.capitalize()
        return new + (m.group(2) or "")

    return _LEFT_RIGHT.sub(swap, text)


def mirror_fields(value: Any) -> Any:
    """Apply :func:`mirror_text` to every string (keys kept) inside nested dicts and lists."""
    if isinstance(value, str):
        return mirror_text(value)
    if isinstance(value, Mapping):
        # A gradient's direction (x, y) turns with the picture.
        return {k: [-v[0], v[1]] if k == "towards" else mirror_fields(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(mirror_fields(v) for v in value)
    return value


# ---------------------------------------------------------------------------------------------------------
# Training loader


def _to_video_tensor(x: np.ndarray) -> Any:
    import torch

    if x.ndim == 3:  # (F, H, W) -> (1, F, H, W)
        return torch.from_numpy(np.ascontiguousarray(x[None]))
    return torch.from_numpy(np.ascontiguousarray(x.transpose(3, 0, 1, 2)))  # (F, H, W, 3) -> (3, F, H, W)


class LayeredVideoDataset:
    """A torch-style map dataset over one split of a layered dataset, with aligned augmentation.

    Each item is a dict: ``input``, ``edit``, ``composite`` as float32 tensors (3, F, H, W); ``alpha`` and
    ``mask`` as (1, F, H, W) (``mask`` zeros and ``has_mask`` False when the clip has none); ``instruction``,
    ``task``, ``fields``, ``clip_id``; ``flipped`` and ``crop`` = (t0, y0, x0) saying what was done.

    Augmentation: a random window of ``frames`` consecutive frames, a random ``size`` = (h, w) spatial crop
    and a horizontal flip with probability 0.5, applied identically to every layer. A flip also mirrors the
    instruction and the fields (left <-> right). For object addition a crop is only accepted if the instructed
    facts still hold inside it (matte present, same direction and position); after 16 refused draws the
    centred window is used. Draws depend only on (``seed``, epoch, index), so they are the same for any number
    of DataLoader workers; call :meth:`set_epoch` each epoch for fresh draws.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        frames: int | None = None,
        size: tuple[int, int] | None = None,
        random_crop: bool = True,
        hflip: bool = True,
        seed: int = 0,
        cache: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.entries = _split_entries(read_index(self.root), split, self.root)
        if not self.entries:
            raise ValueError(f"split {split!r} of {self.root} has no clips; generate some first.")
        if frames is not None and frames < 1:
            raise ValueError(
                f"frames={frames}; expected a positive number of frames or None for whole clips."
            )
        if size is not None and (len(size) != 2 or min(size) < 1):
            raise ValueError(
                f"size={size!r}; expected (height, width) with both >= 1, or None for full frames."
            )
        for e in self.entries:
            if frames is not None and frames > e["frames"]:
                raise ValueError(
                    f"frames={frames} but clip {e['id']!r} has only {e['frames']}; ask for at most "
                    f"{min(x['frames'] for x in self.entries)} frames or regenerate longer clips."
                )
            if size is not None and (size[0] > e["height"] or size[1] > e["width"]):
                raise ValueError(
                    f"size={tuple(size)} is larger than clip {e['id']!r} ({e['height']}x{e['width']}); crops cannot "
                    "grow a clip. Ask for a smaller size or regenerate bigger clips."
                )
        self.frames = frames
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.random_crop = random_crop
        self.hflip = hflip
        self.seed = int(seed)
        self.epoch = 0
        self._cache: dict[int, LayeredClip] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation draws of this epoch."""
        self.epoch = int(epoch)

    def instructions(self) -> list[str]:
        """Every instruction this dataset can hand out: each clip's, and its mirror when flips are on.

        Read from the clips' metadata only (no pixels): what a word-level tokenizer's vocabulary is built from.
        """
        texts = [
            json.loads((self.root / e["path"] / META_FILE).read_text())["instruction"] for e in self.entries
        ]
        return texts + [mirror_text(t) for t in texts] if self.hflip else texts

    def clip(self, index: int) -> LayeredClip:
        """The full, un-augmented clip ``index``."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        clip = load_clip(self.root / self.entries[index]["path"])
        if self._cache is not None:
            self._cache[index] = clip
        return clip

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips in split {self.split!r}.")
        clip = self.clip(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        t0, y0, x0, f, h, w = self._choose_window(clip, rng)
        flipped = bool(self.hflip and rng.random() < 0.5)

        def cut(x: np.ndarray) -> np.ndarray:
            x = x[t0 : t0 + f, y0 : y0 + h, x0 : x0 + w]
            return x[:, :, ::-1] if flipped else x

        mask = cut(clip.mask) if clip.mask is not None else np.zeros((f, h, w), np.float32)
        return {
            "input": _to_video_tensor(cut(clip.input)),
            "edit": _to_video_tensor(cut(clip.edit)),
            "alpha": _to_video_tensor(cut(clip.alpha)),
            "composite": _to_video_tensor(cut(clip.composite)),
            "mask": _to_video_tensor(mask),
            "has_mask": clip.mask is not None,
            "instruction": mirror_text(clip.instruction) if flipped else clip.instruction,
            "task": clip.task,
            "fields": mirror_fields(clip.fields) if flipped else clip.fields,
            "clip_id": clip.clip_id,
            "flipped": flipped,
            "crop": (t0, y0, x0),
        }

    def _choose_window(
        self, clip: LayeredClip, rng: np.random.Generator
    ) -> tuple[int, int, int, int, int, int]:
        frames, height, width = clip.shape
        f = self.frames or frames
        h, w = self.size or (height, width)
        centred = ((frames - f) // 2, (height - h) // 2, (width - w) // 2)
        if not self.random_crop:
            return (*centred, f, h, w)
        for _ in range(16):
            t0 = int(rng.integers(0, frames - f + 1))
            y0 = int(rng.integers(0, height - h + 1))
            x0 = int(rng.integers(0, width - w + 1))
            if _window_keeps_facts(clip, t0, y0, x0, f, h, w):
                return t0, y0, x0, f, h, w
        return (*centred, f, h, w)


def _window_keeps_facts(clip: LayeredClip, t0: int, y0: int, x0: int, f: int, h: int, w: int) -> bool:
    """Whether an object-addition instruction is still true of the cropped clip."""
    if clip.task != "object_addition":
        return True
    alpha = clip.alpha[t0 : t0 + f, y0 : y0 + h, x0 : x0 + w]
    if not (alpha > 0.5).any(axis=(1, 2)).all():
        return False
    direction, position = clip.fields.get("direction"), clip.fields.get("position")
    if direction is not None and centroid_direction(alpha) != direction:
        return False
    return position is None or position_matches(alpha, position)


def collate_layered(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """DataLoader ``collate_fn``: stack the tensors, keep strings, fields and crops as lists."""
    import torch

    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif key in ("has_mask", "flipped"):
            out[key] = torch.tensor(values, dtype=torch.bool)
        else:
            out[key] = values
    return out


def split_code(split: str) -> int:
    """A stable integer for a split name (seeds must not depend on Python's randomised ``hash``)."""
    return zlib.crc32(split.encode("utf-8"))
