"""Opt-in step caching for the Mixture-of-Transformers: skip block computations on steps that barely change.

Lossy accelerations, each one of diffusers' own cache hooks registered on the `VeraMoTBlock`s (the blocks are in
diffusers' `TransformerBlockRegistry`, so the block-level hooks know what a block returns):

- ``first_block:<threshold>`` -- diffusers' `FirstBlockCacheConfig`. Block 0 always runs; when its residual changed
  by less than `threshold` (relative mean absolute difference) since the last full step, the other blocks are
  skipped and their cached residual is added instead. `threshold` 0 never skips.
- ``mag:<threshold>`` -- diffusers' `MagCacheConfig`. Skips all blocks on a step (reusing the last residual of the
  whole stack) while the error accumulated from the model's *magnitude ratios* stays under `threshold`, at most 3
  steps in a row, never in the first 20 % of steps. The ratios are per model and sampling setup: the first ``mag``
  job for a (model, steps, guidance, scheduler) runs in diffusers' calibration mode (nothing skipped, so that job's
  result is exact), and the measured ratios are kept in memory for the model's later jobs (`calibrate_mag_ratios`
  does the same ahead of time on a clip of your choice). `threshold` 0 never skips.
- ``taylorseer:<interval>`` -- diffusers' `TaylorSeerCacheConfig` with Vera's module names: after 3 full warm-up
  steps, one step in `interval` runs the blocks; on the others the last block's output (the MoT's final hidden
  states, all three layers) is predicted by a first-order Taylor expansion over steps and blocks 0..N-2 do nothing
  (diffusers' "skip" mode returns zeros that the predicted last block ignores). The output heads still run with
  the step's own timestep modulation. `interval` 1 never skips.

All three key their state on the pipeline's ``cache_context``: one per temporal window of a long clip (each window
is compared with itself on the previous step), and with classifier-free guidance the conditional and unconditional
passes are one batched forward, so one decision covers both. MagCache's calibration of a long clip keeps the ratios
of the last window (the windows' ratios follow the same schedule).

What is not offered, and why:

- TaylorSeer *lite* (`use_lite_mode=True`) predicts a top-level ``proj_out`` and zeroes every block; Vera's output
  projections are ``branches.<layer>.proj_out``, so lite mode would zero the blocks and predict nothing (wrong
  output). The ``taylorseer`` choice above is the same idea written with Vera's names (it predicts the last
  block's output instead of the heads'). TaylorSeer's default patterns (``^blocks.*attn``) hook the attention
  modules' `forward`, which the joint self-attention never calls.
- Pyramid Attention Broadcast and FasterCache hook the attention modules' `forward` too: the MoT's joint
  self-attention runs the branches' projections directly (one attention call over all three layers' tokens), so
  they could reach only the per-branch cross-attention, a small part of the work; FasterCache also expects separate
  conditional and unconditional calls.
- SeaCache needs the pipeline to pass ``step_index`` and ``sigma`` to `cache_context` and a callback giving the
  raw visual latents; `VeraPipeline` passes only the context name.
- Text K/V caching (`TextKVCacheConfig`) exists for NucleusMoE blocks only.

Use: ``with step_cache(pipe, "first_block:0.1", num_inference_steps=steps, guidance_scale=g): pipe(...)``. The cache
is enabled on `pipe.transformer` for that one call and always removed afterwards (also when the call fails or is
interrupted), so the next job is uncached unless it asks; ``"none"`` touches nothing.
"""

import logging
import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, MagCacheConfig, TaylorSeerCacheConfig
from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK

from vera_engine.acceleration.compile import eager_blocks
from vera_engine.models.transformer_vera import BRANCHES, VeraMoTBlock

logger = logging.getLogger(__name__)

STEP_CACHE_CHOICES: tuple[str, ...] = ("none", "first_block", "mag", "taylorseer")
"""The step caches a job can ask for (the UI/schema choices); "none" is exact sampling."""

DEFAULT_STRENGTHS: dict[str, float] = {"first_block": 0.1, "mag": 0.06, "taylorseer": 3}
"""The strength used when a spec names a cache without one (see the module docstring for what each means)."""

STEP_CACHE_FORMS = (
    '"none", "first_block[:THRESHOLD]" (THRESHOLD >= 0, e.g. first_block:0.1), "mag[:THRESHOLD]" '
    '(THRESHOLD >= 0, e.g. mag:0.06) or "taylorseer[:INTERVAL]" (integer INTERVAL >= 1, e.g. taylorseer:3)'
)

# MagCache's and TaylorSeer's fixed settings (diffusers' defaults): steps that always run in full at the start.
MAG_RETENTION_RATIO = 0.2
MAG_MAX_SKIP_STEPS = 3
TAYLORSEER_WARMUP_STEPS = 3

