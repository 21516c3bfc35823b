"""Vera Edit engine: the Vera MoT model, its pipeline, colour, EXR I/O and the job service.

The heavy exports (torch, diffusers) load on first use, so `vera-engine --help` and the service start quickly and
`diffusers` can still find `vera_engine.VeraTransformer3DModel` when it reads a pipeline's `model_index.json`.
"""

from typing import Any

__version__ = "0.1.0"

_LAZY_EXPORTS = {
    "VeraTransformer3DModel": "vera_engine.models.transformer_vera",
    "VeraTransformerOutput": "vera_engine.models.transformer_vera",
    "SpaceToDepthCodec": "vera_engine.models.space_to_depth_codec",
    "VeraPipeline": "vera_engine.pipelines.pipeline_vera",
    "VeraPipelineOutput": "vera_engine.pipelines.pipeline_vera",
    "VeraInterrupted": "vera_engine.pipelines.pipeline_vera",
    "make_scheduler": "vera_engine.pipelines.pipeline_vera",
}

__all__ = ["__version__", *_LAZY_EXPORTS]


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'vera_engine' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
