"""Memory options (`vera_engine.acceleration.memory`): each one leaves the result as it was, and really does what it says.

On a CPU-only machine the offload target and the compute device are the same memory, so device memory cannot show
a saving here. What these tests check instead is the mechanism: the hooks diffusers installs, every onload/offload
it makes (observed at `ModuleGroup.onload_` / `offload_` by `watch_onloads`), which weights are on the compute
device while each block runs, and, for disk offloading, that the weights really come back from disk. The device
memory saving itself is measured by bench/bench_memory.py on a GPU (`torch.cuda.max_memory_allocated`).
"""

import numpy as np
import pytest
import torch

from vera_engine.acceleration.memory import MemoryOptions, apply_memory_options, group_bytes, watch_onloads
from vera_engine.models.transformer_vera import VeraMoTBlock, VeraTransformer3DModel
from vera_engine.pipelines.pipeline_vera import VeraPipeline
from vera_engine.pipelines.presets import build_random_pipeline

from .conftest import make_tiny_wan_pipeline_parts

STEPS = 2


def _wan_vae_pipeline() -> VeraPipeline:
    parts = make_tiny_wan_pipeline_parts(seed=0)
    transformer = VeraTransformer3DModel.from_wan(parts["transformer"]).eval()
    # Vera-only weights are zero after from_wan; make them count, so the weights outside the blocks matter.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in ("source_embedding.weight", "alpha_layer_embedding", "composite_layer_embedding"):
            parameter = transformer.get_parameter(name)
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    parts["transformer"] = transformer
    pipe = VeraPipeline(**parts, native_height=32, native_width=32, native_frames=5, max_sequence_length=32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _video(height: int = 32, width: int = 32, frames: int = 5) -> np.ndarray:
    # Smooth content: what a codec sees in practice, and what tiling is meant for.
    coarse = torch.rand(1, 3, frames, 4, 4, generator=torch.Generator().manual_seed(0))
    video = torch.nn.functional.interpolate(coarse, size=(frames, height, width), mode="trilinear")
    return video[0].permute(1, 2, 3, 0).contiguous().numpy()


def _sample(pipe: VeraPipeline, video: np.ndarray):
    return pipe(
        video,
        "a red ball",
        num_inference_steps=STEPS,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
    )


@pytest.fixture(scope="module")
def reference():
    """Layers sampled with no memory options: what every exact option must reproduce bit for bit."""
    return _sample(_wan_vae_pipeline(), _video())


def _assert_same(out, ref) -> None:
    for name in ("edit", "alpha", "composite"):
        np.testing.assert_array_equal(getattr(out, name), getattr(ref, name), err_msg=name)


# ------------------------------------------------------------------------------------------------------------------
# Options and their combinations


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(text_encoder_offload="gpu"), ["text_encoder_offload='gpu'", "'swap'"]),
        (dict(group_offload="leaf"), ["group_offload='leaf'", "'block'"]),
        (dict(group_offload="block", num_blocks_per_group=0), ["num_blocks_per_group=0", ">= 1"]),
        (dict(vae_tile_size=64, vae_tile_stride=96), ["vae_tile_stride=96", "vae_tile_size=64"]),
        (dict(vae_tile_size=-8), ["vae_tile_size=-8"]),
    ],
)
def test_bad_option_values_are_refused_by_name(kwargs, words):
    with pytest.raises(ValueError) as error:
        MemoryOptions(**kwargs)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize(
    "kwargs, names",
    [
        (dict(model_cpu_offload=True, group_offload="block"), ["model_cpu_offload", "group_offload"]),
        (
            dict(model_cpu_offload=True, text_encoder_offload="cpu"),
            ["model_cpu_offload", "text_encoder_offload"],
        ),
        (dict(use_stream=True), ["use_stream", "group_offload"]),
        (dict(offload_to_disk="/tmp/x"), ["offload_to_disk", "group_offload"]),
        (dict(num_blocks_per_group=2), ["num_blocks_per_group", "group_offload"]),
        (
            dict(group_offload="block", use_stream=True, num_blocks_per_group=2),
            ["use_stream", "num_blocks_per_group"],
        ),
    ],
)
def test_incompatible_combinations_name_both_options(kwargs, names):
    with pytest.raises(ValueError) as error:
        MemoryOptions(**kwargs)
    for name in names:
        assert name in str(error.value)


