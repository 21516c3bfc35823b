"""`vera-engine train`: Vera's training recipe (paper §4.1.1, App. A.2) on a layered dataset.

Flow matching on all three layers with equally weighted losses, per-branch learning rates (edit 0.1×, alpha 10×,
composite 10× the base by default), mask dropout per task (0.3 background change, 0.9 object addition), linear
warm-up, EMA of the weights, optional gradient checkpointing, bf16 autocast on GPUs. One process on a CPU;
DDP under `torchrun` on GPUs (or on CPUs with gloo), or FSDP (`fsdp=True`: each process holds a shard of the
transformer's weights, gradients, optimiser and EMA state, for sizes whose AdamW state does not fit one GPU).

Conventions are diffusers' (those of the Wan weights and schedulers): `x_t = (1 − σ)·x_0 + σ·noise`, the model
predicts `v = noise − x_0` at timestep `1000·σ`. The paper writes the same flow with time reversed.

Output: a pipeline folder (`VeraPipeline.from_pretrained` loads it; the transformer holds the EMA weights) plus
`training/` inside it with what resuming needs (raw weights, optimiser, EMA, step, RNG: safetensors + JSON) and
`training/log.jsonl` with the losses, and `training/history.json`: the settings each stretch of the run trained with
(a resume may change those that carry no optimiser state, such as the noise-level shift or the precision).
"""

import gc
import json
import logging
import os
import random
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vera_engine.models.transformer_vera import (
    BRANCHES,
    VeraTransformer3DModel,
    with_frame_position_embedding,
)
from vera_engine.pipelines.model_store import make_files_shareable
from vera_engine.pipelines.pipeline_vera import codec_input
from vera_engine.training.recipe import DEFAULT_BRANCH_LR_SCALES, DEFAULT_MASK_DROPOUT

logger = logging.getLogger(__name__)

# Vera-only parameters train with the branch whose tokens they are added to.
_CONDITION_OWNERS = {
    "source_embedding": "composite",
    "composite_layer_embedding": "composite",
    "mask_embedding": "alpha",
    "alpha_layer_embedding": "alpha",
}


def _show_mapping(values: Mapping[str, float]) -> str:
    return ",".join(f"{key}={value:g}" for key, value in values.items())


