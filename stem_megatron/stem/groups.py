"""STEM shard and replica process groups, carved out of megatron's data-parallel (x CP) groups.

The ranks that share a pipeline stage and a TP rank (megatron's data-parallel group with context
parallelism, size D) all need the same table columns. Each such group, with its ranks in
megatron's order p_0..p_{D-1}, is cut into D / S shard groups of S consecutive positions
(S = `shard_size`, default D): shard group j = p_{jS}..p_{jS+S-1}, rows split round-robin over it.
Ranks at the same position in different shard groups hold the same rows: replica group i =
p_i, p_{S+i}, p_{2S+i}, .... Consecutive positions tend to be on one node (megatron orders TP
innermost, then CP, then DP), so the per-micro-batch all-to-all stays local where possible and
only the once-per-step replica all-reduce crosses nodes.

Every rank creates every group in the same order (a torch.distributed requirement): the data-
parallel groups are sorted by their first rank; per group, all shard groups, then all replica
groups. Groups of one rank are not created and are returned as None (the engine treats None as
"no sharding" / "no replicas").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class StemGroups:
    shard_group: object | None  # ProcessGroup over which rows are sharded; None when shard_size == 1
    replica_group: object | None  # ProcessGroup of ranks holding the same rows; None when num_replicas == 1
    shard_rank: int
    shard_size: int
    replica_rank: int
    num_replicas: int
    shard_ranks: tuple[int, ...]  # global ranks of this rank's shard group
    replica_ranks: tuple[int, ...]  # global ranks of this rank's replica group


def split_dp_ranks(dp_ranks: list[int], shard_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(shard groups, replica groups) of one data-parallel rank list."""
    d = len(dp_ranks)
    if shard_size <= 0 or d % shard_size:
        raise ValueError(
            f"stem.shard_size {shard_size} must divide the data-parallel x context-parallel size {d}"
        )
    shards = [list(dp_ranks[j * shard_size : (j + 1) * shard_size]) for j in range(d // shard_size)]
    replicas = [list(dp_ranks[i::shard_size]) for i in range(shard_size)]
    return shards, replicas


def build_stem_groups_from_ranks(all_dp_ranks: list[list[int]], shard_size: int | None) -> StemGroups:
    """Create the groups from every data-parallel rank list of the world (same lists on every rank)."""
    me = dist.get_rank()
    all_dp = sorted((list(r) for r in all_dp_ranks), key=lambda r: r[0])
    mine = None
    for dp_ranks in all_dp:
        s = len(dp_ranks) if shard_size is None else shard_size
        shards, replicas = split_dp_ranks(dp_ranks, s)
        made = {}
        for ranks in shards + replicas:
            made[tuple(ranks)] = dist.new_group(ranks) if len(ranks) > 1 else None
        if me in dp_ranks:
            shard = next(r for r in shards if me in r)
            replica = next(r for r in replicas if me in r)
            mine = StemGroups(
                shard_group=made[tuple(shard)],
                replica_group=made[tuple(replica)],
                shard_rank=shard.index(me),
                shard_size=len(shard),
                replica_rank=replica.index(me),
                num_replicas=len(replica),
                shard_ranks=tuple(shard),
                replica_ranks=tuple(replica),
            )
    if mine is None:
        raise ValueError(f"rank {me} is in none of the data-parallel groups {all_dp}")
    return mine


def build_stem_groups(shard_size: int | None, dp_cp_group=None) -> StemGroups:
    """STEM groups after `parallel_state.initialize_model_parallel(...)`; collective over the world.

    `dp_cp_group`: this rank's data-parallel (x CP) group; default megatron's
    `get_data_parallel_group(with_context_parallel=True)`. The world's list of such groups is
    learned by one all_gather_object, so any megatron rank order works.
    """
    if dp_cp_group is None:
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("build_stem_groups needs parallel_state.initialize_model_parallel(...) first")
        dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    my_dp = dist.get_process_group_ranks(dp_cp_group)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, my_dp)
    unique = {tuple(r) for r in gathered}
    return build_stem_groups_from_ranks([list(r) for r in unique], shard_size)
