# The Vera sampling pipeline: text and video in, edit layer + alpha matte + composite out (model space, [0, 1]).
#
# Modelled on diffusers' `WanPipeline`: `check_inputs` names the argument and its value, the denoising loop shows
# its choices (classifier-free guidance batched in one forward, one scheduler over the three layers stacked on the
# channel axis), `callback_on_step_end` gives progress and previews, `interrupt` stops within one step.

import functools
import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from vera_engine.models.space_to_depth_codec import SpaceToDepthCodec
from vera_engine.models.transformer_vera import VeraTransformer3DModel
from vera_engine.pipelines.windows import default_window_overlap, position_reach

TEXT_CACHE_SIZE = 8
"""Prompt pairs whose text states `VeraPipeline.text_states` keeps (a few MB each at umT5 size)."""

VIDEO_CACHE_SIZE = 2
"""Encoded videos `VeraPipeline` keeps: a job's source and its mask, reused by its next take."""

LAYERS = ("edit", "alpha", "composite")
"""The layers a sampling call can decode (`layers=`)."""

SCHEDULERS = ("unipc", "euler")
"""Flow-matching samplers the pipeline can use (diffusers' `UniPCMultistepScheduler`, `FlowMatchEulerDiscreteScheduler`)."""
INSTRUCTION_FORMATS = ("text", "slots")
"""How a checkpoint's text encoder reads an instruction (`VeraPipeline.encoder_text`)."""


class VeraInterrupted(RuntimeError):
    """Raised by `VeraPipeline.__call__` when `interrupt` was set: sampling stopped before `step` ran."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"sampling interrupted before step {step + 1} of {total}")
        self.step = step
        self.total = total


def codec_input(video: torch.Tensor) -> torch.Tensor:
    """A `(B, C, F, H, W)` video in [0, 1] as the latent codec takes it: 3 channels in [-1, 1].

    One channel (alpha, mask) becomes a 3-channel grey video (paper §3.1.1). Training and sampling both prepare
    their videos here, so what the model learned on and what it is given cannot drift apart.
    """
    if video.shape[1] not in (1, 3):
        raise ValueError(f"video has {video.shape[1]} channels; expected 1 (alpha, mask) or 3 (colour)")
    if video.shape[1] == 1:
        video = video.expand(-1, 3, -1, -1, -1)
    return video * 2 - 1


@dataclass
class VeraPipelineOutput(BaseOutput):
    """The three layers in model space, trimmed to the input's frames and size.

    `edit`: (F, H, W, 3) edit-layer colour, not premultiplied; `alpha`: (F, H, W) matte; `composite`: (F, H, W, 3)
    the model's own composite. float32 numpy arrays in [0, 1] (torch tensors with `output_type="pt"`).
    """

    edit: Any
    alpha: Any
    composite: Any


def make_scheduler(name: str, flow_shift: float = 3.0, num_train_timesteps: int = 1000):
    """A flow-matching scheduler by name: `unipc` (Wan's default) or `euler`, with the given `flow_shift`."""
    if name == "unipc":
        return UniPCMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            num_train_timesteps=num_train_timesteps,
            flow_shift=flow_shift,
        )
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=flow_shift)
    raise ValueError(f"scheduler={name!r} is not known; expected one of {SCHEDULERS}")


def _cleans_up_after_call(call: Callable[..., Any]) -> Callable[..., Any]:
    """After every sampling call, also an interrupted or failed one: no stale trim, cache state or offload hooks."""

    @functools.wraps(call)
    def wrapper(self: "VeraPipeline", *args: Any, **kwargs: Any) -> Any:
        try:
            return call(self, *args, **kwargs)
        finally:
            self._trim = None
            self.maybe_free_model_hooks()

    return wrapper


