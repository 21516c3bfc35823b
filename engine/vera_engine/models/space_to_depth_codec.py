# A lossless latent codec for tiny Vera checkpoints: pixels folded into channels (space-to-depth).
#
# Real checkpoints use the Wan VAE (`AutoencoderKLWan`, stride 4x8x8, 16 channels). A VAE cannot be trained to a
# useful quality on a CPU in minutes, and a tiny model's job is to show the whole product working, so tiny
# checkpoints replace it with an exact rearrangement: decode(encode(x)) == x bit for bit, any frame count.

import os
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class SpaceToDepthCodec(ModelMixin, ConfigMixin):
    """Lossless video codec: each `spatial_factor`² block of pixels becomes one latent pixel with that many channels.

    Videos are `(B, C, F, H, W)` in [-1, 1] (the Wan VAE's convention); latents are
    `(B, C * spatial_factor², F, H / spatial_factor, W / spatial_factor)`. Height and width must be multiples of
    `spatial_factor`; there is no temporal compression.
    """

    _supports_group_offloading = False

    @register_to_config
    def __init__(self, spatial_factor: int = 2, in_channels: int = 3) -> None:
        super().__init__()
        if spatial_factor < 1:
            raise ValueError(f"spatial_factor={spatial_factor} must be >= 1")
        # A zero-size buffer keeps `.device` / `.dtype` meaningful for a module with no weights.
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: "str | os.PathLike[str]", **kwargs: Any
    ) -> "SpaceToDepthCodec":
        """Load from a local folder. The codec has no weights, so `config.json` is all there is to read.

        Loader keywords that only concern weights (`torch_dtype`, `low_cpu_mem_usage`, ...) are accepted and have
        nothing to act on.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            path = os.path.join(path, kwargs["subfolder"])
        if not os.path.isfile(os.path.join(path, cls.config_name)):
            raise FileNotFoundError(
                f"{path!r} has no {cls.config_name}; expected a saved SpaceToDepthCodec folder"
            )
        return cls.from_config(cls.load_config(path))

    @property
    def latent_channels(self) -> int:
        """Channels of a latent pixel."""
        return self.config.in_channels * self.config.spatial_factor**2

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent pixel along height and width."""
        return self.config.spatial_factor

    @property
    def temporal_compression(self) -> int:
        """Frames per latent frame (1: none)."""
        return 1

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Fold `(B, C, F, H, W)` video into `(B, C·s², F, H/s, W/s)` latents."""
        factor = self.config.spatial_factor
        batch, channels, frames, height, width = video.shape
        if channels != self.config.in_channels or height % factor or width % factor:
            raise ValueError(
                f"video has shape {tuple(video.shape)}; expected (batch, {self.config.in_channels}, frames, H, W) "
                f"with H and W multiples of {factor}"
            )
        video = video.reshape(batch, channels, frames, height // factor, factor, width // factor, factor)
        # batch, channels, factor_h, factor_w, frames, h, w
        video = video.permute(0, 1, 4, 6, 2, 3, 5)
        return video.reshape(batch, channels * factor * factor, frames, height // factor, width // factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unfold `(B, C·s², F, h, w)` latents back into `(B, C, F, h·s, w·s)` video, exactly."""
        factor = self.config.spatial_factor
        batch, latent_channels, frames, height, width = latents.shape
        if latent_channels != self.latent_channels:
            raise ValueError(
                f"latents have {latent_channels} channels; this codec makes {self.latent_channels}"
            )
        latents = latents.reshape(batch, self.config.in_channels, factor, factor, frames, height, width)
        latents = latents.permute(0, 1, 4, 5, 2, 6, 3)
        return latents.reshape(batch, self.config.in_channels, frames, height * factor, width * factor)
