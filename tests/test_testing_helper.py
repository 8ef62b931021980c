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


def _devices_seen(rank, world_size):
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available()


def test_gloo_ranks_are_cpu_ranks_even_where_gpus_exist():
    """gloo cannot send CUDA tensors point to point or all-to-all: its ranks must not see GPUs."""
    assert run_distributed(_devices_seen, world_size=1, timeout=60) == [("", False)]


def test_test_batches_follow_the_model_device():
    from stem_megatron.testing.models import on_model_device

    model = torch.nn.Linear(2, 2, device="meta")  # any device other than the batch's
    batch = on_model_device({"tokens": torch.ones(2, 3, dtype=torch.long)}, model)
    assert batch["tokens"].device == torch.device("meta") and batch["tokens"].dtype == torch.long
