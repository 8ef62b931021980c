"""Moved to stem_megatron.outputs (the one output primitive); kept for inference/niah.py's import
until it imports `atomic_dir` from there."""

from stem_megatron.outputs import atomic_dir  # noqa: F401