CacheConfig = FirstBlockCacheConfig | MagCacheConfig | TaylorSeerCacheConfig


@dataclass(frozen=True)
class StepCacheSpec:
    """A parsed step-cache request: `name` (one of `STEP_CACHE_CHOICES`) and its `strength` (None for "none")."""

    name: str
    strength: float | None = None

    def __str__(self) -> str:
        if self.strength is None:
            return self.name
        strength = int(self.strength) if self.name == "taylorseer" else self.strength
        return f"{self.name}:{strength:g}"

    @property
    def never_skips(self) -> bool:
        """True when this spec cannot skip any block: "none", or a strength that makes the cache exact."""
        return self.name == "none" or self.strength == (1 if self.name == "taylorseer" else 0)


def parse_step_cache(spec: "str | StepCacheSpec | None") -> StepCacheSpec:
    """Parse ``"name[:strength]"`` (see `STEP_CACHE_FORMS`); None and "" mean "none". Raises `ValueError`."""
    if spec is None:
        return StepCacheSpec("none")
    if isinstance(spec, StepCacheSpec):
        # Validate a ready-made spec by the same rules, without the rounding of its display form.
        if spec.strength is None:
            return parse_step_cache(spec.name)
        strength = spec.strength
        if spec.name == "taylorseer" and float(strength).is_integer():
            strength = int(strength)
        return parse_step_cache(f"{spec.name}:{strength!r}")
    if not isinstance(spec, str):
        raise ValueError(
            f"step_cache={spec!r} is a {type(spec).__name__}; expected a string: {STEP_CACHE_FORMS}"
        )
    text = spec.strip()
    if not text:
        return StepCacheSpec("none")
    name, sep, value = text.partition(":")
    name = name.strip()
    if name not in STEP_CACHE_CHOICES:
        raise ValueError(
            f"step_cache={spec!r}: {name!r} is not a step cache; expected one of {list(STEP_CACHE_CHOICES)}, "
            f"written {STEP_CACHE_FORMS}"
        )
    if name == "none":
        if sep:
            raise ValueError(f'step_cache={spec!r}: "none" takes no strength; write "none"')
        return StepCacheSpec("none")
    if not sep:
        return StepCacheSpec(name, float(DEFAULT_STRENGTHS[name]))
    value = value.strip()
    if name == "taylorseer":
        try:
            interval = int(value)
        except ValueError:
            interval = 0
        if interval < 1:
            raise ValueError(
                f"step_cache={spec!r}: the taylorseer interval {value!r} is not an integer >= 1 (full steps run "
                "one in INTERVAL; 1 never skips); write e.g. taylorseer:3"
            )
        return StepCacheSpec(name, float(interval))
    try:
        threshold = float(value)
    except ValueError:
        threshold = math.nan
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(
            f"step_cache={spec!r}: the {name} threshold {value!r} is not a finite number >= 0 (0 never skips, "
            f"larger skips more); write e.g. {name}:{DEFAULT_STRENGTHS[name]:g}"
        )
    return StepCacheSpec(name, threshold)


# ----------------------------------------------------------------------------------------------------------------
# MagCache magnitude ratios: measured once per model and sampling setup, kept while the model lives


# transformer -> {(steps, guidance, scheduler, flow shift): ratios}; weak, so an unloaded model takes its ratios.
_MAG_RATIOS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[Any, ...], torch.Tensor]]" = (
    weakref.WeakKeyDictionary()
)


def _mag_key(pipe: Any, num_inference_steps: int, guidance_scale: float) -> tuple[Any, ...]:
    # The ratios follow the timestep schedule and the guided trajectory, so all that shapes them is in the key.
    config = pipe.scheduler.config
    shift = config.get("flow_shift") if "flow_shift" in config else config.get("shift")
    return (int(num_inference_steps), float(guidance_scale), type(pipe.scheduler).__name__, shift)


def mag_ratios_for(pipe: Any, num_inference_steps: int, guidance_scale: float) -> torch.Tensor | None:
    """The calibrated MagCache ratios of `pipe`'s transformer for these settings, or None if not measured yet."""
    return _MAG_RATIOS.get(pipe.transformer, {}).get(_mag_key(pipe, num_inference_steps, guidance_scale))


