"""Shared pytest configuration: the `gpu` marker skips without CUDA (with that reason); the
`one_torch_thread` fixture (a module opts in with `pytestmark = pytest.mark.usefixtures(...)`)."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none (runs when a GPU is lent)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for the module's tests, restored afterwards."""
    # 2 cores shared by many jobs: torch's intra-op threads spin-wait and make tiny models 50x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
