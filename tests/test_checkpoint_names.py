"""docs/CHECKPOINTS.md's naming table: a renamed state dict loads back into the same model; the doc is the code's."""

import re
from pathlib import Path

import pytest
import torch

from vera_engine.pipelines.presets import build_random_transformer
from vera_engine.tools.checkpoint_names import (
    PUBLISHED_TO_VERA_BLOCK,
    PUBLISHED_TO_VERA_BRANCH,
    PUBLISHED_TO_VERA_SHARED,
    published_key_to_vera,
    published_to_vera,
    vera_to_published,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "CHECKPOINTS.md"


def test_a_state_dict_in_the_published_naming_loads_into_the_same_model():
    model = build_random_transformer("vera-tiny", seed=2).eval()  # has frame-position embeddings too
    published = vera_to_published(model.state_dict())
    # What the renamed file looks like: Wan2.1's own names, one branch per prefix.
    for key in (
        "edit.blocks.0.self_attn.q.weight",
        "alpha.blocks.3.cross_attn.norm_k.weight",
        "composite.blocks.1.norm3.bias",
        "edit.blocks.2.ffn.0.weight",
        "alpha.blocks.0.modulation",
        "composite.head.head.weight",
        "edit.time_projection.1.bias",
        "source_patch_embedding.weight",
        "alpha_layer_embedding",
    ):
        assert key in published, key
    assert not any("attn1" in k or "to_q" in k or k.startswith("branches.") for k in published)
    fresh = build_random_transformer("vera-tiny", seed=9).eval()
    fresh.load_state_dict(published_to_vera(published), strict=True)
    g = torch.Generator().manual_seed(0)
    latents = {
        n: torch.randn(1, 12, 2, 4, 4, generator=g) for n in ("edit", "alpha", "composite", "source", "mask")
    }
    text = torch.randn(1, 6, 64, generator=g)

    def run(m):
        with torch.no_grad():
            return m(
                edit_latents=latents["edit"], alpha_latents=latents["alpha"], composite_latents=latents["composite"],
                timestep=torch.tensor([500.0]), encoder_hidden_states=text, source_latents=latents["source"],
                mask_latents=latents["mask"], return_dict=False,
            )  # fmt: skip

    for a, b in zip(run(model), run(fresh), strict=True):
        assert torch.equal(a, b)


def test_unknown_names_are_refused_by_name():
    with pytest.raises(
        ValueError, match=r"tensor 'edit\.blocks\.0\.self_attn\.qkv\.weight' has no counterpart"
    ):
        published_key_to_vera("edit.blocks.0.self_attn.qkv.weight")
    with pytest.raises(ValueError, match=r"'background\.head\.head\.weight'"):
        published_key_to_vera("background.head.head.weight")


def _doc_rows(heading: str) -> dict[str, str]:
    text = DOC.read_text()
    section = text.split(heading, 1)[1].split("\n\n", 2)[1]
    return dict(re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|$", section, flags=re.MULTILINE))


def test_the_documented_table_is_the_code():
    assert _doc_rows("Inside a block") == PUBLISHED_TO_VERA_BLOCK
    assert _doc_rows("Outside the blocks (") == PUBLISHED_TO_VERA_BRANCH
    assert _doc_rows("Vera's own tensors") == PUBLISHED_TO_VERA_SHARED
