"""Sampling: `VeraPipeline` (source + instruction -> edit layer, matte, composite), plates sampled through it
(`edit_plate`), named model sizes (presets), window rules (`windows`) and the model store (which folder a model name
means, loaded once with its memory options)."""