class VeraPipeline(DiffusionPipeline):
    r"""Layered, content-preserving video editing with Vera.

    Components: `transformer` (`VeraTransformer3DModel`), `text_encoder` + `tokenizer` (a transformers T5-family
    encoder: umT5 for Wan checkpoints, a small T5 for tiny ones), `vae` (the latent codec: `AutoencoderKLWan`, or the
    lossless `SpaceToDepthCodec` of tiny checkpoints) and `scheduler` (a diffusers flow-matching scheduler).
    `native_height`, `native_width`, `native_frames` record what the checkpoint was trained at; the pipeline takes
    any size and frame count and pads to what the codec needs. `default_steps` and `default_guidance` are the
    sampling settings the checkpoint is meant to be used with (hosts show them as the defaults).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents", "composite_x0"]

    def __init__(
        self,
        transformer: VeraTransformer3DModel,
        text_encoder: Any,
        tokenizer: Any,
        vae: "AutoencoderKLWan | SpaceToDepthCodec",
        scheduler: "UniPCMultistepScheduler | FlowMatchEulerDiscreteScheduler",
        native_height: int = 480,
        native_width: int = 832,
        native_frames: int = 49,
        max_sequence_length: int = 512,
        default_steps: int = 50,
        default_guidance: float = 5.0,
        instruction_format: str = "text",
    ) -> None:
        super().__init__()
        if instruction_format not in INSTRUCTION_FORMATS:
            raise ValueError(
                f"instruction_format={instruction_format!r}; expected one of {INSTRUCTION_FORMATS} (model_index.json)"
            )
        self.register_modules(
            transformer=transformer,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            vae=vae,
            scheduler=scheduler,
        )
        self.register_to_config(
            native_height=native_height,
            native_width=native_width,
            native_frames=native_frames,
            max_sequence_length=max_sequence_length,
            default_steps=default_steps,
            default_guidance=default_guidance,
            instruction_format=instruction_format,
        )
        self._interrupt = False
        self._trim: tuple[int, int, int] | None = None

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: "str | os.PathLike[str]", **kwargs: Any
    ) -> "VeraPipeline":
        """Load a pipeline folder (`model_index.json` + component folders). Local folders only, safetensors only."""
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(
                f"{path!r} is not a Vera pipeline folder (no model_index.json). Vera Edit loads models from local "
                "folders only: pass a folder written by `save_pretrained`, `vera-engine convert-wan` or "
                "`vera-engine train`."
            )
        kwargs.setdefault("local_files_only", True)
        kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(path, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Properties the engine and hosts read

    @property
    def native_size(self) -> tuple[int, int]:
        """(height, width) the checkpoint was trained at."""
        return (self.config.native_height, self.config.native_width)

    @property
    def native_frames(self) -> int:
        """The frame window the checkpoint was trained at."""
        return self.config.native_frames

    @property
    def interrupt(self) -> bool:
        """Set to True (from a callback or another thread) to stop sampling before the next step."""
        return self._interrupt

    @interrupt.setter
    def interrupt(self, value: bool) -> None:
        self._interrupt = bool(value)

    @property
    def temporal_compression(self) -> int:
        """Frames per latent frame of the codec (Wan VAE: 4, first frame alone; space-to-depth: 1)."""
        if isinstance(self.vae, SpaceToDepthCodec):
            return 1
        return self.vae.config.scale_factor_temporal

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent pixel of the codec along height and width."""
        if isinstance(self.vae, SpaceToDepthCodec):
            return self.vae.spatial_compression
        return self.vae.config.scale_factor_spatial

    def use_scheduler(self, name: str, flow_shift: float | None = None) -> None:
        """Swap the sampler (`unipc` or `euler`), keeping the current flow shift unless one is given."""
        if flow_shift is None:
            config = self.scheduler.config
            flow_shift = config.get("flow_shift") if "flow_shift" in config else config.get("shift", 3.0)
        self.scheduler = make_scheduler(name, flow_shift, self.scheduler.config.num_train_timesteps)

    # ------------------------------------------------------------------------------------------------------------
    # Sizes the codec needs

    def padded_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The (frames, height, width) the input is padded to: what the codec and the patch size accept."""
        p_t, p_h, p_w = self.transformer.config.patch_size
        t = self.temporal_compression
        s = self.spatial_compression
        if t > 1:
            # Causal video VAE (Wan): frames = t·k + 1, and the latent frame count a multiple of p_t.
            latent_frames = -(-(frames - 1) // t) + 1
            latent_frames = -(-latent_frames // p_t) * p_t
            padded_frames = (latent_frames - 1) * t + 1
        else:
            padded_frames = -(-frames // p_t) * p_t
        padded_height = -(-height // (s * p_h)) * s * p_h
        padded_width = -(-width // (s * p_w)) * s * p_w
        return padded_frames, padded_height, padded_width

    @property
    def position_limits(self) -> tuple[int, int, int]:
        """(frames, height, width): the most one sampling window may span, padded, set by how far the transformer's
        rotary table reaches (`rope_max_seq_len` token positions along each axis)."""
        return position_reach(
            self.transformer.config.rope_max_seq_len,
            self.transformer.config.patch_size,
            self.temporal_compression,
            self.spatial_compression,
        )

    def _check_positions(self, frames: int, height: int, width: int, window_frames: int) -> None:
        """Refuse a window or frame size the rotary table does not cover, naming the limit (instead of a shape
        error deep inside the RoPE)."""
        max_frames, max_height, max_width = self.position_limits
        padded_frames, padded_height, padded_width = self.padded_shape(frames, height, width)
        reach = f"rope_max_seq_len {self.transformer.config.rope_max_seq_len} positions per axis"
        if padded_height > max_height or padded_width > max_width:
            raise ValueError(
                f"video is {width}x{height} pixels ({padded_width}x{padded_height} padded); this checkpoint's "
                f"positions reach at most {max_width}x{max_height} ({reach}): fit the video to the model's size "
                f"{self.native_size[1]}x{self.native_size[0]} first (the engine does)"
            )
        span = padded_frames if window_frames == 0 or frames <= window_frames else window_frames
        if self.padded_shape(span, height, width)[0] > max_frames:
            what = "the clip, sampled in one pass," if span == padded_frames else f"a window of {span} frames"
            raise ValueError(
                f"{what} spans more frames than this checkpoint's positions reach ({max_frames}; {reach}): "
                f"use window_frames <= {max_frames} (default: the checkpoint's {self.native_frames})"
            )

    # ------------------------------------------------------------------------------------------------------------
    # Encoders

    def encoder_text(self, prompt: str) -> str:
        """What the text encoder reads for `prompt`: the prompt itself, or its slot tokens for a checkpoint with
        `instruction_format="slots"` (models/instruction_slots.py)."""
        if self.config.get("instruction_format", "text") == "slots":
            from vera_engine.models.instruction_slots import instruction_to_slot_text

            return instruction_to_slot_text(prompt)
        return prompt

    def encode_prompt(self, prompt: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Text states `(1, max_sequence_length, text_dim)`, zero past the prompt's length (Wan's convention)."""
        return self.encode_prompts([prompt], device, dtype)

    def encode_prompts(
        self, prompts: Sequence[str], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """Text states `(len(prompts), max_sequence_length, text_dim)` from one batched encoder call (prompt and
        negative prompt together), each zero past its prompt's length."""
        length = self.config.max_sequence_length
        inputs = self.tokenizer(
            [self.encoder_text(prompt) for prompt in prompts],
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = inputs.input_ids, inputs.attention_mask
        seq_lens = mask.gt(0).sum(dim=1).tolist()
        encoder_device = self.text_encoder.device
        states = self.text_encoder(ids.to(encoder_device), mask.to(encoder_device)).last_hidden_state
        states = states.to(device=device, dtype=dtype)
        for row, seq_len in enumerate(seq_lens):
            states[row, seq_len:] = 0
        return states

    def text_states(
        self,
        prompt: str,
        negative_prompt: str | None,
        guidance: bool,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """`[cond]` or, with guidance, `[cond, uncond]` text states, from an LRU cache of the last
        `TEXT_CACHE_SIZE` prompts: a job's takes, and jobs that repeat an instruction, encode it once (umT5-XXL is
        11.4 GB of weights to run, and to move onto the device when it is swapped in). The key holds the
        encoder's identity and its parameters' version counters, so training the encoder invalidates it."""
        prompts = [prompt, negative_prompt or ""] if guidance else [prompt]
        encoder = self.text_encoder
        version = _weights_version(encoder)
        if version is None:
            return self.encode_prompts(prompts, device, dtype)
        key = (tuple(prompts), id(encoder), id(self.tokenizer), version, self.config.max_sequence_length)
        key += (str(device), dtype)
        cache = self.__dict__.setdefault("_text_cache", OrderedDict())
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        states = self.encode_prompts(prompts, device, dtype)
        cache[key] = states
        while len(cache) > TEXT_CACHE_SIZE:
            cache.popitem(last=False)
        return states

    def _encoded_video(self, array: Any, padded: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """`encode_video` of a source or mask array, remembered for the next call with the same content (a job's
        takes sample the same plate: its VAE encode is done once). One entry per kind of input, keyed by a digest
        of the array's bytes and the codec's identity and parameter versions."""
        values = np.ascontiguousarray(
            array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
        )
        codec = self.vae
        version = _weights_version(codec)
        if version is None:
            return self.encode_video(self._prepare_video(array, padded, device))
        digest = hashlib.blake2b(values.view(np.uint8).reshape(-1), digest_size=16).hexdigest()
        key = (digest, values.shape, str(values.dtype), padded, str(device), id(codec), version)
        cache = self.__dict__.setdefault("_video_cache", OrderedDict())
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        latents = self.encode_video(self._prepare_video(array, padded, device))
        cache[key] = latents
        while len(cache) > VIDEO_CACHE_SIZE:
            cache.popitem(last=False)
        return latents

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """`(B, 3, F, H, W)` video in [-1, 1] -> normalised latents `(B, C, f, h, w)`."""
        if isinstance(self.vae, SpaceToDepthCodec):
            return self.vae.encode(video.to(self.vae.dtype)).float()
        latents = self.vae.encode(video.to(self.vae.dtype)).latent_dist.mode().float()
        mean, std = self._wan_latent_stats(latents)
        return (latents - mean) / std

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> `(B, 3, F, H, W)` video in [-1, 1] (padded size)."""
        if isinstance(self.vae, SpaceToDepthCodec):
            return self.vae.decode(latents.to(self.vae.dtype)).float()
        mean, std = self._wan_latent_stats(latents)
        latents = latents.float() * std + mean
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0].float()

    def _decode_layers(
        self, latents: dict[str, torch.Tensor], layers: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Decode the `layers` asked for: edit and alpha in one batched codec call, the composite on its own (a
        batch of three would hold three clips' decoder activations at once).

        Under context parallelism every rank holds the same final latents: the decode units (edit + alpha, the
        composite; each layer on its own with three or more ranks) are shared out over the ranks and each decoded
        layer is broadcast from the rank that decoded it, so no rank repeats another's VAE work and every rank
        still returns all the layers asked for."""
        edit_alpha = [name for name in ("edit", "alpha") if name in layers]
        units = [unit for unit in (edit_alpha, ["composite"] if "composite" in layers else []) if unit]
        group = self._context_parallel_group()
        if group is None:
            return self._decode_units(latents, units)
        import torch.distributed as dist

        rank, world = group
        if world >= 3:
            units = [[name] for unit in units for name in unit]
        owner = {name: index % world for index, unit in enumerate(units) for name in unit}
        decoded = self._decode_units(
            latents, [unit for index, unit in enumerate(units) if index % world == rank]
        )
        for unit in units:
            for name in unit:
                mine = owner[name] == rank
                meta = [(tuple(decoded[name].shape), decoded[name].dtype) if mine else None]
                dist.broadcast_object_list(meta, src=owner[name])
                if not mine:
                    decoded[name] = torch.empty(meta[0][0], dtype=meta[0][1], device=latents[name].device)
                decoded[name] = decoded[name].contiguous()
                dist.broadcast(decoded[name], src=owner[name])
        return decoded

    def _decode_units(
        self, latents: dict[str, torch.Tensor], units: list[list[str]]
    ) -> dict[str, torch.Tensor]:
        decoded: dict[str, torch.Tensor] = {}
        for unit in units:
            video = self.decode_latents(torch.cat([latents[name] for name in unit]))
            decoded.update(zip(unit, video.chunk(len(unit)), strict=True))
        return decoded

    def _context_parallel_group(self) -> tuple[int, int] | None:
        """(rank, world size) when the transformer is split across processes (`enable_context_parallel`: one job
        over the whole process group), else None."""
        if getattr(self.transformer, "_parallel_config", None) is None:
            return None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return dist.get_rank(), dist.get_world_size()

    def _from_rank0(self, compute: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
        """`compute()` on this process, or under context parallelism on rank 0 only, broadcast to the others (the
        text encode and VAE encodes of a job are the same on every rank: one does them)."""
        group = self._context_parallel_group()
        if group is None:
            return compute()
        import torch.distributed as dist

        rank, _world = group
        tensor = compute().contiguous() if rank == 0 else None
        meta = [(tuple(tensor.shape), tensor.dtype) if tensor is not None else None]
        dist.broadcast_object_list(meta, src=0)
        if tensor is None:
            tensor = torch.empty(meta[0][0], dtype=meta[0][1], device=device)
        dist.broadcast(tensor, src=0)
        return tensor

    def _wan_latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, device=like.device, dtype=torch.float32).view(shape)
        std = torch.tensor(self.vae.config.latents_std, device=like.device, dtype=torch.float32).view(shape)
        return mean, std

    def decode_preview(
        self, composite_x0: torch.Tensor, frame: int | None = None, method: str = "auto"
    ) -> np.ndarray:
        """The predicted clean composite of a step (`callback_kwargs["composite_x0"]`) as (F, H, W, 3) in [0, 1].

        `frame`: preview only the latent frame that holds video frame `frame` and return that one frame (1, H, W, 3)
        (a preview shows one frame: decoding the whole clip at Wan size on every preview would cost a full VAE
        decode). With a temporally compressing codec it is that latent frame on its own, an approximation that is
        fine for a preview.

        `method`: "vae" decodes with the codec; "linear" projects the latent frame to RGB with
        `preview_projection` (no VAE: a few kernels, at the latent grid's resolution drawn at the frame's size);
        "auto" (default) is "linear" for one frame of the Wan VAE, "vae" otherwise (the space-to-depth codec's
        decode is itself a free rearrangement, and a whole-clip preview is asked for its exactness).
        """
        if self._trim is None:
            raise RuntimeError("decode_preview is for use inside a sampling call's step callback")
        if method not in ("auto", "vae", "linear"):
            raise ValueError(f"method={method!r}; expected 'auto', 'vae' or 'linear'")
        frames, height, width = self._trim
        if frame is not None and not 0 <= frame < frames:
            raise ValueError(f"frame={frame}; expected 0..{frames - 1}")
        if method == "auto":
            method = "linear" if frame is not None and not isinstance(self.vae, SpaceToDepthCodec) else "vae"
        if frame is None:
            if method == "linear":
                raise ValueError("method='linear' previews one frame: pass frame=")
            video = self.decode_latents(composite_x0)[:, :, :frames, :height, :width]
            return _to_frames_last((video + 1) / 2)[0].clamp(0, 1).float().cpu().numpy()
        t = self.temporal_compression
        # Wan's causal VAE keeps the first frame alone in latent 0, then t frames per latent.
        latent = frame if t == 1 else (0 if frame == 0 else (frame - 1) // t + 1)
        if method == "vae":
            video = self.decode_latents(composite_x0[:, :, latent : latent + 1])[:, :, :1, :height, :width]
            return _to_frames_last((video + 1) / 2)[0].clamp(0, 1).float().cpu().numpy()
        weight, bias = self.preview_projection()
        values = composite_x0[0, :, latent].float()  # C, h, w
        rgb = torch.einsum("oc,chw->ohw", weight.to(values.device), values) + bias.to(values.device).view(
            3, 1, 1
        )
        s = self.spatial_compression
        rgb = rgb.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)[:, :height, :width]
        return ((rgb.permute(1, 2, 0) + 1) / 2).clamp(0, 1)[None].cpu().numpy()

    def preview_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(weight (3, C), bias (3,))`: the least-squares linear map from a normalised latent pixel to the codec
        input colour ([-1, 1]) it came from, fitted once per codec (and its weights) by encoding a static test card
        of 64 random colour patches (2x2 latent pixels each) and reading which latents each colour gave."""
        codec = self.vae
        key = (id(codec), _weights_version(codec))
        cached = self.__dict__.get("_preview_projection")
        if cached is not None and cached[0] == key:
            return cached[1]
        s, t = self.spatial_compression, self.temporal_compression
        patch = 2 * s
        generator = torch.Generator().manual_seed(0)
        colours = torch.rand(3, 8, 8, generator=generator) * 2 - 1
        card = colours.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)  # 3, 8·patch, 8·patch
        # 1 + t frames: two latent frames of a causal video codec (the first frame alone, then t), one otherwise.
        frames = t + 1 if t > 1 else 1
        video = card[None, :, None].expand(1, 3, frames, -1, -1).to(self._execution_device)
        with torch.no_grad():
            latents = self.encode_video(video)
        # Every latent pixel of every latent frame sees one patch colour (the card is static).
        target = card[:, ::s, ::s]  # 3, h, w
        samples = latents[0].float().cpu().permute(1, 2, 3, 0).reshape(-1, latents.shape[1])  # f·h·w, C
        target = target[None].expand(latents.shape[2], -1, -1, -1).permute(0, 2, 3, 1).reshape(-1, 3)
        design = torch.cat([samples, torch.ones(len(samples), 1)], dim=1).double()
        # SVD-based (gelsd): the card makes some latent channels collinear, where the default driver goes wrong.
        solution = torch.linalg.lstsq(design, target.double(), driver="gelsd").solution.float()  # C + 1, 3
        projection = (solution[:-1].T.contiguous(), solution[-1].contiguous())
        self.__dict__["_preview_projection"] = (key, projection)
        return projection

    # ------------------------------------------------------------------------------------------------------------
    # Inputs

    def temporal_windows(
        self, latent_frames: int, window_frames: int, window_overlap: int
    ) -> list[tuple[int, int, torch.Tensor]]:
        """The latent-frame windows `(start, stop, blend weights)` a clip of `latent_frames` is sampled in.

        `window_frames` / `window_overlap` are in video frames (converted with the codec's temporal compression;
        0 frames: one window over the whole clip). Windows are evenly spread from the first frame to the last;
        weights ramp linearly across each overlap so that they sum to 1 there and neighbouring windows hand over
        gradually (where three windows meet, the ramps are normalised so the weights still sum to 1).
        """
        t = self.temporal_compression
        size = (window_frames - 1) // t + 1 if window_frames else latent_frames
        if latent_frames <= size:
            return [(0, latent_frames, torch.ones(latent_frames))]
        overlap = min(size - 1, -(-window_overlap // t))
        count = -(-(latent_frames - overlap) // (size - overlap))
        # Evenly spread starts from 0 to latent_frames - size: the overlaps come out at least `overlap` frames.
        starts = [round(k * (latent_frames - size) / (count - 1)) for k in range(count)]
        ramps = []
        for k, start in enumerate(starts):
            weight = torch.ones(size)
            if k > 0:
                shared = starts[k - 1] + size - start
                weight[:shared] = torch.minimum(weight[:shared], torch.arange(1, shared + 1) / (shared + 1))
            if k < count - 1:
                shared = start + size - starts[k + 1]
                tail = torch.arange(shared, 0, -1) / (shared + 1)
                weight[size - shared :] = torch.minimum(weight[size - shared :], tail)
            ramps.append(weight)
        # Normalised per frame: where several windows meet their weights sum to exactly 1.
        total = torch.zeros(latent_frames)
        for start, weight in zip(starts, ramps, strict=True):
            total[start : start + size] += weight
        return [
            (start, start + size, weight / total[start : start + size])
            for start, weight in zip(starts, ramps, strict=True)
        ]

    def check_inputs(
        self,
        video: Any,
        prompt: Any,
        mask: Any,
        negative_prompt: Any,
        num_inference_steps: Any,
        guidance_scale: Any,
        callback_on_step_end_tensor_inputs: Sequence[str],
        window_frames: Any = 0,
        window_overlap: Any = 0,
    ) -> None:
        """Raise `ValueError` naming the argument, its value and what is expected, including sizes and windows the
        transformer's rotary table does not reach (named with the limit, not a shape error inside the RoPE)."""
        if not isinstance(video, (np.ndarray, torch.Tensor)):
            raise ValueError(
                f"video must be a numpy array or torch tensor (F, H, W, 3), got {type(video).__name__}"
            )
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(
                f"video has shape {tuple(video.shape)}; expected (frames, height, width, 3) RGB in model space"
            )
        frames, height, width, _ = video.shape
        minimum = self.spatial_compression * max(self.transformer.config.patch_size[1:])
        if frames < 1 or height < minimum or width < minimum:
            raise ValueError(
                f"video has {frames} frames of {width}x{height}; expected at least 1 frame of at least "
                f"{minimum}x{minimum} pixels"
            )
        _check_range("video", video)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt={prompt!r}; expected a non-empty instruction such as 'add a red ball'")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt={negative_prompt!r}; expected a string or None")
        if mask is not None:
            if not isinstance(mask, (np.ndarray, torch.Tensor)):
                raise ValueError(f"mask must be a numpy array or torch tensor, got {type(mask).__name__}")
            shape = tuple(mask.shape)
            if shape not in ((frames, height, width), (frames, height, width, 1)):
                raise ValueError(
                    f"mask has shape {shape}; expected ({frames}, {height}, {width}) or ({frames}, {height}, "
                    f"{width}, 1), one value per pixel of video"
                )
            _check_range("mask", mask)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r}; expected an integer >= 1")
        if (
            not isinstance(guidance_scale, (int, float))
            or not np.isfinite(guidance_scale)
            or guidance_scale < 1
        ):
            raise ValueError(
                f"guidance_scale={guidance_scale!r}; expected a number >= 1 (1 turns classifier-free guidance off)"
            )
        unknown = [
            name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs
        ]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs has {unknown}; expected names from {self._callback_tensor_inputs}"
            )
        if not isinstance(window_frames, int) or window_frames < 0:
            raise ValueError(
                f"window_frames={window_frames!r}; expected frames per window (>= 1), or 0 for none"
            )
        if (
            not isinstance(window_overlap, int)
            or window_overlap < 0
            or (window_frames and window_overlap >= window_frames)
        ):
            raise ValueError(
                f"window_overlap={window_overlap!r}; expected 0 <= overlap < window_frames ({window_frames})"
            )
        self._check_positions(frames, height, width, window_frames)

    def _prepare_video(self, array: Any, padded: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        # (F, H, W, C) or (F, H, W) in [0, 1] -> (1, 3, F', H', W') in [-1, 1], padded by repeating edges.
        tensor = torch.as_tensor(np.asarray(array) if isinstance(array, np.ndarray) else array)
        tensor = tensor.to(device=device, dtype=torch.float32)
        if tensor.ndim == 3:
            tensor = tensor.unsqueeze(-1)
        tensor = codec_input(tensor.permute(3, 0, 1, 2).unsqueeze(0))
        frames, height, width = tensor.shape[2:]
        pad = (0, padded[2] - width, 0, padded[1] - height, 0, padded[0] - frames)
        if any(pad):
            tensor = F.pad(tensor, pad, mode="replicate")
        return tensor

    # ------------------------------------------------------------------------------------------------------------
    # Sampling

    @torch.no_grad()
    @_cleans_up_after_call
    def __call__(
        self,
        video: "np.ndarray | torch.Tensor",
        prompt: str,
        mask: "np.ndarray | torch.Tensor | None" = None,
        negative_prompt: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        callback_on_step_end: Callable[["VeraPipeline", int, torch.Tensor, dict[str, Any]], dict[str, Any]]
        | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        output_type: str = "np",
        return_dict: bool = True,
        window_frames: int | None = None,
        window_overlap: int | None = None,
        layers: Sequence[str] = LAYERS,
    ) -> "VeraPipelineOutput | tuple[Any, Any, Any]":
        """Generate the edit layer, its alpha matte and the composite for `video` as `prompt` asks.

        Args:
            video: (F, H, W, 3) float source video in model space (sRGB-encoded Rec.709, [0, 1]); any size and
                frame count: padded to what the codec needs and trimmed back.
            prompt: the instruction ("add a red ball rolling left to right").
            mask: optional (F, H, W) or (F, H, W, 1) mask video in [0, 1]; without one no mask tokens are added.
            negative_prompt: text for the unconditional pass of classifier-free guidance ("" when None).
            num_inference_steps: denoising steps (default: the checkpoint's `default_steps`).
            guidance_scale: classifier-free guidance weight; 1 runs a single pass per step (default: the
                checkpoint's `default_guidance`).
            generator: seeds the initial noise; the same seed gives the same result on the same device.
            callback_on_step_end: `fn(pipe, step_index, timestep, callback_kwargs) -> dict` after every step;
                `callback_kwargs` holds the names in `callback_on_step_end_tensor_inputs` (`latents`: the three
                layers stacked on channels; `composite_x0`: the predicted clean composite latents, see
                `decode_preview`). Returning `{"latents": ...}` replaces the latents.
            output_type: "np" (float32 numpy, frames last) or "pt" (torch tensors, frames last).
            window_frames: clips longer than this many frames (default: the checkpoint's `native_frames`; 0: never)
                are sampled as overlapping temporal windows of this length, denoised together: at every step each
                window's velocity is predicted on its own (the model sees clips of the length it was trained on)
                and the overlaps are blended with linear ramps before the scheduler steps the whole clip, so the
                windows agree where they meet instead of being stitched afterwards.
            window_overlap: frames shared by neighbouring windows (default: a quarter of `window_frames`, at least 1).
            layers: the layers to decode (default all three); the others come back as None. Each decode is a full
                VAE pass over the clip: a caller that does not read the model's composite saves one of three by
                leaving it out. The edit and the alpha are decoded together in one batched codec call.
        """
        if num_inference_steps is None:
            num_inference_steps = self.config.default_steps
        if guidance_scale is None:
            guidance_scale = self.config.default_guidance
        window_frames = self.native_frames if window_frames is None else window_frames
        if window_overlap is None and isinstance(window_frames, int):
            window_overlap = default_window_overlap(window_frames)
        self.check_inputs(
            video,
            prompt,
            mask,
            negative_prompt,
            num_inference_steps,
            guidance_scale,
            callback_on_step_end_tensor_inputs,
            window_frames=window_frames,
            window_overlap=window_overlap,
        )
        if output_type not in ("np", "pt"):
            raise ValueError(f"output_type={output_type!r}; expected 'np' or 'pt'")
        if isinstance(layers, str) or not layers or any(layer not in LAYERS for layer in layers):
            raise ValueError(f"layers={layers!r}; expected a non-empty sequence of names from {LAYERS}")
        self._interrupt = False
        device = self._execution_device
        dtype = self.transformer.dtype
        frames, height, width, _ = video.shape
        padded = self.padded_shape(frames, height, width)
        self._trim = (frames, height, width)
        do_cfg = guidance_scale > 1.0

        # 1. Text: conditional and (for guidance) unconditional states, batched as [cond, uncond] in one encoder
        # call, and kept for the next call with the same prompts
        # (under context parallelism rank 0 encodes and the other ranks receive the result)
        text = self._from_rank0(
            lambda: self.text_states(prompt, negative_prompt, do_cfg, device, dtype), device
        )

        # 2. Source and mask videos, encoded once (and kept for the next take of the same plate)
        source_latents = self._from_rank0(lambda: self._encoded_video(video, padded, device), device)
        mask_latents = None
        if mask is not None:
            mask_latents = self._from_rank0(lambda: self._encoded_video(mask, padded, device), device)

        # 3. Noise for the three layers, stacked on the channel axis so one scheduler steps them together
        channels = self.transformer.config.in_channels
        latents = randn_tensor(
            (1, 3 * channels, *source_latents.shape[2:]),
            generator=generator,
            device=device,
            dtype=torch.float32,
        )
        windows = self.temporal_windows(source_latents.shape[2], window_frames, window_overlap)
        window_weights = [weight.to(device) for _, _, weight in windows]
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # Steps are indexed from 0 on every call (sigmas[i] below relies on it).
        self.scheduler.set_begin_index(0)
        sigmas_on_device(self.scheduler, device)
        timesteps = self.scheduler.timesteps
        batch = 2 if do_cfg else 1
        source_in = source_latents.to(dtype).expand(batch, -1, -1, -1, -1)
        mask_in = None if mask_latents is None else mask_latents.to(dtype).expand(batch, -1, -1, -1, -1)

        # 4. Denoising loop
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self._interrupt:
                    raise VeraInterrupted(i, len(timesteps))
                model_input = latents.to(dtype).expand(batch, -1, -1, -1, -1)
                sigma = self.scheduler.sigmas[i].to(dtype=torch.float32)
                velocity = torch.zeros_like(latents)
                for index, ((start, stop, _), weight) in enumerate(zip(windows, window_weights, strict=True)):
                    if index and self._interrupt:
                        raise VeraInterrupted(i, len(timesteps))
                    edit_in, alpha_in, composite_in = model_input[:, :, start:stop].chunk(3, dim=1)
                    # One cache context per window: the conditional and unconditional passes run as one batched
                    # forward, and a step cache compares each window with itself on the previous step.
                    with self.transformer.cache_context(
                        "cond_uncond" if index == 0 else f"cond_uncond_{index}"
                    ):
                        out = self.transformer(
                            edit_latents=edit_in,
                            alpha_latents=alpha_in,
                            composite_latents=composite_in,
                            timestep=t.expand(batch).to(device),
                            encoder_hidden_states=text,
                            source_latents=source_in[:, :, start:stop],
                            mask_latents=None if mask_in is None else mask_in[:, :, start:stop],
                            return_dict=False,
                        )
                    window_velocity = torch.cat(out, dim=1).float()
                    if do_cfg:
                        conditional, unconditional = window_velocity.chunk(2)
                        window_velocity = unconditional + guidance_scale * (conditional - unconditional)
                    if len(windows) == 1:
                        velocity = window_velocity
                    else:
                        velocity[:, :, start:stop] += window_velocity * weight.view(1, 1, -1, 1, 1)

                # x_t = (1 - sigma) x_0 + sigma noise and v = noise - x_0, so x_0 = x_t - sigma v.
                composite_x0 = (latents - sigma * velocity).chunk(3, dim=1)[2]
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    available = {"latents": latents, "composite_x0": composite_x0}
                    callback_kwargs = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.get("latents", latents)
                progress_bar.update()

        # 5. Decode the layers asked for and trim the padding away
        decoded = self._decode_layers(dict(zip(LAYERS, latents.chunk(3, dim=1), strict=True)), layers)
        outputs: dict[str, Any] = dict.fromkeys(LAYERS)
        for name, layer in decoded.items():
            if name == "alpha":
                layer = layer.mean(dim=1, keepdim=True)
            layer = _to_frames_last((layer[:, :, :frames, :height, :width] + 1) / 2)[0].clamp(0, 1)
            outputs[name] = layer.cpu().numpy() if output_type == "np" else layer.cpu()
        edit_out, alpha_out, composite_out = (outputs[name] for name in LAYERS)
        if alpha_out is not None:
            alpha_out = alpha_out[..., 0]
        if not return_dict:
            return (edit_out, alpha_out, composite_out)
        return VeraPipelineOutput(edit=edit_out, alpha=alpha_out, composite=composite_out)


def _weights_version(module: Any) -> int | None:
    """The sum of a module's parameters' version counters (in-place updates bump them: an optimiser step, a
    `load_state_dict`), or None where they are not tracked (weights made under `torch.inference_mode`)."""
    try:
        return sum(parameter._version for parameter in module.parameters())
    except RuntimeError:
        return None


def sigmas_on_device(scheduler: Any, device: torch.device) -> None:
    """Move a flow-matching scheduler's sigmas onto the sampling device once, after `set_timesteps`.

    diffusers keeps them on the CPU ("to avoid too much CPU/GPU communication"), but UniPC then copies single
    sigmas to the device about 7 times a step (`self.sigmas[i].to(device)` in its predictor and corrector) and the
    pipeline once more: small copies that each wait on the host. On the device those `.to` calls are no-ops. The
    schedule's arithmetic then runs on the device, which on a GPU can differ from the CPU's in the last bit of a
    sigma-derived coefficient (on a CPU nothing changes).
    """
    scheduler.sigmas = scheduler.sigmas.to(device)


def _to_frames_last(video: torch.Tensor) -> torch.Tensor:
    # (B, C, F, H, W) -> (B, F, H, W, C)
    return video.permute(0, 2, 3, 4, 1)


def _check_range(name: str, array: Any) -> None:
    values = torch.as_tensor(np.asarray(array) if isinstance(array, np.ndarray) else array)
    if not values.is_floating_point():
        raise ValueError(f"{name} has dtype {values.dtype}; expected float values in [0, 1]")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contains NaN or Inf; expected finite values in [0, 1]")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 1:
        raise ValueError(
            f"{name} has values in [{low:.4g}, {high:.4g}]; expected [0, 1] model space "
            "(convert scene-linear plates with vera_engine.imaging.colour first)"
        )
