"""`vera-engine convert-wan` on a tiny Wan folder written with save_pretrained, and `vera-engine bench-step`."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from vera_engine import VeraPipeline
from vera_engine.pipelines.model_store import max_window_frames
from vera_engine.pipelines.presets import WAN_1_3B
from vera_engine.tools.bench import bench_step, step_flops
from vera_engine.tools.cli import main

from .conftest import make_tiny_wan_pipeline_parts


@pytest.fixture
def tiny_wan_folder(tmp_path):
    parts = make_tiny_wan_pipeline_parts()
    WanPipeline(**parts).save_pretrained(tmp_path / "wan")
    return tmp_path / "wan", parts["transformer"]


def test_convert_wan_builds_a_vera_pipeline_folder(tiny_wan_folder, tmp_path):
    wan_dir, wan = tiny_wan_folder
    out = tmp_path / "vera"
    assert (
        main(
            [
                "convert-wan",
                "--wan",
                str(wan_dir),
                "--out",
                str(out),
                "--native-height",
                "32",
                "--native-width",
                "32",
                "--native-frames",
                "5",
            ]
        )
        == 0
    )
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "VeraPipeline" and index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert not (tmp_path / "vera.partial").exists()

    pipe = VeraPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.native_size == (32, 32)
    # Every branch of the converted transformer is the Wan transformer.
    x = torch.randn(1, 16, 2, 8, 8)
    text = torch.randn(1, 5, 16)
    with torch.no_grad():
        expected = wan(x, torch.tensor([300.0]), text).sample
        for branch in ("edit", "alpha", "composite"):
            got = pipe.transformer.forward_branch(branch, x, torch.tensor([300.0]), text)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    video = np.random.default_rng(0).random((5, 16, 16, 3), dtype=np.float32)
    result = pipe(video, "add a ball", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert result.edit.shape == (5, 16, 16, 3)
    # The engine publishes the longest window from the folder's configs alone; the loaded pipeline checks jobs
    # against its rotary reach: one rule (pipelines/windows.py), so the two agree for a causal Wan VAE too.
    # rope_max_seq_len 32, patch_t 1, VAE temporal compression 4:
    assert max_window_frames(out) == pipe.position_limits[0] == (32 * 1 - 1) * 4 + 1


def test_convert_wan_errors_are_clear(tiny_wan_folder, tmp_path, capsys):
    wan_dir, _ = tiny_wan_folder
    assert main(["convert-wan", "--wan", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "has no model_index.json" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert main(["convert-wan", "--wan", str(wan_dir), "--out", str(tmp_path / "busy")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "busy" / "file").read_text() == "x"


def test_step_flops_match_the_published_vera_1_3b_figures():
    # 832x480: Wan VAE latents 60x104, 2x2 patches -> 30x52 tokens a latent frame; 512 text tokens.
    for frames, tflop in ((49, 841), (81, 2036)):
        tokens = ((frames - 1) // 4 + 1) * 30 * 52
        flops = step_flops(WAN_1_3B.transformer, tokens, 512, batch=1)
        assert flops.total / 1e12 == pytest.approx(tflop, rel=2e-3)
    # The joint attention core is ~88% of the FLOPs at 81 frames and a step costs ~7x a Wan forward (issue figures).
    tokens = 21 * 30 * 52
    vera = step_flops(WAN_1_3B.transformer, tokens, 512, batch=1)
    wan = step_flops(WAN_1_3B.transformer, tokens, 512, batch=1, streams=1)
    assert vera.attention_core / vera.total == pytest.approx(0.88, abs=0.01)
    assert vera.total / wan.total == pytest.approx(7.2, abs=0.1)


def test_bench_step_tiny_reports_a_measured_step():
    result = bench_step("tiny", device="cpu", repeats=1)
    assert result.tokens_per_stream == 4 * 8 * 8 and result.batch == 2
    assert result.seconds_per_step > 0 and result.achieved_tflops > 0 and result.peak_memory_gib > 0
    reference = bench_step("tiny", device="cpu", repeats=1, reference_wan=True, cfg=False)
    assert reference.tflop_per_step < result.tflop_per_step / 3


def test_bench_step_cli_json_and_full_size_refused_on_cpu():
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "vera_engine.tools.cli",
            "bench-step",
            "--config",
            "tiny",
            "--json",
            "--repeats",
            "1",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["config"] == "tiny" and report["tokens_per_stream"] == 256
    refused = subprocess.run(
        [sys.executable, "-m", "vera_engine", "bench-step", "--config", "wan-1.3b", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "run it on a GPU" in refused.stderr


@pytest.mark.parametrize(
    ("cfg", "sequential", "forwards"), [(True, False, [2, 2]), (True, True, [1] * 4), (False, False, [1, 1])]
)
def test_bench_step_cfg_modes_run_the_forwards_they_name(monkeypatch, cfg, sequential, forwards):
    from vera_engine.models.transformer_vera import VeraTransformer3DModel

    batches = []
    original = VeraTransformer3DModel.forward

    def counting_forward(self, edit_latents, *args, **kwargs):
        batches.append(edit_latents.shape[0])
        return original(self, edit_latents, *args, **kwargs)

    monkeypatch.setattr(VeraTransformer3DModel, "forward", counting_forward)
    result = bench_step("tiny", device="cpu", repeats=1, cfg=cfg, cfg_sequential=sequential, steps=10)
    # One warm-up step and one timed step.
    assert batches == forwards
    assert (
        result.cfg_mode
        == {(True, False): "batched", (True, True): "sequential", (False, False): "off"}[(cfg, sequential)]
    )
    assert result.seconds_per_clip == pytest.approx(10 * result.seconds_per_step)
    with pytest.raises(ValueError, match="sequential CFG is two passes"):
        bench_step("tiny", device="cpu", cfg=False, cfg_sequential=True)


@pytest.mark.slow
def test_compiled_repeated_block_gives_the_eager_result():
    from vera_engine.pipelines.presets import build_random_transformer

    model = build_random_transformer("tiny", seed=1).eval()
    with torch.no_grad():
        model.source_embedding.weight.normal_(0, 0.2)
    generator = torch.Generator().manual_seed(0)
    latents = [torch.randn(2, 12, 2, 8, 8, generator=generator) for _ in range(4)]
    inputs = dict(
        edit_latents=latents[0],
        alpha_latents=latents[1],
        composite_latents=latents[2],
        timestep=torch.tensor([900.0, 100.0]),
        encoder_hidden_states=torch.randn(2, 5, 32, generator=generator),
        source_latents=latents[3],
        return_dict=False,
    )
    with torch.no_grad():
        eager = model(**inputs)
        model.compile_repeated_blocks(fullgraph=True)
        compiled = model(**inputs)
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
