"""Run under `torchrun --nproc-per-node 2` (gloo, CPU): context-parallel Vera against the same model on one process.

Each rank first computes the reference without parallelism, then enables Ulysses or ring attention and computes the
same things again with the sequence split across the ranks; rank 0 writes the differences as JSON to argv[2].
"""

import json
import sys

import numpy as np
import torch

from vera_engine.acceleration.parallel import enable_context_parallel, init_distributed
from vera_engine.pipelines.presets import build_random_transformer


def transformer_inputs(model, frames: int, height: int, width: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    channels = model.config.in_channels

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    latents = (2, channels, frames, height, width)
    return dict(
        edit_latents=randn(*latents),
        alpha_latents=randn(*latents),
        composite_latents=randn(*latents),
        timestep=torch.tensor([700.0, 150.0]),
        encoder_hidden_states=randn(2, 7, model.config.text_dim),
        source_latents=randn(*latents),
        mask_latents=randn(*latents),
    )


def cpu_flash_attention_forward_op(
    ctx,
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    return_lse=False,
    _save_ctx=True,
    _parallel_config=None,
):
    """diffusers' `_native_flash` forward op with torch's CPU flash kernel in place of the CUDA one.

    Ring attention merges partial results by their log-sum-exp: diffusers' `native` op cannot return it (and
    `enable_context_parallel` refuses ring with it), its LSE-returning ops (cuDNN, flash) are CUDA-only. The CPU flash
    kernel returns the LSE in the same layout, so on CPU ring attention is checked through the `_native_flash` backend
    with this kernel; on GPUs the backend runs its own.
    """
    assert attn_mask is None and not enable_gqa and dropout_p == 0.0
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), is_causal=is_causal, scale=scale
    )
    out = out.transpose(1, 2).contiguous()
    lse = lse.transpose(1, 2).contiguous()
    return (out, lse) if return_lse else out


def main() -> None:
    kind, out_path = sys.argv[1], sys.argv[2]
    rank, _world, _device = init_distributed("cpu")
    ring_refused_with_native = None
    if kind == "ring":
        from diffusers.models import attention_dispatch

        attention_dispatch._native_flash_attention_forward_op = cpu_flash_attention_forward_op
    torch.manual_seed(0)

    # 1. A transformer with every Vera-only parameter non-zero, so source, mask and layer identity all matter.
    model = build_random_transformer("tiny", seed=3).eval()
    with torch.no_grad():
        for name in ("source_embedding", "mask_embedding"):
            getattr(model, name).weight.normal_(0, 0.2)
        model.alpha_layer_embedding.normal_(0, 0.5)
        model.composite_layer_embedding.normal_(0, 0.5)
    inputs = transformer_inputs(model, frames=3, height=8, width=12, seed=1)
    with torch.no_grad():
        reference = model(**inputs)
        reference_no_mask = model(**{**inputs, "mask_latents": None})

    # 2. The shipped checkpoint, sampled through the whole pipeline.
    from vera_engine.pipelines.model_store import load_pipeline

    pipe = load_pipeline("default", device="cpu")
    rng = np.random.default_rng(5)
    video = rng.random((8, 32, 32, 3), dtype=np.float32)
    mask = (rng.random((8, 32, 32)) > 0.5).astype(np.float32)

    def sample():
        return pipe(
            video,
            "add a red circle moving left",
            mask=mask,
            num_inference_steps=3,
            guidance_scale=2.0,
            generator=torch.Generator().manual_seed(7),
        )

    pipeline_reference = sample()

    def max_diff(a, b) -> float:
        return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))

    if kind == "ring":
        # The default `native` backend cannot do ring attention: refused with a clear message.
        try:
            enable_context_parallel(model, kind)
        except ValueError as exc:
            ring_refused_with_native = "log-sum-exp" in str(exc)
        model.set_attention_backend("_native_flash")
        pipe.transformer.set_attention_backend("_native_flash")
    enable_context_parallel(model, kind)
    enable_context_parallel(pipe.transformer, kind)
    seen_lengths = []
    model.blocks[1].register_forward_pre_hook(lambda _m, args: seen_lengths.append(args[0].shape[2]))
    with torch.no_grad():
        parallel = model(**inputs)
        parallel_no_mask = model(**{**inputs, "mask_latents": None})
    # What each rank runs outside the transformer: rank 0 encodes (the caches of the reference run are dropped so
    # that the encoders must run), the decodes are shared out.
    pipe.__dict__.pop("_text_cache", None)
    pipe.__dict__.pop("_video_cache", None)
    work = {"text_encoder": 0, "encode_video": 0, "decoded_layers": 0}
    pipe.text_encoder.register_forward_pre_hook(
        lambda _m, _a: work.__setitem__("text_encoder", work["text_encoder"] + 1)
    )
    encode_video, decode_latents = pipe.encode_video, pipe.decode_latents

    def counting_encode(video):
        work["encode_video"] += 1
        return encode_video(video)

    def counting_decode(latents):
        work["decoded_layers"] += latents.shape[0]
        return decode_latents(latents)

    pipe.encode_video, pipe.decode_latents = counting_encode, counting_decode
    pipeline_parallel = sample()
    pipe.encode_video, pipe.decode_latents = encode_video, decode_latents
    pipeline_difference = max(
        max_diff(getattr(pipeline_reference, n), getattr(pipeline_parallel, n))
        for n in ("edit", "alpha", "composite")
    )
    per_rank = [None, None]
    torch.distributed.all_gather_object(per_rank, {"work": work, "pipeline": pipeline_difference})

    result = {
        "transformer": max(
            max_diff(getattr(reference, n), getattr(parallel, n)) for n in ("edit", "alpha", "composite")
        ),
        "transformer_no_mask": max(
            max_diff(getattr(reference_no_mask, n), getattr(parallel_no_mask, n))
            for n in ("edit", "alpha", "composite")
        ),
        "transformer_scale": float(reference.edit.abs().max()),
        "pipeline": max(rank_result["pipeline"] for rank_result in per_rank),
        "work_per_rank": [rank_result["work"] for rank_result in per_rank],
        "ring_refused_with_native": ring_refused_with_native,
        "tokens_per_layer": 3 * 8 * 12 // 4,
        "tokens_seen_by_a_rank": seen_lengths,
        "pipeline_alpha_mean": float(np.mean(pipeline_reference.alpha)),
        "hooks": sorted(
            name
            for name, module in pipe.transformer.named_modules()
            if getattr(module, "_diffusers_hook", None)
        ),
    }
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(result, handle)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
