"""Tiny datasets in the released Vera layout (metadata.jsonl + 8-bit H.264 MP4 layers), written with PyAV."""

import json
from pathlib import Path

import av
import numpy as np


def write_mp4(path: Path, frames: np.ndarray, fps: int = 16) -> None:
    """uint8 RGB frames (F, H, W, 3) as an H.264 yuv420p MP4 (near-lossless: crf 1), as the release stores them."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "1", "preset": "ultrafast", "tune": "zerolatency"}
        for rgb in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def grey(alpha: np.ndarray) -> np.ndarray:
    """A float matte (F, H, W) as the uint8 grey RGB video the release stores."""
    codes = np.round(np.clip(alpha, 0, 1) * 255).astype(np.uint8)
    return np.repeat(codes[..., None], 3, axis=-1)


def make_layers(seed: int, frames: int, height: int, width: int, task: str) -> dict[str, np.ndarray]:
    """Float layers of one clip: a smooth source, a square edit moving right over it (object addition) or a new
    background around a kept square (background change); composite by Eq. 2."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width, yy / height, np.full_like(xx, 0.4)], axis=-1)
    source = np.repeat(base[None], frames, axis=0) * rng.uniform(0.6, 1.0)
    alpha = np.zeros((frames, height, width), np.float32)
    side = height // 2
    for t in range(frames):
        x0 = 2 + 2 * t
        alpha[t, height // 4 : height // 4 + side, x0 : x0 + side] = 1.0
    if task == "background_change":
        alpha = 1.0 - alpha  # the new background is everywhere but the kept subject
    colour = rng.uniform(0.2, 0.9, 3).astype(np.float32)
    edit = np.broadcast_to(colour, source.shape).astype(np.float32).copy()
    composite = (1 - alpha[..., None]) * source + alpha[..., None] * edit
    return {"input": source, "edit": edit, "alpha": alpha, "composite": composite}


def write_record(
    folder: Path,
    video_id: str,
    task: str,
    *,
    frames: int = 5,
    height: int = 32,
    width: int = 48,
    seed: int = 0,
    with_mask: bool = False,
    dataset_name: str | None = None,
) -> dict:
    """Write one record's MP4s into ``folder``; returns its metadata record (paths relative to ``folder``)."""
    layers = make_layers(seed, frames, height, width, task)
    to8 = lambda x: np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)  # noqa: E731
    names = {
        "input_video_path": (f"{video_id}_input.mp4", to8(layers["input"])),
        "edit_rgb_path": (f"{video_id}_edit_rgb.mp4", to8(layers["edit"])),
        "edit_alpha_path": (f"{video_id}_edit_alpha.mp4", grey(layers["alpha"])),
        "target_composite_path": (f"{video_id}_target_composite.mp4", to8(layers["composite"])),
    }
    if with_mask:
        names["mask_path"] = (f"{video_id}_mask.mp4", grey((layers["alpha"] > 0).astype(np.float32)))
    for file, video in names.values():
        write_mp4(folder / file, video)
    instruction = (
        "Add a red box entering from the left edge and sliding smoothly to the right."
        if task == "object_addition"
        else "Change the background to a dirt path cutting through a misty forest. Keep the square intact."
    )
    return {
        "video_id": video_id,
        "dataset_name": dataset_name or ("test_obj_add" if task == "object_addition" else "test_bg_change"),
        "edit_instruction": instruction,
        **{key: file for key, (file, _) in names.items()},
    }


def write_metadata(folder: Path, records: list) -> Path:
    path = folder / "metadata.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_released_dataset(root: Path, count: int = 4, **kwargs) -> Path:
    """``count`` good records alternating the two tasks (the second with a mask), in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    records = [
        write_record(
            root,
            f"clip{i:03d}",
            ("object_addition", "background_change")[i % 2],
            seed=i,
            with_mask=i % 2 == 1,
            **kwargs,
        )
        for i in range(count)
    ]
    write_metadata(root, records)
    return root
