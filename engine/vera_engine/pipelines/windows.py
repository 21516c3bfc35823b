"""Sampling-window rules, written once for the pipeline, the engine's job options and the benchmarks.

No torch here: the service reads these to publish and check job options without loading a model.
"""

from __future__ import annotations


def default_window_overlap(window_frames: int) -> int:
    """Frames neighbouring windows share when a caller does not say: a quarter of the window, at least one frame
    (windows that share no frame would meet at a seam); 0 for a window of one frame or none (one pass)."""
    return max(1, window_frames // 4) if window_frames > 1 else 0


def position_reach(
    rope_max_seq_len: int,
    patch_size: tuple[int, int, int] | list[int],
    temporal_compression: int,
    spatial_compression: int,
) -> tuple[int, int, int]:
    """(frames, height, width): the most one sampling window may span, padded, given how far the transformer's
    rotary table reaches (`rope_max_seq_len` token positions along each axis).

    A token position covers `patch` latent cells, and a latent cell `compression` pixels; in time a causal video
    codec (Wan's VAE, temporal compression > 1) maps latent frames `n` to `(n - 1) * t + 1` video frames.
    """
    p_t, p_h, p_w = (int(p) for p in patch_size)
    t, s = temporal_compression, spatial_compression
    frames = rope_max_seq_len * p_t if t == 1 else (rope_max_seq_len * p_t - 1) * t + 1
    return frames, rope_max_seq_len * p_h * s, rope_max_seq_len * p_w * s
