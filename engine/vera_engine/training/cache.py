"""`vera-engine cache`: every training clip through the model's own codec, every instruction through its text encoder,
once; `vera-engine train --cache` then trains on the stored latents without loading either.

A real Vera run spends most of a step's time in the Wan VAE (five videos per clip) and a 5.7B-parameter umT5 that
never change (the paper freezes both), so they run here once. The cache is a folder::

    index.json                 what was encoded with what (below), and the clips
    empty_text.safetensors     the text states of the empty prompt (classifier-free guidance's dropped text)
    clips/<n>.safetensors      one clip: latents edit, alpha, composite, source, mask; region; text states

``index.json`` records the model folder, a sha256 of each of its VAE, text encoder and tokenizer folders, the VAE's
class, the prompt length, the clips' pixel size and frames and the latent shape. Training refuses a cache whose VAE,
text encoder, tokenizer, size or frames differ from the run's, naming both sides.

What a cache leaves out: the random crops and flips of the pixel loader (each clip is stored once, its centred
window at the cached size). The latents of a flipped clip are not the flipped latents, so flips would need a
second copy; a dataset large enough to need a cache (the release's 18K tuples) does without them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

CACHE_FORMAT = "vera-latent-cache"
CACHE_VERSION = 1
INDEX = "index.json"
EMPTY_TEXT = "empty_text.safetensors"
LATENT_LAYERS = ("edit", "alpha", "composite", "source", "mask")
# The loader's key of each layer (LayeredVideoDataset's items call the source "input").
_PIXEL_KEY = {"edit": "edit", "alpha": "alpha", "composite": "composite", "source": "input", "mask": "mask"}
# Components a cache depends on (hashed), and those `train --cache` does not load.
HASHED_COMPONENTS = ("vae", "text_encoder", "tokenizer")
UNLOADED_COMPONENTS = ("vae", "text_encoder")


def component_hash(model_dir: Path, component: str) -> str:
    """sha256 over the files of ``model_dir/component`` (relative names and contents): the component's identity."""
    folder = Path(model_dir) / component
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def model_identity(model_dir: Path) -> dict[str, Any]:
    """What a cache made with ``model_dir`` depends on: each hashed component's sha256 and class, the prompt length."""
    model_dir = Path(model_dir)
    index = json.loads((model_dir / "model_index.json").read_text())
    return {
        "model": str(model_dir.resolve()),
        **{f"{name}_sha256": component_hash(model_dir, name) for name in HASHED_COMPONENTS},
        "vae_class": index["vae"][1],
        "text_encoder_class": index["text_encoder"][1],
        "max_sequence_length": index.get("max_sequence_length"),
    }


