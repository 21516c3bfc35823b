"""The Vera authors' released dataset, read as published: ``metadata.jsonl`` + 8-bit MP4 layers.

Layout (the project page's sample folder, and each config folder of the full release)::

    metadata.jsonl                      one JSON record a line
    <video_id>_input.mp4                source video
    <video_id>_edit_rgb.mp4             edit layer (straight colour)
    <video_id>_edit_alpha.mp4           its matte, as a grey video
    <video_id>_target_composite.mp4     the edited video
    [<video_id>_mask.mp4]               full release only: the mask video (``mask_path``)

A record holds ``video_id``, ``dataset_name``, ``edit_instruction``, ``input_video_path``, ``edit_rgb_path``,
``edit_alpha_path``, ``target_composite_path`` (and in the full release ``mask_path``, ``composite_path``); paths
are relative to the folder of the ``metadata.jsonl``. A split is the ``metadata.jsonl`` in ``ROOT/<split>/``, or
in every ``ROOT/<split>_*/`` (the test configs ``test_bg_change`` and ``test_obj_add`` for ``--split test``), or
else ``ROOT/metadata.jsonl`` itself.

Each record becomes a :class:`~vera_engine.training.data.dataset.LayeredClip` in model space:

* the layers are decoded with PyAV and scaled to [0, 1]; the alpha is the mean of the grey video's three channels
  (a video whose channels disagree is refused: it is not a matte);
* the H.264 noise floor of the matte (codes 0 and 1 of 255) reads as 0, and where the matte is 0 the edit layer
  is undefined: it is filled with the Gaussian-smoothed composite (METHOD.md, Formulation), as the synthetic
  generator fills it;
* a record without ``mask_path`` has no mask (training then always drops it; evaluation runs without one);
* a clip of another size is scaled to cover the training size (aspect kept) and cropped; a longer clip gives a
  window of the training frames.

Every record is checked before training starts (:func:`read_records`): the files exist and open, the layers agree
in frame count and size, the matte is grey, the clip has enough frames. A bad record is an error that names it
and what is wrong, or with ``skip_bad`` it is left out and counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vera_engine.training.data.dataset import (
    INDEX_FILE,
    LayeredClip,
    _to_video_tensor,
    mirror_text,
)

METADATA_FILE = "metadata.jsonl"
FORMATS = ("auto", "vera", "layered")
# Record keys of the layers, in the order they are checked.
LAYER_KEYS = {
    "input": "input_video_path",
    "edit": "edit_rgb_path",
    "alpha": "edit_alpha_path",
    "composite": "target_composite_path",
}
MASK_KEY = "mask_path"
# A grey video decodes to three (nearly) equal channels; H.264's chroma rounding moves them by a code or two. A matte
# whose channels differ by more than this many codes at more than GREY_OUTLIER_SHARE of its pixels is colour.
GREY_TOLERANCE_CODES = 16
GREY_OUTLIER_SHARE = 0.01
# Codes at or below this read as alpha 0: the compression noise floor of a black matte.
ALPHA_ZERO_CODE = 1


class BadRecordError(ValueError):
    """A released-layout record that cannot be used; the message names the record and what is wrong."""


@dataclass(frozen=True)
class ReleasedRecord:
    """One checked record: where its layers are and what its clip is."""

    video_id: str
    task: str
    instruction: str
    paths: dict[str, Path]
    frames: int
    height: int
    width: int
    where: str  # "metadata.jsonl line N", for messages
    dataset_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Detection


def is_released_layout(root: str | Path) -> bool:
    """Whether ``root`` holds the released layout (a ``metadata.jsonl`` here or one folder down, no index.json)."""
    root = Path(root)
    if (root / INDEX_FILE).is_file():
        return False
    return (root / METADATA_FILE).is_file() or any(root.glob(f"*/{METADATA_FILE}"))


def detect_format(root: str | Path, requested: str = "auto") -> str:
    """``vera`` (the released layout) or ``layered`` (this project's format, docs/DATASET.md) for ``root``.

    ``requested`` ``vera`` or ``layered`` insists on that format and says what is missing when the folder is not in
    it; ``auto`` detects.
    """
    root = Path(root)
    if requested not in FORMATS:
        raise ValueError(f"--format {requested!r}; expected one of {FORMATS}")
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root} is not a folder")
    released = is_released_layout(root)
    if requested == "vera" and not released:
        raise ValueError(
            f"--format vera: {root} has no {METADATA_FILE} (nor one in a sub-folder); the released Vera layout is a "
            f"{METADATA_FILE} with the MP4 layers beside it"
        )
    if requested == "layered" and not (root / INDEX_FILE).is_file():
        raise ValueError(f"--format layered: {root} has no {INDEX_FILE} (docs/DATASET.md)")
    if requested != "auto":
        return requested
    return "vera" if released else "layered"


def metadata_files(root: str | Path, split: str) -> list[Path]:
    """The ``metadata.jsonl`` files that make up ``split`` (module docstring)."""
    root = Path(root)
    own = root / split / METADATA_FILE
    if own.is_file():
        return [own]
    configs = sorted(root.glob(f"{split}_*/{METADATA_FILE}"))
    if configs:
        return configs
    if (root / METADATA_FILE).is_file():
        return [root / METADATA_FILE]
    found = sorted(str(p.relative_to(root)) for p in root.glob(f"*/{METADATA_FILE}"))
    raise FileNotFoundError(
        f"split {split!r}: no {split}/{METADATA_FILE}, {split}_*/{METADATA_FILE} or {METADATA_FILE} in {root}; "
        f"it has {found or 'none'}"
    )


# ---------------------------------------------------------------------------------------------------------
# Video files


def probe_video(path: Path) -> tuple[int, int, int]:
    """(frames, height, width) of the first video stream of ``path``; raises ValueError if it does not open."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path.name} has no video stream")
            stream = container.streams.video[0]
            frames = int(stream.frames)
            if frames <= 0:  # no frame count in the header: count the packets
                frames = sum(1 for packet in container.demux(stream) if packet.size)
            return frames, int(stream.codec_context.height), int(stream.codec_context.width)
    except av.error.FFmpegError as error:
        raise ValueError(f"{path.name} is not a readable video ({error})") from error


