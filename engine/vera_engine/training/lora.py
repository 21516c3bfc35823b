"""Low-rank adapters (LoRA) for Vera: trained by `vera-engine train --lora RANK`, served by `serve --lora NAME=PATH`.

The adapters are `peft` LoRA layers added through diffusers' adapter API (`PeftAdapterMixin.add_adapter`,
`load_lora_adapter`, `set_adapters`, `disable_adapters`) on the projections of all three branches' blocks: self- and
cross-attention query, key, value and output, and both FFN layers. Each branch's adapters train at that branch's
learning rate (the paper's per-branch scales), as the full weights do. Patch embeddings, norms, modulation and the
output heads stay the base model's.

An adapter file holds the LoRA weights alone (diffusers' `save_lora_adapter` safetensors, with its LoRA config) and,
in the same metadata, the sha256 of the base transformer it was trained on and that model's name: an adapter is
only correct on the exact weights it was trained against, so loading it onto another base is refused, naming both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ADAPTER_FILE = "vera_lora.safetensors"
BASE_HASH_KEY = "vera_base_transformer_sha256"
BASE_NAME_KEY = "vera_base_model"
RANK_KEY = "vera_lora_rank"
# peft matches a string target as a regular expression over the whole module name.
LORA_TARGETS = (
    r"blocks\.\d+\.(edit|alpha|composite)\."
    r"(attn1\.(to_q|to_k|to_v|to_out\.0)|attn2\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.(0\.proj|2))"
)
TRAINING_ADAPTER = "default"


def lora_config(rank: int, alpha: float | None = None) -> Any:
    """The `peft.LoraConfig` of Vera's adapters: ``rank``, scale ``alpha / rank`` (default 1), B initialised to 0 so
    a new adapter leaves the base model's output unchanged until it trains."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"--lora {rank}: expected a rank of 1 or more")
    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=LORA_TARGETS,
        init_lora_weights=True,
    )


def add_training_adapter(model: torch.nn.Module, rank: int) -> None:
    """Freeze ``model`` and add trainable LoRA layers of ``rank`` (adapter ``default``), through diffusers' API."""
    model.requires_grad_(False)
    model.add_adapter(lora_config(rank), adapter_name=TRAINING_ADAPTER)


def base_transformer_hash(model_dir: str | os.PathLike[str]) -> str:
    """sha256 of a pipeline folder's transformer files: the base an adapter belongs to."""
    from vera_engine.training.cache import component_hash

    folder = Path(model_dir)
    if not (folder / "transformer").is_dir():
        raise FileNotFoundError(f"{folder} has no transformer folder; expected a Vera pipeline folder")
    return component_hash(folder, "transformer")


def save_adapter(
    model: torch.nn.Module,
    folder: str | os.PathLike[str],
    *,
    base_hash: str,
    base_name: str,
    adapter_name: str = TRAINING_ADAPTER,
) -> Path:
    """Write ``model``'s adapter alone to ``folder/vera_lora.safetensors`` with its base model's hash and name."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    model.save_lora_adapter(folder, adapter_name=adapter_name, weight_name=ADAPTER_FILE)
    path = folder / ADAPTER_FILE
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    rank = int(model.peft_config[adapter_name].r)
    metadata.update({BASE_HASH_KEY: base_hash, BASE_NAME_KEY: base_name, RANK_KEY: str(rank)})
    save_file(load_file(str(path)), str(path), metadata=metadata)
    return path


def adapter_file(path: str | os.PathLike[str]) -> Path:
    """The adapter file at ``path`` (the file, or a folder holding vera_lora.safetensors)."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"adapter {path} does not exist; expected a {ADAPTER_FILE} written by `train --lora`"
        )
    return path


