"""`vera-engine train`: Vera's training recipe (paper §4.1.1, App. A.2) on a layered dataset.

Flow matching on all three layers with equally weighted losses, per-branch learning rates (edit 0.1×, alpha 10×,
composite 10× the base by default), mask dropout per task (0.3 background change, 0.9 object addition), linear
warm-up, EMA of the weights, optional gradient checkpointing, bf16 autocast on GPUs. One process on a CPU;
DDP under `torchrun` on GPUs (or on CPUs with gloo).

Conventions are diffusers' (those of the Wan weights and schedulers): `x_t = (1 − σ)·x_0 + σ·noise`, the model
predicts `v = noise − x_0` at timestep `1000·σ`. The paper writes the same flow with time reversed.

Output: a pipeline folder (`VeraPipeline.from_pretrained` loads it; the transformer holds the EMA weights) plus
`training/` inside it with what resuming needs (raw weights, optimiser, EMA, step, RNG: safetensors + JSON) and
`training/log.jsonl` with the losses.
"""

import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .models.transformer_vera import BRANCHES, VeraTransformer3DModel
from .recipe import DEFAULT_BRANCH_LR_SCALES, DEFAULT_MASK_DROPOUT

# Vera-only parameters train with the branch whose tokens they are added to.
_CONDITION_OWNERS = {
    "source_embedding": "composite",
    "composite_layer_embedding": "composite",
    "mask_embedding": "alpha",
    "alpha_layer_embedding": "alpha",
}


