"""torch.distributed + megatron parallel_state initialisation for one experiment.

`init_distributed()` starts the default process group from torchrun's environment (NCCL on GPU,
gloo on CPU); `initialize_model_parallel(cfg)` builds megatron's TP/PP/(V)PP/CP/DP groups, seeds
the RNGs (megatron's model-parallel RNG tracker included) and, on machines without CUDA, installs
the CPU compatibility layer first. STEM shard/replica groups are built by `stem.groups`.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from stem_megatron import compat
from stem_megatron.config import ExperimentConfig


@dataclass(frozen=True)
class ParallelInfo:
    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int


def init_distributed(timeout_minutes: int = 30) -> None:
    """Initialise the default process group from torchrun's environment (single process if absent)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def initialize_model_parallel(cfg: ExperimentConfig) -> ParallelInfo:
    """megatron parallel_state for cfg's layout, and seeded RNGs. Needs the default process group."""
    from megatron.core import parallel_state, tensor_parallel

    compat.apply()  # no-op when CUDA is present
    world = dist.get_world_size()
    cfg.validate_world(world)
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
    )
    seed = cfg.train.seed
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    # Different stages initialise different layers: offset the default generator by stage.
    random.seed(seed + 100 * pp_rank)
    np.random.seed(seed + 100 * pp_rank)
    torch.manual_seed(seed + 100 * pp_rank)
    tensor_parallel.model_parallel_cuda_manual_seed(seed + 100 * pp_rank)
    return parallel_info()


def parallel_info() -> ParallelInfo:
    from megatron.core import parallel_state as ps

    return ParallelInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
        dp_size=ps.get_data_parallel_world_size(with_context_parallel=True),
    )


def destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
