"""Tensor names of a Vera transformer in another published naming, mapped onto the ones this loader expects.

This engine names a Vera transformer's tensors as diffusers names Wan's (`WanTransformer3DModel`), one copy per
branch (docs/CHECKPOINTS.md). The "published" naming mapped here is the one of the original Wan2.1 code base
(`Wan-AI/Wan2.1-T2V-*` `diffusion_pytorch_model.safetensors`: `blocks.N.self_attn.q`, `ffn.0`, `head.head`, ...),
which a Vera built on the authors' code would use, with each branch under its own prefix (`edit.`, `alpha.`,
`composite.`) and the Vera-only tensors beside them. The mapping is pure renaming (every shape is the same), the
same renaming diffusers' Wan conversion does.

`PUBLISHED_TO_VERA_BLOCK` and `PUBLISHED_TO_VERA_BRANCH` are the table docs/CHECKPOINTS.md prints (a test checks
the two agree).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vera_engine.models.transformer_vera import BRANCHES, wan_key_to_vera

# Inside `blocks.N.` of a branch: published module path -> this loader's (diffusers Wan) module path.
PUBLISHED_TO_VERA_BLOCK: dict[str, str] = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    # Wan's code applies its norms in the order norm1, norm3, norm2: its norm3 (the affine one, before
    # cross-attention) is diffusers' norm2.
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
}
# Outside the blocks, per branch.
PUBLISHED_TO_VERA_BRANCH: dict[str, str] = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
    "frame_position_embedding": "frame_position_embedding",
}
# Vera's own tensors (no branch prefix in either naming).
PUBLISHED_TO_VERA_SHARED: dict[str, str] = {
    "source_patch_embedding": "source_embedding",
    "mask_patch_embedding": "mask_embedding",
    "alpha_layer_embedding": "alpha_layer_embedding",
    "composite_layer_embedding": "composite_layer_embedding",
}


def _rename(rest: str, table: Mapping[str, str]) -> str | None:
    """``rest`` with its longest leading module path in ``table`` replaced (at a segment boundary), or None."""
    for source in sorted(table, key=len, reverse=True):
        if rest == source or rest.startswith(source + "."):
            return table[source] + rest[len(source) :]
    return None


def published_key_to_vera(key: str) -> str:
    """One published tensor name as this loader's; an unknown name is an error naming it."""
    shared = _rename(key, PUBLISHED_TO_VERA_SHARED)
    if shared is not None:
        return shared
    branch, _, rest = key.partition(".")
    if branch in BRANCHES:
        if rest.startswith("blocks."):
            _, index, inner = rest.split(".", 2)
            renamed = _rename(inner, PUBLISHED_TO_VERA_BLOCK)
            if renamed is not None:
                return wan_key_to_vera(f"blocks.{index}.{renamed}", branch)
        else:
            renamed = _rename(rest, PUBLISHED_TO_VERA_BRANCH)
            if renamed is not None:
                return wan_key_to_vera(renamed, branch)
    raise ValueError(
        f"tensor {key!r} has no counterpart in a Vera transformer: expected <branch>.<Wan2.1 name> with branch one of "
        f"{BRANCHES}, or one of {sorted(PUBLISHED_TO_VERA_SHARED)} (docs/CHECKPOINTS.md)"
    )


def published_to_vera(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A published-naming state dict renamed for `VeraTransformer3DModel.load_state_dict` (tensors not copied)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new = published_key_to_vera(key)
        if new in out:
            raise ValueError(
                f"tensors {key!r} and another both map to {new!r}; the checkpoint is inconsistent"
            )
        out[new] = tensor
    return out


def _invert(table: Mapping[str, str]) -> dict[str, str]:
    return {vera: published for published, vera in table.items()}


def vera_key_to_published(key: str) -> str:
    """This loader's tensor name in the published naming (the inverse of :func:`published_key_to_vera`)."""
    shared = _rename(key, _invert(PUBLISHED_TO_VERA_SHARED))
    if shared is not None:
        return shared
    parts = key.split(".")
    if parts[0] == "branches" and parts[1] in BRANCHES:
        renamed = _rename(".".join(parts[2:]), _invert(PUBLISHED_TO_VERA_BRANCH))
        if renamed is not None:
            return f"{parts[1]}.{renamed}"
    if parts[0] == "blocks" and parts[2] in BRANCHES:
        renamed = _rename(".".join(parts[3:]), _invert(PUBLISHED_TO_VERA_BLOCK))
        if renamed is not None:
            return f"{parts[2]}.blocks.{parts[1]}.{renamed}"
    raise ValueError(f"tensor {key!r} is not a VeraTransformer3DModel tensor this table knows")


def vera_to_published(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Vera state dict in the published naming (for exporting, and for testing the table both ways)."""
    return {vera_key_to_published(key): tensor for key, tensor in state_dict.items()}
