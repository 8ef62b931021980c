"""STEM shard / replica groups from megatron's data-parallel (x CP) groups, on gloo at world 4.

Layouts: DP=4 with shard_size 1, 2, 4 (and the default), TP=2 x DP=2 with shard_size 1, 2.
Each group is also used for a collective to show every rank created every group consistently.
"""

import pytest
import torch
import torch.distributed as dist

from stem_megatron.stem.groups import split_dp_ranks
from stem_megatron.testing.distributed import run_distributed


def test_split_dp_ranks():
    shards, replicas = split_dp_ranks([1, 3, 5, 7], 2)
    assert shards == [[1, 3], [5, 7]] and replicas == [[1, 5], [3, 7]]
    with pytest.raises(ValueError, match="must divide"):
        split_dp_ranks([0, 1, 2, 3], 3)


def _summary(groups):
    def total(group):
        t = torch.tensor([1.0 + dist.get_rank()])
        if group is not None:
            dist.all_reduce(t, group=group)
        return t.item()

    return (
        groups.shard_ranks,
        groups.replica_ranks,
        groups.shard_rank,
        groups.shard_size,
        groups.replica_rank,
        groups.num_replicas,
        total(groups.shard_group),
        total(groups.replica_group),
    )


def _layouts(rank, world_size):
    from megatron.core import parallel_state

    from stem_megatron.stem.groups import build_stem_groups

    with pytest.raises(RuntimeError, match="initialize_model_parallel"):
        build_stem_groups(None)
    out = {}
    parallel_state.initialize_model_parallel(create_gloo_process_groups=False)  # DP=4
    for s in (None, 1, 2, 4):
        out[("dp4", s)] = _summary(build_stem_groups(s))
    with pytest.raises(ValueError, match="must divide the data-parallel"):
        build_stem_groups(3)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, create_gloo_process_groups=False)
    for s in (None, 1, 2):
        out[("tp2dp2", s)] = _summary(build_stem_groups(s))
    return out


def test_groups_dp4_and_tp2_dp2():
    res = run_distributed(_layouts, world_size=4, timeout=180)
    for r in range(4):
        # DP=4: (shard ranks, replica ranks, shard rank, G, replica rank, R, sum over shard, over replica)
        full = ((0, 1, 2, 3), (r,), r, 4, 0, 1, 10.0, 1.0 + r)
        assert res[r][("dp4", None)] == res[r][("dp4", 4)] == full
        assert res[r][("dp4", 1)] == ((r,), (0, 1, 2, 3), 0, 1, r, 4, 1.0 + r, 10.0)
        pair = (0, 1) if r < 2 else (2, 3)
        rep = (r % 2, r % 2 + 2)
        assert res[r][("dp4", 2)] == (
            pair,
            rep,
            r % 2,
            2,
            r // 2,
            2,
            sum(1.0 + x for x in pair),
            sum(1.0 + x for x in rep),
        )
        # TP=2 x DP=2: megatron puts TP innermost, so the DP groups are {0, 2} and {1, 3}.
        dp = (r % 2, r % 2 + 2)
        dp_sum = sum(1.0 + x for x in dp)
        assert (
            res[r][("tp2dp2", None)] == res[r][("tp2dp2", 2)] == (dp, (r,), r // 2, 2, 0, 1, dp_sum, 1.0 + r)
        )
        assert res[r][("tp2dp2", 1)] == ((r,), dp, 0, 1, r // 2, 2, 1.0 + r, dp_sum)
