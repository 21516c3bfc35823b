"""The slot reader of small checkpoints: every fact the generator writes is read back, in both wordings and mirrored."""

import pytest

from vera_engine.models.instruction_slots import instruction_to_slot_text, read_instruction
from vera_engine.training.data.dataset import mirror_fields, mirror_text
from vera_engine.training.data.synthetic import generate_clip


@pytest.mark.parametrize("wording", ["train", "reworded"])
def test_reads_every_fact_the_generator_states(wording):
    for i in range(160):
        task = ("object_addition", "background_change")[i % 2]
        clip = generate_clip(task, 7000 + i, frames=4, height=16, width=16, wording=wording)
        for flipped in (False, True):
            text = mirror_text(clip.instruction) if flipped else clip.instruction
            fields = mirror_fields(clip.fields) if flipped else clip.fields
            slots = read_instruction(text)
            assert slots.task == task, text
            assert slots.unread == [], (text, slots.unread)
            if task == "object_addition":
                got = (slots.colour, slots.shape, slots.size, slots.motion, slots.place)
                want = (
                    fields["colour"],
                    fields["shape"],
                    fields["size"],
                    fields["direction"],
                    fields["position"],
                )
                assert got == want, text
            else:
                background = fields["new_background"]
                assert slots.background_kind == background["kind"], text
                assert slots.background_colours == background["colours"], text
                if background["kind"] == "stripes":
                    assert slots.orientation.startswith(background["orientation"]), text


def test_opposite_motions_are_different_tokens():
    right = instruction_to_slot_text("add a red circle moving from left to right in the upper half")
    left = instruction_to_slot_text("add a red circle moving from right to left in the upper half")
    assert "motion_left_to_right" in right.split() and "motion_right_to_left" in left.split()
    assert right.replace("left_to_right", "X") == left.replace("right_to_left", "X")


def test_gradient_sides_follow_the_colours():
    slots = read_instruction(
        "replace the background with a gradient from red on the left to blue on the right"
    )
    assert (slots.background_colours, slots.background_sides) == (["red", "blue"], ["left", "right"])
    text = instruction_to_slot_text(
        "keep the green star and replace everything behind it with a gradient from red at the top to blue at the bottom"
    )
    assert text.split() == [
        "task_background",
        "kind_gradient",
        "first_red",
        "second_blue",
        "first_at_top",
        "second_at_bottom",
    ]


def test_what_cannot_be_read_is_reported_and_empty_stays_empty():
    assert instruction_to_slot_text("") == ""
    slots = read_instruction("add something nice")
    assert "the object's colour" in slots.unread and "the motion" in slots.unread


def test_slot_pipeline_encodes_the_slots_and_keeps_instruction_words_in_its_vocabulary():
    import torch

    from vera_engine.pipelines.presets import build_random_pipeline

    texts = ["add a red circle moving from left to right in the upper half"]
    pipe = build_random_pipeline("vera-tiny-v2", vocabulary=texts)
    assert pipe.config.instruction_format == "slots"
    vocab = pipe.tokenizer.get_vocab()
    assert "circle" in vocab and "motion_left_to_right" in vocab
    assert pipe.encoder_text(texts[0]).startswith("task_add colour_red")
    right = pipe.encode_prompt(texts[0], torch.device("cpu"), torch.float32)
    left = pipe.encode_prompt(mirror_text(texts[0]), torch.device("cpu"), torch.float32)
    assert not torch.equal(right, left)
