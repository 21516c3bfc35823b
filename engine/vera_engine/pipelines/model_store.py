"""Where models come from: a local pipeline folder, or `default` — the checkpoint shipped in the repository.

No hub, no downloads: a model is a folder on disk (`model_index.json` + component folders, safetensors only).
`$VERA_MODEL` overrides what `default` means, e.g. to make a studio's own fine-tune the default.
"""

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from vera_engine.pipelines.windows import position_reach

if TYPE_CHECKING:
    from vera_engine.acceleration.memory import MemoryOptions
    from vera_engine.pipelines.pipeline_vera import VeraPipeline

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "vera-tiny"
SHIPPED_MODEL_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / DEFAULT_MODEL_NAME

# Pickle-based weight formats: loading them runs code, so a model folder holding any is refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def resolve_model_dir(model: "str | os.PathLike[str]" = "default") -> Path:
    """The pipeline folder for `model`: a folder path, or 'default' ($VERA_MODEL, else the shipped checkpoint)."""
    if os.fspath(model) == "default":
        override = os.environ.get("VERA_MODEL")
        path = Path(override) if override else SHIPPED_MODEL_DIR
        if not (path / "model_index.json").is_file():
            where = f"$VERA_MODEL={override}" if override else str(SHIPPED_MODEL_DIR)
            raise FileNotFoundError(
                f"model 'default': no pipeline folder at {where}; pass a folder written by save_pretrained, "
                "`vera-engine convert-wan` or `vera-engine train`"
            )
        return path
    path = Path(model)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"model {os.fspath(model)!r} is not a Vera pipeline folder (no model_index.json); pass a folder written "
            "by save_pretrained, `vera-engine convert-wan` or `vera-engine train`, or 'default'"
        )
    return path