def decode_video(path: Path, start: int = 0, count: int | None = None) -> np.ndarray:
    """Frames ``start .. start+count`` of ``path`` as uint8 RGB (F, H, W, 3); raises ValueError when short or bad."""
    import av

    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index < start:
                    continue
                frames.append(frame.to_ndarray(format="rgb24"))
                if count is not None and len(frames) == count:
                    break
    except av.error.FFmpegError as error:
        raise ValueError(f"{path.name} could not be decoded ({error})") from error
    if not frames or (count is not None and len(frames) < count):
        raise ValueError(
            f"{path.name} has {start + len(frames)} frames; expected at least {start + (count or 1)}"
        )
    return np.stack(frames)


def grey_problem(rgb: np.ndarray) -> str | None:
    """Why uint8 RGB frames are not a grey matte, or None when they are."""
    spread = rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1).astype(np.int16)
    share = float(np.mean(spread > GREY_TOLERANCE_CODES))
    if share > GREY_OUTLIER_SHARE:
        return (
            f"is not grey: its channels differ by more than {GREY_TOLERANCE_CODES} codes at {share:.1%} of the pixels "
            f"(allowed {GREY_OUTLIER_SHARE:.0%}); the matte must be a grey video (R = G = B)"
        )
    return None


def matte_from_grey(rgb: np.ndarray) -> np.ndarray:
    """A grey uint8 video (F, H, W, 3) as a float32 matte (F, H, W): the channels' mean, noise floor at 0."""
    grey = rgb.astype(np.float32).mean(axis=-1)
    grey[grey <= ALPHA_ZERO_CODE] = 0.0
    return grey / np.float32(255.0)


