"""The multi-process helper itself: results come back, and every rank's failure is reported."""

import pytest
import torch
import torch.distributed as dist

from stem_megatron.testing.distributed import DistributedTestError, run_distributed


def _allreduce_rank(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_odd(rank, world_size):
    if rank % 2 == 1:
        raise ValueError(f"boom on {rank}")
    return rank


def test_results_from_all_ranks():
    assert run_distributed(_allreduce_rank, world_size=2) == [1.0, 1.0]


def test_failures_are_reported_per_rank():
    with pytest.raises(DistributedTestError, match="boom on 1"):
        run_distributed(_fail_on_odd, world_size=2, timeout=60)
