"""Does a checkpoint read the words that say where an object goes and which way it moves? A diagnostic, not a score.

For object-addition clips of a held-out split, prompts that differ only in the words under test are compared on the
same clip with the same noise:

* direction swap: "moving from left to right" against "moving from right to left" (or top to bottom against
  bottom to top for vertical paths), everything else in the sentence kept;
* position swap: "in the upper half" against "in the lower half" (or the left side against the right side).

Each prompt gets one forward pass at noise levels sigma >= 0.75, where the layout of the clip is decided: the noisy
layers are x_sigma = (1 - sigma) x_0 + sigma noise, with x_0 the clip's true layers (the same for both prompts, so
only the words differ) and the same noise, and the model's velocity v gives its predicted clean matte
x_0 = x_sigma - sigma v, decoded as the pipeline decodes it (classifier-free guidance at the checkpoint's default).
Any checkpoint folder works, including slot-conditioned ones (`instruction_format="slots"`): prompts go through the
pipeline's own `encode_prompt`, which reads them into slot tokens where the checkpoint asks for it.

Reported per sigma, as fractions of the frame:

* the direction swap's centroid shift: the mean over frames of the distance between the two predicted mattes'
  centroids;
* the predicted travel: the centroid's displacement from the first to the last frame along the path, positive the
  way the first phrase says (rightwards, downwards), for each phrase, and how far the swap moves it
  (travel asked forward - travel asked backward; a model that moves the object as asked gets about 1.0, the
  generator's paths running from 0.22-0.26 to 0.74-0.78 of the frame). Target: >= 0.5;
* the position swap's centroid shift across the path (asked: +0.46, the bands' centres being 0.27 and 0.73).

A predicted matte at high noise is a blurred guess, not a cut-out, so centroids are weighted by the matte above each
frame's median (the faint level over the plate) rather than by a 0.5 threshold, which the guess rarely reaches.
`--sample-steps N` also runs the full sampler (N steps) for each prompt and reports the same figures for the
sampled matte.

    python bench/probe_instructions.py --model default --data DATA --clips 12
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vera_engine.training.data.dataset import LayeredClip, iter_clips

# The noise levels probed by default: where the layout is decided (issue 22 item 4).
DEFAULT_SIGMAS = (1.0, 0.9, 0.75)
# What the direction swap must move the predicted travel by (fraction of the frame), issue 22 item 4.
TRAVEL_SWAP_TARGET = 0.5

# Motion phrases of the generator's training wording (training/data/synthetic.py): (forward, backward, axis), the
# axis 0 for x, 1 for y; forward runs towards larger coordinates.
MOTION_SWAPS = {
    "horizontal": ("moving from left to right", "moving from right to left", 0),
    "vertical": ("moving from top to bottom", "moving from bottom to top", 1),
}
# Places across the path: (phrase A, phrase B, axis); B lies at larger coordinates.
POSITION_SWAPS = {
    "horizontal": ("in the upper half", "in the lower half", 1),
    "vertical": ("on the left side", "on the right side", 0),
}
SIZE_WORDS = {"small": "small ", "medium": "", "large": "large "}


def path_orientation(clip: LayeredClip) -> str | None:
    """ "horizontal" or "vertical" for a moving object-addition clip, None for anything else."""
    if clip.task != "object_addition":
        return None
    return {
        "left_to_right": "horizontal",
        "right_to_left": "horizontal",
        "top_to_bottom": "vertical",
        "bottom_to_top": "vertical",
    }.get(clip.fields.get("direction"))


def probe_prompts(clip: LayeredClip) -> dict[str, str]:
    """The four prompts compared on `clip`: the same object, with the motion and the place words swapped.

    `forward` / `backward` share the place (phrase A); `place_a` / `place_b` share the forward motion.
    """
    orientation = path_orientation(clip)
    if orientation is None:
        raise ValueError(
            f"clip {clip.clip_id}: task {clip.task}, direction {clip.fields.get('direction')}; the probe takes "
            "object-addition clips that move left/right or up/down"
        )
    fields = clip.fields
    obj = f"{SIZE_WORDS.get(fields.get('size', 'medium'), '')}{fields['colour']} {fields['shape']}"
    forward, backward, _ = MOTION_SWAPS[orientation]
    place_a, place_b, _ = POSITION_SWAPS[orientation]
    return {
        "forward": f"add a {obj} {forward} {place_a}",
        "backward": f"add a {obj} {backward} {place_a}",
        "place_a": f"add a {obj} {forward} {place_a}",
        "place_b": f"add a {obj} {forward} {place_b}",
    }


def weighted_centroids(alpha: np.ndarray) -> np.ndarray:
    """Per-frame (x, y) centroid of the matte above the frame's median, as fractions of the width / height; NaN
    where nothing stands above the median."""
    alpha = np.asarray(alpha, dtype=np.float64)
    frames, height, width = alpha.shape
    xs, ys = (np.arange(width) + 0.5) / width, (np.arange(height) + 0.5) / height
    out = np.full((frames, 2), np.nan)
    for i, frame in enumerate(alpha):
        weight = np.clip(frame - np.median(frame), 0.0, None)
        total = weight.sum()
        if total > 0:
            out[i] = (weight.sum(axis=0) @ xs / total, weight.sum(axis=1) @ ys / total)
    return out


def travel(alpha: np.ndarray, axis: int) -> float:
    """The centroid's displacement along `axis` from the first to the last frame with a matte (fraction of the
    frame; positive towards larger coordinates); NaN with fewer than two such frames."""
    c = weighted_centroids(alpha)[:, axis]
    valid = np.nonzero(~np.isnan(c))[0]
    if len(valid) < 2:
        return float("nan")
    return float(c[valid[-1]] - c[valid[0]])


def centroid_shift(a: np.ndarray, b: np.ndarray) -> float:
    """The mean over frames of the distance between the two mattes' centroids (fraction of the frame)."""
    distance = np.linalg.norm(weighted_centroids(a) - weighted_centroids(b), axis=1)
    return float(np.nanmean(distance)) if not np.isnan(distance).all() else float("nan")


