"""`vera-engine cache` and `train --cache`: latents from the model's own codec, text states from its encoder, once."""

import json

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file
from transformers import T5EncoderModel, UMT5EncoderModel

from tests.released_fixtures import write_released_dataset
from tests.wan_fixtures import save_tiny_wan_pipeline
from vera_engine.pipelines.pipeline_vera import VeraPipeline, codec_input
from vera_engine.tools.cli import main
from vera_engine.training.data.released import ReleasedVeraDataset
from vera_engine.training.train import TrainConfig, read_log, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    data = write_released_dataset(root / "data", count=4)
    model = save_tiny_wan_pipeline(root / "wan")
    cache = root / "cache"
    assert (
        main(["cache", "--data", str(data), "--model", str(model), "--out", str(cache), "--no-progress"]) == 0
    )
    return data, model, cache


def test_the_cache_holds_the_wan_vae_latents_and_umt5_states(setup):
    data, model, cache = setup
    index = json.loads((cache / "index.json").read_text())
    assert index["vae_class"] == "AutoencoderKLWan" and index["text_encoder_class"] == "UMT5EncoderModel"
    assert index["model"] == str(model.resolve()) and index["frames"] == 5 and index["size"] == [32, 48]
    # Wan's VAE: 5 frames -> 2 latent frames, 32x48 -> 4x6, 4 channels.
    assert index["latent_shape"] == [4, 2, 4, 6] and len(index["clips"]) == 4
    pipe = VeraPipeline.from_pretrained(model)
    item = ReleasedVeraDataset(data, random_crop=False, hflip=False)[1]
    stored = load_file(str(cache / index["clips"][1]["file"]))
    with torch.no_grad():
        latents = pipe.encode_video(codec_input(item["composite"][None]))[0]
        text = pipe.encode_prompt(item["instruction"], torch.device("cpu"), torch.float32)[0]
    assert torch.equal(stored["composite"], latents)
    used = stored["text"].shape[0]
    assert torch.equal(stored["text"], text[:used]) and text[used:].abs().max() == 0
    assert index["clips"][1]["has_mask"] and not index["clips"][0]["has_mask"]


def test_train_from_the_cache_loads_neither_vae_nor_text_encoder(setup, tmp_path, monkeypatch):
    data, model, cache = setup

    def refuse(*args, **kwargs):
        raise AssertionError("train --cache loaded a VAE or text encoder")

    for cls in (AutoencoderKLWan, UMT5EncoderModel, T5EncoderModel):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(refuse))
    config = TrainConfig(
        data=str(data),
        out=str(tmp_path / "run"),
        cache=str(cache),
        steps=3,
        batch_size=2,
        warmup_steps=0,
        log_every=1,
    )
    summary = train(config, progress=False)
    assert summary["steps"] == 3 and len(read_log(tmp_path / "run")) == 3
    monkeypatch.undo()
    # The saved folder is a whole pipeline: the VAE and text encoder copied from the model the run started from.
    trained = VeraPipeline.from_pretrained(tmp_path / "run")
    assert isinstance(trained.vae, AutoencoderKLWan) and isinstance(trained.text_encoder, UMT5EncoderModel)
    before = VeraPipeline.from_pretrained(model).transformer.state_dict()
    after = trained.transformer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_mismatched_cache_is_refused_by_name(setup, tmp_path, capsys):
    data, model, cache = setup
    other = save_tiny_wan_pipeline(tmp_path / "other", vae_seed=1)
    base = [
        "train",
        "--data",
        str(data),
        "--cache",
        str(cache),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    assert main([*base, "--out", str(tmp_path / "a"), "--init", str(other)]) == 2
    err = capsys.readouterr().err
    assert (
        f"was encoded with the vae of {model.resolve()}" in err and f"--init {other} has another vae" in err
    )
    assert main([*base, "--out", str(tmp_path / "b"), "--size", "16", "16"]) == 2
    assert "--size 16 16, but --cache" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "c"), "--frames", "3"]) == 2
    assert "holds clips of 5 frames" in capsys.readouterr().err


def test_the_shipped_tiny_models_codec_caches_the_layered_format(tmp_path):
    from vera_engine.pipelines.model_store import resolve_model_dir
    from vera_engine.training.data import generate_dataset

    data = tmp_path / "layered"
    generate_dataset(data, {"train": 2}, frames=4, height=32, width=32, seed=3)
    cache = tmp_path / "cache"
    assert (
        main(["cache", "--data", str(data), "--model", "default", "--out", str(cache), "--no-progress"]) == 0
    )
    index = json.loads((cache / "index.json").read_text())
    assert index["vae_class"] == "SpaceToDepthCodec" and index["model"] == str(
        resolve_model_dir("default").resolve()
    )
    # Space-to-depth (factor 2) is lossless: the latents hold the pixels.
    assert index["latent_shape"] == [12, 4, 16, 16]
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--cache", str(cache), "--out", str(out), "--steps", "2"]
    assert main([*argv, "--batch-size", "2", "--warmup-steps", "0", "--no-progress"]) == 0
    assert VeraPipeline.from_pretrained(out).vae.__class__.__name__ == "SpaceToDepthCodec"


def test_an_adapter_trains_from_the_cache_on_the_model_it_names(setup, tmp_path):
    from vera_engine.training.lora import (
        ADAPTER_FILE,
        BASE_HASH_KEY,
        base_transformer_hash,
        read_adapter_metadata,
    )

    data, model, cache = setup
    out = tmp_path / "adapter"
    argv = [
        "train",
        "--data",
        str(data),
        "--cache",
        str(cache),
        "--out",
        str(out),
        "--lora",
        "2",
        "--steps",
        "2",
    ]
    assert main([*argv, "--batch-size", "2", "--warmup-steps", "0", "--no-progress"]) == 0
    assert read_adapter_metadata(out / ADAPTER_FILE)[BASE_HASH_KEY] == base_transformer_hash(model)
    assert not (out / "vae").exists() and not (out / "transformer").exists()