def test_streams_need_cuda_and_options_apply_once():
    pipe = build_random_pipeline("tiny")
    with pytest.raises(ValueError, match=r"use_stream=True needs a CUDA device, but device='cpu'"):
        apply_memory_options(pipe, MemoryOptions(group_offload="block", use_stream=True), "cpu")
    with pytest.raises(TypeError, match="MemoryOptions"):
        apply_memory_options(pipe, {"group_offload": "block"}, "cpu")
    apply_memory_options(pipe, MemoryOptions(group_offload="block"), "cpu")
    with pytest.raises(RuntimeError, match=r"already has offloading \(transformer has group offloading\)"):
        apply_memory_options(pipe, MemoryOptions(), "cpu")


def test_default_options_place_everything_on_the_device_and_note_nothing(reference):
    pipe = _wan_vae_pipeline()
    assert apply_memory_options(pipe, MemoryOptions(), "cpu") == []
    _assert_same(_sample(pipe, _video()), reference)


# ------------------------------------------------------------------------------------------------------------------
# Group offloading of the transformer


def _block_probe(pipe: VeraPipeline, ledger, seen: list) -> None:
    # A leaf inside each block runs after diffusers has onloaded that block's group: record what is resident then.
    for block in pipe.transformer.blocks:
        block.edit.attn1.to_q.register_forward_pre_hook(
            lambda module, args: seen.append((set(ledger.resident), ledger.resident_bytes))
        )


