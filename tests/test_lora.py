"""LoRA: `train --lora RANK` trains adapters alone, the engine serves them, and switched off they change nothing."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from vera_engine.pipelines.pipeline_vera import VeraPipeline
from vera_engine.pipelines.presets import build_random_pipeline
from vera_engine.tools.cli import main
from vera_engine.training.data import generate_dataset
from vera_engine.training.data.dataset import LayeredVideoDataset, collate_layered
from vera_engine.training.lora import (
    ADAPTER_FILE,
    BASE_HASH_KEY,
    adapter_in_use,
    add_training_adapter,
    base_transformer_hash,
    load_adapter,
    parse_lora_arguments,
)
from vera_engine.training.train import (
    BRANCHES,
    branch_parameter_groups,
    encode_batch,
    flow_matching_loss,
    read_log,
)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A random tiny base model, a tiny dataset and a rank-4 adapter trained on it (40 steps)."""
    root = tmp_path_factory.mktemp("lora")
    data = root / "data"
    generate_dataset(data, {"train": 4}, frames=4, height=32, width=32, seed=11)
    base = root / "base"
    build_random_pipeline("tiny", seed=3).save_pretrained(base, safe_serialization=True)
    out = root / "adapter"
    argv = [
        "train",
        "--data",
        str(data),
        "--init",
        str(base),
        "--out",
        str(out),
        "--lora",
        "4",
        "--steps",
        "40",
    ]
    argv += [
        "--batch-size",
        "2",
        "--lr",
        "2e-3",
        "--branch-lr",
        "edit=1,alpha=1,composite=1",
        "--warmup-steps",
        "0",
    ]
    argv += ["--ema-decay", "0", "--text-dropout", "0", "--no-progress", "--log-every", "1"]
    assert main(argv) == 0
    return data, base, out


def _fixed_batch_loss(pipe, data) -> float:
    dataset = LayeredVideoDataset(data, "train", random_crop=False, hflip=False)
    batch = collate_layered([dataset[i] for i in range(4)])
    latents = encode_batch(pipe, batch, {}, torch.Generator().manual_seed(1), torch.device("cpu"))
    text = torch.stack(
        [pipe.encode_prompt(p, torch.device("cpu"), torch.float32)[0] for p in batch["instruction"]]
    )
    pipe.transformer.eval()
    with torch.no_grad():
        loss, _ = flow_matching_loss(pipe.transformer, latents, text, torch.Generator().manual_seed(7))
    return float(loss)


def test_adapters_sit_on_every_branch_attention_and_ffn_projection_at_the_branch_rates():
    model = build_random_pipeline("tiny").transformer
    add_training_adapter(model, 4)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    layers = {n.rsplit(".lora_", 1)[0] for n in trainable}
    projections = [f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")]
    projections += ["ffn.net.0.proj", "ffn.net.2"]
    expected = {f"blocks.{b}.{br}.{p}" for b in range(2) for br in BRANCHES for p in projections}
    assert layers == expected
    groups = branch_parameter_groups(model, 1e-4, {"edit": 0.1, "alpha": 10.0, "composite": 10.0})
    assert [g["lr"] for g in groups] == pytest.approx([1e-5, 1e-3, 1e-3])
    assert all(".edit." in n for n, p in model.named_parameters() if any(p is q for q in groups[0]["params"]))


def test_a_lora_run_lowers_the_loss_and_saves_the_adapter_alone(lora_run):
    data, base, out = lora_run
    log = read_log(out)
    assert len(log) == 40
    with safe_open(str(out / ADAPTER_FILE), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(
        "lora_A" in k or "lora_B" in k for k in keys
    )  # the adapter alone, not the base weights
    assert metadata[BASE_HASH_KEY] == base_transformer_hash(base)
    assert not (out / "transformer").exists()
    pipe = VeraPipeline.from_pretrained(base)
    before = _fixed_batch_loss(pipe, data)
    load_adapter(pipe.transformer, out, "tuned", base_hash=base_transformer_hash(base), base_name="base")
    with adapter_in_use(pipe.transformer, "tuned"):
        after = _fixed_batch_loss(pipe, data)
    assert after < 0.9 * before, (before, after)


def test_an_adapter_changes_the_output_and_switched_off_restores_it_bit_for_bit(lora_run):
    data, base, out = lora_run
    pipe = VeraPipeline.from_pretrained(base)
    clip = LayeredVideoDataset(data, "train").clip(0)

    def edit(**kwargs):
        result = pipe(clip.input, clip.instruction, num_inference_steps=2, guidance_scale=1.0,
                      generator=torch.Generator().manual_seed(0), **kwargs)  # fmt: skip
        return np.concatenate([result.edit.ravel(), result.alpha.ravel(), result.composite.ravel()])

    plain = edit()
    load_adapter(pipe.transformer, out, "tuned", base_hash=base_transformer_hash(base), base_name="base")
    assert np.array_equal(edit(), plain)  # loaded but not asked for: off
    with adapter_in_use(pipe.transformer, "tuned", 1.0):
        tuned = edit()
    with adapter_in_use(pipe.transformer, "tuned", 0.5):
        half = edit()
    assert np.abs(tuned - plain).max() > 1e-3 and not np.array_equal(half, tuned)
    assert np.array_equal(edit(), plain)  # switched off after the job
    pipe.transformer.delete_adapters("tuned")
    assert np.array_equal(edit(), plain)  # unloaded


def test_an_adapter_for_another_base_is_refused_naming_both(lora_run, tmp_path):
    _, _, out = lora_run
    other = tmp_path / "other"
    build_random_pipeline("tiny", seed=4).save_pretrained(other, safe_serialization=True)
    pipe = VeraPipeline.from_pretrained(other)
    with pytest.raises(ValueError, match=r"was trained on base \(transformer sha256 \w{12}\), not on other"):
        load_adapter(
            pipe.transformer, out, "tuned", base_hash=base_transformer_hash(other), base_name="other"
        )


def test_lora_arguments_and_runs_are_checked(tmp_path, capsys):
    assert parse_lora_arguments(["a=/x", "b=/y"]) == {"a": "/x", "b": "/y"}
    for bad in (["a"], ["none=/x"], ["a=/x", "a=/y"]):
        with pytest.raises(ValueError, match="--lora"):
            parse_lora_arguments(bad)
    data = tmp_path / "d"
    generate_dataset(data, {"train": 2}, frames=2, height=16, width=16, seed=1)
    assert (
        main(["train", "--data", str(data), "--out", str(tmp_path / "o"), "--lora", "2", "--no-progress"])
        == 2
    )
    assert "--lora adapts a trained model" in capsys.readouterr().err
