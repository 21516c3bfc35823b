"""A tiny Wan-shaped Vera pipeline: a small `AutoencoderKLWan` and a small umT5 encoder (configs made here)."""

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

from vera_engine.pipelines.pipeline_vera import VeraPipeline, make_scheduler
from vera_engine.pipelines.presets import build_random_transformer

LATENT_CHANNELS = 4
TEXT_DIM = 32


def tiny_wan_vae(seed: int = 0) -> AutoencoderKLWan:
    """Wan2.1's VAE architecture (causal 3D, 4x8x8 compression) at 8 base channels and 4 latent channels."""
    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.0, 0.3],
        latents_std=[1.5, 0.8, 1.0, 2.0],
    ).eval()


def tiny_umt5(seed: int = 0) -> tuple[ByT5Tokenizer, UMT5EncoderModel]:
    """umT5's architecture (per-layer relative position buckets) at width 32; a byte tokenizer (no download)."""
    tokenizer = ByT5Tokenizer()
    torch.manual_seed(seed)
    encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).eval()
    return tokenizer, encoder


def save_tiny_wan_pipeline(folder: Path, *, vae_seed: int = 0, seed: int = 0) -> Path:
    """Write a Vera pipeline folder with the tiny Wan VAE and umT5 (native 32x48, 5 frames)."""
    tokenizer, encoder = tiny_umt5(seed)
    transformer = build_random_transformer(
        "tiny", seed=seed + 1, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM
    )
    pipe = VeraPipeline(
        transformer=transformer.eval(),
        text_encoder=encoder,
        tokenizer=tokenizer,
        vae=tiny_wan_vae(vae_seed),
        scheduler=make_scheduler("unipc"),
        native_height=32,
        native_width=48,
        native_frames=5,
        max_sequence_length=160,  # byte tokens: the fixtures' instructions fit
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