@pytest.mark.parametrize("blocks_per_group", [1, 2])
def test_group_offload_is_exact_and_keeps_one_block_group_on_the_device(reference, blocks_per_group):
    pipe = _wan_vae_pipeline()
    tensors = [*pipe.transformer.parameters(), *pipe.transformer.buffers()]
    total = sum(t.numel() * t.element_size() for t in tensors)
    notes = apply_memory_options(
        pipe, MemoryOptions(group_offload="block", num_blocks_per_group=blocks_per_group), "cpu"
    )
    assert "group_offload" in notes[0]
    assert pipe._execution_device == torch.device("cpu")
    seen: list = []
    with watch_onloads() as ledger:
        _block_probe(pipe, ledger, seen)
        out = _sample(pipe, _video())
    _assert_same(out, reference)

    layers = pipe.transformer.config.num_layers
    groups = -(-layers // blocks_per_group) + 1  # block groups + the parts outside the blocks
    # Every step's forward onloads each group once and offloads it again; nothing stays behind.
    assert ledger.onloads == ledger.offloads == STEPS * groups
    assert ledger.resident == {}
    # While a block runs, exactly two groups are on the device: the parts outside the blocks and its own group.
    assert len(seen) == STEPS * layers
    assert all(len(resident) == 2 for resident, _ in seen)
    assert ledger.peak_bytes == max(size for _, size in seen)
    if blocks_per_group == 1:
        block_bytes = group_bytes(next(g for g in seen[0][0] if isinstance(g.modules[0], VeraMoTBlock)))
        # The peak is the whole transformer but all blocks except one.
        assert ledger.peak_bytes == total - (layers - 1) * block_bytes


def test_group_offload_to_disk_reads_the_weights_back_from_disk(reference, tmp_path):
    pipe = _wan_vae_pipeline()
    apply_memory_options(pipe, MemoryOptions(group_offload="block", offload_to_disk=str(tmp_path)), "cpu")
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == pipe.transformer.config.num_layers + 1
    # Between uses the parameters are placeholders: overwrite them with garbage; the result must not change,
    # because every use reads the weights from the files.
    with torch.no_grad():
        for parameter in pipe.transformer.parameters():
            parameter.fill_(float("nan"))
    _assert_same(_sample(pipe, _video()), reference)


# ------------------------------------------------------------------------------------------------------------------
# Text encoder


def test_text_encoder_swap_is_on_the_device_only_while_encoding(reference):
    pipe = _wan_vae_pipeline()
    notes = apply_memory_options(pipe, MemoryOptions(text_encoder_offload="swap"), "cpu")
    assert "text encoder stays in CPU memory" in notes[0]
    encoder_group = pipe.text_encoder._diffusers_hook.get_hook("group_offloading").group
    during_transformer: list = []
    with watch_onloads() as ledger:
        pipe.transformer.blocks[0].edit.attn1.to_q.register_forward_pre_hook(
            lambda module, args: during_transformer.append(encoder_group in ledger.resident)
        )
        out = _sample(pipe, _video())
    _assert_same(out, reference)
    # Prompt and negative prompt in one batched encode (issue 27): the whole encoder onloaded and offloaded once.
    assert [kind for kind, group in ledger.events if group is encoder_group] == ["onload", "offload"]
    assert group_bytes(encoder_group) == sum(
        p.numel() * p.element_size() for p in pipe.text_encoder.parameters()
    ) + sum(b.numel() * b.element_size() for b in pipe.text_encoder.buffers())
    assert during_transformer and not any(during_transformer)


def test_text_encoder_on_cpu_runs_there_and_the_states_reach_the_transformer(reference):
    pipe = _wan_vae_pipeline()
    notes = apply_memory_options(
        pipe, MemoryOptions(text_encoder_offload="cpu", group_offload="block"), "cpu"
    )
    assert any("encodes there" in note for note in notes)
    encoder_devices: list = []
    pipe.text_encoder.register_forward_pre_hook(
        lambda module, args: encoder_devices.append(args[0].device.type)
    )
    _assert_same(_sample(pipe, _video()), reference)
    # The CPU is also the compute device here, so this shows the path, not a saving: the encoder ran on the CPU
    # with the execution device taken from the transformer's group offloading.
    assert encoder_devices == ["cpu"]  # prompt and negative prompt in one batched call
    assert pipe._execution_device == torch.device("cpu")


@pytest.mark.parametrize(
    ("mode", "device", "placement"),
    [
        ("auto", "cuda", "swap"),  # the default on a GPU: off it between encodes
        ("auto", "cuda:1", "swap"),
        ("auto", "cpu", "none"),  # nothing to save where the offload target is the device
        ("none", "cuda", "none"),  # the explicit way to keep it resident
        ("cpu", "cuda", "cpu"),
        ("swap", "cpu", "swap"),
    ],
)
def test_text_encoder_placement_is_swap_by_default_on_cuda_only(mode, device, placement):
    from vera_engine.acceleration.memory import text_encoder_placement

    assert text_encoder_placement(mode, device) == placement


def test_pipelines_loaded_for_cuda_get_the_default_options_and_swaps_pin_on_cuda():
    from vera_engine.acceleration.memory import default_memory_options, pinned_swap

    assert MemoryOptions().text_encoder_offload == "auto"
    assert default_memory_options(None, "cuda") == MemoryOptions()
    assert default_memory_options(None, "cuda:0") == MemoryOptions()
    assert default_memory_options(None, "cpu") is None  # moved to the device whole, as before
    resident = MemoryOptions(text_encoder_offload="none")
    assert default_memory_options(resident, "cuda") is resident
    assert pinned_swap("cuda") and pinned_swap(torch.device("cuda", 1))
    assert not pinned_swap("cpu")
    # model_cpu_offload manages the text encoder itself; the default placement does not conflict with it.
    assert MemoryOptions(model_cpu_offload=True).text_encoder_offload == "auto"


def _record_text_encoder_placement(pipe, monkeypatch) -> tuple[list, list]:
    from vera_engine.acceleration import memory

    moves: list = []
    swaps: list = []
    # There is no CUDA device here: the other components' placement is not under test.
    monkeypatch.setattr(pipe.transformer, "to", lambda *a, **k: pipe.transformer)
    monkeypatch.setattr(pipe.vae, "to", lambda *a, **k: pipe.vae)
    monkeypatch.setattr(pipe.text_encoder, "to", lambda *a, **k: moves.append((a, k)) or pipe.text_encoder)
    monkeypatch.setattr(memory, "_copy_stream", lambda device: ("stream", device))
    monkeypatch.setattr(
        memory,
        "_swap_from_pinned_memory",
        lambda encoder, device, stream: swaps.append((encoder, device, stream)),
    )
    return moves, swaps


def test_default_options_keep_the_text_encoder_off_a_cuda_device(monkeypatch):
    pipe = build_random_pipeline("tiny", seed=0)
    moves, swaps = _record_text_encoder_placement(pipe, monkeypatch)
    notes = apply_memory_options(pipe, MemoryOptions(), "cuda")
    cuda = torch.device("cuda")
    assert moves == []  # never moved onto the GPU whole
    assert swaps == [(pipe.text_encoder, cuda, ("stream", cuda))]
    assert any("pinned CPU memory" in note for note in notes)


def test_text_encoder_offload_none_keeps_it_resident_on_cuda(monkeypatch):
    pipe = build_random_pipeline("tiny", seed=0)
    moves, swaps = _record_text_encoder_placement(pipe, monkeypatch)
    assert apply_memory_options(pipe, MemoryOptions(text_encoder_offload="none"), "cuda") == []
    assert moves == [((torch.device("cuda"),), {})] and swaps == []


def test_pinned_swap_is_exact_and_copies_nothing_back(reference, monkeypatch):
    """The CUDA swap path (diffusers' streamed `ModuleGroup`) run on the CPU: a CPU stream stands in for the CUDA
    one and `pin_memory` (which needs CUDA) for a copy, so what is checked is the mechanism: every weight copied
    to its pinned home once, encodes reading from it, and an offload that points the weights back at it."""
    from vera_engine.acceleration import memory

    pinned: list = []

    def pin_memory(tensor, *args, **kwargs):
        copy = tensor.clone()
        pinned.append(copy.data_ptr())
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda tensor, *a, **k: tensor.data_ptr() in pinned)
    monkeypatch.setattr(memory, "pinned_swap", lambda device: True)
    monkeypatch.setattr(memory, "_copy_stream", lambda device: torch.cpu.Stream())
    # CPU streams are ordered with the host already; torch's stand-in lacks the method diffusers calls.
    monkeypatch.setattr(torch.cpu.Stream, "synchronize", lambda stream: None, raising=False)
    pipe = _wan_vae_pipeline()
    tensors = [*pipe.text_encoder.parameters(), *pipe.text_encoder.buffers()]
    notes = apply_memory_options(pipe, MemoryOptions(text_encoder_offload="swap"), "cpu")
    assert any("pinned CPU memory" in note for note in notes)
    group = pipe.text_encoder._diffusers_hook.get_hook("group_offloading").group
    assert group.stream is not None and group.non_blocking is False
    homes = [t.data_ptr() for t in tensors]
    # Each weight pinned once, and the weights live in those copies.
    assert len(pinned) == len(tensors) and sorted(homes) == sorted(pinned)
    with watch_onloads() as ledger:
        out = _sample(pipe, _video())
    _assert_same(out, reference)
    assert [kind for kind, g in ledger.events if g is group] == ["onload", "offload"]
    # Offloading pointed every weight back at its pinned copy: nothing copied back, nothing pinned again.
    assert [t.data_ptr() for t in tensors] == homes and len(pinned) == len(tensors)


