"""`vera-engine train`: the recipe's pieces, a short run that lowers the loss, checkpoints, resume and DDP."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from vera_engine import VeraPipeline
from vera_engine.pipelines.presets import build_random_pipeline
from vera_engine.tools.cli import main
from vera_engine.training.data import generate_dataset
from vera_engine.training.data.dataset import LayeredVideoDataset, collate_layered
from vera_engine.training.train import (
    BRANCHES,
    TrainConfig,
    branch_of_parameter,
    branch_parameter_groups,
    clip_gradients,
    encode_batch,
    flow_matching_loss,
    learning_rate_factor,
    parse_branch_lr_scales,
    parse_mask_dropout,
    read_history,
    read_log,
    run_history,
    train,
    warmup_factor,
)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("layered")
    generate_dataset(root, {"train": 8, "heldout": 2}, frames=4, height=32, width=32, seed=5)
    return root


def _tiny_config(dataset_dir, out, **settings) -> TrainConfig:
    """A run of the tiny preset on the module's dataset: batch 2, no warm-up, saved every 2 steps; `settings` override."""
    defaults = dict(preset="tiny", steps=2, batch_size=2, warmup_steps=0, save_every=2)
    return TrainConfig(data=str(dataset_dir), out=str(out), **{**defaults, **settings})


def _fixed_batch_loss(pipe, dataset_dir) -> float:
    # The same clips, crops, noise and timesteps every time: a loss that can only move if the weights do.
    dataset = LayeredVideoDataset(dataset_dir, "train", random_crop=False, hflip=False)
    batch = collate_layered([dataset[i] for i in range(4)])
    generator = torch.Generator().manual_seed(123)
    latents = encode_batch(
        pipe, batch, {"object_addition": 0.0, "background_change": 0.0}, generator, torch.device("cpu")
    )
    text = torch.stack(
        [pipe.encode_prompt(p, torch.device("cpu"), torch.float32)[0] for p in batch["instruction"]]
    )
    pipe.transformer.eval()
    with torch.no_grad():
        loss, _ = flow_matching_loss(pipe.transformer, latents, text, torch.Generator().manual_seed(7))
    return float(loss)


def test_every_parameter_belongs_to_exactly_one_branch_group():
    model = build_random_pipeline("tiny").transformer
    groups = branch_parameter_groups(model, 1e-5, {"edit": 0.1, "alpha": 10.0, "composite": 10.0})
    assert [g["name"] for g in groups] == list(BRANCHES)
    assert [g["lr"] for g in groups] == pytest.approx([1e-6, 1e-4, 1e-4])
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert branch_of_parameter("blocks.1.alpha.attn1.to_q.weight") == "alpha"
    assert branch_of_parameter("branches.edit.proj_out.weight") == "edit"
    assert branch_of_parameter("source_embedding.weight") == "composite"
    assert branch_of_parameter("mask_embedding.bias") == "alpha"
    with pytest.raises(ValueError, match="expected one scale for each"):
        branch_parameter_groups(model, 1e-5, {"edit": 1.0})


def test_options_parse_and_reject_nonsense():
    assert parse_branch_lr_scales("alpha=5") == {"edit": 0.1, "alpha": 5.0, "composite": 10.0}
    assert parse_mask_dropout("object_addition=0.5")["object_addition"] == 0.5
    with pytest.raises(ValueError, match="--branch-lr item 'mask=2'"):
        parse_branch_lr_scales("mask=2")
    with pytest.raises(ValueError, match="expected a probability"):
        parse_mask_dropout("background_change=1.5")
    assert warmup_factor(0, 200) == pytest.approx(1 / 200) and warmup_factor(500, 200) == 1.0
    # Warm-up, constant, then a linear cool-down whose last step still moves the weights.
    factors = [learning_rate_factor(step, 2, 10, 4) for step in range(10)]
    assert factors == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25])
    assert [learning_rate_factor(step, 0, 10) for step in (0, 9)] == [1.0, 1.0]