def check_safetensors_only(folder: Path) -> list[Path]:
    """The folder's safetensors files; a `ValueError` if it holds pickle weights anywhere."""
    pickles = [p for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        names = ", ".join(str(p.relative_to(folder)) for p in pickles[:5])
        raise ValueError(
            f"{folder}: contains pickle weight files ({names}); the engine loads safetensors only: re-save the "
            "model with save_pretrained(safe_serialization=True)"
        )
    weights = sorted(folder.rglob("*.safetensors"))
    if not weights:
        raise ValueError(f"{folder}: no .safetensors weights found")
    return weights


def make_files_shareable(folder: "str | os.PathLike[str]") -> None:
    """Give every file under `folder` the mode the user's umask gives a new file (0o644 under umask 022).

    safetensors writes its files through a private temporary file (mode 0o600) and keeps that mode, so weights
    saved with `save_pretrained` would be readable by their owner only: an engine running as another user, or a
    colleague, could not load them.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def max_window_frames(model_dir: Path) -> int:
    """The longest sampling window (frames) a pipeline folder's transformer positions reach, read from its configs
    (no weights loaded); `VeraPipeline.position_limits` computes the same from a loaded pipeline."""
    transformer = json.loads((model_dir / "transformer" / "config.json").read_text())
    codec = json.loads((model_dir / "vae" / "config.json").read_text())
    t = 1 if codec.get("_class_name") == "SpaceToDepthCodec" else int(codec.get("scale_factor_temporal", 4))
    frames, _, _ = position_reach(
        int(transformer.get("rope_max_seq_len", 1024)), transformer.get("patch_size", (1, 2, 2)), t, 1
    )
    return frames


def vocabulary(model_dir: Path) -> list[str]:
    """The words a word-level checkpoint reads (its tokenizer's vocabulary without special tokens), or [] for a
    tokenizer that reads free text (sentencepiece, bytes)."""
    path = model_dir / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        return []
    model = json.loads(path.read_text()).get("model", {})
    if model.get("type") != "WordLevel":
        return []
    return sorted(
        word for word in model.get("vocab", {}) if not (word.startswith("<") and word.endswith(">"))
    )


def load_pipeline(
    model: "str | os.PathLike[str]" = "default",
    device: str | None = None,
    precision: str = "auto",
    *,
    memory: "MemoryOptions | None" = None,
    attention_backend: str | None = "auto",
    compile_blocks: bool | None = None,
) -> "VeraPipeline":
    """Load a `VeraPipeline` from `model` (see `resolve_model_dir`), refusing pickle weights.

    `precision`: "auto" runs the transformer and text encoder in bfloat16 on a GPU (norms and modulation stay
    float32, the VAE stays float32, as for Wan) and everything in float32 on a CPU; or "float32" / "bfloat16".
    `memory`: a `vera_engine.acceleration.memory.MemoryOptions` placing the components on `device` (offloading, VAE tiling);
    without it every component goes to `device`, except on CUDA, where `MemoryOptions()` applies (the text encoder
    in pinned host memory, swapped in to encode; pass `MemoryOptions(text_encoder_offload="none")` to keep it
    there). `attention_backend`: a diffusers attention backend name for the
    joint attention (`native`, `_native_cudnn`, `flash`, `_flash_3`, `sage`, ...), or "auto" / None for the one
    `acceleration.backends.choose_attention_backend` picks for the device (`$VERA_ATTENTION_BACKEND` overrides it).
    `compile_blocks`: compile the repeated MoT block with `torch.compile(fullgraph=True)` (the first job pays the
    compilation); None: on CUDA without offloading, off elsewhere (`$VERA_COMPILE=0` turns the default off).
    """
    import torch

    from vera_engine.pipelines.pipeline_vera import VeraPipeline

    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision={precision!r}; expected 'auto', 'float32' or 'bfloat16'")
    from vera_engine.acceleration.backends import AUTO, resolve_attention_backend
    from vera_engine.acceleration.compile import compile_blocks as compile_repeated
    from vera_engine.acceleration.compile import should_compile

    if attention_backend not in (None, AUTO):
        check_attention_backend(attention_backend)
    on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    half = precision == "bfloat16" or (precision == "auto" and on_gpu)
    torch_dtype: torch.dtype | dict[str, torch.dtype] = torch.float32
    if half:
        torch_dtype = {
            "transformer": torch.bfloat16,
            "text_encoder": torch.bfloat16,
            "default": torch.float32,
        }
    folder = resolve_model_dir(model)
    check_safetensors_only(folder)
    pipe = VeraPipeline.from_pretrained(folder, dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    from vera_engine.acceleration.memory import apply_memory_options, default_memory_options

    # Without options a CUDA pipeline still gets the default ones: its text encoder visits the GPU only to encode.
    memory = default_memory_options(memory, device or ("cuda" if on_gpu else "cpu"))
    if memory is not None:
        apply_memory_options(pipe, memory, device or ("cuda" if on_gpu else "cpu"))
    elif device:
        pipe.to(device)
    target = torch.device(device or ("cuda" if on_gpu else "cpu"))
    backend, why = resolve_attention_backend(attention_backend, target, pipe.transformer.dtype)
    if backend != pipe.transformer.attention_backend:
        if why != "named":
            check_attention_backend(backend)
        pipe.transformer.set_attention_backend(backend)
    logger.info("attention backend %s (%s)", backend, why)
    offloading = memory is not None and (memory.group_offload is not None or memory.model_cpu_offload)
    if should_compile(compile_blocks, target.type, offloading):
        compile_repeated(pipe.transformer)
    return pipe


def check_attention_backend(name: str) -> None:
    """Refuse an attention backend diffusers does not know (listing the ones it does) or cannot run here."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
    )

    known = [backend.value for backend in AttentionBackendName]
    if name not in known:
        raise ValueError(f"attention backend {name!r} is not known to diffusers; expected one of {known}")
    try:
        # diffusers' own check that the backend's package (flash-attn, sageattention, kernels) is installed.
        _check_attention_backend_requirements(AttentionBackendName(name))
    except RuntimeError as exc:
        raise ValueError(f"attention backend {name!r} cannot run here: {exc}") from None
