"""Word-level tokenizer for tiny checkpoints: its vocabulary, its folder, and training with a fresh one."""

import dataclasses

import pytest
import torch
from transformers import AutoTokenizer

from vera_engine import VeraPipeline
from vera_engine.models.word_tokenizer import build_word_tokenizer, unknown_words, words_of
from vera_engine.pipelines import presets
from vera_engine.pipelines.presets import build_random_pipeline
from vera_engine.tools.cli import main
from vera_engine.training.data import generate_dataset
from vera_engine.training.data.dataset import LayeredVideoDataset, mirror_text
from vera_engine.training.evaluate import check_targets
from vera_engine.training.model_card import write_model_card
from vera_engine.training.train import TrainConfig, train

TEXTS = ["Add a red circle moving left to right, in the top-left corner", "change the background to blue"]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("layered")
    generate_dataset(root, {"train": 6, "heldout": 1}, frames=4, height=32, width=32, seed=11)
    return root


@pytest.fixture
def tiny_words(monkeypatch):
    """The tiny preset reading words: a shape tests can train in seconds."""
    preset = dataclasses.replace(
        presets.TINY,
        name="tiny-words",
        tokenizer="word",
        max_sequence_length=24,
        transformer={**presets.TINY.transformer, "mask_text_padding": True},
    )
    monkeypatch.setitem(presets.PRESETS, preset.name, preset)
    return preset


def test_every_word_is_one_token_case_and_punctuation_aside():
    tokenizer = build_word_tokenizer(TEXTS)
    ids = tokenizer("ADD a Red circle, top-left").input_ids
    vocab = tokenizer.get_vocab()
    assert ids == [vocab[w] for w in ("add", "a", "red", "circle", ",", "top", "-", "left")] + [
        tokenizer.eos_token_id
    ]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    # Sorted vocabulary: the same texts in another order give the same ids.
    assert build_word_tokenizer(reversed(TEXTS)).get_vocab() == vocab
    assert words_of("Top-left, please!") == ["top", "-", "left", ",", "please", "!"]


def test_unknown_words_read_as_unk_and_are_reported():
    tokenizer = build_word_tokenizer(TEXTS)
    assert tokenizer("add a purple circle").input_ids[2] == tokenizer.unk_token_id
    assert unknown_words(tokenizer, "add a Purple circle quickly") == ["purple", "quickly"]
    assert unknown_words(tokenizer, "add a red circle") == []
    with pytest.raises(ValueError, match="every instruction was empty"):
        build_word_tokenizer(["", "  "])


def test_the_tokenizer_folder_reloads_with_the_same_ids(tmp_path):
    tokenizer = build_word_tokenizer(TEXTS)
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "change the background to a red gradient"
    assert again(text).input_ids == tokenizer(text).input_ids
    assert again.unk_token_id == tokenizer.unk_token_id


def test_a_word_preset_needs_a_vocabulary_and_its_pipeline_round_trips(tiny_words, tmp_path):
    with pytest.raises(ValueError, match="pass vocabulary="):
        build_random_pipeline(tiny_words)
    pipe = build_random_pipeline(tiny_words, vocabulary=TEXTS)
    pipe.save_pretrained(tmp_path)
    again = VeraPipeline.from_pretrained(tmp_path)
    assert again.config.max_sequence_length == 24
    a = pipe.encode_prompt("add a red circle", torch.device("cpu"), torch.float32)
    b = again.encode_prompt("add a red circle", torch.device("cpu"), torch.float32)
    assert a.shape == (1, 24, 32) and torch.equal(a, b)
    # The states past the prompt (4 words and </s>) are zero; a different colour word changes the states.
    assert a[0, 5:].abs().max() == 0 and a[0, :5].abs().min() > 0
    c = pipe.encode_prompt("add a blue circle", torch.device("cpu"), torch.float32)
    assert not torch.equal(a[0, 2], c[0, 2])


def test_the_dataset_lists_its_instructions_and_their_mirrors(dataset_dir):
    flips = LayeredVideoDataset(dataset_dir, "train")
    texts = flips.instructions()
    plain = LayeredVideoDataset(dataset_dir, "train", hflip=False).instructions()
    assert len(plain) == 6 and texts == plain + [mirror_text(t) for t in plain]
    assert [flips.clip(i).instruction for i in range(6)] == plain


def test_training_from_a_word_preset_builds_the_vocabulary_from_the_data(tiny_words, dataset_dir, tmp_path):
    out = tmp_path / "run"
    train(
        TrainConfig(
            data=str(dataset_dir), out=str(out), preset="tiny-words", steps=1, batch_size=2, save_every=1
        ),
        progress=False,
    )
    tokenizer = VeraPipeline.from_pretrained(out).tokenizer
    for text in LayeredVideoDataset(dataset_dir, "train").instructions():
        assert unknown_words(tokenizer, text) == [], text