def _encode_clip(pipe: Any, item: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    from vera_engine.pipelines.pipeline_vera import codec_input

    latents: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for layer in LATENT_LAYERS:
            video = item[_PIXEL_KEY[layer]][None].to(device)
            latents[layer] = pipe.encode_video(codec_input(video))[0].float().cpu()
        # Where the edit is, on the latent grid: what the loss's foreground weight reads.
        latents["region"] = F.adaptive_max_pool3d(
            (item["alpha"][None] > 0).float(), tuple(latents["alpha"].shape[1:])
        )[0]
    return latents


def _text_states(pipe: Any, prompt: str, device: torch.device) -> torch.Tensor:
    """The prompt's text states, trimmed to its tokens (the rest are zero by Wan's convention and padded back)."""
    with torch.no_grad():
        return trimmed_text_states(pipe.encode_prompt(prompt, device, torch.float32)[0].cpu())


def trimmed_text_states(states: torch.Tensor) -> torch.Tensor:
    """`(max_sequence_length, dim)` text states without the zero rows past the prompt's tokens (Wan's convention
    zeroes them); `F.pad` with zero rows restores them exactly. A umT5 state is 512 x 4096 values, a prompt a few
    dozen tokens: what a cache of many instructions stores."""
    used = int(states.abs().amax(dim=-1).gt(0).nonzero().max()) + 1 if states.abs().amax() > 0 else 1
    return states[:used].contiguous()


def build_cache(
    data: str | os.PathLike[str],
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    split: str = "train",
    format: str = "auto",
    frames: int | None = None,
    size: tuple[int, int] | None = None,
    skip_bad: bool = False,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode every clip of ``split`` of ``data`` with ``model``'s codec and text encoder into ``out``; the index."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from vera_engine.pipelines.model_store import resolve_model_dir
    from vera_engine.pipelines.pipeline_vera import VeraPipeline
    from vera_engine.training.data.released import open_training_dataset

    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")
        shutil.rmtree(out)
    model_dir = resolve_model_dir(model)
    dataset = open_training_dataset(
        data,
        split,
        format=format,
        frames=frames,
        size=size,
        skip_bad=skip_bad,
        random_crop=False,
        hflip=False,
    )
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = VeraPipeline.from_pretrained(model_dir, transformer=None).to(torch_device)
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "clips").mkdir(parents=True)
    save_file({"text": _text_states(pipe, "", torch_device)}, str(staging / EMPTY_TEXT))
    entries = []
    started = time.perf_counter()
    shape: list[int] | None = None
    for index in tqdm(range(len(dataset)), disable=not progress, desc="cache"):
        item = dataset[index]
        tensors = _encode_clip(pipe, item, torch_device)
        tensors["text"] = _text_states(pipe, item["instruction"], torch_device)
        file = f"clips/{index:06d}.safetensors"
        save_file(tensors, str(staging / file))
        shape = list(tensors["edit"].shape)
        entries.append(
            {
                "id": item["clip_id"],
                "file": file,
                "task": item["task"],
                "has_mask": bool(item["has_mask"]),
                "instruction": item["instruction"],
            }
        )
    first = dataset[0]["alpha"]
    index = {
        "format": CACHE_FORMAT,
        "format_version": CACHE_VERSION,
        **model_identity(model_dir),
        "data": str(Path(data).resolve()),
        "split": split,
        "frames": int(first.shape[1]),
        "size": [int(first.shape[2]), int(first.shape[3])],
        "latent_shape": shape,
        "clips": entries,
        "seconds": time.perf_counter() - started,
    }
    (staging / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    staging.rename(out)
    return index


def read_cache_index(cache: str | os.PathLike[str]) -> dict[str, Any]:
    """The index of a cache folder, checked to be one."""
    path = Path(cache) / INDEX
    if not path.is_file():
        raise FileNotFoundError(
            f"--cache {cache}: no {INDEX}; make one with `vera-engine cache --data ... --out {cache}`"
        )
    index = json.loads(path.read_text())
    if index.get("format") != CACHE_FORMAT or index.get("format_version") != CACHE_VERSION:
        raise ValueError(
            f"--cache {cache}: format {index.get('format')!r} version {index.get('format_version')!r}; expected "
            f"{CACHE_FORMAT!r} version {CACHE_VERSION} (re-run `vera-engine cache`)"
        )
    return index


def check_cache_matches(
    index: Mapping[str, Any],
    cache: str | os.PathLike[str],
    model_dir: Path,
    *,
    frames: int | None = None,
    size: tuple[int, int] | None = None,
) -> None:
    """Refuse a cache that ``model_dir`` (or the asked ``frames`` / ``size``) does not match, naming both sides."""
    identity = model_identity(model_dir)
    for component in HASHED_COMPONENTS:
        key = f"{component}_sha256"
        if identity[key] != index[key]:
            raise ValueError(
                f"--cache {cache} was encoded with the {component} of {index['model']} (sha256 {index[key][:12]}), "
                f"but --init {model_dir} has another {component} (sha256 {identity[key][:12]}); re-run "
                f"`vera-engine cache --model {model_dir}`, or train from {index['model']}"
            )
    if identity["max_sequence_length"] != index["max_sequence_length"]:
        raise ValueError(
            f"--cache {cache} holds text states of {index['max_sequence_length']} tokens but --init {model_dir} reads "
            f"{identity['max_sequence_length']}; re-run `vera-engine cache --model {model_dir}`"
        )
    if frames is not None and frames != index["frames"]:
        raise ValueError(
            f"--frames {frames}, but --cache {cache} holds clips of {index['frames']} frames; drop --frames or re-run "
            f"`vera-engine cache --frames {frames}`"
        )
    if size is not None and list(size) != list(index["size"]):
        raise ValueError(
            f"--size {size[0]} {size[1]}, but --cache {cache} holds clips of {index['size'][0]}x{index['size'][1]} "
            f"(height x width); drop --size or re-run `vera-engine cache --size {size[0]} {size[1]}`"
        )


class CachedLatentDataset:
    """The clips of a cache as training items: ``latent_<layer>`` tensors, ``region``, the text states (padded to the
    model's prompt length) and the empty prompt's, ``has_mask``, ``task``, ``instruction``, ``clip_id``."""

    def __init__(self, cache: str | os.PathLike[str]) -> None:
        from safetensors.torch import load_file

        self.root = Path(cache)
        self.index = read_cache_index(cache)
        self.entries = self.index["clips"]
        if not self.entries:
            raise ValueError(f"--cache {cache} holds no clips")
        self.length = int(self.index["max_sequence_length"])
        self.empty_text = self._padded(load_file(str(self.root / EMPTY_TEXT))["text"])

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        """Nothing is drawn per epoch: a cached clip is always its centred window."""

    def instructions(self) -> list[str]:
        return [entry["instruction"] for entry in self.entries]

    def _padded(self, states: torch.Tensor) -> torch.Tensor:
        return F.pad(states, (0, 0, 0, self.length - states.shape[0]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        from safetensors.torch import load_file

        entry = self.entries[index]
        tensors = load_file(str(self.root / entry["file"]))
        return {
            **{f"latent_{layer}": tensors[layer] for layer in LATENT_LAYERS},
            "region": tensors["region"],
            "text_states": self._padded(tensors["text"]),
            "empty_text_states": self.empty_text,
            "has_mask": bool(entry["has_mask"]),
            "task": entry["task"],
            "instruction": entry["instruction"],
            "clip_id": entry["id"],
        }


def cached_latents(
    batch: Mapping[str, Any],
    mask_dropout: Mapping[str, float],
    generator: torch.Generator,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """What `train.encode_batch` makes from pixels, from a cached batch (the same draws from ``generator``)."""
    drop = torch.tensor([mask_dropout.get(task, 0.0) for task in batch["task"]])
    keep = (torch.rand(len(drop), generator=generator) >= drop) & batch["has_mask"].cpu()
    return {
        "region": batch["region"].to(device),
        **{layer: batch[f"latent_{layer}"].to(device) for layer in LATENT_LAYERS},
        "mask_keep": keep.to(device=device, dtype=torch.float32),
    }


def cached_text(batch: Mapping[str, Any], drop_text: torch.Tensor, device: torch.device, dtype: torch.dtype):
    """The batch's text states, the empty prompt's where ``drop_text`` (classifier-free guidance's dropout)."""
    states = torch.where(drop_text.view(-1, 1, 1), batch["empty_text_states"], batch["text_states"])
    return states.to(device=device, dtype=dtype)


def open_cache_for_training(config: Any, resume: bool) -> tuple[CachedLatentDataset, Any]:
    """`train --cache`: the cached dataset and the pipeline to train, loaded without its VAE and text encoder.

    The model is ``--init`` (or, without it, the model the cache was made with); it must match the cache.
    """
    from vera_engine.pipelines.model_store import resolve_model_dir
    from vera_engine.pipelines.pipeline_vera import VeraPipeline

    dataset = CachedLatentDataset(config.cache)
    index = dataset.index
    if config.text_encoder_lr_scale > 0:
        # A preset's recipe may train its text encoder; the cache holds the states of the frozen one.
        print(
            f"--cache holds the text states of a frozen text encoder: --text-encoder-lr "
            f"{config.text_encoder_lr_scale:g} ignored (train without --cache to train the encoder)"
        )
        config.text_encoder_lr_scale = 0.0
    if config.fresh_text_encoder:
        raise ValueError("--fresh-text-encoder needs the text encoder, which --cache does not load")
    if Path(config.data).resolve() != Path(index["data"]):
        raise ValueError(
            f"--cache {config.cache} was made from --data {index['data']}, not {Path(config.data).resolve()}; pass "
            "the data it was made from, or make a cache of this data"
        )
    if not config.init:
        config.init = index["model"]
    model_dir = resolve_model_dir(config.init)
    # A resumed run's folder holds the VAE and text encoder copied from the model it started from: the same check.
    check_cache_matches(index, config.cache, model_dir, frames=config.frames, size=config.size)
    pipe = VeraPipeline.from_pretrained(model_dir, **dict.fromkeys(UNLOADED_COMPONENTS))
    if config.frame_position_embedding and not pipe.transformer.config.frame_position_embedding:
        from vera_engine.models.transformer_vera import with_frame_position_embedding

        pipe.register_modules(transformer=with_frame_position_embedding(pipe.transformer))
    channels = pipe.transformer.config.in_channels
    if index["latent_shape"][0] != channels:
        raise ValueError(
            f"--cache {config.cache} holds {index['latent_shape'][0]}-channel latents but the transformer of "
            f"{model_dir} takes {channels}"
        )
    pipe.set_progress_bar_config(disable=True)
    # Checkpoints copy these components' folders from here (`complete_pipeline_folder`).
    pipe.unloaded_components_from = str(model_dir)
    return dataset, pipe


def complete_pipeline_folder(folder: Path, source: str | os.PathLike[str]) -> None:
    """Copy the components a cached run did not load from ``source`` into the saved pipeline ``folder``."""
    source = Path(source)
    index_path = Path(folder) / "model_index.json"
    index = json.loads(index_path.read_text())
    source_index = json.loads((source / "model_index.json").read_text())
    for name in UNLOADED_COMPONENTS:
        if index.get(name) in (None, [None, None]):
            if (Path(folder) / name).exists():
                shutil.rmtree(Path(folder) / name)
            shutil.copytree(source / name, Path(folder) / name)
            index[name] = source_index[name]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