class ForwardProbe:
    """One forward pass of a Vera pipeline's transformer per prompt on a clip, at a given noise level."""

    def __init__(self, pipe: Any, clip: LayeredClip, seed: int, guidance: float) -> None:
        frames, height, width = clip.shape
        if frames > pipe.native_frames:
            raise ValueError(
                f"clip {clip.clip_id} has {frames} frames; the probe takes clips of at most the checkpoint's "
                f"native {pipe.native_frames} (make the split with --frames {pipe.native_frames})"
            )
        self.pipe, self.guidance, self.shape = pipe, guidance, (frames, height, width)
        self.device, self.dtype = pipe._execution_device, pipe.transformer.dtype
        padded = pipe.padded_shape(frames, height, width)
        with torch.no_grad():
            encode = [
                pipe.encode_video(pipe._prepare_video(layer, padded, self.device))
                for layer in (clip.edit, clip.alpha, clip.composite, clip.input)
            ]
        self.clean = torch.cat(encode[:3], dim=1)
        self.source = encode[3]
        self.noise = torch.randn(self.clean.shape, generator=torch.Generator().manual_seed(seed)).to(
            self.device
        )
        self.unconditional = pipe.encode_prompt("", self.device, self.dtype) if guidance > 1.0 else None

    @torch.no_grad()
    def predicted_alpha(self, prompt: str, sigma: float) -> np.ndarray:
        """The predicted clean matte (F, H, W) in [0, 1] for `prompt` at noise level `sigma`."""
        pipe = self.pipe
        noisy = (1 - sigma) * self.clean + sigma * self.noise
        text = pipe.encode_prompt(prompt, self.device, self.dtype)
        if self.unconditional is not None:
            text = torch.cat([text, self.unconditional])
        batch = text.shape[0]
        edit, alpha, composite = noisy.to(self.dtype).expand(batch, -1, -1, -1, -1).chunk(3, dim=1)
        out = pipe.transformer(
            edit_latents=edit,
            alpha_latents=alpha,
            composite_latents=composite,
            timestep=torch.full((batch,), sigma * 1000.0, device=self.device),
            encoder_hidden_states=text,
            source_latents=self.source.to(self.dtype).expand(batch, -1, -1, -1, -1),
            mask_latents=None,
            return_dict=False,
        )
        velocity = torch.cat(out, dim=1).float()
        if self.unconditional is not None:
            conditional, unconditional = velocity.chunk(2)
            velocity = unconditional + self.guidance * (conditional - unconditional)
        alpha_x0 = (noisy - sigma * velocity).chunk(3, dim=1)[1]
        decoded = pipe.decode_latents(alpha_x0).mean(dim=1)[0]  # (F', H', W') in [-1, 1]
        frames, height, width = self.shape
        return ((decoded[:frames, :height, :width] + 1) / 2).clamp(0, 1).cpu().numpy()


def sampled_alpha(
    pipe: Any, clip: LayeredClip, prompt: str, steps: int, guidance: float, seed: int
) -> np.ndarray:
    out = pipe(
        clip.input,
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
    )
    return np.clip(out.alpha, 0, 1)


def compare(mattes: dict[str, np.ndarray], orientation: str) -> dict[str, float]:
    """The figures of one clip at one noise level, from the four prompts' predicted mattes."""
    motion_axis = MOTION_SWAPS[orientation][2]
    place_axis = POSITION_SWAPS[orientation][2]
    forward, backward = travel(mattes["forward"], motion_axis), travel(mattes["backward"], motion_axis)
    place_a = np.nanmean(weighted_centroids(mattes["place_a"])[:, place_axis])
    place_b = np.nanmean(weighted_centroids(mattes["place_b"])[:, place_axis])
    return {
        "direction_centroid_shift": centroid_shift(mattes["forward"], mattes["backward"]),
        "travel_forward": forward,
        "travel_backward": backward,
        "travel_swap": forward - backward,
        "position_shift": float(place_b - place_a),
    }


