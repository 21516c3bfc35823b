"""Named Vera configurations: the Wan2.1 sizes (for benchmarks and conversion checks) and a tiny one for CPUs.

A preset is data: the transformer's constructor arguments (its config) plus, for the tiny one, the small text
encoder and the lossless codec it runs with. `build_random_pipeline` makes a complete random-weight pipeline from a
preset, which is what tests and the tiny benchmark run on.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass(frozen=True)
class VeraPreset:
    """One Vera size: transformer config, native sampling size, and (tiny only) text encoder and codec settings."""

    name: str
    transformer: dict[str, Any]
    native_height: int
    native_width: int
    native_frames: int
    max_sequence_length: int = 512
    # Tiny checkpoints only: a small T5 encoder trained with the model, over bytes ("byte": ByT5's tokenizer, no
    # vocabulary) or words ("word": a vocabulary built from the training instructions, see
    # models/word_tokenizer.py), and the space-to-depth codec. Full-size presets use umT5-XXL and the Wan VAE from a
    # real Wan folder.
    text_encoder: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = "byte"
    codec_spatial_factor: int | None = None
    # "text": the encoder reads the instruction's words. "slots": it reads the facts the instruction states, one
    # token per fact (models/instruction_slots.py) - for small checkpoints trained from scratch, which cannot learn
    # word order from a CPU's worth of steps.
    instruction_format: str = "text"
    # Sampling settings the checkpoint is trained for (the pipeline's default_steps / default_guidance).
    default_steps: int = 50
    default_guidance: float = 5.0
    # `vera-engine train` settings (TrainConfig field names) this size trains well with, used for every setting
    # the command line does not give when a run starts from this preset or from a model of its shape. Empty: the
    # paper's recipe (TrainConfig's defaults: lr 1e-5, text encoder frozen), which suits a pretrained Wan start.
    training: dict[str, Any] = field(default_factory=dict)


WAN_1_3B = VeraPreset(
    name="wan-1.3b",
    transformer=dict(
        patch_size=(1, 2, 2),
        num_attention_heads=12,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=8960,
        num_layers=30,
    ),
    native_height=480,
    native_width=832,
    native_frames=49,
)

WAN_14B = VeraPreset(
    name="wan-14b",
    transformer=dict(
        patch_size=(1, 2, 2),
        num_attention_heads=40,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=13824,
        num_layers=40,
    ),
    native_height=480,
    native_width=832,
    native_frames=49,
)

TINY = VeraPreset(
    name="tiny",
    transformer=dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=12,
        out_channels=12,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        rope_max_seq_len=64,
    ),
    native_height=32,
    native_width=32,
    native_frames=4,
    max_sequence_length=96,
    text_encoder=dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    codec_spatial_factor=2,
)

# The shape of the checkpoint shipped in the repository (the engine's default model): small enough to train on a
# CPU and to ship in a few MB. A token covers 4x4 pixels (space-to-depth 2, patch 2): 48 values, well under the
# 128-wide hidden state, which must carry a token's noise to predict it. What a model trained from scratch needs
# that a pretrained Wan has (docs/TINY_MODEL.md): an encoder over words, cross-attention that leaves out the
# prompt's padding, and frame-position embeddings.
VERA_TINY = VeraPreset(
    name="vera-tiny",
    transformer=dict(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=12,
        out_channels=12,
        text_dim=64,
        freq_dim=64,
        ffn_dim=384,
        num_layers=4,
        rope_max_seq_len=64,
        # Cross-attention sees the prompt, not its zero padding (see VeraTransformer3DModel.text_padding_mask).
        mask_text_padding=True,
        frame_position_embedding=True,
    ),
    native_height=32,
    native_width=32,
    native_frames=8,
    # The longest synthetic instruction is 29 words and punctuation marks, plus </s>.
    max_sequence_length=48,
    text_encoder=dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
    tokenizer="word",
    codec_spatial_factor=2,
    # The shipped checkpoint's recipe (its model card): nothing is pretrained, so every branch learns at the same
    # rate and the text encoder learns with them (that is how the model learns its words); layout is decided at
    # high noise (shift 3) and a small object's loss is weighed up.
    training=dict(
        learning_rate=5e-4,
        branch_lr_scales={"edit": 1.0, "alpha": 1.0, "composite": 1.0},
        text_encoder_lr_scale=1.0,
        timestep_shift=3.0,
        foreground_weight=4.0,
        warmup_steps=200,
        ema_decay=0.998,
        mask_dropout={"object_addition": 0.6, "background_change": 0.3},
        batch_size=8,
    ),
)

# vera-tiny v2 (issue 22): vera-tiny's shape with what its study found missing. A token covers 2 frames of 4x4 pixels
# (patch (2, 2, 2): 256 tokens per branch instead of 512; 1.7x faster per training step measured here under load,
# 3.2x in the quiet measurement), the frame-position embedding starts at a useful scale (std 0.15: about 0.5
# RMS per token, like the patch embedding's), and the instruction is read into slot tokens (one per fact: colour,
# shape, size, motion, place; background kind, colours, sides, orientation), so "left to right" and "right to left"
# are different tokens rather than one word order.
VERA_TINY_V2 = replace(
    VERA_TINY,
    name="vera-tiny-v2",
    transformer={**VERA_TINY.transformer, "patch_size": (2, 2, 2), "frame_position_init_std": 0.15},
    # Slot sentences are at most 8 tokens plus </s>.
    max_sequence_length=16,
    instruction_format="slots",
    default_steps=20,
    default_guidance=2.5,
    # A fresh model, so a higher rate than vera-tiny's fine-tuning, a cool-down at the end, a clean-matte weight,
    # and the paper's object-addition mask dropout (most object-addition samples are placed from the words alone).
    training={
        **VERA_TINY.training,
        "learning_rate": 1e-3,
        "clear_alpha_weight": 4.0,
        "warmup_steps": 300,
        "cooldown_steps": 1500,
        "mask_dropout": {"object_addition": 0.9, "background_change": 0.3},
    },
)

PRESETS: dict[str, VeraPreset] = {
    preset.name: preset for preset in (TINY, VERA_TINY, VERA_TINY_V2, WAN_1_3B, WAN_14B)
}


def get_preset(name: str) -> VeraPreset:
    """The preset called `name`, or a `ValueError` listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset={name!r} is not known; expected one of {sorted(PRESETS)}") from None


