# Vera: a layered diffusion model for content-preserving video editing (Netflix & Caltech, 2026).
#
# A Mixture-of-Transformers of three Wan2.1 DiTs -- edit, alpha, composite -- that attend to each other. Every
# branch keeps the full set of Wan weights (patch embedding, time/text embedder, blocks with their own QKV, norms,
# cross-attention and FFN, output norm and projection); the only thing they share is one self-attention call over
# the concatenation of their tokens (paper §3.1.2, App. A.2).
#
# The blocks are diffusers' own `WanTransformerBlock`s, so a Wan state dict loads into each branch by a plain key
# mapping (`wan_key_to_vera`), and every branch run alone is exactly `WanTransformer3DModel`. Only the joint block
# forward is written here: it is the one thing diffusers lacks.

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.loaders import PeftAdapterMixin
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import (
    WanRotaryPosEmbed,
    WanTimeTextImageEmbedding,
    WanTransformer3DModel,
    WanTransformerBlock,
    _get_qkv_projections,
)
from diffusers.utils import BaseOutput

BRANCHES: tuple[str, ...] = ("edit", "alpha", "composite")
"""The three layers Vera generates, in the order their tokens are concatenated for joint attention."""

# Vera-only parameters: they have no counterpart in a Wan checkpoint and start at zero (paper App. A.2).
VERA_ONLY_PARAMETERS: tuple[str, ...] = (
    "source_embedding.weight",
    "source_embedding.bias",
    "mask_embedding.weight",
    "mask_embedding.bias",
    "alpha_layer_embedding",
    "composite_layer_embedding",
)


def wan_key_to_vera(key: str, branch: str) -> str:
    """Map a `WanTransformer3DModel` state-dict key to the same weight of one Vera branch.

    `blocks.7.attn1.to_q.weight` -> `blocks.7.edit.attn1.to_q.weight`; everything outside the blocks
    (`patch_embedding.*`, `condition_embedder.*`, `norm_out`, `proj_out.*`, `scale_shift_table`) lives in
    `branches.<branch>.*`.
    """
    if branch not in BRANCHES:
        raise ValueError(f"branch={branch!r} is not a Vera branch; expected one of {BRANCHES}")
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        return f"blocks.{index}.{branch}.{rest}"
    return f"branches.{branch}.{key}"


def apply_rotary_emb(
    hidden_states: torch.Tensor,
    freqs_cos: torch.Tensor,
    freqs_sin: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Wan's interleaved rotary embedding (same arithmetic as `WanAttnProcessor`, so branches match Wan exactly).

    `out`: where to write the result (a slice of the joint attention's q/k/v buffer); its dtype is the result's.
    """
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    if out is None:
        out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


# Frequencies (in multiples of pi, per axis) of the frame-position features: a period of 2 frame widths down to a
# quarter frame, so "left half", "top-left corner" and a stripe's phase are all a linear read-out.
FRAME_POSITION_FREQUENCIES: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)


def frame_position_features(grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Fourier features of each token's place in the clip, as fractions of it: `(f·h·w, 6 · len(FREQUENCIES))`.

    Token centres are normalised to (0, 1) along time, height and width, so the features mean the same thing at
    every resolution and clip length the model samples at ("the upper half" is y < 0.5 whatever the size).
    """
    axes = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n for n in grid]
    t, y, x = torch.meshgrid(*axes, indexing="ij")
    coordinates = torch.stack([t, y, x], dim=-1).reshape(-1, 3, 1)  # seq_len, 3, 1
    angles = coordinates * torch.tensor(FRAME_POSITION_FREQUENCIES, device=device) * math.pi
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)