@dataclass
class TrainConfig:
    """Everything a training run is defined by; saved in `training/config.json` and checked on resume."""

    data: str
    out: str
    init: str | None = None
    preset: str = "tiny"
    steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    branch_lr_scales: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_BRANCH_LR_SCALES))
    mask_dropout: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MASK_DROPOUT))
    warmup_steps: int = 200
    # Instructions replaced by "" this often, so the unconditional pass of classifier-free guidance is trained.
    text_dropout: float = 0.1
    # 0 keeps the text encoder frozen (the paper's setting, for a pretrained umT5). A tiny checkpoint trained from
    # scratch has a random encoder, and learning it (at this multiple of the base rate) is what lets it read words.
    text_encoder_lr_scale: float = 0.0
    # With `init`: replace the init pipeline's tokenizer and text encoder by fresh ones of `preset`'s kind (a
    # word-level vocabulary from this run's data, the preset's `mask_text_padding`), keeping the transformer's
    # weights: how a trained tiny model changes the words it reads without relearning to denoise.
    fresh_text_encoder: bool = False
    # Training noise levels: u ~ U(0, 1) mapped to sigma = s·u / (1 + (s − 1)·u). s = 1 is uniform; s > 1 spends
    # more of training at high noise, where layout and colour are decided (matches inference's flow_shift).
    timestep_shift: float = 1.0
    ema_decay: float = 0.999
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto: bf16 autocast on CUDA, float32 elsewhere; or "no" / "bf16"
    frames: int | None = None
    size: tuple[int, int] | None = None
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    max_grad_norm: float = 1.0


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

    def close(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _load_or_build_pipeline(config: TrainConfig, vocabulary: Callable[[], list[str]], resume: bool):
    """The run's starting pipeline; `vocabulary()` lists the training instructions (read only when needed)."""
    from .pipeline_vera import VeraPipeline
    from .presets import build_random_pipeline, build_text_encoder, get_preset

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
    else:
        if config.fresh_text_encoder:
            raise ValueError(
                "--fresh-text-encoder replaces the encoder of an --init model; a preset's is new already"
            )
        pipe = build_random_pipeline(
            preset, seed=config.seed, vocabulary=vocabulary() if preset.tokenizer == "word" else None
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class PromptCache:
    """Text-encoder states per instruction: the encoder is frozen (as in the paper), so each is computed once."""

    def __init__(self, pipe: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.pipe, self.device, self.dtype = pipe, device, dtype
        self._states: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        for prompt in prompts:
            if prompt not in self._states:
                with torch.no_grad():
                    self._states[prompt] = self.pipe.encode_prompt(prompt, self.device, self.dtype)[0]
        return torch.stack([self._states[prompt] for prompt in prompts])


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Map uniform samples to noise levels with the flow shift `shift` (1: unchanged)."""
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    text: torch.Tensor,
    generator: torch.Generator,
    timestep_shift: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Equally weighted flow-matching loss of the three layers for a batch of encoded latents.

    `batch` holds latents `edit`, `alpha`, `composite`, `source`, `mask` (B, C, f, h, w) and `mask_keep` (B,).
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
    losses = {
        name: F.mse_loss(prediction.float(), layer_target.float())
        for name, prediction, layer_target in zip(BRANCHES, out, target.chunk(3, dim=1), strict=True)
    }
    loss = sum(losses.values()) / len(losses)
    return loss, {name: float(value.detach()) for name, value in losses.items()}


def encode_batch(
    pipe: Any,
    batch: Mapping[str, Any],
    mask_dropout: Mapping[str, float],
    generator: torch.Generator,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Latents of a loader batch (videos in [0, 1], channels first) and the per-sample mask keep flags."""

    def encode(video: torch.Tensor) -> torch.Tensor:
        video = video.to(device)
        if video.shape[1] == 1:
            video = video.expand(-1, 3, -1, -1, -1)  # alpha and mask: 3-channel grey video (paper §3.1.1)
        with torch.no_grad():
            return pipe.encode_video(video * 2 - 1)

    drop = torch.tensor([mask_dropout.get(task, 0.0) for task in batch["task"]])
    keep = (torch.rand(len(drop), generator=generator) >= drop) & batch["has_mask"].cpu()
    return {
        "edit": encode(batch["edit"]),
        "alpha": encode(batch["alpha"]),
        "composite": encode(batch["composite"]),
        "source": encode(batch["input"]),
        "mask": encode(batch["mask"]),
        "mask_keep": keep.to(device=device, dtype=torch.float32),
    }


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
) -> None:
    """Write the pipeline folder (EMA weights) and the resume state, each folder swapped in atomically."""
    out = Path(config.out)
    staging = out.with_name(out.name + ".saving")
    if staging.exists():
        shutil.rmtree(staging)
    ema.store(trainable)
    ema.copy_to(trainable)
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
    finally:
        ema.restore(trainable)
    training = staging / "training"
    training.mkdir()
    model.save_pretrained(training / "raw_transformer", safe_serialization=True)
    if any(p.requires_grad for p in pipe.text_encoder.parameters()):
        pipe.text_encoder.save_pretrained(training / "raw_text_encoder", safe_serialization=True)
    save_state(
        training / "state",
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            # Where in the data the run is: a resume must see the same epochs (same data, same process count).
            "batches_per_epoch": batches_per_epoch,
        },
    )
    _write_json_atomic(training / "config.json", asdict(config))
    old_log = out / "training" / "log.jsonl"
    if old_log.exists():
        shutil.copy2(old_log, training / "log.jsonl")
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


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary with the final losses and timing."""
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from .data.dataset import LayeredVideoDataset, collate_layered

    dist = _Distributed()
    out = Path(config.out)
    state_path = out / "training" / "state.safetensors"
    if resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"--resume: {state_path} does not exist; start without --resume")
        saved = json.loads((out / "training" / "config.json").read_text())
        # Optimiser and EMA state carry their own learning rates and decay: a changed value would be silently
        # ignored, so refuse it rather than record a config the run does not follow.
        for key in (
            "data",
            "preset",
            "batch_size",
            "frames",
            "size",
            "learning_rate",
            "branch_lr_scales",
            "ema_decay",
            "seed",  # the data order of every epoch follows from it
        ):
            value = getattr(config, key)
            saved_value = tuple(saved[key]) if isinstance(saved[key], list) else saved[key]
            if value != saved_value:
                raise ValueError(
                    f"--resume: {key}={value!r} differs from the run being resumed ({saved_value!r})"
                )
        config.init = str(out)
    elif (out / "training").exists():
        raise FileExistsError(f"--out {out} already holds a training run; pass --resume to continue it")

    random.seed(config.seed + dist.rank)
    np.random.seed(config.seed + dist.rank)
    torch.manual_seed(config.seed + dist.rank)
    dataset = LayeredVideoDataset(
        config.data, "train", frames=config.frames, size=config.size, seed=config.seed
    )
    pipe = _load_or_build_pipeline(config, dataset.instructions, resume)
    if resume:
        from diffusers.models.model_loading_utils import load_state_dict

        raw = load_state_dict(
            str(out / "training" / "raw_transformer" / "diffusion_pytorch_model.safetensors")
        )
        pipe.transformer.load_state_dict(raw, strict=True)
        raw_text = out / "training" / "raw_text_encoder" / "model.safetensors"
        if config.text_encoder_lr_scale > 0 and raw_text.is_file():
            pipe.text_encoder.load_state_dict(load_state_dict(str(raw_text)), strict=False)
    pipe.to(dist.device)
    model: VeraTransformer3DModel = pipe.transformer
    model.train()
    train_text = config.text_encoder_lr_scale > 0
    pipe.text_encoder.requires_grad_(train_text).train(train_text)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()

    use_bf16 = config.mixed_precision == "bf16" or (
        config.mixed_precision == "auto" and dist.device.type == "cuda"
    )
    trainable = list(model.parameters()) + (list(pipe.text_encoder.parameters()) if train_text else [])
    ema = EMAModel(
        trainable,
        decay=config.ema_decay,
        model_cls=VeraTransformer3DModel,
        model_config=model.config,
    )
    groups = branch_parameter_groups(model, config.learning_rate, config.branch_lr_scales)
    if train_text:
        text_lr = config.learning_rate * config.text_encoder_lr_scale
        groups.append(
            {
                "params": list(pipe.text_encoder.parameters()),
                "lr": text_lr,
                "name": "text_encoder",
                "initial_lr": text_lr,
            }
        )
    train_model: torch.nn.Module = model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)

    generator = torch.Generator().manual_seed(config.seed * 1009 + dist.rank)
    start_step = 0
    if resume:
        state = load_state(out / "training" / "state")
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        ema.to(dist.device)
        if dist.world_size == 1:
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
        else:
            # Only rank 0's streams are saved: give every rank its own again, as at the start of the run.
            generator.manual_seed(config.seed * 1009 + dist.rank + 7919 * int(state["step"]))
        start_step = int(state["step"])
    if start_step >= config.steps:
        raise ValueError(
            f"--steps {config.steps}: the run is already at step {start_step}; ask for more steps"
        )

    sampler = EpochSampler(len(dataset), config.batch_size, config.seed, dist.world_size, dist.rank)
    if sampler.batches_per_epoch == 0:
        raise ValueError(
            f"--batch-size {config.batch_size} is larger than the {len(dataset) // dist.world_size} training clips "
            "per process; use a smaller batch or more data"
        )
    if resume and state.get("batches_per_epoch", sampler.batches_per_epoch) != sampler.batches_per_epoch:
        raise ValueError(
            f"--resume: the run had {state['batches_per_epoch']} batches per epoch and now has "
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
    prompts = PromptCache(pipe, dist.device, model.dtype)
    log_path = out / "training" / "log.jsonl"
    pending_log: list[dict[str, Any]] = []
    bar = tqdm(total=config.steps, initial=start_step, disable=not (progress and dist.is_main), desc="train")
    step = start_step
    # A resumed run starts at the first batch of the epoch it has not trained on: it sees exactly the data, in the
    # same order and with the same augmentations, as a run that was never stopped.
    epoch, skip = divmod(start_step, sampler.batches_per_epoch)
    started = time.perf_counter()
    last: dict[str, float] = {}
    while step < config.steps:
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, skip_batches=skip)
        skip = 0
        for batch in loader:
            if step >= config.steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * warmup_factor(step, config.warmup_steps)
            latents = encode_batch(pipe, batch, config.mask_dropout, generator, dist.device)
            drop_text = torch.rand(len(batch["instruction"]), generator=generator) < config.text_dropout
            instructions = [
                "" if drop else p for p, drop in zip(batch["instruction"], drop_text, strict=True)
            ]
            with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                if train_text:
                    text = torch.cat([pipe.encode_prompt(p, dist.device, model.dtype) for p in instructions])
                else:
                    text = prompts(instructions)
                loss, parts = flow_matching_loss(train_model, latents, text, generator, config.timestep_shift)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            ema.step(trainable)
            step += 1
            last = {"loss": dist.mean(float(loss.detach())), **{k: dist.mean(v) for k, v in parts.items()}}
            bar.update()
            bar.set_postfix(loss=f"{last['loss']:.4f}")
            if dist.is_main and (step % config.log_every == 0 or step == config.steps):
                pending_log.append(
                    {
                        "step": step,
                        **last,
                        "grad_norm": float(grad_norm),
                        "lr": optimizer.param_groups[0]["lr"],
                        "time": time.time(),
                    }
                )
            if step % config.save_every == 0 or step == config.steps:
                if dist.is_main:
                    _save_checkpoint(
                        pipe,
                        model,
                        trainable,
                        ema,
                        optimizer,
                        step,
                        config,
                        generator,
                        sampler.batches_per_epoch,
                    )
                    log_path.parent.mkdir(parents=True, exist_ok=True)
                    with log_path.open("a") as log:
                        for row in pending_log:
                            log.write(json.dumps(row) + "\n")
                    pending_log.clear()
                dist.barrier()
        epoch += 1
    bar.close()
    elapsed = time.perf_counter() - started
    dist.close()
    return {
        "steps": step,
        "seconds": elapsed,
        "last": last,
        "out": str(out),
        "seconds_per_step": elapsed / max(1, step - start_step),
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