def preset_of_transformer(config: Mapping[str, Any]) -> "VeraPreset | None":
    """The preset a model was built from: the one whose every transformer setting its transformer config (the
    folder's `transformer/config.json`) holds, or None (e.g. a size no preset names)."""

    def same(a: Any, b: Any) -> bool:
        return list(a) == list(b) if isinstance(a, (list, tuple)) else a == b

    for preset in PRESETS.values():
        if all(key in config and same(config[key], value) for key, value in preset.transformer.items()):
            return preset
    return None


def build_random_transformer(preset: "str | VeraPreset", seed: int = 0, **overrides: Any):
    """A `VeraTransformer3DModel` of the preset's shape with seeded random weights."""
    from vera_engine.models.transformer_vera import VeraTransformer3DModel

    preset = get_preset(preset) if isinstance(preset, str) else preset
    torch.manual_seed(seed)
    return VeraTransformer3DModel(**{**preset.transformer, **overrides})


def build_text_encoder(
    preset: "str | VeraPreset", seed: int = 0, vocabulary: "Iterable[str] | None" = None
) -> tuple[Any, Any]:
    """A tiny preset's tokenizer and seeded random T5 encoder.

    `vocabulary`: the texts a word-level tokenizer takes its words from (the training instructions); required by
    presets with `tokenizer="word"`, ignored by byte-level ones.
    """
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    from vera_engine.models.word_tokenizer import build_word_tokenizer

    preset = get_preset(preset) if isinstance(preset, str) else preset
    if not preset.text_encoder:
        raise ValueError(
            f"preset {preset.name!r} is a full Wan size: it uses the umT5 encoder from a real Wan2.1 folder"
        )
    if preset.tokenizer == "word":
        if vocabulary is None:
            raise ValueError(
                f"preset {preset.name!r} reads words: pass vocabulary= (the training instructions) to build its "
                "tokenizer"
            )
        tokenizer = build_word_tokenizer(vocabulary)
    elif preset.tokenizer == "byte":
        tokenizer = ByT5Tokenizer()
    else:
        raise ValueError(f"preset {preset.name!r}: tokenizer={preset.tokenizer!r}; expected 'byte' or 'word'")
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=preset.text_encoder["d_model"],
            d_kv=preset.text_encoder["d_kv"],
            d_ff=preset.text_encoder["d_ff"],
            num_layers=preset.text_encoder["num_layers"],
            num_heads=preset.text_encoder["num_heads"],
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).eval()
    return tokenizer, text_encoder


def build_random_pipeline(
    preset: "str | VeraPreset" = "tiny",
    seed: int = 0,
    scheduler: str = "unipc",
    vocabulary: "Iterable[str] | None" = None,
):
    """A complete `VeraPipeline` with random weights (tiny presets only: they need no downloaded parts).

    The text encoder is a small T5 (over bytes, or over the words of `vocabulary` for word-level presets), the
    codec is lossless space-to-depth: everything is created here.
    """
    from vera_engine.models.space_to_depth_codec import SpaceToDepthCodec
    from vera_engine.pipelines.pipeline_vera import VeraPipeline, make_scheduler

    preset = get_preset(preset) if isinstance(preset, str) else preset
    if preset.codec_spatial_factor is None:
        raise ValueError(
            f"preset {preset.name!r} is a full Wan size: its pipeline needs the umT5 encoder and the Wan VAE from a "
            "real Wan2.1 folder (use `vera-engine convert-wan`); random pipelines exist for tiny presets only"
        )
    if vocabulary is not None and preset.instruction_format == "slots":
        from vera_engine.models.instruction_slots import instruction_to_slot_text

        # The vocabulary keeps the instructions' own words (hosts flag words outside it) and adds the slot tokens the
        # encoder actually reads.
        vocabulary = list(vocabulary)
        vocabulary += [instruction_to_slot_text(text) for text in vocabulary]
    tokenizer, text_encoder = build_text_encoder(preset, seed, vocabulary)
    codec = SpaceToDepthCodec(spatial_factor=preset.codec_spatial_factor)
    transformer = build_random_transformer(preset, seed=seed + 1)
    if codec.latent_channels != transformer.config.in_channels:
        raise ValueError(
            f"preset {preset.name!r}: codec makes {codec.latent_channels} latent channels but the transformer takes "
            f"{transformer.config.in_channels}"
        )
    pipe = VeraPipeline(
        transformer=transformer.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=codec,
        scheduler=make_scheduler(scheduler),
        native_height=preset.native_height,
        native_width=preset.native_width,
        native_frames=preset.native_frames,
        max_sequence_length=preset.max_sequence_length,
        default_steps=preset.default_steps,
        default_guidance=preset.default_guidance,
        instruction_format=preset.instruction_format,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