def remember_mag_ratios(
    pipe: Any, num_inference_steps: int, guidance_scale: float, ratios: "torch.Tensor | list[float]"
) -> None:
    """Keep MagCache ratios measured earlier (e.g. stored beside the checkpoint) for these settings."""
    ratios = torch.as_tensor(ratios, dtype=torch.float32).flatten()
    if ratios.numel() != num_inference_steps or not bool(torch.isfinite(ratios).all()):
        raise ValueError(
            f"ratios has {ratios.numel()} values ({ratios.tolist()[:4]}...); expected {num_inference_steps} finite "
            "magnitude ratios, one per step, as calibrate_mag_ratios measures them"
        )
    _MAG_RATIOS.setdefault(pipe.transformer, {})[_mag_key(pipe, num_inference_steps, guidance_scale)] = ratios


def forget_mag_ratios(pipe: Any) -> None:
    """Drop every calibrated ratio of `pipe`'s transformer (after its weights changed, e.g. a fine-tune)."""
    _MAG_RATIOS.pop(pipe.transformer, None)


def calibrate_mag_ratios(
    pipe: Any,
    video: Any,
    prompt: str,
    *,
    mask: Any = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Measure MagCache's ratios for `pipe` on one clip with diffusers' calibration mode and keep them.

    One full, exact sampling run; later ``mag`` jobs with the same steps, guidance and scheduler use the ratios.
    (Without this, the first ``mag`` job calibrates on its own clip.)
    """
    steps, guidance = _sampling_settings(pipe, num_inference_steps, guidance_scale)
    key = _mag_key(pipe, steps, guidance)
    _MAG_RATIOS.get(pipe.transformer, {}).pop(key, None)
    with step_cache(pipe, "mag", num_inference_steps=steps, guidance_scale=guidance):
        pipe(
            video,
            prompt,
            mask=mask,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
        )
    ratios = mag_ratios_for(pipe, steps, guidance)
    if ratios is None:
        raise RuntimeError(
            f"MagCache calibration over {steps} steps recorded no ratios; the run did not finish"
        )
    return ratios


# ----------------------------------------------------------------------------------------------------------------
# Configs and the per-call context


def _sampling_settings(
    pipe: Any, num_inference_steps: int | None, guidance_scale: float | None
) -> tuple[int, float]:
    steps = pipe.config.default_steps if num_inference_steps is None else num_inference_steps
    guidance = pipe.config.default_guidance if guidance_scale is None else guidance_scale
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(
            f"num_inference_steps={steps!r}; expected an integer >= 1 (the sampling call's steps)"
        )
    return steps, float(guidance)


def build_cache_config(
    pipe: Any,
    spec: "str | StepCacheSpec | None",
    *,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
) -> CacheConfig | None:
    """The diffusers cache config for `spec` on `pipe.transformer`, or None for "none".

    `num_inference_steps` and `guidance_scale` must be the sampling call's (default: the checkpoint's defaults):
    MagCache counts steps and looks its ratios up by them. A ``mag`` spec without calibrated ratios gives a
    calibration config (nothing is skipped; `step_cache` keeps the measured ratios).
    """
    parsed = parse_step_cache(spec)
    if parsed.name == "none":
        return None
    assert parsed.strength is not None
    steps, guidance = _sampling_settings(pipe, num_inference_steps, guidance_scale)
    if parsed.name == "first_block":
        return FirstBlockCacheConfig(threshold=parsed.strength)
    if parsed.name == "mag":
        ratios = mag_ratios_for(pipe, steps, guidance)
        if ratios is None:
            return MagCacheConfig(calibrate=True, num_inference_steps=steps)
        return MagCacheConfig(
            threshold=parsed.strength,
            # A ratio of exactly 1 adds no error, so threshold 0 alone could still skip: also allow no skips.
            max_skip_steps=0 if parsed.strength == 0 else MAG_MAX_SKIP_STEPS,
            retention_ratio=MAG_RETENTION_RATIO,
            num_inference_steps=steps,
            mag_ratios=ratios.clone(),
        )
    # taylorseer: predict the last block's output, let the others return diffusers' cheap zeros meanwhile.
    last = len(pipe.transformer.blocks) - 1
    return TaylorSeerCacheConfig(
        cache_interval=int(parsed.strength),
        disable_cache_before_step=TAYLORSEER_WARMUP_STEPS,
        max_order=1,
        taylor_factors_dtype=pipe.transformer.dtype,
        skip_predict_identifiers=[rf"blocks\.{index}" for index in range(last)],
        cache_identifiers=[rf"blocks\.{last}"],
    )


@dataclass
class StepCacheRun:
    """What `step_cache` enabled for one call: the parsed spec, the diffusers config (None for "none") and whether
    this call calibrates MagCache (it then skips nothing)."""

    spec: StepCacheSpec
    config: CacheConfig | None
    calibrating: bool = False


@contextmanager
def step_cache(
    pipe: Any,
    spec: "str | StepCacheSpec | None",
    *,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
) -> Iterator[StepCacheRun]:
    """Enable the step cache `spec` on `pipe.transformer` for the sampling call made inside; always disable it.

    Pass the call's `num_inference_steps` and `guidance_scale` (default: the checkpoint's defaults). "none" (or
    None / "") does nothing at all. Raises `RuntimeError` if the transformer already has a cache enabled by
    someone else, `ValueError` for a bad spec.
    """
    parsed = parse_step_cache(spec)
    if parsed.name == "none":
        yield StepCacheRun(parsed, None)
        return
    transformer = pipe.transformer
    if getattr(transformer, "_parallel_config", None) is not None:
        # The cache hooks would compare a rank's share of the tokens with residuals of the whole sequence.
        raise ValueError(
            f'step_cache={str(parsed)!r}: step caches do not combine with context parallelism; use "none"'
        )
    if transformer.is_cache_enabled:
        raise RuntimeError(
            f"step_cache={str(parsed)!r}: the transformer already has a cache enabled "
            f"({type(transformer._cache_config).__name__}); call pipe.transformer.disable_cache() first"
        )
    steps, guidance = _sampling_settings(pipe, num_inference_steps, guidance_scale)
    config = build_cache_config(pipe, parsed, num_inference_steps=steps, guidance_scale=guidance)
    calibrating = isinstance(config, MagCacheConfig) and config.calibrate
    # The cache hooks wrap the blocks' forward, which a compiled block cannot call into: compiled blocks (the
    # default for exact sampling on CUDA, `acceleration.compile`) run eager for this call and are restored after.
    with eager_blocks(transformer):
        transformer.enable_cache(config)
        handle = None
        recorded: dict[str, list[float]] = {}
        try:
            if calibrating:
                handle = _watch_mag_calibration(transformer, recorded)
            yield StepCacheRun(parsed, config, calibrating)
        finally:
            if handle is not None:
                handle.remove()
            transformer.disable_cache()
    if calibrating:
        ratios = recorded.get("ratios", [])
        if len(ratios) == steps:
            remember_mag_ratios(pipe, steps, guidance, ratios)
        else:
            logger.warning(
                "MagCache calibration recorded %d ratios for %d steps (the call stopped early or used another step "
                "count); not kept",
                len(ratios),
                steps,
            )


def _watch_mag_calibration(transformer: Any, recorded: dict[str, list[float]]) -> Any:
    # diffusers' calibration appends each step's ratio to the state's list in the tail block and replaces the list
    # with a new one after the last step (it prints the finished list): keep a reference to the list each step.
    tail = transformer.blocks[-1]
    hook = HookRegistry.check_if_exists_or_initialize(tail).get_hook(_MAG_CACHE_BLOCK_HOOK)

    def keep(module: torch.nn.Module, args: Any) -> None:
        # Outside any cache context (not a sampling step of ours) diffusers raises ValueError: nothing to keep.
        with suppress(ValueError):
            recorded["ratios"] = hook.state_manager.get_state().calibration_ratios

    return tail.register_forward_pre_hook(keep)


# ----------------------------------------------------------------------------------------------------------------
# Measuring what a cache skipped


class BlockEvaluationCounter:
    """Counts MoT block evaluations asked for (`calls`) and really computed (`runs`), one per branch and block.

    A cache hook replaces a block's `forward` but not its `__call__`, so a pre-hook on the block sees every call and
    a pre-hook on each branch's feed-forward (which only the real forward reaches) sees the computed ones. For
    tests and benchmarks (hooks cost a little and break torch.compile graphs): ``with BlockEvaluationCounter(t) as
    c: ...; c.skipped_fraction``.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer
        self.calls = 0
        self.runs = 0
        self._handles: list[Any] = []

    @property
    def skipped_fraction(self) -> float:
        """Fraction of requested block evaluations that a cache skipped (0 when nothing was called)."""
        return 1.0 - self.runs / self.calls if self.calls else 0.0

    def __enter__(self) -> "BlockEvaluationCounter":
        for module in self.transformer.modules():
            if isinstance(module, VeraMoTBlock):
                self._handles.append(module.register_forward_pre_hook(self._count_call, with_kwargs=True))
                for name in BRANCHES:
                    self._handles.append(getattr(module, name).ffn.register_forward_pre_hook(self._count_run))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _count_call(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # VeraMoTBlock.forward(hidden_states, encoder_hidden_states, temb, rotary_emb, branches=BRANCHES)
        branches = args[4] if len(args) > 4 else kwargs.get("branches", BRANCHES)
        self.calls += len(branches)

    def _count_run(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self.runs += 1
