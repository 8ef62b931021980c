"""Shared pytest configuration: the `gpu` marker skips without CUDA (with that reason)."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none (runs when a GPU is lent)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