def fit_to_size(video: np.ndarray, size: tuple[int, int] | None, offset: tuple[float, float] = (0.5, 0.5)):
    """Scale float32 (F, H, W[, C]) frames to cover ``size`` = (h, w), aspect kept, then crop to it.

    ``offset`` (0..1 along height and width) places the crop in the scaled frame (0.5: centred). Unchanged when
    the frames already have that size or ``size`` is None.
    """
    import torch
    import torch.nn.functional as F

    if size is None or tuple(video.shape[1:3]) == tuple(size):
        return video
    h, w = video.shape[1:3]
    scale = max(size[0] / h, size[1] / w)
    new_h, new_w = max(size[0], round(h * scale)), max(size[1], round(w * scale))
    x = torch.from_numpy(np.ascontiguousarray(video))
    x = x[..., None] if x.ndim == 3 else x
    x = x.permute(0, 3, 1, 2)  # (F, C, H, W)
    # Antialiased bilinear: a shrink keeps thin matte edges instead of aliasing them.
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=scale < 1)
    y0 = round((new_h - size[0]) * offset[0])
    x0 = round((new_w - size[1]) * offset[1])
    x = x[:, :, y0 : y0 + size[0], x0 : x0 + size[1]].permute(0, 2, 3, 1).clamp(0.0, 1.0)
    out = x.numpy()
    return np.ascontiguousarray(out[..., 0] if video.ndim == 3 else out)


# ---------------------------------------------------------------------------------------------------------
# Records


def task_of(record: dict[str, Any]) -> str | None:
    """The task of a record: from ``dataset_name`` (``..bg_change..`` / ``..obj_add..``), else the instruction."""
    name = str(record.get("dataset_name", "")).lower()
    if "bg" in name or "background" in name:
        return "background_change"
    if "obj" in name or "add" in name:
        return "object_addition"
    text = str(record.get("edit_instruction", "")).strip().lower()
    if "background" in text.split(".")[0]:
        return "background_change"
    if text.startswith(("add ", "insert ", "place ", "put ")):
        return "object_addition"
    return None