# ------------------------------------------------------------------------------------------------------------------
# Model CPU offload


def test_model_cpu_offload_is_exact_and_hooks_every_component(reference):
    from accelerate.hooks import CpuOffload

    pipe = _wan_vae_pipeline()
    apply_memory_options(pipe, MemoryOptions(model_cpu_offload=True), "cpu")
    for name in ("text_encoder", "transformer", "vae"):
        assert isinstance(getattr(pipe, name)._hf_hook, CpuOffload), name
    _assert_same(_sample(pipe, _video()), reference)
    # The pipeline re-arms the hooks after the call (`maybe_free_model_hooks`): a second call is the same.
    _assert_same(_sample(pipe, _video()), reference)


# ------------------------------------------------------------------------------------------------------------------
# VAE tiling


def _count_calls(module: torch.nn.Module) -> list:
    calls: list = []
    module.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape[-2:])))
    return calls


def test_vae_tiling_runs_the_codec_per_tile_with_a_bounded_difference():
    video = _video(height=64, width=64)
    plain = _wan_vae_pipeline()
    plain_decodes, plain_encodes = _count_calls(plain.vae.decoder), _count_calls(plain.vae.encoder)
    reference = _sample(plain, video)

    tiled = _wan_vae_pipeline()
    notes = apply_memory_options(
        tiled, MemoryOptions(vae_tiling=True, vae_tile_size=32, vae_tile_stride=24), "cpu"
    )
    assert notes == ["vae_tiling: 32px tiles every 24px"]
    tiled_decodes, tiled_encodes = _count_calls(tiled.vae.decoder), _count_calls(tiled.vae.encoder)
    out = _sample(tiled, video)

    # Untiled, the decoder sees whole 8x8 latent frames; tiled, 4x4 latent tiles at 3-latent strides (3x3 tiles).
    assert set(plain_decodes) == {(8, 8)}
    assert max(tiled_decodes) <= (4, 4)
    assert len(tiled_decodes) == 9 * len(plain_decodes)
    assert set(plain_encodes) == {(64, 64)} and max(tiled_encodes) <= (32, 32)
    for name in ("edit", "alpha", "composite"):
        difference = np.abs(getattr(out, name) - getattr(reference, name))
        # A random tiny VAE's receptive field spans whole tiles, so seams differ far more than with trained Wan
        # weights at 256px tiles; the bound still catches a misplaced or missing tile (errors of order 1).
        assert difference.mean() < 0.03, (name, difference.mean())
        assert difference.max() < 0.4, (name, difference.max())