def _setting(default: Any = MISSING, **metadata: Any) -> Any:
    """A `TrainConfig` field: its default and, as metadata, its help and command-line form (tools/config_cli.py)."""
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything a training run is defined by; saved in `training/config.json` and checked on resume.

    The fields are also `vera-engine train`'s flags (`--field-name` unless a `flag` says otherwise), with these
    defaults and help texts.
    """

    data: str = _setting(help="layered dataset folder (docs/DATASET.md)")
    out: str = _setting(help="pipeline folder to write (checkpoints replace it atomically)")
    init: str | None = _setting(
        None, help="pipeline folder to start from (convert-wan output, or a trained Vera)"
    )
    preset: str = _setting(
        "tiny", help="random-weight tiny preset to start from; with --init, only for --fresh-text-encoder"
    )
    steps: int = _setting(1000, help="optimiser steps of the whole run (a resume may raise it)")
    batch_size: int = _setting(4, help="clips per process and step")
    learning_rate: float = _setting(1e-5, flag="--lr", help="base learning rate (paper: 1e-5)")
    branch_lr_scales: dict[str, float] = field(
        default_factory=lambda: dict(DEFAULT_BRANCH_LR_SCALES),
        metadata={
            "flag": "--branch-lr",
            "parse": lambda text: parse_branch_lr_scales(text),
            "show": _show_mapping,
            "help": "per-branch multipliers of --lr",
        },
    )
    mask_dropout: dict[str, float] = field(
        default_factory=lambda: dict(DEFAULT_MASK_DROPOUT),
        metadata={
            "parse": lambda text: parse_mask_dropout(text),
            "show": _show_mapping,
            "help": "probability of training without the mask, per task",
        },
    )
    warmup_steps: int = _setting(200, help="linear warm-up of the learning rate over this many steps")
    cooldown_steps: int = _setting(
        0,
        help="decay the learning rate linearly to 0 over the last N of --steps (0: constant after warm-up, as in the "
        "paper); a schedule, not optimiser state, so a --resume may add it once the run's length is known",
    )
    text_dropout: float = _setting(
        0.1,
        help="probability of training on an empty instruction (trains classifier-free guidance's other pass)",
    )
    text_encoder_lr_scale: float = _setting(
        0.0,
        flag="--text-encoder-lr",
        help="train the text encoder at this multiple of --lr (0: frozen, the paper's setting for a pretrained "
        "umT5; a tiny checkpoint trained from scratch learns its encoder, which is what lets it read words)",
    )
    fresh_text_encoder: bool = _setting(
        False,
        help="with --init: keep its transformer, start a new tokenizer and text encoder of --preset's kind (a "
        "word-level vocabulary from this run's data, the preset's mask_text_padding)",
    )
    frame_position_embedding: bool = _setting(
        False,
        help="with --init: give its transformer frame-position embeddings (zero at first, so the init model's "
        "output is unchanged until they train)",
    )
    timestep_shift: float = _setting(
        1.0,
        help="flow shift of the training noise levels: u ~ U(0, 1) -> sigma = s*u / (1 + (s-1)*u); 1 is uniform, "
        "3 spends more of training at high noise, where layout and colour are decided (like inference's shift)",
    )
    foreground_weight: float = _setting(
        1.0,
        help="weigh the loss this much more where the edit's alpha is above 0 (1: the paper's uniform loss); a small "
        "object is a few percent of the frame, and a model trained from scratch otherwise learns the rest first",
    )
    clear_alpha_weight: float = _setting(
        1.0,
        help="weigh the alpha branch's loss this much more where the true alpha is exactly 0 (1: uniform); a faint "
        "matte where nothing should change costs the plate's bit-exactness there, so a clean matte is worth more",
    )
    ema_decay: float = _setting(0.999, help="decay of the weights' moving average (the saved model)")
    gradient_checkpointing: bool = _setting(
        False,
        help="recompute each block's activations in the backward pass (always on for transformers of a billion "
        "parameters or more: Vera-1.3B's activations at 49 frames are ~220 GB without it)",
    )
    fsdp: bool = _setting(
        False,
        help="under torchrun: shard the transformer's weights, gradients, optimiser and EMA state across the "
        "processes (FSDP2) instead of replicating them (DDP); checkpoints are the same full-weight folders, so a "
        "run may resume with or without it",
    )
    mixed_precision: str = _setting(
        "auto",
        choices=("auto", "no", "bf16"),
        help="auto: bf16 autocast on CUDA, float32 on CPU; bf16 also pays on CPUs with AVX-512 BF16",
    )
    frames: int | None = _setting(None, type=int, help="frames per training crop (default: whole clips)")
    size: tuple[int, int] | None = _setting(
        None, type=int, nargs=2, metavar=("H", "W"), help="spatial crop (default: full frames)"
    )
    save_every: int = _setting(500, help="steps between checkpoints")
    log_every: int = _setting(10, help="steps between logged losses")
    seed: int = _setting(0, help="seed of the weights, the data order and the noise")
    num_workers: int = _setting(0, help="DataLoader worker processes")
    max_grad_norm: float = _setting(1.0, help="gradient clipping norm")
    # Data formats, cached latents and adapters (issue 24; training/data/released.py, training/cache.py, lora.py)
    format: str = _setting(
        "auto",
        choices=("auto", "vera", "layered"),
        help="--data's format: vera (the released metadata.jsonl + MP4 layers), layered (docs/DATASET.md), or "
        "auto (detected)",
    )
    skip_bad: bool = _setting(
        False, help="leave out (and count) released-layout records that fail the checks instead of stopping"
    )
    cache: str | None = _setting(
        None,
        type=str,
        help="latents and text states made by `vera-engine cache` from --data: train without loading the VAE or "
        "the text encoder (the model is --init, else the one the cache was made with; a mismatch is refused)",
    )
    lora: int = _setting(
        0,
        help="train low-rank adapters of this rank on the --init model's attention and FFN projections (all three "
        "branches, at their --branch-lr scales) instead of all its weights; --out receives the adapter alone "
        "(vera_lora.safetensors, with the base model's hash) for `serve --lora NAME=PATH`",
    )


def branch_of_parameter(name: str) -> str:
    """The branch (edit / alpha / composite) a `VeraTransformer3DModel` parameter belongs to."""
    parts = name.split(".")
    if parts[0] == "branches":
        return parts[1]
    if parts[0] == "blocks":
        return parts[2]
    if parts[0] in _CONDITION_OWNERS:
        return _CONDITION_OWNERS[parts[0]]
    raise ValueError(
        f"parameter {name!r} belongs to no branch; VeraTransformer3DModel has a new parameter kind"
    )


def branch_parameter_groups(
    model: torch.nn.Module, learning_rate: float, scales: Mapping[str, float]
) -> list[dict[str, Any]]:
    """Optimiser parameter groups, one per branch, at `learning_rate × scales[branch]` (paper Table 5)."""
    unknown = set(scales) - set(BRANCHES)
    if unknown or set(scales) != set(BRANCHES):
        raise ValueError(f"branch_lr_scales={dict(scales)}; expected one scale for each of {BRANCHES}")
    groups: dict[str, list[torch.nn.Parameter]] = {name: [] for name in BRANCHES}
    for name, param in model.named_parameters():
        if param.requires_grad:
            # FSDP and DDP prefix names (`module.`, `_fsdp_wrapped_module.`): strip what is not ours.
            clean = name.replace("_fsdp_wrapped_module.", "").removeprefix("module.")
            groups[branch_of_parameter(clean)].append(param)
    return [
        {
            "params": params,
            "lr": learning_rate * scales[name],
            "name": name,
            "initial_lr": learning_rate * scales[name],
        }
        for name, params in groups.items()
    ]


class EpochSampler(torch.utils.data.Sampler[int]):
    """This process's share of a shuffle that depends only on (seed, epoch), from a chosen batch of the epoch on.

    Like `DistributedSampler` (each of `num_replicas` processes takes every `num_replicas`-th index of the epoch's
    permutation), plus `skip_batches`, so that a run resumed mid-epoch continues where it stopped instead of
    replaying the epoch. Incomplete batches are dropped.
    """

    def __init__(self, size: int, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.batches_per_epoch = size // num_replicas // batch_size
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Shuffle for `epoch`, starting after its first `skip_batches` batches."""
        if not 0 <= skip_batches <= self.batches_per_epoch:
            raise ValueError(f"skip_batches={skip_batches}; expected 0..{self.batches_per_epoch}")
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self) -> "Iterator[int]":
        order = torch.randperm(
            self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        ).tolist()
        share = order[self.rank :: self.num_replicas][: self.batches_per_epoch * self.batch_size]
        return iter(share[self.skip_batches * self.batch_size :])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.skip_batches) * self.batch_size


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up to the full learning rate over `warmup_steps`, then constant (the paper's schedule)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int, cooldown_steps: int = 0) -> float:
    """The multiple of the base learning rate at 0-based `step`: `warmup_factor`, and over the last `cooldown_steps`
    of `total_steps` a linear decay towards 0 (its last step at 1/cooldown of the base)."""
    factor = warmup_factor(step, warmup_steps)
    if cooldown_steps > 0:
        factor *= min(1.0, (total_steps - step) / cooldown_steps)
    return factor


def _parse_mapping(text: str, keys: tuple[str, ...], what: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in keys or not value:
            raise ValueError(f"{what} item {item!r}; expected KEY=NUMBER with KEY one of {keys}")
        out[key] = float(value)
    return out


def parse_branch_lr_scales(text: str) -> dict[str, float]:
    """`edit=0.1,alpha=10,composite=10` -> dict; every branch must be named."""
    scales = {**DEFAULT_BRANCH_LR_SCALES, **_parse_mapping(text, BRANCHES, "--branch-lr")}
    return scales


def parse_mask_dropout(text: str) -> dict[str, float]:
    """`object_addition=0.9,background_change=0.3` -> dict of probabilities in [0, 1]."""
    rates = {**DEFAULT_MASK_DROPOUT, **_parse_mapping(text, tuple(DEFAULT_MASK_DROPOUT), "--mask-dropout")}
    for task, rate in rates.items():
        if not 0 <= rate <= 1:
            raise ValueError(f"--mask-dropout {task}={rate}; expected a probability in [0, 1]")
    return rates


class _Distributed:
    """Rank, world size and device of this process; initialises torch.distributed under torchrun."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], device=self.device, dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return float(tensor) / self.world_size

    def average_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Average across processes the gradients that no DDP / FSDP wrapper reduces (a trained text encoder's).

        Every process runs the same encoder code, so the same parameters have gradients everywhere.
        """
        grads = [p.grad for p in parameters if p.grad is not None]
        if self.world_size == 1 or not grads:
            return
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def check_replicas_agree(self, parameters: list[torch.nn.Parameter], what: str) -> None:
        """Raise on every process if the replicated `parameters` differ between processes (checked at each save:
        only process 0 writes, and a diverged run would otherwise save one replica's weights as the run's)."""
        if self.world_size == 1 or not parameters:
            return
        # Two checksums per parameter (the sum and the sum of squares, so differences cannot cancel out), each
        # compared with process 0's to a relative 1e-6: replicas that reduce the same gradients agree exactly.
        checksums = torch.stack(
            [torch.stack([p.detach().double().sum(), p.detach().double().pow(2).sum()]) for p in parameters]
        ).to(self.device)
        reference = checksums.clone()
        torch.distributed.broadcast(reference, src=0)
        worst = ((checksums - reference).abs() / reference.abs().clamp(min=1.0)).max()
        torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        if float(worst) > 1e-6:
            raise RuntimeError(
                f"the {what} differ between processes (largest relative checksum difference {float(worst):.3g}); "
                "the processes must start from the same weights and reduce the same gradients"
            )

    def close(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


CHECKPOINTING_PARAMETERS = 10**9
"""Transformers this large train with gradient checkpointing whatever `gradient_checkpointing` says (the real
presets: Vera-1.3B has 4.26 B parameters)."""


def needs_checkpointing(model: torch.nn.Module, requested: bool) -> bool:
    """Gradient checkpointing on when asked, and always for a transformer of `CHECKPOINTING_PARAMETERS` or more."""
    return requested or sum(p.numel() for p in model.parameters()) >= CHECKPOINTING_PARAMETERS


def fsdp_mixed_precision(use_bf16: bool) -> Any:
    """FSDP2's `MixedPrecisionPolicy` for a bf16 run: weights all-gathered in bf16 (not fp32, then cast again by
    autocast into a per-rank cache of bf16 copies), gradients reduced in fp32; None for an fp32 run."""
    if not use_bf16:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_transformer(model: torch.nn.Module, mp_policy: Any = None) -> None:
    """FSDP2 (`fully_shard`) over the default device mesh: each MoT block is one unit, the embeddings and output
    heads another. Parameter names are unchanged, so branch groups and checkpoints read them as usual.
    `fully_shard` moves each process's shard to the mesh's device: called on a CPU model, no process ever holds
    the whole model on its GPU."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def _is_sharded(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _gather_full(value: Any, keep: bool = True) -> Any:
    """`value` (nested dicts / lists of tensors) with every sharded tensor gathered whole, on the CPU.

    A collective under FSDP: every process calls it on the same structure, in the same order. Processes that do
    not write (`keep=False`) take part in each gather and drop the result (tensors come back as None), so only the
    writing process holds a whole copy in host memory.
    """
    if isinstance(value, torch.Tensor):
        whole = value.full_tensor() if _is_sharded(value) else value
        return whole.detach().cpu() if keep else None
    if isinstance(value, Mapping):
        return {key: _gather_full(item, keep) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_gather_full(item, keep) for item in value)
    return value


def _shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A saved whole tensor laid out as `param` is (its shard, for a sharded parameter of the same shape)."""
    if _is_sharded(param) and tuple(full.shape) == tuple(param.shape):
        from torch.distributed.tensor import distribute_tensor

        # Every process read the whole tensor from disk: each cuts its own shard, nothing is scattered.
        return distribute_tensor(
            full.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None
        )
    return full


def _shard_optimizer_state(state: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A saved (whole-tensor) optimiser state dict with each parameter's moments laid out as the parameter is."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {
            index: {
                key: _shard_like(value, params[int(index)]) if isinstance(value, torch.Tensor) else value
                for key, value in entry.items()
            }
            for index, entry in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }


def clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    """`clip_grad_norm_` over parameters some of which are sharded (FSDP) and some replicated; the total norm.

    Sharded gradients contribute their local shards' squares, summed across processes in one all-reduce.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = [grad.to_local().detach() for grad in grads if _is_sharded(grad)]
    replicated = [grad.detach() for grad in grads if not _is_sharded(grad)]
    device = grads[0].device if grads else torch.device("cpu")
    # One fused norm per group (`_foreach_norm`) and one host read at the end, not a loop of per-gradient kernels
    # each followed by a device-to-host copy.
    sharded_squares = _sum_of_squares(sharded, device)
    if sharded:
        torch.distributed.all_reduce(sharded_squares)
    total = float((sharded_squares + _sum_of_squares(replicated, device)).sqrt())
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1.0:
        local = [grad.to_local() if _is_sharded(grad) else grad for grad in grads]
        torch._foreach_mul_(local, coefficient)
    return total


def _sum_of_squares(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of the squares of all elements of `tensors`, in float64, on `device`."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float64)
    return torch.stack(norms).to(device).pow(2).sum()


def _load_or_build_pipeline(config: TrainConfig, vocabulary: Callable[[], list[str]], resume: bool):
    """The run's starting pipeline; `vocabulary()` lists the training instructions (read only when needed)."""
    from vera_engine.models.word_tokenizer import extend_word_tokenizer, is_word_tokenizer
    from vera_engine.pipelines.pipeline_vera import VeraPipeline
    from vera_engine.pipelines.presets import build_random_pipeline, build_text_encoder, get_preset

    preset = get_preset(config.preset)
    if config.init:
        pipe = VeraPipeline.from_pretrained(config.init)
        # A resumed run is its own init: its text encoder is already the fresh one, trained.
        if config.fresh_text_encoder and not resume:
            tokenizer, text_encoder = build_text_encoder(
                preset, config.seed, vocabulary() if preset.tokenizer == "word" else None
            )
            text_dim = pipe.transformer.config.text_dim
            if text_encoder.config.d_model != text_dim:
                raise ValueError(
                    f"--fresh-text-encoder: preset {preset.name!r} makes a {text_encoder.config.d_model}-wide "
                    f"encoder but the transformer of {config.init} reads {text_dim}-wide text states; pick the "
                    "preset the init model was built from"
                )
            pipe.register_modules(tokenizer=tokenizer, text_encoder=text_encoder)
            pipe.register_to_config(max_sequence_length=preset.max_sequence_length)
            # The new encoder comes with the preset's way of reading its padding.
            pipe.transformer.register_to_config(
                mask_text_padding=preset.transformer.get("mask_text_padding", False)
            )
        elif not resume and is_word_tokenizer(pipe.tokenizer):
            # New words in this run's data (a reworded or extended dataset) join the init model's vocabulary;
            # the words it knows keep their ids, so its trained encoder still reads them.
            texts = vocabulary()
            if pipe.config.get("instruction_format", "text") == "slots":
                texts = texts + [pipe.encoder_text(text) for text in texts]
            tokenizer = extend_word_tokenizer(pipe.tokenizer, texts)
            if len(tokenizer) > len(pipe.tokenizer):
                pipe.text_encoder.resize_token_embeddings(len(tokenizer))
                pipe.register_modules(tokenizer=tokenizer)
        if config.frame_position_embedding and not pipe.transformer.config.frame_position_embedding:
            pipe.register_modules(transformer=with_frame_position_embedding(pipe.transformer))
    else:
        if config.fresh_text_encoder:
            raise ValueError(
                "--fresh-text-encoder replaces the encoder of an --init model; a preset's is new already"
            )
        if config.frame_position_embedding:
            raise ValueError(
                "--frame-position-embedding adds the embedding to an --init model; a preset says itself whether "
                "it has one"
            )
        pipe = build_random_pipeline(
            preset, seed=config.seed, vocabulary=vocabulary() if preset.tokenizer == "word" else None
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class PromptCache:
    """Text-encoder states per instruction: the encoder is frozen (as in the paper), so each is computed once.

    Bounded (`max_entries`, least recently used dropped first) and kept in host memory in `storage_dtype`
    (bfloat16 for a bf16 run: the text projection consumes them in bf16 under autocast anyway), trimmed to the
    prompt's tokens (`cache.trimmed_text_states`: at umT5 size a state is 512 x 4096 values, a prompt a few dozen
    tokens) and padded back with zeros per batch, moved to `device` per batch. A frozen encoder that does not live
    on `device` (a bf16 run keeps it in host memory: umT5-XXL is 11.4 GB) is moved there to encode a batch's new
    instructions and back.

    `fill(prompts)` encodes every instruction a run can draw once, up front, and keeps them all (never evicted):
    `train` then drops the encoder (`_drop_frozen_text_encoder`), and an instruction outside the table is refused.
    """

    def __init__(
        self,
        pipe: Any,
        device: torch.device,
        dtype: torch.dtype,
        max_entries: int = 1024,
        storage_dtype: torch.dtype | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries={max_entries}; expected 1 or more cached instructions")
        self.pipe, self.device, self.dtype = pipe, device, dtype
        self.max_entries = max_entries
        self.storage_dtype = storage_dtype or dtype
        self.filled = False
        self._states: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._length = 0

    def __len__(self) -> int:
        return len(self._states)

    def _encode(self, prompts: list[str]) -> None:
        from vera_engine.training.cache import trimmed_text_states

        missing = list(dict.fromkeys(p for p in prompts if p not in self._states))
        if not missing:
            return
        if self.filled:
            raise KeyError(
                f"instruction {missing[0]!r} was not among the run's instructions encoded before the text encoder "
                "was dropped; the dataset handed out an instruction its instructions() does not list"
            )
        encoder = self.pipe.text_encoder
        home = encoder.device
        visiting = home != self.device
        if visiting:
            encoder.to(self.device)
        try:
            with torch.no_grad():
                for prompt in missing:
                    states = self.pipe.encode_prompt(prompt, self.device, self.dtype)[0]
                    self._length = states.shape[0]
                    stored = states.to(device="cpu", dtype=self.storage_dtype)
                    self._states[prompt] = trimmed_text_states(stored)
        finally:
            if visiting:
                encoder.to(home)

    def fill(self, prompts: list[str]) -> None:
        """Encode every one of `prompts` now and keep them all, so that the encoder is no longer needed."""
        self._encode(prompts)
        self.max_entries = max(self.max_entries, len(self._states))
        self.filled = True

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        self._encode(prompts)
        batch = []
        for prompt in prompts:
            self._states.move_to_end(prompt)
            states = self._states[prompt]
            batch.append(F.pad(states, (0, 0, 0, self._length - states.shape[0])))
        while len(self._states) > self.max_entries:
            self._states.popitem(last=False)
        return torch.stack(batch).to(device=self.device, dtype=self.dtype, non_blocking=True)


UP_FRONT_TEXT_BYTES = 4 * 1024**3
"""Host memory the up-front encode of a frozen text encoder's instructions may take. Beyond it (a very large real
dataset) the encoder stays and encodes lazily, and `vera-engine cache` is the route that drops it."""


def _up_front_text_bytes(pipe: Any, prompts: list[str], dtype: torch.dtype) -> int:
    """What `prompts`' encoded states take in `PromptCache`'s table: each trimmed to its tokens (counted with the
    pipeline's own tokenizer, as `encode_prompts` reads them) x the encoder's width."""
    width = getattr(pipe.text_encoder.config, "d_model", None) or pipe.text_encoder.config.hidden_size
    ids = pipe.tokenizer(
        [pipe.encoder_text(prompt) for prompt in prompts],
        max_length=pipe.config.max_sequence_length,
        truncation=True,
        add_special_tokens=True,
    ).input_ids
    tokens = sum(max(1, len(row)) for row in ids)
    return tokens * int(width) * torch.empty((), dtype=dtype).element_size()


def _drop_frozen_text_encoder(run: "_Run", prompts: PromptCache, instructions: list[str]) -> Path | None:
    """Encode every instruction the run can draw (the dataset's, and the empty one of text dropout) into `prompts`,
    then drop the frozen text encoder: the steps hold no encoder (umT5-XXL: 11.4 GB in bf16, on the device or in
    host memory). As `train --cache` does, checkpoints copy its folder in (`cache.complete_pipeline_folder`): process
    0 saves it once here, exactly as a checkpoint would have. Returns that folder (removed when the run ends)."""
    config, dist, pipe = run.config, run.dist, run.pipe
    # Encoded under the autocast the steps would have encoded them under: the same states as encoding lazily.
    with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
        prompts.fill([*instructions, ""])
    folder = None
    if dist.is_main:
        out = Path(config.out)
        folder = out.with_name(f".{out.name}.text_encoder")
        if folder.exists():
            shutil.rmtree(folder)
        pipe.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        (folder / "model_index.json").write_text(
            json.dumps({"text_encoder": list(pipe.config["text_encoder"])})
        )
        pipe.unloaded_components_from = str(folder)
    on_device = pipe.text_encoder.device.type != "cpu"
    pipe.register_modules(text_encoder=None)
    gc.collect()
    if on_device and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Map uniform samples to noise levels with the flow shift `shift` (1: unchanged)."""
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    text: torch.Tensor,
    generator: torch.Generator,
    timestep_shift: float = 1.0,
    foreground_weight: float = 1.0,
    clear_alpha_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Equally weighted flow-matching loss of the three layers for a batch of encoded latents.

    `batch` holds latents `edit`, `alpha`, `composite`, `source`, `mask` (B, C, f, h, w), `mask_keep` (B,) and
    `region` (B, 1, f, h, w): 1 where the edit's alpha is above 0. `foreground_weight` > 1 weighs the squared error
    there that much more (each sample's weights normalised to a mean of 1, so the loss keeps its scale).
    `clear_alpha_weight` > 1 weighs the alpha branch's error that much more where the true alpha is 0 everywhere in
    the latent cell (where a faint predicted matte would touch plate pixels that must stay bit-exact).
    """
    clean = torch.cat([batch["edit"], batch["alpha"], batch["composite"]], dim=1)
    size = clean.shape[0]
    device = clean.device
    noise = torch.randn(clean.shape, generator=generator, device="cpu").to(device)
    sigma = shifted_sigmas(torch.rand(size, generator=generator, device="cpu"), timestep_shift).to(device)
    sigma_b = sigma.view(-1, 1, 1, 1, 1)
    noisy = (1 - sigma_b) * clean + sigma_b * noise
    target = noise - clean
    edit, alpha, composite = noisy.chunk(3, dim=1)
    out = model(
        edit_latents=edit,
        alpha_latents=alpha,
        composite_latents=composite,
        timestep=sigma * 1000,
        encoder_hidden_states=text,
        source_latents=batch["source"],
        mask_latents=batch["mask"],
        mask_keep=batch["mask_keep"],
        return_dict=False,
    )
    if foreground_weight == 1.0:
        weights = None
    else:
        weights = 1.0 + (foreground_weight - 1.0) * batch["region"].float()
        weights = weights / weights.mean(dim=(1, 2, 3, 4), keepdim=True)

    def branch_weights(name: str) -> torch.Tensor | None:
        if name != "alpha" or clear_alpha_weight == 1.0:
            return weights
        clear = 1.0 + (clear_alpha_weight - 1.0) * (1.0 - batch["region"].float())
        combined = clear if weights is None else weights * clear
        return combined / combined.mean(dim=(1, 2, 3, 4), keepdim=True)

    losses = {}
    for name, prediction, layer_target in zip(BRANCHES, out, target.chunk(3, dim=1), strict=True):
        w = branch_weights(name)
        error = (prediction.float() - layer_target.float()) ** 2
        losses[name] = error.mean() if w is None else (w * error).mean()
    loss = sum(losses.values()) / len(losses)
    return loss, {name: float(value.detach()) for name, value in losses.items()}


def encode_batch(
    pipe: Any,
    batch: Mapping[str, Any],
    mask_dropout: Mapping[str, float],
    generator: torch.Generator,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Latents of a loader batch (videos in [0, 1], channels first) and the per-sample mask keep flags.

    The five videos of every sample go through the codec in one call (one batch of 5 x B clips): one VAE launch
    per step instead of five, with the same latents (each clip is encoded on its own inside the batch; bit-equal
    on the CPU, tests/test_train.py). `train --cache` reads stored latents and makes no encode at all.
    """
    drop = torch.tensor([mask_dropout.get(task, 0.0) for task in batch["task"]])
    keep = (torch.rand(len(drop), generator=generator) >= drop) & batch["has_mask"].cpu()
    names = ("edit", "alpha", "composite", "source", "mask")
    keys = ("edit", "alpha", "composite", "input", "mask")
    with torch.no_grad():
        videos = torch.cat([codec_input(batch[key].to(device)) for key in keys])
        latents = dict(zip(names, pipe.encode_video(videos).chunk(len(keys)), strict=True))
    # Where the edit is, on the latent grid (whatever the codec's compression): for weighing the loss there.
    region = F.adaptive_max_pool3d((batch["alpha"].to(device) > 0).float(), tuple(latents["alpha"].shape[2:]))
    return {"region": region, **latents, "mask_keep": keep.to(device=device, dtype=torch.float32)}


def save_state(stem: Path, state: Any) -> None:
    """Save a nested state (dicts, lists, tensors, numbers) as `stem.safetensors` + `stem.json`, never pickle.

    Tensors go to the safetensors file under their path in the structure; the JSON keeps the structure with
    `{"__tensor__": key}` where a tensor was. The engine refuses pickle anywhere in a model folder, and this
    state lives in one.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(value, Mapping):
            return {
                "__dict__": [
                    [encode(k, f"{path}.k{i}"), encode(v, f"{path}.{i}")]
                    for i, (k, v) in enumerate(value.items())
                ]
            }
        if isinstance(value, (list, tuple)):
            return [encode(v, f"{path}.{i}") for i, v in enumerate(value)]
        return value

    structure = encode(state, "state")
    save_file(tensors, str(stem) + ".safetensors")
    Path(str(stem) + ".json").write_text(json.dumps(structure))


def load_state(stem: Path) -> Any:
    """Read a state written by `save_state`."""
    from safetensors.torch import load_file

    tensors = load_file(str(stem) + ".safetensors")

    def decode(value: Any) -> Any:
        if isinstance(value, dict) and "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if isinstance(value, dict) and "__dict__" in value:
            return {decode(k): decode(v) for k, v in value["__dict__"]}
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    return decode(json.loads(Path(str(stem) + ".json").read_text()))


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# Settings whose change at a resume is bookkeeping, not a change of recipe (`fresh_text_encoder` only acts when a
# run starts). `steps` is recorded when a cool-down makes the schedule depend on it.
_UNRECORDED_CHANGES = (
    "out",
    "init",
    "steps",
    "fresh_text_encoder",
    "frame_position_embedding",
    "num_workers",
    "save_every",
    "log_every",
)


def run_history(
    saved_config: Mapping[str, Any],
    config: TrainConfig,
    start_step: int,
    history: list[dict[str, Any]] | None,
) -> list[dict[str, Any]]:
    """The run's history after resuming at `start_step`: `history` (or, for runs saved before histories were
    kept, one stretch of `saved_config`'s settings from step 0) plus a stretch naming what `config` changes.

    Each stretch is `{"from_step": N, "settings": {...}}` (the first: every setting) or `{"from_step": N,
    "changed": {name: [old, new]}}`; a resume that changes nothing adds nothing.
    """
    if history:
        history = [dict(stretch) for stretch in history]
    else:
        first = dict(saved_config)
        if first.get("init") == first.get("out"):
            # Resumed before histories were kept: a resume points `init` at the run itself, so what the run
            # started from is no longer known.
            first["init"] = "unknown"
        history = [{"from_step": 0, "settings": first}]
    current = json.loads(json.dumps(asdict(config)))  # tuples as lists, as in the saved JSON
    # A setting the run's saved config predates is the behaviour it had then: the setting's default.
    before = {**json.loads(json.dumps(asdict(TrainConfig(data="", out="")))), **saved_config}
    cooldown = bool(before["cooldown_steps"] or config.cooldown_steps)
    changed = {
        key: [before[key], value]
        for key, value in current.items()
        if (key not in _UNRECORDED_CHANGES or (key == "steps" and cooldown)) and before[key] != value
    }
    if changed:
        history.append({"from_step": start_step, "changed": changed})
    return history


def read_history(out: "str | os.PathLike[str]") -> list[dict[str, Any]]:
    """The stretches of a training run (`training/history.json`); [] for a run saved before histories were kept."""
    path = Path(out) / "training" / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _unsharded(model: torch.nn.Module, weights: Mapping[str, torch.Tensor] | None) -> torch.nn.Module:
    """`model` itself, or (given its gathered `weights`) an ordinary copy of the sharded `model` to save."""
    if weights is None:
        return model
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        plain = VeraTransformer3DModel.from_config(model.config)
    plain.load_state_dict(weights, strict=True, assign=True)
    return plain


def _save_pipeline(pipe: Any, folder: Path, transformer_weights: Mapping[str, torch.Tensor] | None) -> None:
    """`pipe.save_pretrained(folder)`, with an ordinary copy in place of a sharded transformer."""
    sharded = pipe.transformer
    pipe.transformer = _unsharded(sharded, transformer_weights)
    try:
        pipe.save_pretrained(folder, safe_serialization=True)
        # A --cache run: the folder also gets the VAE and text encoder the run did not load.
        if getattr(pipe, "unloaded_components_from", None):
            from vera_engine.training.cache import complete_pipeline_folder

            complete_pipeline_folder(folder, pipe.unloaded_components_from)
    finally:
        pipe.transformer = sharded


def _save_checkpoint(
    pipe: Any,
    model: torch.nn.Module,
    trainable: list[torch.nn.Parameter],
    ema: Any,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: TrainConfig,
    generator: torch.Generator,
    batches_per_epoch: int,
    history: list[dict[str, Any]],
    dist: _Distributed,
) -> None:
    """Write the pipeline folder (EMA weights) and the resume state, each folder swapped in atomically.

    Every process calls it: replicated weights are checked to agree, and under FSDP the shards are gathered into
    whole tensors (collectives); process 0 alone writes, the same full-weight folder with or without FSDP.
    """
    dist.check_replicas_agree([p for p in trainable if not _is_sharded(p)], "replicated weights")
    if not (dist.is_main or config.fsdp):
        return
    out = Path(config.out)
    staging = out.with_name(out.name + ".saving")
    if dist.is_main and staging.exists():
        shutil.rmtree(staging)
    ema.store(trainable)
    ema.copy_to(trainable)
    try:
        ema_weights = _gather_full(model.state_dict(), dist.is_main) if config.fsdp else None
        if dist.is_main:
            _save_pipeline(pipe, staging, ema_weights)
        del ema_weights
    finally:
        ema.restore(trainable)
    raw_weights = _gather_full(model.state_dict(), dist.is_main) if config.fsdp else None
    optimizer_state = _gather_full(optimizer.state_dict(), dist.is_main)
    ema_state = _gather_full(ema.state_dict(), dist.is_main)
    if not dist.is_main:
        return
    training = staging / "training"
    training.mkdir()
    _unsharded(model, raw_weights).save_pretrained(training / "raw_transformer", safe_serialization=True)
    if pipe.text_encoder is not None and any(p.requires_grad for p in pipe.text_encoder.parameters()):
        pipe.text_encoder.save_pretrained(training / "raw_text_encoder", safe_serialization=True)
    save_state(
        training / "state",
        {
            "step": step,
            "optimizer": optimizer_state,
            "ema": ema_state,
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            # Where in the data the run is: a resume must see the same epochs (same data, same process count).
            "batches_per_epoch": batches_per_epoch,
        },
    )
    _write_json_atomic(training / "config.json", asdict(config))
    _write_json_atomic(training / "history.json", history)
    old_log = out / "training" / "log.jsonl"
    if old_log.exists():
        shutil.copy2(old_log, training / "log.jsonl")
    make_files_shareable(staging)  # weights readable like any file the user writes, not owner-only
    # Keep whatever else the user put in the folder (model card, figures); replace what training owns.
    if out.exists():
        for extra in out.iterdir():
            if not (staging / extra.name).exists():
                shutil.move(str(extra), staging / extra.name)
        backup = out.with_name(out.name + ".previous")
        if backup.exists():
            shutil.rmtree(backup)
        out.rename(backup)
        staging.rename(out)
        shutil.rmtree(backup)
    else:
        staging.rename(out)


# Settings a resume must keep: optimiser and EMA state carry their own learning rates and decay (a changed value
# would be silently ignored), and the data order of every epoch follows from the seed, data and batch size.
_FIXED_AT_RESUME = (
    "data",
    "preset",
    "batch_size",
    "frames",
    "size",
    "learning_rate",
    "branch_lr_scales",
    "ema_decay",
    "text_encoder_lr_scale",  # the optimiser's text-encoder group keeps its saved rate
    "seed",
)


@dataclass
class _Run:
    """Everything a training run holds while it trains (built by `train`'s stages, in order)."""

    config: TrainConfig
    dist: "_Distributed"
    pipe: Any
    model: VeraTransformer3DModel
    train_model: torch.nn.Module  # `model`, or its DDP wrapper
    trainable: list[torch.nn.Parameter]  # the transformer's, then the text encoder's when it trains
    text_parameters: list[torch.nn.Parameter]
    ema: Any
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    use_bf16: bool
    start_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _check_resume(config: TrainConfig, resume: bool) -> dict[str, Any] | None:
    """The saved config of the run being resumed (after refusing changes it cannot follow), or None."""
    out = Path(config.out)
    if not resume:
        if (out / "training").exists():
            raise FileExistsError(f"--out {out} already holds a training run; pass --resume to continue it")
        return None
    state_path = out / "training" / "state.safetensors"
    if not state_path.is_file():
        raise FileNotFoundError(f"--resume: {state_path} does not exist; start without --resume")
    saved = json.loads((out / "training" / "config.json").read_text())
    for key in _FIXED_AT_RESUME:
        value = getattr(config, key)
        saved_value = tuple(saved[key]) if isinstance(saved[key], list) else saved[key]
        if value != saved_value:
            raise ValueError(
                f"--resume: {key}={value!r} differs from the run being resumed ({saved_value!r})"
            )
    config.init = str(out)
    return saved


def _load_raw_weights(pipe: Any, config: TrainConfig) -> None:
    """A resumed run trains on from its raw (not EMA) weights; the folder's transformer holds the EMA ones."""
    from diffusers.models.model_loading_utils import load_state_dict

    training = Path(config.out) / "training"
    raw = load_state_dict(str(training / "raw_transformer" / "diffusion_pytorch_model.safetensors"))
    pipe.transformer.load_state_dict(raw, strict=True)
    del raw  # every process read it: do not hold a second copy of the weights for the whole run
    raw_text = training / "raw_text_encoder" / "model.safetensors"
    if config.text_encoder_lr_scale > 0 and raw_text.is_file():
        pipe.text_encoder.load_state_dict(load_state_dict(str(raw_text)), strict=False)


def _prepare_model(pipe: Any, config: TrainConfig, dist: "_Distributed") -> _Run:
    """Put the model on its device (sharded under FSDP, wrapped by DDP), and make its EMA and optimiser."""
    from diffusers.training_utils import EMAModel

    use_bf16 = config.mixed_precision == "bf16" or (
        config.mixed_precision == "auto" and dist.device.type == "cuda"
    )
    model: VeraTransformer3DModel = pipe.transformer
    model.train()
    if config.lora:  # only the adapters train (training/lora.py)
        from vera_engine.training.lora import add_training_adapter

        add_training_adapter(model, config.lora)
    train_text = config.text_encoder_lr_scale > 0
    if pipe.text_encoder is not None:  # None: a --cache run, which does not load it
        pipe.text_encoder.requires_grad_(train_text).train(train_text)
    if needs_checkpointing(model, config.gradient_checkpointing):
        model.enable_gradient_checkpointing()
    if config.fsdp:
        # Sharded before anything moves (fully_shard puts each process's shard on its device): no process holds
        # the whole fp32 transformer on its GPU. Before the optimiser and EMA: they hold the sharded parameters.
        shard_transformer(model, fsdp_mixed_precision(use_bf16 and dist.device.type == "cuda"))
    else:
        model.to(dist.device)
    # (A run from a latent/text cache loads neither codec nor encoder: they may be None.)
    if pipe.vae is not None:
        pipe.vae.to(dist.device)
    if pipe.text_encoder is None:
        pass
    elif train_text or not (use_bf16 and dist.device.type == "cuda"):
        pipe.text_encoder.to(dist.device)
    else:
        # A frozen encoder in a bf16 GPU run: bf16 (umT5-XXL 11.4 GB, not 22.8 GB) and in host memory, visiting
        # the GPU only to encode new instructions (`PromptCache`), whose states are kept.
        pipe.text_encoder.to(dtype=torch.bfloat16)

    text_parameters = list(pipe.text_encoder.parameters()) if train_text else []
    trainable = [p for p in model.parameters() if p.requires_grad] + text_parameters
    ema = EMAModel(
        trainable,
        decay=config.ema_decay,
        model_cls=VeraTransformer3DModel,
        model_config=model.config,
        # One fused kernel per update on a GPU instead of one per parameter (the CPU keeps the per-parameter
        # arithmetic, which rounds the same as before).
        foreach=dist.device.type == "cuda",
    )
    groups = branch_parameter_groups(model, config.learning_rate, config.branch_lr_scales)
    if train_text:
        text_lr = config.learning_rate * config.text_encoder_lr_scale
        groups.append(
            {"params": text_parameters, "lr": text_lr, "name": "text_encoder", "initial_lr": text_lr}
        )
    train_model: torch.nn.Module = model
    if dist.world_size > 1 and not config.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )
    return _Run(
        config=config,
        dist=dist,
        pipe=pipe,
        model=model,
        train_model=train_model,
        trainable=trainable,
        text_parameters=text_parameters,
        ema=ema,
        optimizer=torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8),
        generator=torch.Generator().manual_seed(config.seed * 1009 + dist.rank),
        use_bf16=use_bf16,
    )


def _restore_state(run: _Run, saved_config: dict[str, Any] | None) -> int | None:
    """Load the optimiser, EMA, RNG and step of a resumed run (and its history); returns the saved batches per
    epoch (None for a new run, or a run saved before they were recorded)."""
    config, dist = run.config, run.dist
    out = Path(config.out)
    if saved_config is None:
        run.history = [{"from_step": 0, "settings": json.loads(json.dumps(asdict(config)))}]
        return None
    state = load_state(out / "training" / "state")
    # Saved whole; under FSDP each process keeps its parameters' shard of the moments and the average.
    run.optimizer.load_state_dict(
        _shard_optimizer_state(state["optimizer"], run.optimizer) if config.fsdp else state["optimizer"]
    )
    run.ema.load_state_dict(state["ema"])
    run.ema.shadow_params = [
        _shard_like(s, p) for s, p in zip(run.ema.shadow_params, run.trainable, strict=True)
    ]
    run.ema.to(dist.device)
    if dist.world_size == 1:
        run.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
    else:
        # Only rank 0's streams are saved: give every rank its own again, as at the start of the run.
        run.generator.manual_seed(config.seed * 1009 + dist.rank + 7919 * int(state["step"]))
    run.start_step = int(state["step"])
    run.history = run_history(saved_config, config, run.start_step, read_history(out))
    if run.start_step >= config.steps:
        raise ValueError(
            f"--steps {config.steps}: the run is already at step {run.start_step}; ask for more steps"
        )
    return state.get("batches_per_epoch")


def _make_loader(
    dataset: Any, config: TrainConfig, dist: "_Distributed", saved_batches_per_epoch: int | None
) -> tuple[EpochSampler, torch.utils.data.DataLoader]:
    """This process's sampler and loader; a resume must find the epochs it was trained on."""
    from vera_engine.training.data.dataset import collate_layered

    sampler = EpochSampler(len(dataset), config.batch_size, config.seed, dist.world_size, dist.rank)
    if sampler.batches_per_epoch == 0:
        raise ValueError(
            f"--batch-size {config.batch_size} is larger than the {len(dataset) // dist.world_size} training clips "
            "per process; use a smaller batch or more data"
        )
    if saved_batches_per_epoch not in (None, sampler.batches_per_epoch):
        raise ValueError(
            f"--resume: the run had {saved_batches_per_epoch} batches per epoch and now has "
            f"{sampler.batches_per_epoch} (the dataset or the number of processes changed); resume with the same "
            "data and process count, or start a new run with --init"
        )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_layered,
        num_workers=config.num_workers,
        # Its own generator: each epoch's iterator draws a worker seed, which must not come from the global stream
        # that dropout (the text encoder's) draws from, or a resumed run would be one draw out of step.
        generator=torch.Generator().manual_seed(config.seed),
    )
    return sampler, loader


def _train_step(
    run: _Run, batch: Mapping[str, Any], step: int, prompts: PromptCache
) -> tuple[dict[str, float], float]:
    """One optimiser step on `batch`; returns the (process-averaged) losses and the gradient norm."""
    from vera_engine.training.cache import cached_latents, cached_text

    config, dist, pipe = run.config, run.dist, run.pipe
    for group in run.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * learning_rate_factor(
            step, config.warmup_steps, config.steps, config.cooldown_steps
        )
    cached = "text_states" in batch  # --cache: latents and text states made by `vera-engine cache`
    if cached:
        latents = cached_latents(batch, config.mask_dropout, run.generator, dist.device)
    else:
        latents = encode_batch(pipe, batch, config.mask_dropout, run.generator, dist.device)
    drop_text = torch.rand(len(batch["instruction"]), generator=run.generator) < config.text_dropout
    instructions = ["" if drop else p for p, drop in zip(batch["instruction"], drop_text, strict=True)]
    with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
        if cached:
            text = cached_text(batch, drop_text, dist.device, run.model.dtype)
        elif run.text_parameters:
            text = torch.cat([pipe.encode_prompt(p, dist.device, run.model.dtype) for p in instructions])
        else:
            text = prompts(instructions)
        loss, parts = flow_matching_loss(
            run.train_model,
            latents,
            text,
            run.generator,
            config.timestep_shift,
            config.foreground_weight,
            config.clear_alpha_weight,
        )
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.text_parameters:
        dist.average_gradients(run.text_parameters)
    grad_norm = (
        clip_gradients(run.trainable, config.max_grad_norm)
        if config.fsdp
        else torch.nn.utils.clip_grad_norm_(run.trainable, config.max_grad_norm)
    )
    run.optimizer.step()
    run.ema.step(run.trainable)
    losses = {"loss": dist.mean(float(loss.detach())), **{k: dist.mean(v) for k, v in parts.items()}}
    return losses, float(grad_norm)


def _append_log(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as log:
        for row in rows:
            log.write(json.dumps(row) + "\n")
    rows.clear()


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary with the final losses and timing."""
    from tqdm.auto import tqdm

    from vera_engine.training.cache import open_cache_for_training
    from vera_engine.training.data.released import open_training_dataset
    from vera_engine.training.lora import check_lora_run, save_lora_checkpoint

    if config.cooldown_steps < 0 or config.warmup_steps < 0:
        raise ValueError(
            f"--warmup-steps {config.warmup_steps}, --cooldown-steps {config.cooldown_steps}: expected 0 or more"
        )
    # 1. Processes, and the run this one continues (a resume may not change what its saved state fixes)
    dist = _Distributed()
    if config.fsdp and dist.world_size == 1:
        raise ValueError(
            "--fsdp shards the transformer across processes: run under torchrun with --nproc_per_node 2 or more "
            "(a single process trains the whole model without it)"
        )
    saved_config = _check_resume(config, resume)
    check_lora_run(config, resume)
    random.seed(config.seed + dist.rank)
    np.random.seed(config.seed + dist.rank)
    torch.manual_seed(config.seed + dist.rank)

    # 2. Data and the starting pipeline (a preset's random weights, an --init model, or the run's raw weights)
    # --cache: latents and text states encoded once by `vera-engine cache`, no VAE or text encoder here.
    if config.cache:
        dataset, pipe = open_cache_for_training(config, resume)
    else:
        dataset = open_training_dataset(
            config.data,
            "train",
            format=config.format,
            frames=config.frames,
            size=config.size,
            seed=config.seed,
            skip_bad=config.skip_bad,
        )
        pipe = _load_or_build_pipeline(config, dataset.instructions, resume)
    if config.lora:  # the base the adapter is trained on: recorded in the adapter file
        from vera_engine.pipelines.model_store import resolve_model_dir
        from vera_engine.training.lora import base_transformer_hash

        base_dir = resolve_model_dir(config.init)
        pipe.lora_base_hash, pipe.lora_base_name = base_transformer_hash(base_dir), base_dir.resolve().name
    if resume:
        _load_raw_weights(pipe, config)

    # 3. Model on its device, optimiser and EMA; on a resume their saved state, the RNG and the step
    run = _prepare_model(pipe, config, dist)
    saved_batches_per_epoch = _restore_state(run, saved_config)
    sampler, loader = _make_loader(dataset, config, dist, saved_batches_per_epoch)

    # 4. The loop. A resumed run starts at the first batch of the epoch it has not trained on: it sees exactly the
    # data, in the same order and with the same augmentations, as a run that was never stopped.
    out = Path(config.out)
    log_path = out / "training" / "log.jsonl"
    # Kept in bf16 for a bf16 run (the text projection reads them in bf16 under autocast: nothing is lost).
    prompts = PromptCache(
        pipe, dist.device, run.model.dtype, storage_dtype=torch.bfloat16 if run.use_bf16 else None
    )
    # A frozen encoder reads a fixed set of instructions: encode them all now and drop it (with a trained one, keep it).
    encoder_folder = None
    if pipe.text_encoder is not None and not run.text_parameters:
        instructions = dataset.instructions()
        distinct = [*dict.fromkeys([*instructions, ""])]  # and the empty one of text dropout
        if _up_front_text_bytes(pipe, distinct, prompts.storage_dtype) <= UP_FRONT_TEXT_BYTES:
            encoder_folder = _drop_frozen_text_encoder(run, prompts, instructions)
        elif dist.is_main:
            logger.warning(
                "%d distinct instructions: too many to encode up front within %s GiB of host memory; the frozen "
                "text encoder stays loaded and encodes them as they come (vera-engine cache encodes them once, "
                "on disk, and trains without the encoder)",
                len(distinct),
                UP_FRONT_TEXT_BYTES / 1024**3,
            )
    pending_log: list[dict[str, Any]] = []
    bar = tqdm(
        total=config.steps, initial=run.start_step, disable=not (progress and dist.is_main), desc="train"
    )
    step = run.start_step
    epoch, skip = divmod(run.start_step, sampler.batches_per_epoch)
    started = time.perf_counter()
    last: dict[str, float] = {}
    while step < config.steps:
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, skip_batches=skip)
        skip = 0
        for batch in loader:
            if step >= config.steps:
                break
            last, grad_norm = _train_step(run, batch, step, prompts)
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{last['loss']:.4f}")
            if dist.is_main and (step % config.log_every == 0 or step == config.steps):
                lr = run.optimizer.param_groups[0]["lr"]
                pending_log.append(
                    {"step": step, **last, "grad_norm": grad_norm, "lr": lr, "time": time.time()}
                )
            # 5. Checkpoints: the pipeline folder (EMA weights) and what a resume needs, replaced atomically
            if config.lora and (step % config.save_every == 0 or step == config.steps):
                if dist.is_main:
                    save_lora_checkpoint(run, step)
                    _append_log(log_path, pending_log)
                dist.barrier()
            elif step % config.save_every == 0 or step == config.steps:
                _save_checkpoint(
                    pipe,
                    run.model,
                    run.trainable,
                    run.ema,
                    run.optimizer,
                    step,
                    config,
                    run.generator,
                    sampler.batches_per_epoch,
                    run.history,
                    dist,
                )
                if dist.is_main:
                    _append_log(log_path, pending_log)
                dist.barrier()
        epoch += 1
    bar.close()
    elapsed = time.perf_counter() - started

    # 6. Teardown. DDP's reducer holds the process group. Dropped after the group is destroyed, the reducer's
    # destructor would drop its last reference, and gloo's destructor then waits for worker threads that need the
    # GIL it holds (a hang at exit, seen here). Dropped first, the group's last reference goes with
    # destroy_process_group instead.
    del run.train_model
    gc.collect()
    dist.close()
    if encoder_folder is not None:
        shutil.rmtree(encoder_folder, ignore_errors=True)
    return {
        "steps": step,
        "seconds": elapsed,
        "last": last,
        "out": str(out),
        "seconds_per_step": elapsed / max(1, step - run.start_step),
    }


def read_log(out: "str | os.PathLike[str]") -> list[dict[str, Any]]:
    """The logged losses of a training run (`training/log.jsonl`)."""
    path = Path(out) / "training" / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smoothed(values: list[float], window: int = 10) -> list[float]:
    """Moving average used when a loss curve is summarised (model card, tests)."""
    out = []
    for index in range(len(values)):
        chunk = values[max(0, index - window + 1) : index + 1]
        out.append(sum(chunk) / len(chunk))
    return out