def test_mask_dropout_follows_the_task_and_needs_a_mask(dataset_dir):
    pipe = build_random_pipeline("tiny")
    dataset = LayeredVideoDataset(dataset_dir, "train", random_crop=False, hflip=False)
    batch = collate_layered([dataset[i] for i in range(len(dataset))])
    generator = torch.Generator().manual_seed(0)
    never = encode_batch(
        pipe, batch, {"object_addition": 0.0, "background_change": 0.0}, generator, torch.device("cpu")
    )
    assert never["mask_keep"].tolist() == [float(m) for m in batch["has_mask"]]
    always = encode_batch(
        pipe, batch, {"object_addition": 1.0, "background_change": 1.0}, generator, torch.device("cpu")
    )
    assert not always["mask_keep"].any()
    assert never["alpha"].shape == never["edit"].shape == never["source"].shape


def test_short_run_lowers_the_loss_reloads_and_resumes(dataset_dir, tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(
        data=str(dataset_dir),
        out=str(out),
        preset="tiny",
        steps=12,
        batch_size=4,
        learning_rate=2e-3,
        branch_lr_scales={"edit": 1.0, "alpha": 1.0, "composite": 1.0},
        warmup_steps=2,
        ema_decay=0.0,
        save_every=6,
        log_every=2,
        seed=1,
    )
    before = _fixed_batch_loss(build_random_pipeline("tiny", seed=1), dataset_dir)
    summary = train(config, progress=False)
    assert summary["steps"] == 12
    trained = VeraPipeline.from_pretrained(out)
    after = _fixed_batch_loss(trained, dataset_dir)
    assert after < 0.9 * before, (before, after)

    log = read_log(out)
    assert [row["step"] for row in log] == [2, 4, 6, 8, 10, 12]
    assert {"loss", "edit", "alpha", "composite", "lr"} <= set(log[0])
    # Weights and resume state alike are safetensors + JSON: the engine refuses pickle in a model folder.
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert (out / "training" / "state.safetensors").is_file() and not (tmp_path / "run.saving").exists()

    with pytest.raises(FileExistsError, match="pass --resume"):
        train(config, progress=False)
    config.steps = 14
    assert train(config, resume=True, progress=False)["steps"] == 14
    assert [row["step"] for row in read_log(out)][-2:] == [12, 14]
    config.batch_size = 2
    with pytest.raises(ValueError, match="batch_size=2 differs"):
        train(config, resume=True, progress=False)


def test_per_branch_learning_rates_really_differ_in_the_optimiser(dataset_dir, tmp_path):
    # With Adam, the first update of each parameter is about lr in size: the branches must move by their own lr.
    config = TrainConfig(
        data=str(dataset_dir),
        out=str(tmp_path / "run"),
        preset="tiny",
        steps=1,
        batch_size=2,
        learning_rate=1e-3,
        warmup_steps=0,
        ema_decay=0.0,
        save_every=1,
    )
    start = build_random_pipeline("tiny", seed=0).transformer.state_dict()
    train(config, progress=False)
    raw = VeraPipeline.from_pretrained(tmp_path / "run").transformer.state_dict()
    moved = {}
    for branch in BRANCHES:
        key = f"blocks.0.{branch}.ffn.net.2.weight"
        moved[branch] = float((raw[key] - start[key]).abs().max())
    assert moved["alpha"] == pytest.approx(1e-2, rel=0.05)
    assert moved["composite"] == pytest.approx(1e-2, rel=0.05)
    assert moved["edit"] == pytest.approx(1e-4, rel=0.05)


def test_train_cli_errors_are_clear(dataset_dir, tmp_path, capsys):
    code = main(
        [
            "train",
            "--data",
            str(dataset_dir),
            "--out",
            str(tmp_path / "o"),
            "--steps",
            "1",
            "--batch-size",
            "64",
            "--no-progress",
        ]
    )
    assert code == 2 and "larger than the 8 training clips" in capsys.readouterr().err
    assert (
        main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    )
    capsys.readouterr()
    assert (
        main(["train", "--data", str(dataset_dir), "--out", str(tmp_path / "o3"), "--cooldown-steps", "-5"])
        == 2
    )
    assert "--cooldown-steps -5: expected 0 or more" in capsys.readouterr().err


def _torchrun_train(
    dataset_dir, out, *args: str, script: str = "-m vera_engine"
) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun comes with torch"
    options = {"--data": dataset_dir, "--out": out, "--batch-size": 2, "--lr": 1e-3, "--text-encoder-lr": 1}
    options |= {"--warmup-steps": 0, "--ema-decay": 0.5, "--save-every": 2, "--log-every": 1}
    return subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            *script.split(),
            "train",
            *(str(item) for pair in options.items() for item in pair),
            "--no-progress",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _folder_tensors(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = [
        "transformer/diffusion_pytorch_model.safetensors",  # EMA weights
        "text_encoder/model.safetensors",
        "training/raw_transformer/diffusion_pytorch_model.safetensors",
        "training/raw_text_encoder/model.safetensors",
        "training/state.safetensors",  # optimiser moments and EMA, saved whole
    ]
    tensors = {f"{name}:{key}": value for name in files for key, value in load_file(str(out / name)).items()}
    # Random-generator states: under several processes a resume reseeds them from the step (not compared).
    return {key: value for key, value in tensors.items() if value.dtype != torch.uint8}


@pytest.mark.slow
def test_fsdp_learns_what_ddp_learns_and_runs_resume_across_them(dataset_dir, tmp_path):
    # Two gloo processes, the text encoder trained too (replicated, its gradients averaged by hand). One run starts
    # under DDP and resumes under FSDP, the other the reverse: sharding must change neither what is learned nor
    # what a checkpoint holds, so both end with the same weights, EMA and optimiser state.
    runs, norms = {}, {}
    for name, first, second in (("ddp_then_fsdp", [], ["--fsdp"]), ("fsdp_then_ddp", ["--fsdp"], [])):
        out = tmp_path / name
        for steps, extra in (("2", first), ("4", ["--resume", *second])):
            run = _torchrun_train(dataset_dir, out, "--steps", steps, *extra)
            assert run.returncode == 0, run.stderr[-3000:]
        assert [row["step"] for row in read_log(out)] == [1, 2, 3, 4]
        norms[name] = [row["grad_norm"] for row in read_log(out)]
        assert read_history(out)[1] == {"from_step": 2, "changed": {"fsdp": [bool(first), bool(second)]}}
        VeraPipeline.from_pretrained(out)
        runs[name] = _folder_tensors(out)
    # The same gradient norms, one of them above the clipping threshold (1.0): each way's clipping is exercised.
    assert norms["fsdp_then_ddp"] == pytest.approx(norms["ddp_then_fsdp"], rel=1e-4)
    assert max(norms["ddp_then_fsdp"]) > 1
    assert runs["ddp_then_fsdp"].keys() == runs["fsdp_then_ddp"].keys()
    for key, value in runs["ddp_then_fsdp"].items():
        torch.testing.assert_close(runs["fsdp_then_ddp"][key], value, atol=1e-4, rtol=1e-4, msg=key)
    start = build_random_pipeline("tiny", seed=0).transformer.state_dict()
    key = "transformer/diffusion_pytorch_model.safetensors:blocks.0.alpha.ffn.net.2.weight"
    assert not torch.equal(runs["ddp_then_fsdp"][key], start["blocks.0.alpha.ffn.net.2.weight"]), (
        "it must learn"
    )


@pytest.mark.slow
def test_replicas_that_drift_apart_stop_the_run_at_its_first_save(dataset_dir, tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "workers", "train_without_text_sync.py")
    run = _torchrun_train(dataset_dir, tmp_path / "drift", "--steps", "2", script=worker)
    assert run.returncode != 0
    assert "the replicated weights differ between processes" in run.stderr
    assert not (tmp_path / "drift" / "training").exists(), "nothing is saved from diverged replicas"


def test_fsdp_needs_torchrun_and_clipping_matches_torch(dataset_dir, tmp_path, capsys):
    code = main(
        ["train", "--data", str(dataset_dir), "--out", str(tmp_path / "one"), "--fsdp", "--steps", "1"]
    )
    assert code == 2
    assert "--fsdp shards the transformer across processes: run under torchrun" in capsys.readouterr().err
    # Without sharded parameters, the FSDP-aware clipping is torch's.
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for param in params:
        param.grad = torch.randn_like(param) * 4
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for copy, param in zip(copies, params, strict=True):
        copy.grad = param.grad.clone()
    expected = float(torch.nn.utils.clip_grad_norm_(copies, 1.0))
    assert clip_gradients(params, 1.0) == pytest.approx(expected, rel=1e-6) and expected > 1.0
    for copy, param in zip(copies, params, strict=True):
        torch.testing.assert_close(param.grad, copy.grad)


def test_the_pipeline_folder_holds_the_ema_weights_and_resume_restores_them(dataset_dir, tmp_path):
    from diffusers.models.model_loading_utils import load_state_dict

    out = tmp_path / "ema"
    config = _tiny_config(dataset_dir, out, learning_rate=1e-2, ema_decay=0.5)
    train(config, progress=False)
    ema = VeraPipeline.from_pretrained(out).transformer.state_dict()
    raw = load_state_dict(str(out / "training" / "raw_transformer" / "diffusion_pytorch_model.safetensors"))
    key = "blocks.0.alpha.ffn.net.2.weight"
    assert not torch.equal(ema[key], raw[key]), "the shipped weights must be the EMA, not the raw ones"
    # Resuming keeps averaging from the saved EMA (not from the raw weights): one more step moves the EMA
    # part of the way towards the new raw weights only.
    config.steps = 3
    train(config, resume=True, progress=False)
    ema3 = VeraPipeline.from_pretrained(out).transformer.state_dict()[key]
    raw3 = load_state_dict(str(out / "training" / "raw_transformer" / "diffusion_pytorch_model.safetensors"))[
        key
    ]
    assert not torch.equal(ema3, raw3) and not torch.equal(ema3, ema[key])
    with pytest.raises(ValueError, match=r"ema_decay=0\.9 differs"):
        config.steps, config.ema_decay = 4, 0.9
        train(config, resume=True, progress=False)


def test_text_encoder_is_frozen_by_default_and_trains_when_asked(dataset_dir, tmp_path):
    start = build_random_pipeline("tiny", seed=0).text_encoder.state_dict()
    key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    for scale in (0.0, 1.0):
        out = tmp_path / f"text{scale}"
        config = TrainConfig(
            data=str(dataset_dir),
            out=str(out),
            preset="tiny",
            steps=2,
            batch_size=2,
            learning_rate=1e-3,
            warmup_steps=0,
            ema_decay=0.0,
            save_every=2,
            text_encoder_lr_scale=scale,
            timestep_shift=3.0,
        )
        train(config, progress=False)
        saved = VeraPipeline.from_pretrained(out).text_encoder.state_dict()[key]
        assert torch.equal(saved, start[key]) == (scale == 0.0), scale
    assert (tmp_path / "text1.0" / "training" / "raw_text_encoder").is_dir()


def test_timestep_shift_moves_training_towards_high_noise():
    from vera_engine.training.train import shifted_sigmas

    u = torch.tensor([0.0, 0.5, 1.0])
    assert torch.equal(shifted_sigmas(u, 1.0), u)
    assert shifted_sigmas(u, 3.0).tolist() == pytest.approx([0.0, 0.75, 1.0])


def test_model_card_has_the_loss_curve_and_eval_figures(dataset_dir, tmp_path):
    from PIL import Image

    from vera_engine.training.evaluate import check_targets
    from vera_engine.training.model_card import write_model_card

    out = tmp_path / "card"
    config = _tiny_config(dataset_dir, out, steps=4, learning_rate=1e-3, log_every=1)
    train(config, progress=False)
    # Resumed with another noise-level shift: the card says which steps trained with which.
    config.steps, config.timestep_shift = 6, 3.0
    train(config, resume=True, progress=False)
    summary = {
        "background_change": {
            "count": 100.0,
            "matte_iou": 0.95,
            "composite_psnr": 15.0,
            "composite_psnr_ge_20": 0.83,
            "composite_psnr_ge_20_ci95": [0.7445, 0.8911],
        }
    }
    report = {"steps": 10, "guidance": 1.0, "summary": summary, "targets": check_targets(summary)}
    reworded = {
        "steps": 10,
        "guidance": 1.0,
        "summary": {"object_addition": {"count": 1.0, "direction_ok": 1.0}},
    }
    card = write_model_card(
        out,
        out,
        report,
        name="test card",
        data_command="gen",
        train_command="train",
        eval_command="eval",
        machine="a CPU",
        extra_reports=[("Reworded held-out split", "eval --data reworded", reworded)],
        notes=["- a note"],
    )
    text = card.read_text()
    assert "| background_change | matte_iou | 0.95 | ≥ 0.9 (met) |" in text
    assert "| background_change | composite_psnr | 15 |  |" in text
    # Rates with their 95 % interval; the interval is not a row of its own.
    assert "| background_change | composite_psnr_ge_20 | 0.83 (0.74–0.89) | ≥ 0.9 (not met) |" in text
    assert "_ci95" not in text
    # 100 clips per task is enough; the reworded report's single clip is not, and the card says so.
    assert text.count("Fewer than 100 clips per task") == 1 and "(object_addition 1)" in text
    assert "### Reworded held-out split\n\n`eval --data reworded`" in text
    assert "| object_addition | direction_ok | 1 |  |" in text and "## Notes\n\n- a note" in text
    assert "6 steps of batch 2" in text
    assert "noise-level shift 1, precision auto" in text
    assert "- from step 4 (resumed with other settings): timestep_shift 1.0 -> 3.0" in text
    assert "- from random weights" in text and "text encoder over bytes (ByT5 tokenizer)" in text
    # A run resumed before histories were kept cannot say what it started from.
    (out / "training" / "history.json").unlink()
    text = write_model_card(
        out, out, report, name="t", data_command="d", train_command="t", eval_command="e", machine="m"
    ).read_text()
    assert "- started from: not recorded (the run was resumed before training histories were kept)" in text
    with Image.open(out / "loss_curve.png") as image:
        assert image.size == (640, 320)
        # The curve is drawn: the plot holds more than the white background and the frame.
        assert len(image.getcolors(10_000) or []) > 3


def test_the_run_history_records_what_each_resume_changed(dataset_dir, tmp_path):
    out = tmp_path / "history"
    config = _tiny_config(dataset_dir, out)
    train(config, progress=False)
    [first] = read_history(out)
    assert first["from_step"] == 0 and first["settings"]["timestep_shift"] == 1.0
    # More steps or other save intervals are not a change of recipe; a new precision, shift or cool-down is (and
    # with a cool-down the length of the run is too: the schedule depends on it).
    config.steps, config.save_every = 4, 4
    train(config, resume=True, progress=False)
    assert read_history(out) == [first]
    config.steps, config.timestep_shift, config.mixed_precision = 6, 2.0, "no"
    config.text_encoder_lr_scale = 1.0
    with pytest.raises(ValueError, match=r"text_encoder_lr_scale=1\.0 differs"):
        train(config, resume=True, progress=False)
    config.text_encoder_lr_scale = 0.0
    config.cooldown_steps = 2  # the last two steps at 1x and 0.5x the learning rate
    train(config, resume=True, progress=False)
    changed = {"cooldown_steps": [0, 2], "timestep_shift": [1.0, 2.0], "mixed_precision": ["auto", "no"]}
    assert read_history(out) == [first, {"from_step": 4, "changed": {"steps": [4, 6], **changed}}]
    rates = {row["step"]: row["lr"] for row in read_log(out)}
    assert rates[6] == pytest.approx(0.5 * rates[4])
    # A run saved before histories were kept: its saved config becomes the first stretch, except `init`, which a
    # resume had pointed at the run itself.
    saved = json.loads((out / "training" / "config.json").read_text())
    assert saved["init"] == saved["out"]
    del saved["fsdp"]  # saved by a version without the setting: it had the default, so nothing changed
    config.timestep_shift, config.steps = 4.0, 8
    assert run_history(saved, config, 6, None) == [
        {"from_step": 0, "settings": {**saved, "init": "unknown"}},
        {"from_step": 6, "changed": {"steps": [6, 8], "timestep_shift": [2.0, 4.0]}},
    ]


def test_training_time_leaves_out_the_gap_of_a_resume():
    from vera_engine.training.model_card import training_seconds

    log = [{"step": s, "time": 100.0 + 2.0 * s} for s in range(0, 100, 10)]
    assert training_seconds(log) == (pytest.approx(180.0), 0)
    # Stopped after step 90, resumed an hour later: the gap counts as one ordinary interval.
    resumed = log + [{"step": s, "time": 3900.0 + 2.0 * s} for s in range(100, 150, 10)]
    assert training_seconds(resumed) == (pytest.approx(280.0), 1)
    assert training_seconds(log[:1]) == (0.0, 0)


@pytest.mark.parametrize("text_encoder_lr_scale", [0.0, 1.0])  # a trained text encoder draws dropout
def test_a_run_resumed_mid_epoch_ends_with_the_weights_of_an_uninterrupted_run(
    dataset_dir, tmp_path, text_encoder_lr_scale
):
    from diffusers.models.model_loading_utils import load_state_dict

    def run(out, stops):
        config = TrainConfig(
            data=str(dataset_dir),
            out=str(out),
            preset="tiny",
            batch_size=3,  # 8 clips: 2 batches per epoch, so step 3 stops in the middle of the second epoch
            learning_rate=1e-3,
            warmup_steps=0,
            ema_decay=0.5,
            save_every=1,
            seed=2,
            text_encoder_lr_scale=text_encoder_lr_scale,
        )
        for index, steps in enumerate(stops):
            config.steps = steps
            train(config, resume=index > 0, progress=False)
        return load_state_dict(
            str(out / "training" / "raw_transformer" / "diffusion_pytorch_model.safetensors")
        )

    uninterrupted = run(tmp_path / "straight", [5])
    resumed = run(tmp_path / "resumed", [3, 5])
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_epoch_sampler_shares_and_skips():
    from vera_engine.training.train import EpochSampler

    sampler = EpochSampler(10, batch_size=2, seed=0, num_replicas=2, rank=1)
    sampler.set_epoch(3)
    whole = list(sampler)
    assert sampler.batches_per_epoch == 2 and len(whole) == 4
    other = EpochSampler(10, batch_size=2, seed=0, num_replicas=2, rank=0)
    other.set_epoch(3)
    assert not set(whole) & set(other)  # the two processes take different clips
    sampler.set_epoch(3, skip_batches=1)
    assert list(sampler) == whole[2:] and len(sampler) == 2
    sampler.set_epoch(4)
    assert list(sampler) != whole  # a new shuffle each epoch
    with pytest.raises(ValueError, match=r"skip_batches=3; expected 0\.\.2"):
        sampler.set_epoch(0, skip_batches=3)


def test_resume_refuses_another_seed_or_another_epoch_length(tmp_path):
    data = tmp_path / "data"
    generate_dataset(data, {"train": 8}, frames=4, height=32, width=32, seed=5)
    config = TrainConfig(
        data=str(data), out=str(tmp_path / "run"), preset="tiny", steps=1, batch_size=3, seed=2
    )
    train(config, progress=False)
    config.steps, config.seed = 2, 3
    with pytest.raises(ValueError, match="seed=3 differs"):
        train(config, resume=True, progress=False)
    config.seed = 2
    shutil.rmtree(data)
    generate_dataset(data, {"train": 9}, frames=4, height=32, width=32, seed=5)  # 3 batches per epoch, not 2
    with pytest.raises(ValueError, match="had 2 batches per epoch and now has 3"):
        train(config, resume=True, progress=False)


def test_train_flags_are_the_config_fields_with_its_defaults():
    import argparse
    import dataclasses

    from vera_engine.tools.config_cli import add_config_arguments, config_from_arguments, given

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    # Nothing but the required fields: the config is the dataclass's own defaults.
    args = parser.parse_args(["--data", "D", "--out", "O"])
    assert config_from_arguments(TrainConfig, args) == TrainConfig(data="D", out="O")
    assert not given(args, "preset") and given(args, "data")
    # Every field has a flag, and its help shows the dataclass's default.
    text = parser.format_help()
    for field in dataclasses.fields(TrainConfig):
        flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
        assert flag in text, flag
    assert "(default: 1000)" in text and "edit=0.1,alpha=10,composite=10" in text
    args = parser.parse_args(
        ["--data", "D", "--out", "O", "--lr", "3e-4", "--branch-lr", "edit=1", "--size", "16", "24", "--fsdp"]
    )
    config = config_from_arguments(TrainConfig, args)
    assert config.learning_rate == 3e-4 and config.size == (16, 24) and config.fsdp
    assert config.branch_lr_scales == {"edit": 1.0, "alpha": 10.0, "composite": 10.0}
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", "D", "--out", "O", "--mixed-precision", "fp8"])


def test_foreground_weight_weighs_the_loss_where_the_edit_is(dataset_dir):
    pipe = build_random_pipeline("tiny", seed=0)
    dataset = LayeredVideoDataset(dataset_dir, "train", frames=4, seed=0)
    batch = collate_layered([dataset[0], dataset[1]])
    latents = encode_batch(pipe, batch, {}, torch.Generator().manual_seed(0), torch.device("cpu"))
    text = torch.zeros(2, 8, pipe.transformer.config.text_dim)
    # The region is where alpha > 0, on the latent grid (space-to-depth 2: each latent pixel is 2x2 pixels).
    expected = torch.nn.functional.max_pool3d((batch["alpha"] > 0).float(), (1, 2, 2))
    assert torch.equal(latents["region"], expected) and 0 < float(expected.mean()) < 1

    def loss(weight: float) -> float:
        return float(
            flow_matching_loss(
                pipe.transformer, latents, text, torch.Generator().manual_seed(7), 1.0, weight
            )[0]
        )

    uniform, weighted = loss(1.0), loss(4.0)
    # By hand: the same noise and prediction, squared errors weighed 4x in the region, normalised per sample.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(7)
        clean = torch.cat([latents["edit"], latents["alpha"], latents["composite"]], dim=1)
        noise = torch.randn(clean.shape, generator=generator)
        sigma = torch.rand(2, generator=generator).view(-1, 1, 1, 1, 1)
        noisy = (1 - sigma) * clean + sigma * noise
        out = pipe.transformer(
            *noisy.chunk(3, dim=1),
            sigma.view(-1) * 1000,
            text,
            latents["source"],
            latents["mask"],
            latents["mask_keep"],
            return_dict=False,
        )
        weights = 1 + 3 * expected
        weights = weights / weights.mean(dim=(1, 2, 3, 4), keepdim=True)
        by_hand = (
            sum(
                float((weights * (p - t) ** 2).mean())
                for p, t in zip(out, (noise - clean).chunk(3, dim=1), strict=False)
            )
            / 3
        )
    assert abs(weighted - by_hand) < 1e-6 * max(1.0, by_hand) and abs(weighted - uniform) > 1e-4


@pytest.mark.parametrize("codec", ["space_to_depth", "wan"])
def test_encode_batch_makes_one_codec_call_equal_to_five(dataset_dir, codec):
    """Issue 27 item 13: the five videos of a batch go through the codec in one call, with the latents of five."""
    from vera_engine.pipelines.pipeline_vera import codec_input

    from .conftest import make_tiny_wan_pipeline_parts

    if codec == "wan":
        parts = make_tiny_wan_pipeline_parts(seed=0)
        parts["transformer"] = None
        pipe = VeraPipeline(
            **parts, native_height=32, native_width=32, native_frames=5, max_sequence_length=32
        )
        frames = 5  # the Wan VAE's causal frames: 4k + 1
    else:
        pipe, frames = build_random_pipeline("tiny", seed=0), 4
    generate_dataset(dataset_dir / codec, {"train": 2}, frames=frames, height=32, width=32, seed=5)
    dataset = LayeredVideoDataset(dataset_dir / codec, "train", random_crop=False, hflip=False)
    batch = collate_layered([dataset[i] for i in range(2)])
    calls: list[int] = []
    encode = pipe.encode_video

    def counted(video):
        calls.append(video.shape[0])
        return encode(video)

    pipe.encode_video = counted
    latents = encode_batch(pipe, batch, {}, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert calls == [10]  # one call: 5 videos x batch 2 (five calls of 2 before)
    del pipe.encode_video
    with torch.no_grad():
        for name, key in zip(
            ("edit", "alpha", "composite", "source", "mask"),
            ("edit", "alpha", "composite", "input", "mask"),
            strict=True,
        ):
            alone = pipe.encode_video(codec_input(batch[key]))
            assert torch.equal(latents[name], alone), name


def _record_text_encoder_per_step(monkeypatch) -> list:
    """The pipeline's text encoder as each training step sees it (None once a frozen one is dropped)."""
    from vera_engine.training import train as train_module

    seen: list = []
    step = train_module._train_step

    def recording_step(run, batch, index, prompts):
        seen.append(run.pipe.text_encoder)
        return step(run, batch, index, prompts)

    monkeypatch.setattr(train_module, "_train_step", recording_step)
    return seen


def test_frozen_text_encoder_is_encoded_up_front_and_dropped(dataset_dir, tmp_path, monkeypatch):
    """Issue 27 item 11: with a frozen encoder, the run encodes every instruction once and holds no encoder while
    it trains; the losses, the weights and the saved folder are exactly those of a run that kept the encoder and
    encoded lazily (same encoder calls, same autocast, zero padding trimmed and restored exactly)."""
    from safetensors.torch import load_file

    from vera_engine.training import train as train_module

    encoder_during_steps = _record_text_encoder_per_step(monkeypatch)
    settings = dict(steps=3, save_every=3, text_dropout=0.5)
    progress = False
    train(_tiny_config(dataset_dir, tmp_path / "upfront", **settings), progress=progress)
    assert len(encoder_during_steps) == 3 and all(e is None for e in encoder_during_steps)
    assert not (tmp_path / ".upfront.text_encoder").exists()  # the saved encoder's staging folder is removed

    encoder_during_steps.clear()
    monkeypatch.setattr(train_module, "_drop_frozen_text_encoder", lambda run, prompts, instructions: None)
    train(_tiny_config(dataset_dir, tmp_path / "lazy", **settings), progress=progress)
    assert all(e is not None for e in encoder_during_steps)  # the old behaviour: the encoder held throughout

    assert [row["loss"] for row in read_log(tmp_path / "upfront")] == [
        row["loss"] for row in read_log(tmp_path / "lazy")
    ]
    for part in ("transformer/diffusion_pytorch_model", "text_encoder/model"):
        upfront = load_file(str(tmp_path / "upfront" / f"{part}.safetensors"))
        lazy = load_file(str(tmp_path / "lazy" / f"{part}.safetensors"))
        assert upfront.keys() == lazy.keys() and all(torch.equal(upfront[k], lazy[k]) for k in upfront), part
    index = json.loads((tmp_path / "upfront" / "model_index.json").read_text())
    assert (
        index["text_encoder"]
        == json.loads((tmp_path / "lazy" / "model_index.json").read_text())["text_encoder"]
    )
    reloaded = VeraPipeline.from_pretrained(tmp_path / "upfront")
    assert reloaded.text_encoder is not None


def test_trained_text_encoder_is_kept(dataset_dir, tmp_path, monkeypatch):
    from vera_engine.training import train as train_module

    held: list = []
    step = train_module._train_step
    monkeypatch.setattr(
        train_module,
        "_train_step",
        lambda run, batch, index, prompts: (
            held.append(run.pipe.text_encoder) or step(run, batch, index, prompts)
        ),
    )
    train(
        _tiny_config(dataset_dir, tmp_path / "run", steps=1, save_every=1, text_encoder_lr_scale=1.0),
        progress=False,
    )
    assert held and all(e is not None for e in held)


def test_prompt_cache_table_refuses_instructions_it_was_not_filled_with():
    from vera_engine.training.train import PromptCache, _up_front_text_bytes

    pipe = build_random_pipeline("tiny", seed=0)
    cpu = torch.device("cpu")
    cache = PromptCache(pipe, cpu, torch.float32, max_entries=1)
    cache.fill(["add a red ball", "add a blue ball", ""])
    assert len(cache) == 3  # a table: the bound does not evict what fill encoded
    with torch.no_grad():
        expected = torch.cat([pipe.encode_prompt(p, cpu, torch.float32) for p in ("add a blue ball", "")])
    assert torch.equal(cache(["add a blue ball", ""]), expected)
    assert len(cache) == 3
    with pytest.raises(KeyError, match="'add a green ball' was not among the run's instructions"):
        cache(["add a green ball"])
    # The bound on the up-front encode counts what the table holds: each state trimmed to its tokens.
    held = sum(states.numel() * states.element_size() for states in cache._states.values())
    assert _up_front_text_bytes(pipe, ["add a red ball", "add a blue ball", ""], torch.float32) == held


def test_too_many_instructions_to_encode_up_front_keep_the_encoder(
    dataset_dir, tmp_path, monkeypatch, caplog
):
    """The up-front encode is bounded in host memory: a dataset whose instructions would not fit keeps the frozen
    encoder and encodes lazily (as before), saying why and which route drops it."""
    from vera_engine.training import train as train_module

    encoder_during_steps = _record_text_encoder_per_step(monkeypatch)
    monkeypatch.setattr(train_module, "UP_FRONT_TEXT_BYTES", 1024)
    with caplog.at_level("WARNING", logger="vera_engine.training.train"):
        train(_tiny_config(dataset_dir, tmp_path / "run", steps=2, save_every=2), progress=False)
    assert len(encoder_during_steps) == 2 and all(e is not None for e in encoder_during_steps)
    assert "too many to encode up front" in caplog.text and "vera-engine cache" in caplog.text