def test_a_fresh_text_encoder_keeps_the_init_transformer(tiny_words, dataset_dir, tmp_path):
    init = tmp_path / "byte-model"
    build_random_pipeline("tiny", seed=3).save_pretrained(init)
    config = TrainConfig(
        data=str(dataset_dir),
        out=str(tmp_path / "run"),
        init=str(init),
        preset="tiny-words",
        fresh_text_encoder=True,
        steps=1,
        batch_size=2,
        learning_rate=0.0,  # nothing moves: what is saved is what the run started from
        warmup_steps=0,
        ema_decay=0.0,
        save_every=1,
        text_encoder_lr_scale=1.0,
    )
    train(config, progress=False)
    start, run = VeraPipeline.from_pretrained(init), VeraPipeline.from_pretrained(tmp_path / "run")
    assert type(start.tokenizer).__name__ == "ByT5Tokenizer" and "red" in run.tokenizer.get_vocab()
    assert run.config.max_sequence_length == 24
    assert run.transformer.config.mask_text_padding and not start.transformer.config.mask_text_padding
    for key, value in start.transformer.state_dict().items():
        assert torch.equal(run.transformer.state_dict()[key], value), key
    summary = {"object_addition": {"count": 1.0, "colour_ok": 1.0}}
    report = {"steps": 2, "guidance": 1.0, "summary": summary, "targets": check_targets(summary)}
    card = write_model_card(
        tmp_path / "run",
        tmp_path / "run",
        report,
        name="n",
        data_command="d",
        train_command="t",
        eval_command="e",
        machine="m",
        started_from="A byte-level run of 3 steps.",
    ).read_text()
    assert (
        "- started from the `--init` model: its transformer, with a new tokenizer and text encoder. A byte-level"
        in card
    )
    assert str(init) not in card  # a path on the trainer's machine means nothing to the card's readers
    assert "text encoder over words (a vocabulary of the training instructions)" in card

    # A resume keeps the run's own (trained) encoder and vocabulary instead of starting yet another one.
    encoder = run.text_encoder.state_dict()
    config.steps = 2
    train(config, resume=True, progress=False)
    resumed = VeraPipeline.from_pretrained(tmp_path / "run")
    assert resumed.tokenizer.get_vocab() == run.tokenizer.get_vocab()
    for key, value in encoder.items():
        assert torch.equal(resumed.text_encoder.state_dict()[key], value), key


def test_fresh_text_encoder_errors_name_the_fix(tiny_words, dataset_dir, tmp_path, capsys):
    init = tmp_path / "byte-model"
    build_random_pipeline("tiny", seed=3).save_pretrained(init)
    common = ["train", "--data", str(dataset_dir), "--steps", "1", "--batch-size", "2", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a"), "--init", str(init), "--preset", "tiny-words"]) == 2
    assert "add --fresh-text-encoder" in capsys.readouterr().err
    assert (
        main([*common, "--out", str(tmp_path / "b"), "--preset", "tiny-words", "--fresh-text-encoder"]) == 2
    )
    assert "replaces the encoder of an --init model" in capsys.readouterr().err
    # vera-tiny's encoder is 64 wide; the tiny transformer reads 32-wide states.
    args = [
        "--out",
        str(tmp_path / "c"),
        "--init",
        str(init),
        "--preset",
        "vera-tiny",
        "--fresh-text-encoder",
    ]
    assert main([*common, *args]) == 2
    assert "reads 32-wide text states" in capsys.readouterr().err


def test_extending_a_vocabulary_keeps_the_ids_it_had():
    from vera_engine.models.word_tokenizer import extend_word_tokenizer, is_word_tokenizer

    old = build_word_tokenizer(TEXTS)
    assert is_word_tokenizer(old) and extend_word_tokenizer(old, TEXTS) is old
    new = extend_word_tokenizer(old, [*TEXTS, "add a green box heading upwards"])
    assert len(new) == len(old) + 4  # green, box, heading, upwards
    for word, index in old.get_vocab().items():
        assert new.get_vocab()[word] == index
    assert unknown_words(new, "add a green box heading upwards") == []
    from transformers import ByT5Tokenizer

    assert not is_word_tokenizer(ByT5Tokenizer())


def test_an_init_model_meeting_new_words_learns_them_and_keeps_its_own(tiny_words, dataset_dir, tmp_path):
    # A word model trained on other sentences: the data here has words it never saw.
    init = tmp_path / "init"
    build_random_pipeline("tiny-words", seed=3, vocabulary=["add a red circle"]).save_pretrained(init)
    train(
        TrainConfig(
            data=str(dataset_dir),
            out=str(tmp_path / "run"),
            init=str(init),
            steps=1,
            batch_size=2,
            save_every=1,
            learning_rate=0.0,
            warmup_steps=0,
            ema_decay=0.0,
            text_encoder_lr_scale=1.0,
            frame_position_embedding=True,
        ),
        progress=False,
    )
    start, run = VeraPipeline.from_pretrained(init), VeraPipeline.from_pretrained(tmp_path / "run")
    for text in LayeredVideoDataset(dataset_dir, "train").instructions():
        assert unknown_words(run.tokenizer, text) == [], text
    old_vocab = start.tokenizer.get_vocab()
    assert {word: run.tokenizer.get_vocab()[word] for word in old_vocab} == old_vocab
    # The old words' embeddings are the trained ones (nothing moved at learning rate 0).
    old_rows = run.text_encoder.get_input_embeddings().weight[: len(old_vocab)]
    torch.testing.assert_close(old_rows, start.text_encoder.get_input_embeddings().weight, atol=0, rtol=0)
    # And the transformer gained its (zero) frame-position embeddings.
    assert (
        run.transformer.config.frame_position_embedding
        and not start.transformer.config.frame_position_embedding
    )
    assert run.transformer.branches["edit"].frame_position_embedding.weight.abs().max() == 0
