"""Vera's networks: the Mixture-of-Transformers and the lossless latent codec for tiny checkpoints."""

from vera_engine.models.space_to_depth_codec import SpaceToDepthCodec
from vera_engine.models.transformer_vera import (
    BRANCHES,
    VeraTransformer3DModel,
    VeraTransformerOutput,
    wan_key_to_vera,
)

__all__ = [
    "BRANCHES",
    "SpaceToDepthCodec",
    "VeraTransformer3DModel",
    "VeraTransformerOutput",
    "wan_key_to_vera",
]
