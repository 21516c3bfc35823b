"""One training step (forward, backward, AdamW) of a preset's transformer in float32 and under bf16 autocast.

Usage (repository root):
    OMP_NUM_THREADS=2 python bench/bench_train_step.py --preset vera-tiny --batch-size 8   # CPU
    OMP_NUM_THREADS=2 python bench/bench_train_step.py --preset vera-tiny vera-tiny-v2     # two shapes, one run
    python bench/bench_train_step.py --preset vera-tiny --batch-size 64 --device cuda

Both precisions (and every preset named) run in this one process, so their ratios are what to compare across
machines.
The loss is `vera_engine.training.train.flow_matching_loss`, the one `vera-engine train` uses; the batch is random latents
of the preset's native size and a prompt half of zero padding (the tiny presets mask it). It also prints the two
losses on that batch with the same noise, to show bf16 autocast is not changing what is learned.
"""

import argparse
import time

import torch

from vera_engine.pipelines.presets import build_random_transformer, get_preset
from vera_engine.training.train import flow_matching_loss


def random_batch(preset_name: str, batch_size: int, device: torch.device) -> tuple[dict, torch.Tensor]:
    preset = get_preset(preset_name)
    if preset.codec_spatial_factor is None:
        raise SystemExit(
            f"--preset {preset_name}: a full Wan size trains on Wan VAE latents; this benchmark covers the tiny presets "
            "(their space-to-depth codec fixes the latent shape): tiny, vera-tiny"
        )
    config = preset.transformer
    channels = config["in_channels"]
    factor = preset.codec_spatial_factor
    shape = (
        batch_size,
        channels,
        preset.native_frames,
        preset.native_height // factor,
        preset.native_width // factor,
    )
    generator = torch.Generator().manual_seed(0)
    batch = {
        name: torch.randn(shape, generator=generator).to(device)
        for name in ("edit", "alpha", "composite", "source", "mask")
    }
    batch["mask_keep"] = torch.ones(batch_size, device=device)
    text = torch.randn(batch_size, preset.max_sequence_length, config["text_dim"], generator=generator)
    text[:, preset.max_sequence_length // 2 :] = 0
    return batch, text.to(device)


def time_steps(model, batch, text, bf16: bool, warmup: int, repeats: int) -> tuple[float, float]:
    """Seconds per training step and the first step's loss."""
    device = text.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    first_loss = float("nan")

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = flow_matching_loss(model, batch, text, generator, timestep_shift=2.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    for index in range(warmup):
        value = step()
        if index == 0:
            first_loss = value
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats, first_loss


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", nargs="+", default=["vera-tiny"], help="one or more tiny presets")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    device = torch.device(args.device)
    bf16_seconds = {}
    for preset in args.preset:
        batch, text = random_batch(preset, args.batch_size, device)
        results = {}
        for name, bf16 in (("float32", False), ("bf16 autocast", True)):
            # The same seeded weights for both, so the first losses are comparable.
            model = build_random_transformer(preset, seed=0).to(device).train()
            results[name] = time_steps(model, batch, text, bf16, args.warmup, args.repeats)
        print(
            f"{preset}, batch {args.batch_size}, {device.type}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}"
        )
        for name, (seconds, loss) in results.items():
            print(f"  {name:<14} {seconds:.3f} s/step   first loss {loss:.4f}")
        print(f"  float32 / bf16: {results['float32'][0] / results['bf16 autocast'][0]:.2f}x")
        bf16_seconds[preset] = results["bf16 autocast"][0]
    if len(bf16_seconds) > 1:
        first = args.preset[0]
        for preset, seconds in bf16_seconds.items():
            print(f"bf16 step time, {first} / {preset}: {bf16_seconds[first] / seconds:.2f}x")


if __name__ == "__main__":
    main()