def unknown_prompt_words(pipe: Any, prompts: Sequence[str]) -> list[str]:
    """Words of `prompts` a word-level checkpoint reads as <unk> (what its text encoder actually reads)."""
    from vera_engine.models.word_tokenizer import is_word_tokenizer, unknown_words

    if not is_word_tokenizer(pipe.tokenizer):
        return []
    return sorted({w for p in prompts for w in unknown_words(pipe.tokenizer, pipe.encoder_text(p))})


def probe(
    pipe: Any,
    clips: Sequence[LayeredClip],
    *,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    guidance: float | None = None,
    seed: int = 0,
    sample_steps: int = 0,
) -> dict[str, Any]:
    """Run the probe on `clips` (moving object-addition clips); returns the per-clip and mean figures per sigma
    (and for the sampler with `sample_steps`)."""
    for sigma in sigmas:
        if not 0.0 < sigma <= 1.0:
            raise ValueError(f"sigma {sigma}: noise levels are in (0, 1]")
    guidance = float(guidance if guidance is not None else pipe.config.get("default_guidance", 1.0))
    levels = [f"sigma {s:.2f}" for s in sigmas] + ([f"sampled, {sample_steps} steps"] if sample_steps else [])
    per_level: dict[str, list[dict[str, float]]] = {level: [] for level in levels}
    prompts_used: list[str] = []
    for clip in clips:
        orientation = path_orientation(clip)
        prompts = probe_prompts(clip)
        prompts_used += prompts.values()
        forward_probe = ForwardProbe(pipe, clip, seed, guidance)
        for sigma, level in zip(sigmas, levels, strict=False):
            mattes = {name: forward_probe.predicted_alpha(text, sigma) for name, text in prompts.items()}
            per_level[level].append(compare(mattes, orientation))
        if sample_steps:
            mattes = {
                name: sampled_alpha(pipe, clip, text, sample_steps, guidance, seed)
                for name, text in prompts.items()
            }
            per_level[levels[-1]].append(compare(mattes, orientation))
    means = {
        level: {key: float(np.nanmean([row[key] for row in rows])) for key in rows[0]} if rows else {}
        for level, rows in per_level.items()
    }
    return {
        "clips": len(clips),
        "guidance": guidance,
        "seed": seed,
        "travel_swap_target": TRAVEL_SWAP_TARGET,
        "unknown_words": unknown_prompt_words(pipe, prompts_used),
        "means": means,
        "per_clip": per_level,
    }


def format_probe(report: dict[str, Any]) -> str:
    lines = [
        f"{report['clips']} clips, guidance {report['guidance']:g}, seed {report['seed']}; figures are fractions "
        "of the frame"
    ]
    if report["unknown_words"]:
        lines.append(
            f"words the checkpoint does not know (read as <unk>): {', '.join(report['unknown_words'])}"
        )
    for level, m in report["means"].items():
        if not m:
            continue
        met = "met" if m["travel_swap"] >= report["travel_swap_target"] else "NOT met"
        lines.append(
            f"{level}: direction swap moves the centroid by {m['direction_centroid_shift']:.3f} and the predicted "
            f"travel by {m['travel_swap']:+.3f} (forward {m['travel_forward']:+.3f}, backward "
            f"{m['travel_backward']:+.3f}; target >= {report['travel_swap_target']:g}: {met}); position swap "
            f"moves the centroid by {m['position_shift']:+.3f} (asked: +0.46)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="default", help="pipeline folder, or 'default' for the shipped one"
    )
    parser.add_argument(
        "--data", required=True, help="layered dataset folder (made at the checkpoint's size)"
    )
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--clips", type=int, default=12, help="moving object-addition clips to probe")
    parser.add_argument(
        "--sigmas",
        default=",".join(f"{s:g}" for s in DEFAULT_SIGMAS),
        help="noise levels of the one-pass probe, comma-separated",
    )
    parser.add_argument("--sample-steps", type=int, default=0, help="also run the full sampler (0: do not)")
    parser.add_argument("--guidance", type=float, default=None, help="default: the checkpoint's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    try:
        sigmas = [float(s) for s in args.sigmas.split(",")]
    except ValueError:
        parser.error(f"--sigmas {args.sigmas!r}: expected comma-separated numbers such as 1,0.9,0.75")
    from vera_engine.pipelines.model_store import load_pipeline

    pipe = load_pipeline(args.model)
    clips = []
    for clip in iter_clips(args.data, args.split):
        if len(clips) == args.clips:
            break
        if path_orientation(clip) is not None:
            clips.append(clip)
    if not clips:
        parser.error(
            f"{args.data} split {args.split} has no object-addition clip that moves left/right or up/down"
        )
    started = time.perf_counter()
    report = probe(
        pipe, clips, sigmas=sigmas, guidance=args.guidance, seed=args.seed, sample_steps=args.sample_steps
    )
    report["seconds"] = time.perf_counter() - started
    print(format_probe(report) + f"\n{report['seconds']:.0f} s")
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
