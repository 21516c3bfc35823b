"""Training and evaluation data: the layered dataset format, its loader and the synthetic generator.

See docs/DATASET.md for the on-disk format.
"""

from typing import Any

from vera_engine.training.data.dataset import (
    TASKS,
    LayeredClip,
    LayeredVideoDataset,
    collate_layered,
    compose_layers,
    iter_clips,
    load_clip,
    mirror_fields,
    mirror_text,
    read_index,
    save_clip,
    write_index,
)

# The generator is imported on first use, so `python -m vera_engine.training.data.synthetic` runs it as a fresh
# module (no runpy warning) and the loader does not pay for it.
_SYNTHETIC = ("PALETTE", "clip_seed", "generate_clip", "generate_dataset", "generate_split")


def __getattr__(name: str) -> Any:
    if name in _SYNTHETIC:
        from vera_engine.training.data import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module 'vera_engine.training.data' has no attribute {name!r}")


__all__ = [
    "PALETTE",
    "TASKS",
    "LayeredClip",
    "LayeredVideoDataset",
    "clip_seed",
    "collate_layered",
    "compose_layers",
    "generate_clip",
    "generate_dataset",
    "generate_split",
    "iter_clips",
    "load_clip",
    "mirror_fields",
    "mirror_text",
    "read_index",
    "save_clip",
    "write_index",
]
