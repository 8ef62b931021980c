"""Test utilities shared by the test suite and benchmarks (multi-process gloo launching)."""

from stem_megatron.testing.distributed import find_free_port, run_distributed

__all__ = ["find_free_port", "run_distributed"]