def read_adapter_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of an adapter file (its LoRA config, base hash and name)."""
    from safetensors import safe_open

    with safe_open(str(adapter_file(path)), "pt") as handle:
        return dict(handle.metadata() or {})


def load_adapter(
    transformer: torch.nn.Module, path: str | os.PathLike[str], name: str, *, base_hash: str, base_name: str
) -> None:
    """Load the adapter at ``path`` into ``transformer`` as ``name``; refuse one trained on another base model."""
    file = adapter_file(path)
    metadata = read_adapter_metadata(file)
    if BASE_HASH_KEY not in metadata:
        raise ValueError(
            f"adapter {name}={file} records no base model ({BASE_HASH_KEY}); Vera adapters are written by "
            "`vera-engine train --lora`"
        )
    if metadata[BASE_HASH_KEY] != base_hash:
        raise ValueError(
            f"adapter {name}={file} was trained on {metadata.get(BASE_NAME_KEY, '?')} (transformer sha256 "
            f"{metadata[BASE_HASH_KEY][:12]}), not on {base_name} (transformer sha256 {base_hash[:12]}); serve it "
            "with the model it was trained on, or train one for this model"
        )
    if name in getattr(transformer, "peft_config", {}):
        raise ValueError(f"adapter name {name!r} is given twice; each --lora NAME must be different")
    transformer.load_lora_adapter(str(file), prefix=None, adapter_name=name)
    transformer.disable_adapters()  # a job asks for its adapter; none is on by default


@contextmanager
def adapter_in_use(transformer: torch.nn.Module, name: str | None, scale: float = 1.0) -> Iterator[None]:
    """Sample with adapter ``name`` at ``scale`` (None or "none": the base model), and switch it off after.

    Switched off, every LoRA layer computes its base layer alone: the output is the base model's bit for bit.
    """
    loaded = getattr(transformer, "peft_config", {})
    if not name or name == "none":
        if loaded:
            transformer.disable_adapters()
        yield
        return
    if name not in loaded:
        raise ValueError(f"adapter {name!r} is not loaded; loaded: {sorted(loaded) or 'none'}")
    transformer.enable_adapters()
    transformer.set_adapters([name], weights=[float(scale)])
    try:
        yield
    finally:
        transformer.disable_adapters()


def parse_lora_arguments(values: list[str] | None) -> dict[str, str]:
    """`serve --lora NAME=PATH` (repeatable) -> {name: path}."""
    adapters: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        name = name.strip()
        if not sep or not name or not path or name == "none":
            raise ValueError(
                f"--lora {value!r}; expected NAME=PATH (NAME not 'none'), e.g. --lora swans=/loras/swans"
            )
        if name in adapters:
            raise ValueError(f"--lora {name} is given twice; each NAME must be different")
        adapters[name] = path
    return adapters


def save_lora_checkpoint(run: Any, step: int) -> Path:
    """A `train --lora` checkpoint: the adapter (EMA weights) alone in ``--out``, plus the run's config."""
    config = run.config
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    run.ema.store(run.trainable)
    run.ema.copy_to(run.trainable)
    try:
        path = save_adapter(
            run.model, out, base_hash=run.pipe.lora_base_hash, base_name=run.pipe.lora_base_name
        )
    finally:
        run.ema.restore(run.trainable)
    training = out / "training"
    training.mkdir(exist_ok=True)
    from dataclasses import asdict

    (training / "config.json").write_text(json.dumps({**asdict(config), "saved_step": step}, indent=2) + "\n")
    return path


def check_lora_run(config: Any, resume: bool) -> None:
    """What `train --lora` needs: a base model (--init), a frozen text encoder, one process, no resume."""
    if not config.lora:
        return
    if not config.init and not config.cache:
        raise ValueError("--lora adapts a trained model: give it with --init (or --cache, which names one)")
    if resume:
        raise ValueError(
            "--lora runs save the adapter alone and cannot --resume; start a new run with --init"
        )
    if config.fresh_text_encoder or config.frame_position_embedding:
        raise ValueError(
            "--lora trains adapters on the --init model as it is: drop --fresh-text-encoder and "
            "--frame-position-embedding (they change the base the adapter is served on)"
        )
    if config.text_encoder_lr_scale > 0:
        # A preset's recipe may train its text encoder; an adapter is served with the base model's encoder.
        print(
            f"--lora: the text encoder stays frozen (--text-encoder-lr {config.text_encoder_lr_scale:g} ignored)"
        )
        config.text_encoder_lr_scale = 0.0
    if config.fsdp:
        raise ValueError(
            "--lora trains a few million parameters: run it without --fsdp (DDP under torchrun works)"
        )


def adapter_size(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """Bytes and tensors of an adapter file (for the benchmark and the log)."""
    from safetensors import safe_open

    file = adapter_file(path)
    with safe_open(str(file), "pt") as handle:
        count = len(list(handle.keys()))
    return {"bytes": file.stat().st_size, "tensors": count}


def check_adapter_base(path: str | os.PathLike[str], name: str, model_dir: str | os.PathLike[str]) -> None:
    """Refuse (before anything loads) an adapter that is missing or was trained on another base than ``model_dir``."""
    metadata = read_adapter_metadata(path)
    base_hash, base_name = base_transformer_hash(model_dir), Path(model_dir).resolve().name
    if metadata.get(BASE_HASH_KEY) != base_hash:
        raise ValueError(
            f"--lora {name}={path} was trained on {metadata.get(BASE_NAME_KEY, 'an unknown model')} (transformer "
            f"sha256 {str(metadata.get(BASE_HASH_KEY, 'none'))[:12]}), not on {base_name} (transformer sha256 "
            f"{base_hash[:12]}); serve it with the model it was trained on, or train one for this model"
        )


def load_adapter_for_model(
    transformer: torch.nn.Module, path: str | os.PathLike[str], name: str, model_dir: str | os.PathLike[str]
) -> None:
    """:func:`load_adapter` with the base hash and name of the pipeline folder ``model_dir`` the engine serves."""
    load_adapter(
        transformer,
        path,
        name,
        base_hash=base_transformer_hash(model_dir),
        base_name=Path(model_dir).resolve().name,
    )