def check_record(
    record: Any, folder: Path, where: str, *, min_frames: int | None = None, check_grey: bool = True
) -> ReleasedRecord:
    """Check one parsed record (files, sizes, frame counts, the matte); raises :class:`BadRecordError`."""
    if not isinstance(record, dict):
        raise BadRecordError(f"{where}: not a JSON object")
    video_id = str(record.get("video_id") or "")
    name = f"{where} (video_id {video_id!r})" if video_id else where

    def bad(what: str) -> BadRecordError:
        return BadRecordError(f"{name}: {what}")

    if not video_id:
        raise bad("has no video_id")
    instruction = record.get("edit_instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise bad("has no edit_instruction")
    task = task_of(record)
    if task is None:
        raise bad(
            f"task unknown: dataset_name {record.get('dataset_name')!r} names neither background change (bg) nor "
            "object addition (obj/add), and the instruction starts with neither 'Add' nor 'Change the background'"
        )
    keys = dict(LAYER_KEYS)
    if record.get(MASK_KEY):
        keys["mask"] = MASK_KEY
    paths: dict[str, Path] = {}
    shapes: dict[str, tuple[int, int, int]] = {}
    for layer, key in keys.items():
        relative = record.get(key)
        if not isinstance(relative, str) or not relative:
            raise bad(f"has no {key}")
        path = folder / relative
        if not path.is_file():
            raise bad(f"{key} {relative!r}: {path} does not exist")
        try:
            shapes[layer] = probe_video(path)
        except ValueError as error:
            raise bad(f"{key}: {error}") from None
        paths[layer] = path
    frames, height, width = shapes["input"]
    for layer, (f, h, w) in shapes.items():
        if (h, w) != (height, width):
            raise bad(
                f"{keys[layer]} is {w}x{h} but the input is {width}x{height}; every layer must match the input"
            )
        if f != frames:
            raise bad(
                f"{keys[layer]} has {f} frames but the input has {frames}; every layer must match the input"
            )
    if min_frames is not None and frames < min_frames:
        raise bad(f"has {frames} frames; training takes {min_frames} (ask for fewer with --frames)")
    if check_grey:
        for layer in ("alpha", "mask") if "mask" in paths else ("alpha",):
            try:
                problem = grey_problem(decode_video(paths[layer], 0, 1))
            except ValueError as error:
                raise bad(f"{keys[layer]}: {error}") from None
            if problem:
                raise bad(f"{keys[layer]} {problem}")
    return ReleasedRecord(
        video_id=video_id,
        task=task,
        instruction=instruction.strip(),
        paths=paths,
        frames=frames,
        height=height,
        width=width,
        where=name,
        dataset_name=str(record.get("dataset_name", "")),
        extra={k: v for k, v in record.items() if k not in (*keys.values(), "edit_instruction", "video_id")},
    )


def read_records(
    root: str | Path, split: str = "train", *, skip_bad: bool = False, min_frames: int | None = None
) -> tuple[list[ReleasedRecord], list[str]]:
    """Every record of ``split``, checked; returns (good records, messages of the skipped ones).

    Without ``skip_bad`` the first bad record raises :class:`BadRecordError`; with it, bad records are left out
    and their messages returned (an empty split is still an error).
    """
    records: list[ReleasedRecord] = []
    skipped: list[str] = []
    files = metadata_files(root, split)
    for metadata in files:
        for number, line in enumerate(metadata.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{metadata}:{number}"
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise BadRecordError(f"{where}: not valid JSON ({error.msg})") from None
                records.append(check_record(record, metadata.parent, where, min_frames=min_frames))
            except BadRecordError as error:
                if not skip_bad:
                    raise BadRecordError(f"{error} (or pass --skip-bad to leave bad records out)") from None
                skipped.append(str(error))
    if not records:
        raise ValueError(
            f"split {split!r} of {root} has no usable record ({len(skipped)} skipped) in {[str(f) for f in files]}"
        )
    return records, skipped


def load_record(
    record: ReleasedRecord,
    *,
    frames: int | None = None,
    size: tuple[int, int] | None = None,
    start: int | None = None,
    offset: tuple[float, float] = (0.5, 0.5),
) -> LayeredClip:
    """Decode one record into a model-space clip: ``frames`` from ``start`` (default centred), fitted to ``size``."""
    from vera_engine.training.data.synthetic import gaussian_blur

    count = frames or record.frames
    if count > record.frames:
        raise BadRecordError(f"{record.where}: has {record.frames} frames; asked for {count}")
    start = (record.frames - count) // 2 if start is None else start

    def layer(name: str) -> np.ndarray:
        try:
            return decode_video(record.paths[name], start, count)
        except ValueError as error:
            raise BadRecordError(f"{record.where}: {error}") from None

    def colour(name: str) -> np.ndarray:
        return fit_to_size(layer(name).astype(np.float32) / np.float32(255.0), size, offset)

    alpha_rgb = layer("alpha")
    problem = grey_problem(alpha_rgb)
    if problem:
        raise BadRecordError(f"{record.where}: {LAYER_KEYS['alpha']} {problem}")
    alpha = fit_to_size(matte_from_grey(alpha_rgb), size, offset)
    alpha[alpha < ALPHA_ZERO_CODE / 255.0] = 0.0  # scaling spreads the noise floor; it stays zero
    source, edit, composite = colour("input"), colour("edit"), colour("composite")
    # METHOD.md: where the matte is zero the edit layer is undefined; it becomes the Gaussian-smoothed composite.
    sigma = max(1.0, 0.04 * min(alpha.shape[1:]))
    edit = np.where(alpha[..., None] > 0, edit, gaussian_blur(composite, sigma)).astype(np.float32)
    mask = None
    if "mask" in record.paths:
        mask = (fit_to_size(matte_from_grey(layer("mask")), size, offset) > 0.5).astype(np.float32)
    return LayeredClip(
        input=source,
        edit=edit,
        alpha=alpha,
        composite=composite,
        mask=mask,
        instruction=record.instruction,
        task=record.task,
        fields={"dataset_name": record.dataset_name, "source_frames": record.frames},
        clip_id=record.video_id,
    )


# ---------------------------------------------------------------------------------------------------------
# Loader


class ReleasedVeraDataset:
    """A map dataset over one split of the released layout, with the items of ``LayeredVideoDataset``.

    ``frames`` and ``size`` default to the first record's; every clip is scaled to cover ``size`` and cropped
    (randomly when ``random_crop``), given a random window of ``frames`` and flipped (instruction mirrored) with
    probability 0.5 when ``hflip``. Draws depend only on (``seed``, epoch, index).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        frames: int | None = None,
        size: Sequence[int] | None = None,
        random_crop: bool = True,
        hflip: bool = True,
        seed: int = 0,
        skip_bad: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.records, self.skipped = read_records(root, split, skip_bad=skip_bad, min_frames=frames)
        first = self.records[0]
        self.frames = int(frames or min(r.frames for r in self.records))
        self.size = (int(size[0]), int(size[1])) if size is not None else (first.height, first.width)
        self.random_crop, self.hflip, self.seed = random_crop, hflip, int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def instructions(self) -> list[str]:
        texts = [r.instruction for r in self.records]
        return texts + [mirror_text(t) for t in texts] if self.hflip else texts

    def clip(self, index: int) -> LayeredClip:
        """Clip ``index``: the centred window, centred crop, no flip (what evaluation and the cache read)."""
        return load_record(self.records[index], frames=self.frames, size=self.size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records in split {self.split!r}")
        record = self.records[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.random_crop:
            start = int(rng.integers(0, record.frames - self.frames + 1))
            offset = (float(rng.random()), float(rng.random()))
        else:
            start, offset = (record.frames - self.frames) // 2, (0.5, 0.5)
        flipped = bool(self.hflip and rng.random() < 0.5)
        clip = load_record(record, frames=self.frames, size=self.size, start=start, offset=offset)

        def view(x: np.ndarray) -> np.ndarray:
            return x[:, :, ::-1] if flipped else x

        mask = view(clip.mask) if clip.mask is not None else np.zeros(clip.alpha.shape, np.float32)
        return {
            "input": _to_video_tensor(view(clip.input)),
            "edit": _to_video_tensor(view(clip.edit)),
            "alpha": _to_video_tensor(view(clip.alpha)),
            "composite": _to_video_tensor(view(clip.composite)),
            "mask": _to_video_tensor(mask),
            "has_mask": clip.mask is not None,
            "instruction": mirror_text(clip.instruction) if flipped else clip.instruction,
            "task": clip.task,
            "fields": clip.fields,
            "clip_id": clip.clip_id,
            "flipped": flipped,
            "crop": (start, 0, 0),
        }


def open_training_dataset(
    root: str | Path,
    split: str = "train",
    *,
    format: str = "auto",
    frames: int | None = None,
    size: Sequence[int] | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    random_crop: bool = True,
    hflip: bool = True,
) -> Any:
    """The training dataset of ``root`` in either format (detected, or ``format`` insisted on)."""
    from vera_engine.training.data.dataset import LayeredVideoDataset

    if detect_format(root, format) == "vera":
        dataset = ReleasedVeraDataset(
            root,
            split,
            frames=frames,
            size=size,
            seed=seed,
            skip_bad=skip_bad,
            random_crop=random_crop,
            hflip=hflip,
        )
        if dataset.skipped:
            print(f"--skip-bad: left out {len(dataset.skipped)} bad record(s) of {root}:")
            for message in dataset.skipped:
                print(f"  {message}")
        return dataset
    return LayeredVideoDataset(
        root,
        split,
        frames=frames,
        size=None if size is None else (int(size[0]), int(size[1])),
        seed=seed,
        random_crop=random_crop,
        hflip=hflip,
    )


def iter_split_clips(
    root: str | Path,
    split: str,
    *,
    format: str = "auto",
    frames: int | None = None,
    size: Sequence[int] | None = None,
    skip_bad: bool = False,
) -> Iterator[LayeredClip]:
    """The full clips of ``split`` in either format (what evaluation and the cache read); released records are
    all checked before the first is yielded."""
    from vera_engine.training.data.dataset import iter_clips

    if detect_format(root, format) == "layered":
        yield from iter_clips(root, split)
        return
    dataset = ReleasedVeraDataset(
        root, split, frames=frames, size=size, skip_bad=skip_bad, random_crop=False, hflip=False
    )
    for message in dataset.skipped:
        print(f"--skip-bad: left out {message}")
    for index in range(len(dataset)):
        yield dataset.clip(index)
