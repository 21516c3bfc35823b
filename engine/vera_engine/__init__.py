"""Vera Edit engine: the Vera MoT model, its pipeline, colour, EXR I/O and the job service."""
