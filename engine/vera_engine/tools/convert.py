"""`vera-engine convert-wan`: build a Vera pipeline folder from a diffusers-format Wan2.1 text-to-video folder.

The transformer becomes a `VeraTransformer3DModel` with all three branches initialised from Wan (paper App. A.2);
the VAE, text encoder, tokenizer and scheduler are copied over unchanged, so the result loads with
`VeraPipeline.from_pretrained` and is ready for `vera-engine train`.
"""

import json
import os
import shutil
from pathlib import Path

import torch

from vera_engine.models.transformer_vera import VeraTransformer3DModel
from vera_engine.pipelines.model_store import make_files_shareable

CARRIED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")


def convert_wan(
    wan_dir: "str | os.PathLike[str]",
    out_dir: "str | os.PathLike[str]",
    *,
    native_height: int = 480,
    native_width: int = 832,
    native_frames: int = 49,
    max_sequence_length: int = 512,
    torch_dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Vera pipeline folder at `out_dir` from the Wan pipeline folder `wan_dir`; return `out_dir`."""
    wan_dir, out_dir = Path(wan_dir), Path(out_dir)
    index_path = wan_dir / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(
            f"--wan {str(wan_dir)!r} has no model_index.json; expected a diffusers-format Wan2.1 T2V folder "
            "(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    wan_index = json.loads(index_path.read_text())
    missing = [name for name in ("transformer", *CARRIED_COMPONENTS) if not (wan_dir / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"--wan {str(wan_dir)!r} lacks the component folders {missing}")
    if wan_index.get("vae", [None, None])[1] != "AutoencoderKLWan":
        raise ValueError(
            f"--wan {str(wan_dir)!r}: its vae is {wan_index.get('vae')}; expected diffusers' AutoencoderKLWan"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"--out {str(out_dir)!r} exists and is not empty; pass --overwrite to replace it"
            )
        shutil.rmtree(out_dir)

    # Write into a sibling folder and rename at the end, so an interrupted conversion leaves no half model behind.
    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    transformer = VeraTransformer3DModel.from_wan(wan_dir / "transformer", torch_dtype=torch_dtype)
    transformer.save_pretrained(staging / "transformer", safe_serialization=True)
    del transformer
    for name in CARRIED_COMPONENTS:
        shutil.copytree(wan_dir / name, staging / name)

    index = {
        "_class_name": "VeraPipeline",
        "_diffusers_version": wan_index.get("_diffusers_version", ""),
        # The module path, as `save_pretrained` writes it: diffusers finds the loader (ModelMixin) through it.
        "transformer": [VeraTransformer3DModel.__module__, "VeraTransformer3DModel"],
        **{name: wan_index[name] for name in CARRIED_COMPONENTS},
        "native_height": native_height,
        "native_width": native_width,
        "native_frames": native_frames,
        "max_sequence_length": max_sequence_length,
    }
    (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    make_files_shareable(staging)  # safetensors leaves its files owner-only
    staging.rename(out_dir)
    return out_dir
