"""`vera-engine train` with a preset's own training settings, `--init default`, and `vera-engine eval`'s progress bar."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from vera_engine.pipelines.model_store import SHIPPED_MODEL_DIR
from vera_engine.pipelines.presets import (
    PRESETS,
    VERA_TINY,
    VERA_TINY_V2,
    build_random_pipeline,
    preset_of_transformer,
)
from vera_engine.tools.cli import main
from vera_engine.training.data import generate_dataset
from vera_engine.training.train import TrainConfig

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    generate_dataset(root, {"train": 2, "heldout": 2}, seed=0, frames=8, height=32, width=32)
    return root


def test_a_model_is_matched_to_the_preset_it_was_built_from(tmp_path: Path) -> None:
    shipped = json.loads((SHIPPED_MODEL_DIR / "transformer" / "config.json").read_text())
    assert preset_of_transformer(shipped) is VERA_TINY_V2  # the shipped checkpoint is vera-tiny v2
    build_random_pipeline("tiny").transformer.save_config(tmp_path)
    assert preset_of_transformer(json.loads((tmp_path / "config.json").read_text())) is PRESETS["tiny"]
    assert preset_of_transformer({**shipped, "num_layers": 5}) is None


def test_every_preset_training_setting_is_a_train_setting() -> None:
    fields = set(TrainConfig.__dataclass_fields__)
    for preset in PRESETS.values():
        assert set(preset.training) <= fields, preset.name
    # The shipped model's recipe (its model card): the text encoder learns, every branch at the same rate.
    assert VERA_TINY.training["text_encoder_lr_scale"] > 0
    assert VERA_TINY.training["learning_rate"] == 5e-4


@pytest.fixture
def captured_config(monkeypatch: pytest.MonkeyPatch) -> list[TrainConfig]:
    """`vera-engine train` up to the config it would train with (the training itself is tested elsewhere)."""
    import vera_engine.training.train as train_module

    seen: list[TrainConfig] = []

    def fake_train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
        seen.append(config)
        return {"steps": 0, "seconds_per_step": 0.0, "last": {}, "out": config.out}

    monkeypatch.setattr(train_module, "train", fake_train)
    return seen


def test_presets_bring_their_training_settings_and_flags_win(captured_config, tmp_path: Path) -> None:
    base = ["train", "--data", "D", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*base, "--preset", "vera-tiny"]) == 0
    config = captured_config[-1]
    assert (config.learning_rate, config.text_encoder_lr_scale, config.timestep_shift) == (5e-4, 1.0, 3.0)
    assert config.branch_lr_scales == {"edit": 1.0, "alpha": 1.0, "composite": 1.0}
    assert main([*base, "--preset", "vera-tiny", "--lr", "1e-4", "--text-encoder-lr", "0.5"]) == 0
    assert (captured_config[-1].learning_rate, captured_config[-1].text_encoder_lr_scale) == (1e-4, 0.5)
    # The test preset `tiny` and a Wan size keep the paper's recipe (TrainConfig's defaults).
    assert main(base) == 0
    assert (captured_config[-1].learning_rate, captured_config[-1].text_encoder_lr_scale) == (1e-5, 0.0)


def test_init_default_is_the_shipped_model_with_its_recipe(captured_config, tmp_path: Path, capsys) -> None:
    base = ["train", "--data", "D", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*base, "--init", "default"]) == 0
    config = captured_config[-1]
    assert Path(config.init) == SHIPPED_MODEL_DIR
    # The shipped model's own recipe: vera-tiny v2's.
    assert (config.learning_rate, config.text_encoder_lr_scale, config.batch_size) == (1e-3, 1.0, 8)
    assert main([*base, "--init", str(tmp_path / "nothing")]) == 2
    assert "is not a Vera pipeline folder" in capsys.readouterr().err


def test_init_default_trains_and_its_weights_are_readable_by_others(
    small_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = ["train", "--data", str(small_dataset), "--out", str(out), "--init", "default", "--steps", "1"]
    umask = os.umask(0o022)
    try:
        assert main([*args, "--batch-size", "1", "--save-every", "1", "--no-progress"]) == 0
    finally:
        os.umask(umask)
    saved = json.loads((out / "training" / "config.json").read_text())
    assert saved["init"] == str(SHIPPED_MODEL_DIR) and saved["learning_rate"] == 1e-3
    assert saved["text_encoder_lr_scale"] == 1.0
    # safetensors writes owner-only files; a trained model is shared like any file (umask 022: mode 644).
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert "transformer/diffusion_pytorch_model.safetensors" in modes
    assert set(modes.values()) == {0o644}, modes


def test_eval_shows_a_progress_bar(small_dataset: Path, tmp_path: Path, capsys) -> None:
    build_random_pipeline("tiny").save_pretrained(tmp_path / "model")
    args = [
        "eval",
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(small_dataset),
        "--steps",
        "1",
        "--json",
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "eval heldout" in err and "2/2" in err
    assert main([*args, "--no-progress"]) == 0
    assert "eval heldout" not in capsys.readouterr().err