class VeraBranchEmbeddingsAndHead(nn.Module):
    """The parts of one Wan model outside its blocks: patch embedding, time/text embedder, output norm and head.

    Attribute names are Wan's, so `WanTransformer3DModel` weights load here unchanged.
    """

    def __init__(
        self,
        inner_dim: int,
        in_channels: int,
        out_channels: int,
        patch_size: tuple[int, int, int],
        freq_dim: int,
        text_dim: int,
        eps: float,
        frame_position_embedding: bool = False,
    ) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        if frame_position_embedding:
            self.frame_position_embedding = nn.Linear(6 * len(FRAME_POSITION_FREQUENCIES), inner_dim)
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim=inner_dim, time_freq_dim=freq_dim, time_proj_dim=inner_dim * 6, text_embed_dim=text_dim
        )
        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)


class VeraMoTBlock(nn.Module):
    """One layer of the Mixture-of-Transformers: a `WanTransformerBlock` per branch, one joint self-attention.

    Each branch modulates, projects (QKV), normalises and rotates its own tokens with its own weights; the queries,
    keys and values of all branches are concatenated along the sequence and attended in a single
    `dispatch_attention_fn` call (so flash / sage / cuDNN backends and context parallelism apply); the result is split
    back and each branch finishes with its own output projection, cross-attention to the text and FFN.
    """

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        qk_norm: str | None,
        cross_attn_norm: bool,
        eps: float,
    ) -> None:
        super().__init__()
        self.edit = WanTransformerBlock(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps)
        self.alpha = WanTransformerBlock(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps)
        self.composite = WanTransformerBlock(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps)

    def joint_self_attention(
        self,
        norm_hidden_states: list[torch.Tensor],
        branches: tuple[str, ...],
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
    ) -> list[torch.Tensor]:
        """Self-attention over the concatenated tokens of `branches`; returns each branch's projected output.

        Each branch's rotated queries and keys and its values are written straight into one preallocated
        `(3, batch, heads, num_branches * seq_len, head_dim)` buffer, so the joint q/k/v exist once (not as
        per-branch tensors plus their concatenation: ~1-2 GB at 49 frames of Vera-1.3B), in the heads-first
        layout torch's SDPA kernels take, so the `permute(...).contiguous()` of diffusers' `native` / cuDNN
        backends copies nothing; they are handed over as `(batch, tokens, heads, head_dim)` views, the dispatch
        convention (the last dimension stays contiguous, as flash-attn requires). The buffer has the
        values' dtype: under autocast the RMS-normed queries and keys come out float32 (torch >= 2.12 runs
        RMSNorm in float32 there) and are cast to the values' bfloat16 as they are written, which is what the
        fused attention kernels (cuDNN, flash, sage) require of all three.
        """
        seq_len = norm_hidden_states[0].shape[1]
        qkv: torch.Tensor | None = None
        for index, (name, hidden_states) in enumerate(zip(branches, norm_hidden_states, strict=True)):
            attn = getattr(self, name).attn1
            query, key, value = _get_qkv_projections(attn, hidden_states, None)
            query = attn.norm_q(query)
            key = attn.norm_k(key)
            # batch, seq_len, heads, head_dim
            query = query.unflatten(2, (attn.heads, -1))
            key = key.unflatten(2, (attn.heads, -1))
            value = value.unflatten(2, (attn.heads, -1))
            if qkv is None:
                batch, _, heads, head_dim = value.shape
                qkv = value.new_empty(3, batch, heads, len(branches) * seq_len, head_dim).transpose(2, 3)
            rows = slice(index * seq_len, (index + 1) * seq_len)
            # All layers share the same RoPE positions: token i of every branch is the same place in the video.
            apply_rotary_emb(query, *rotary_emb, out=qkv[0, :, rows])
            apply_rotary_emb(key, *rotary_emb, out=qkv[1, :, rows])
            qkv[2, :, rows] = value
        assert qkv is not None
        # batch, num_branches * seq_len, heads, head_dim (views of the heads-first buffer)
        query, key, value = qkv.unbind(0)

        # The backend and the context-parallel config are set on the branches' processors by diffusers
        # (`set_attention_backend`, `enable_parallelism`); they are the same on every branch, so read the first.
        processor = getattr(self, branches[0]).attn1.processor
        # batch, num_branches * seq_len, heads, head_dim
        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=None,
            dropout_p=0.0,
            is_causal=False,
            backend=processor._attention_backend,
            parallel_config=processor._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3).type_as(value)

        outputs = []
        for name, branch_states in zip(branches, hidden_states.split(seq_len, dim=1), strict=True):
            attn = getattr(self, name).attn1
            outputs.append(attn.to_out[1](attn.to_out[0](branch_states)))
        return outputs

    @staticmethod
    def masked_cross_attention(
        attn: nn.Module, hidden_states: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Wan's cross-attention (`WanAttnProcessor` without image context) leaving out the masked text positions.

        Always through torch's SDPA (diffusers' `native` backend): flash, sage and ring backends take no mask, and
        attending a few dozen text tokens costs little next to the joint self-attention, which keeps its backend.
        """
        query, key, value = _get_qkv_projections(attn, hidden_states, text)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        out = dispatch_attention_fn(
            query, key, value, attn_mask=text_mask, backend=AttentionBackendName.NATIVE
        )
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        branches: tuple[str, ...] = BRANCHES,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # text_mask: None (attend to every text position, Wan's way) or batch, 1, 1, text_len booleans
        # hidden_states: batch, num_branches, seq_len, inner_dim
        # encoder_hidden_states: batch, num_branches, text_len, inner_dim (each branch embeds the text itself)
        # temb: batch, num_branches, 6, inner_dim
        inputs, gates, norm_hidden_states = [], [], []
        for index, name in enumerate(branches):
            block = getattr(self, name)
            states = hidden_states[:, index]
            shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
                block.scale_shift_table + temb[:, index].float()
            ).chunk(6, dim=1)
            inputs.append(states)
            gates.append((gate_msa, c_shift_msa, c_scale_msa, c_gate_msa))
            norm_hidden_states.append(
                (block.norm1(states.float()) * (1 + scale_msa) + shift_msa).type_as(states)
            )

        # 1. Joint self-attention across the branches
        attn_outputs = self.joint_self_attention(norm_hidden_states, branches, rotary_emb)

        outputs = []
        for index, name in enumerate(branches):
            block = getattr(self, name)
            states = inputs[index]
            gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = gates[index]
            states = (states.float() + attn_outputs[index] * gate_msa).type_as(states)

            # 2. Cross-attention to the text, per branch
            norm_states = block.norm2(states.float()).type_as(states)
            if text_mask is None:
                states = states + block.attn2(norm_states, encoder_hidden_states[:, index], None, None)
            else:
                states = states + self.masked_cross_attention(
                    block.attn2, norm_states, encoder_hidden_states[:, index], text_mask
                )

            # 3. Feed-forward, per branch
            norm_states = (block.norm3(states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(states)
            ff_output = block.ffn(norm_states)
            states = (states.float() + ff_output.float() * c_gate_msa).type_as(states)
            outputs.append(states)
        return torch.stack(outputs, dim=1)


# diffusers' block-level caches (FirstBlockCache, MagCache) look blocks up here to know what a block returns.
TransformerBlockRegistry.register(
    VeraMoTBlock,
    TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None),
)


@dataclass
class VeraTransformerOutput(BaseOutput):
    """Flow-matching velocities (diffusers convention: noise - data) for the three layers, each (B, C, F, H, W)."""

    edit: torch.Tensor
    alpha: torch.Tensor
    composite: torch.Tensor


# PeftAdapterMixin: diffusers' adapter API (LoRA training and serving, training/lora.py).
class VeraTransformer3DModel(ModelMixin, ConfigMixin, CacheMixin, AttentionMixin, PeftAdapterMixin):
    r"""The Vera Mixture-of-Transformers: three Wan2.1 DiTs (edit, alpha, composite) with joint self-attention.

    The constructor's arguments are the config and mean what they mean for `WanTransformer3DModel` (one branch has
    exactly a Wan model's shape), plus two switches for small checkpoints trained from scratch, both off by default
    so that a model built from Wan stays exactly Wan: `mask_text_padding` (see `text_padding_mask`) and
    `frame_position_embedding`.

    `frame_position_embedding`: Wan's tokens know where they are only relative to each other (RoPE); a pretrained
    Wan has learned the frame's edges from billions of videos, a tiny model trained from scratch has not, and
    "in the upper half", "moving left to right" or "a gradient from red on the left" need the absolute place.
    With it, each branch adds a learned projection (zero at initialisation, so adding it to a trained model changes
    nothing until it trains) of `frame_position_features`, the token's place as a fraction of the clip.

    Conditioning (paper App. A.2): the source video latents go through `source_embedding` and are **added to the
    composite tokens**; the optional mask latents (the mask encoded as a 3-channel grey video) go through
    `mask_embedding` and are **added to the noisy alpha tokens**. Both start at zero, as do the learnable
    `alpha_layer_embedding` / `composite_layer_embedding` that let the branches tell the layers apart.

    Without a mask (`mask_latents=None`) no mask tokens are added at all: the alpha tokens are exactly the noisy
    alpha latents' patch embedding plus the layer embedding. Training's mask dropout does the same per sample
    (`mask_keep`), so "no mask" at inference is the state the model was trained for, not a zero video.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = [
        "patch_embedding",
        "condition_embedder",
        "norm",
        "source_embedding",
        "mask_embedding",
    ]
    _no_split_modules = ["VeraMoTBlock"]
    _keep_in_fp32_modules = ["rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]
    _keys_to_ignore_on_load_unexpected = ["norm_added_q"]
    _repeated_blocks = ["VeraMoTBlock"]
    # Context parallelism: every layer's tokens are split along the sequence (dim 2 of the stacked
    # batch, layer, seq_len, dim states). The joint attention has no mask and applies RoPE before dispatch, so
    # Ulysses and ring attention over the concatenation of the local chunks give the same result.
    _cp_plan = {
        "rope": {
            0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
            1: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
        },
        "blocks.0": {"hidden_states": ContextParallelInput(split_dim=2, expected_dims=4, split_output=False)},
        **{f"branches.{b}.proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3) for b in BRANCHES},
    }

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 12,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 8960,
        num_layers: int = 30,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        rope_max_seq_len: int = 1024,
        mask_text_padding: bool = False,
        frame_position_embedding: bool = False,
        frame_position_init_std: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels
        patch_size = tuple(patch_size)

        # 1. Positions (shared by all layers) and the per-branch embeddings and heads
        self.rope = WanRotaryPosEmbed(attention_head_dim, patch_size, rope_max_seq_len)
        self.branches = nn.ModuleDict(
            {
                name: VeraBranchEmbeddingsAndHead(
                    inner_dim,
                    in_channels,
                    out_channels,
                    patch_size,
                    freq_dim,
                    text_dim,
                    eps,
                    frame_position_embedding,
                )
                for name in BRANCHES
            }
        )

        # 2. Vera's conditioning and layer identity, all zero at initialisation
        self.source_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        self.mask_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        self.alpha_layer_embedding = nn.Parameter(torch.zeros(1, 1, inner_dim))
        self.composite_layer_embedding = nn.Parameter(torch.zeros(1, 1, inner_dim))
        self.zero_vera_only_parameters()
        if frame_position_embedding and frame_position_init_std > 0:
            # A model trained from scratch with the embedding starts with it at a useful scale: zero-initialised
            # on top of a trained model it stayed at 4-8 % of the token's size (docs/TINY_MODEL.md).
            for name in BRANCHES:
                nn.init.normal_(
                    self.branches[name].frame_position_embedding.weight, std=frame_position_init_std
                )

        # 3. Mixture-of-Transformers blocks
        self.blocks = nn.ModuleList(
            [
                VeraMoTBlock(inner_dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps)
                for _ in range(num_layers)
            ]
        )
        self.gradient_checkpointing = False

    @property
    def attention_backend(self) -> str:
        """The diffusers attention backend the joint attention dispatches to (`set_attention_backend` sets it)."""
        backend = self.blocks[0].edit.attn1.processor._attention_backend
        if backend is None:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry

            backend = _AttentionBackendRegistry.get_active_backend()[0]
        return getattr(backend, "value", backend)

    def enable_group_offload(self, *args: Any, offload_type: str = "block_level", **kwargs: Any) -> None:
        """diffusers group offloading, `block_level` only: Vera calls its branch modules' parts, not their
        `forward`, so leaf-level hooks would never move some parameters onto the device."""
        if offload_type != "block_level":
            raise ValueError(
                f"offload_type={offload_type!r}: VeraTransformer3DModel supports block_level group offloading only "
                "(each VeraMoTBlock moves as a whole); use offload_type='block_level'"
            )
        super().enable_group_offload(*args, offload_type=offload_type, **kwargs)

    @torch.no_grad()
    def zero_vera_only_parameters(self) -> None:
        """Reset the source/mask patch embeddings, the layer embeddings and the frame-position projections (when
        the model has them) to zero: their initial state."""
        for name in VERA_ONLY_PARAMETERS:
            self.get_parameter(name).zero_()
        for name in BRANCHES:
            projection = getattr(self.branches[name], "frame_position_embedding", None)
            if projection is not None:
                projection.weight.zero_()
                projection.bias.zero_()

    def _embed_tokens(self, branch: str, latents: torch.Tensor) -> torch.Tensor:
        """A branch's patch embedding of `latents`, plus its frame-position embedding when the model has one."""
        branch_io = self.branches[branch]
        tokens = self._patchify(branch_io.patch_embedding, latents)
        if self.config.frame_position_embedding:
            p_t, p_h, p_w = self.config.patch_size
            grid = (latents.shape[2] // p_t, latents.shape[3] // p_h, latents.shape[4] // p_w)
            features = frame_position_features(grid, tokens.device).to(
                branch_io.frame_position_embedding.weight.dtype
            )
            tokens = tokens + branch_io.frame_position_embedding(features).to(tokens.dtype)
        return tokens

    # ------------------------------------------------------------------------------------------------------------
    # Construction from Wan

    @classmethod
    def from_wan(
        cls,
        wan: "WanTransformer3DModel | str | os.PathLike[str]",
        torch_dtype: torch.dtype | None = None,
    ) -> "VeraTransformer3DModel":
        """Initialise all three branches from one diffusers-format Wan2.1 text-to-video transformer.

        `wan` is a `WanTransformer3DModel` or a local folder holding one (`config.json` + safetensors). Every branch
        gets its own copy of the Wan weights; the Vera-only parameters start at zero, so the fresh model ignores the
        source and mask exactly and each branch alone reproduces Wan.
        """
        if not isinstance(wan, WanTransformer3DModel):
            path = os.fspath(wan)
            if not os.path.isdir(path):
                raise FileNotFoundError(
                    f"wan={path!r} is not a folder; expected a local diffusers-format WanTransformer3DModel folder "
                    "(config.json + diffusion_pytorch_model*.safetensors), or the transformer/ subfolder of a Wan "
                    "pipeline"
                )
            # The dtype at load (not a cast afterwards) keeps Wan's fp32 modules in fp32, as diffusers does.
            wan = WanTransformer3DModel.from_pretrained(
                path, local_files_only=True, use_safetensors=True, dtype=torch_dtype
            )

        wan_config = dict(wan.config)
        unsupported = {
            key: wan_config.get(key)
            for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
            if wan_config.get(key) is not None
        }
        if unsupported:
            raise ValueError(
                f"from_wan needs a Wan2.1 text-to-video transformer, but this one has {unsupported} "
                "(an image-to-video model). Use the T2V checkpoint of the same size."
            )
        config = {key: wan_config[key] for key in cls._init_signature_keys() if key in wan_config}
        if torch_dtype is None:
            torch_dtype = wan.dtype

        # Build on the meta device and assign copied tensors: a 14B Wan makes a 42B Vera, so random initialisation
        # of weights that are overwritten at once would cost minutes and a second copy of memory.
        with torch.device("meta"):
            model = cls(**config)
        wan_state = wan.state_dict()
        keep_fp32 = set(cls._keep_in_fp32_modules)

        def dtype_of(key: str, tensor: torch.Tensor) -> torch.dtype:
            # Norms, time embedder and modulation tables stay fp32 in a bf16 model, exactly as in Wan.
            return torch.float32 if keep_fp32.intersection(key.split(".")) else torch_dtype

        state = {
            wan_key_to_vera(key, branch): tensor.detach().to(dtype=dtype_of(key, tensor), copy=True)
            for branch in BRANCHES
            for key, tensor in wan_state.items()
        }
        for name in VERA_ONLY_PARAMETERS:
            state[name] = torch.zeros(model.get_parameter(name).shape, dtype=torch_dtype)
        model.load_state_dict(state, strict=True, assign=True)
        # Non-persistent RoPE tables are not in any state dict: rebuild them off the meta device.
        model.rope = WanRotaryPosEmbed(
            model.config.attention_head_dim, tuple(model.config.patch_size), model.config.rope_max_seq_len
        )
        return model.to(device=wan.device)

    @classmethod
    def _init_signature_keys(cls) -> list[str]:
        import inspect

        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    def branch_state_dict(self, branch: str) -> dict[str, torch.Tensor]:
        """One branch's weights under `WanTransformer3DModel` names (loads into a Wan model of the same config)."""
        if branch not in BRANCHES:
            raise ValueError(f"branch={branch!r} is not a Vera branch; expected one of {BRANCHES}")
        out: dict[str, torch.Tensor] = {}
        block_marker = f".{branch}."
        for key, tensor in self.state_dict().items():
            if key.startswith(f"branches.{branch}."):
                out[key[len(f"branches.{branch}.") :]] = tensor
            elif key.startswith("blocks.") and block_marker in key:
                index, rest = key[len("blocks.") :].split(block_marker, 1)
                out[f"blocks.{index}.{rest}"] = tensor
        return out

    # ------------------------------------------------------------------------------------------------------------
    # Forward

    def _patchify(self, embedding: nn.Conv3d, latents: torch.Tensor) -> torch.Tensor:
        # batch, inner_dim, f, h, w -> batch, seq_len, inner_dim
        return embedding(latents.to(embedding.weight.dtype)).flatten(2).transpose(1, 2)

    def _embed_conditions(
        self, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, branches: tuple[str, ...]
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        temb, timestep_proj, text = [], [], []
        for name in branches:
            branch_temb, branch_proj, branch_text, _ = self.branches[name].condition_embedder(
                timestep, encoder_hidden_states
            )
            temb.append(branch_temb)
            timestep_proj.append(branch_proj.unflatten(1, (6, -1)))  # batch, 6, inner_dim
            text.append(branch_text)
        # batch, num_branches, 6, inner_dim / batch, num_branches, text_len, inner_dim
        return temb, torch.stack(timestep_proj, dim=1), torch.stack(text, dim=1)

    def _run_blocks(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep_proj: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        branches: tuple[str, ...],
        text_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(
                    block,
                    hidden_states,
                    encoder_hidden_states,
                    timestep_proj,
                    rotary_emb,
                    branches,
                    text_mask,
                )
            else:
                hidden_states = block(
                    hidden_states, encoder_hidden_states, timestep_proj, rotary_emb, branches, text_mask
                )
        return hidden_states

    def text_padding_mask(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor | None:
        """`(B, 1, 1, text_len)` True where the cross-attention may look, or None to look everywhere (Wan).

        With `mask_text_padding` the padding is left out: positions whose text state is exactly zero, which is
        how the pipeline (like Wan) pads a prompt. Wan attends to that padding, and a pretrained Wan has learned
        to; a small model trained from scratch learns instead to park its cross-attention there, where the text
        cannot steer it (docs/TINY_MODEL.md).
        """
        if not self.config.mask_text_padding:
            return None
        present = encoder_hidden_states.abs().amax(dim=-1) > 0
        present = present | ~present.any(dim=1, keepdim=True)  # an all-zero text keeps every position
        return present[:, None, None, :]

    def _head(
        self, name: str, hidden_states: torch.Tensor, temb: torch.Tensor, grid: tuple[int, ...]
    ) -> torch.Tensor:
        branch_io = self.branches[name]
        batch_size = hidden_states.shape[0]
        post_patch_num_frames, post_patch_height, post_patch_width = grid
        p_t, p_h, p_w = self.config.patch_size
        shift, scale = (branch_io.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden_states = (branch_io.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(
            hidden_states
        )
        hidden_states = branch_io.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(
            batch_size, post_patch_num_frames, post_patch_height, post_patch_width, p_t, p_h, p_w, -1
        )
        hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _check_latents(self, name: str, latents: torch.Tensor, reference: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.config.in_channels:
            raise ValueError(
                f"{name} has shape {tuple(latents.shape)}; expected (batch, {self.config.in_channels}, frames, "
                "height, width) latents"
            )
        if latents.shape[0] != reference.shape[0] or latents.shape[2:] != reference.shape[2:]:
            raise ValueError(
                f"{name} has shape {tuple(latents.shape)} but edit_latents has {tuple(reference.shape)}; all layer, "
                "source and mask latents must share batch, frames, height and width"
            )
        p_t, p_h, p_w = self.config.patch_size
        if latents.shape[2] % p_t or latents.shape[3] % p_h or latents.shape[4] % p_w:
            raise ValueError(
                f"{name} has latent size {tuple(latents.shape[2:])}; frames, height and width must be multiples of "
                f"the patch size {tuple(self.config.patch_size)}"
            )

    def forward(
        self,
        edit_latents: torch.Tensor,
        alpha_latents: torch.Tensor,
        composite_latents: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        source_latents: torch.Tensor,
        mask_latents: torch.Tensor | None = None,
        mask_keep: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> "VeraTransformerOutput | tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
        """Predict the velocities of the three noisy layers.

        Args:
            edit_latents, alpha_latents, composite_latents: noisy latents `(B, C, F, H, W)` of each layer.
            timestep: `(B,)` diffusion timesteps (0..1000, the scheduler's scale), shared by all layers.
            encoder_hidden_states: `(B, text_len, text_dim)` text-encoder states; each branch projects them itself.
            source_latents: `(B, C, F, H, W)` latents of the source video (added to the composite tokens).
            mask_latents: optional `(B, C, F, H, W)` latents of the mask video (added to the alpha tokens).
            mask_keep: optional `(B,)` 0/1 per sample: 0 drops that sample's mask (training's mask dropout).
            attention_kwargs: accepted for diffusers pipeline compatibility; Vera has no LoRA scale to apply.
        """
        for name, latents in (
            ("alpha_latents", alpha_latents),
            ("composite_latents", composite_latents),
            ("source_latents", source_latents),
            ("mask_latents", mask_latents),
        ):
            if latents is not None:
                self._check_latents(name, latents, edit_latents)
        self._check_latents("edit_latents", edit_latents, edit_latents)
        if timestep.ndim != 1:
            raise ValueError(f"timestep has shape {tuple(timestep.shape)}; expected (batch,)")

        p_t, p_h, p_w = self.config.patch_size
        _, _, num_frames, height, width = edit_latents.shape
        grid = (num_frames // p_t, height // p_h, width // p_w)
        rotary_emb = self.rope(edit_latents)

        # 1. Patch embedding per layer, plus Vera's conditions and layer identities
        edit_tokens = self._embed_tokens("edit", edit_latents)
        alpha_tokens = self._embed_tokens("alpha", alpha_latents)
        alpha_tokens = alpha_tokens + self.alpha_layer_embedding
        if mask_latents is not None:
            mask_tokens = self._patchify(self.mask_embedding, mask_latents)
            if mask_keep is not None:
                mask_tokens = mask_tokens * mask_keep.to(mask_tokens.dtype).view(-1, 1, 1)
            alpha_tokens = alpha_tokens + mask_tokens
        composite_tokens = self._embed_tokens("composite", composite_latents)
        composite_tokens = composite_tokens + self.composite_layer_embedding
        composite_tokens = composite_tokens + self._patchify(self.source_embedding, source_latents)
        # batch, 3, seq_len, inner_dim
        hidden_states = torch.stack([edit_tokens, alpha_tokens, composite_tokens], dim=1).contiguous()

        # 2. Time and text embeddings, each branch with its own embedder
        temb, timestep_proj, text = self._embed_conditions(timestep, encoder_hidden_states, BRANCHES)

        # 3. Mixture-of-Transformers blocks
        text_mask = self.text_padding_mask(encoder_hidden_states)
        hidden_states = self._run_blocks(hidden_states, text, timestep_proj, rotary_emb, BRANCHES, text_mask)

        # 4. Output norm, projection and unpatchify, per branch
        edit, alpha, composite = (
            self._head(name, hidden_states[:, index], temb[index], grid)
            for index, name in enumerate(BRANCHES)
        )
        if not return_dict:
            return (edit, alpha, composite)
        return VeraTransformerOutput(edit=edit, alpha=alpha, composite=composite)

    def forward_branch(
        self,
        branch: str,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
    ) -> torch.Tensor:
        """Run one branch on its own tokens alone, as the Wan model it is (plus its layer embedding).

        With the layer embedding at zero (a fresh `from_wan` model) this is `WanTransformer3DModel.forward` of the
        Wan weights it was built from; it goes through the same joint-attention code as the full model.
        """
        if branch not in BRANCHES:
            raise ValueError(f"branch={branch!r} is not a Vera branch; expected one of {BRANCHES}")
        self._check_latents("hidden_states", hidden_states, hidden_states)
        p_t, p_h, p_w = self.config.patch_size
        _, _, num_frames, height, width = hidden_states.shape
        grid = (num_frames // p_t, height // p_h, width // p_w)
        rotary_emb = self.rope(hidden_states)
        tokens = self._embed_tokens(branch, hidden_states)
        if branch != "edit":
            tokens = tokens + getattr(self, f"{branch}_layer_embedding")
        temb, timestep_proj, text = self._embed_conditions(timestep, encoder_hidden_states, (branch,))
        tokens = self._run_blocks(
            tokens.unsqueeze(1).contiguous(),
            text,
            timestep_proj,
            rotary_emb,
            (branch,),
            self.text_padding_mask(encoder_hidden_states),
        )
        return self._head(branch, tokens[:, 0], temb[0], grid)


def with_frame_position_embedding(model: VeraTransformer3DModel) -> VeraTransformer3DModel:
    """A copy of `model` with frame-position embeddings added (zero, so it computes exactly what `model` does)."""
    # A keyword, not an edited config dict: diffusers resets the keys a loaded config.json lacked to their defaults.
    new = VeraTransformer3DModel.from_config(model.config, frame_position_embedding=True)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any("frame_position_embedding" not in key for key in missing):
        raise ValueError(f"cannot add frame-position embeddings: missing {missing}, unexpected {unexpected}")
    return new.to(device=model.device, dtype=model.dtype)
