"""Sampling: `VeraPipeline` (source + instruction -> edit layer, matte, composite), named model sizes (presets)
and the model store (which folder a model name means, loaded once with its memory options)."""