def test_vae_tiling_is_skipped_exactly_for_the_space_to_depth_codec():
    video = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    plain = build_random_pipeline("tiny")
    reference = plain(video, "a ball", num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    pipe = build_random_pipeline("tiny")
    notes = apply_memory_options(pipe, MemoryOptions(vae_tiling=True), "cpu")
    assert notes == [
        "vae_tiling: skipped, the space-to-depth codec is a per-pixel rearrangement with no activations"
    ]
    out = pipe(video, "a ball", num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    _assert_same(out, reference)


def test_vae_tile_sizes_must_fit_the_wan_compression():
    pipe = _wan_vae_pipeline()
    with pytest.raises(
        ValueError, match=r"vae_tile_stride=20; expected a multiple of the VAE's spatial compression 8"
    ):
        apply_memory_options(
            pipe, MemoryOptions(vae_tiling=True, vae_tile_size=32, vae_tile_stride=20), "cpu"
        )


# ------------------------------------------------------------------------------------------------------------------
# The benchmark


@pytest.mark.slow
def test_bench_memory_measures_each_option_in_its_own_process():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "bench_memory.py"
    command = [sys.executable, str(script), "--config", "tiny-wan", "--device", "cpu", "--height", "64"]
    command += [
        "--width",
        "64",
        "--frames",
        "5",
        "--steps",
        "1",
        "--options",
        "none,group_offload_disk,minimal",
    ]
    done = subprocess.run(
        [*command, "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["option"]: row for row in map(json.loads, done.stdout.strip().splitlines())}
    assert list(rows) == ["none", "group_offload_disk", "minimal"]
    for row in rows.values():
        assert row["peak_bytes"] >= row["at_rest_bytes"] > 0
    assert rows["none"]["onloads"] == 0
    assert rows["minimal"]["onloads"] == rows["group_offload_disk"]["onloads"] > 0
    # Disk offloading wrote the transformer's groups; the text encoder on the CPU and group offloading leave
    # fewer weight bytes on the compute device than the default.
    assert rows["group_offload_disk"]["disk_bytes"] > 0
    assert rows["minimal"]["device_weight_bytes"] < rows["group_offload_disk"]["device_weight_bytes"]
    assert rows["group_offload_disk"]["device_weight_bytes"] < rows["none"]["device_weight_bytes"]
