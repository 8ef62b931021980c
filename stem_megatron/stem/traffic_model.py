"""Byte counters of a whole shard group's exchange, computed without collectives (the scale model).

Given every rank's token ids, this runs the routing functions the engine runs
(`exchange.owner_major`, `hierarchical.route_to_aggregators`, `hierarchical.node_union`) for
all ranks at once, hands each rank's per-peer counts to the engine's own counter functions
(`flat_lookup_traffic`, `lookup_traffic_hierarchical`, ...), and returns, per rank, the dict
the engine's `stats` would hold. tests/test_stem_hierarchical.py checks it against the
counters measured in gloo runs; `benchmarks.scale_model` runs it up to 1,024 ranks.

Scopes: `microbatch` (one exchange per micro-batch, as the engine does) or `step` (one exchange
of the union of a step's micro-batches). Gradients reduce once per step either way, over each
rank's union of the step's ids (every looked-up row gets a gradient in training).

Legend: G shard ranks, U unique ids of a rank, A ids an aggregator received.
"""

from __future__ import annotations

import torch

from stem_megatron.stem.exchange import owner_major
from stem_megatron.stem.hierarchical import (
    NodeMap,
    add_traffic,
    flat_lookup_traffic,
    flat_reduce_traffic,
    lookup_traffic_hierarchical,
    node_union,
    reduce_traffic_hierarchical,
    route_to_aggregators,
)

SCOPES = ("microbatch", "step")


def _owner_major_unique(ids: torch.Tensor, g: int) -> torch.Tensor:
    sorted_U = torch.unique(ids.reshape(-1).to(torch.int64), sorted=True)
    perm_U, _ = owner_major(sorted_U, g)
    return sorted_U[perm_U]


def _hierarchical_counts(unique_per_rank: list[torch.Tensor], nm: NodeMap):
    """Phase A and B counts of every rank ([rank][peer]), as the engine's lookup/reduce compute them."""
    g, p = nm.shard_size, nm.ranks_per_node
    send_a, routed = [], []
    for r, ids_U in enumerate(unique_per_rank):
        perm_U, counts = route_to_aggregators(ids_U, r, nm)
        send_a.append(counts)
        routed.append(ids_U[perm_U])
    recv_a = [[send_a[s][r] for s in range(g)] for r in range(g)]
    send_b = []
    for a in range(g):  # aggregator a receives, from its node peers in shard-rank order, its segment
        lo = nm.node(a) * p
        parts = []
        for s in range(lo, lo + p):
            start = sum(send_a[s][:a])
            parts.append(routed[s][start : start + send_a[s][a]])
        send_b.append(node_union(torch.cat(parts), g)[2])
    recv_b = [[send_b[s][r] for s in range(g)] for r in range(g)]
    return send_a, recv_a, send_b, recv_b


def lookup_traffic_all(ids_per_rank: list[torch.Tensor], nm: NodeMap, row_bytes: int, exchange: str) -> list[dict]:
    """Every rank's byte counters (sent/recv, intra/inter) of one lookup of `ids_per_rank`."""
    g = nm.shard_size
    unique = [_owner_major_unique(ids, g) for ids in ids_per_rank]
    if exchange == "flat":
        uniq_GG = [torch.bincount(u % g, minlength=g).tolist() for u in unique]
        return [flat_lookup_traffic(uniq_GG, r, row_bytes, nm) for r in range(g)]
    sa, ra, sb, rb = _hierarchical_counts(unique, nm)
    return [lookup_traffic_hierarchical(sa[r], ra[r], sb[r], rb[r], r, nm, row_bytes) for r in range(g)]


def reduce_traffic_all(ids_per_rank: list[torch.Tensor], nm: NodeMap, grad_row_bytes: int, exchange: str) -> list[dict]:
    """Every rank's byte counters of one gradient reduce of rows touched by `ids_per_rank` (shard group part)."""
    g = nm.shard_size
    unique = [torch.unique(ids.reshape(-1).to(torch.int64), sorted=True) for ids in ids_per_rank]
    if exchange == "flat":
        count_GG = [torch.bincount(u % g, minlength=g).tolist() for u in unique]
        return [flat_reduce_traffic(count_GG, r, grad_row_bytes, nm) for r in range(g)]
    sa, ra, sb, rb = _hierarchical_counts(unique, nm)
    return [reduce_traffic_hierarchical(sa[r], ra[r], sb[r], rb[r], r, nm, grad_row_bytes) for r in range(g)]


def step_traffic_all(
    micro_batches_per_rank: list[list[torch.Tensor]],
    nm: NodeMap,
    row_bytes: int,
    grad_row_bytes: int,
    exchange: str,
    scope: str,
) -> list[dict]:
    """Every rank's bytes for one training step: lookups (per scope) plus the step's reduce.

    Keys: `lookup_{sent,recv}_{intra,inter}` and `reduce_{sent,recv}_{intra,inter}`.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    g = nm.shard_size
    n_mb = len(micro_batches_per_rank[0])
    if any(len(mbs) != n_mb for mbs in micro_batches_per_rank):
        raise ValueError("every rank needs the same number of micro-batches")
    step_ids = [torch.cat([m.reshape(-1) for m in mbs]) for mbs in micro_batches_per_rank]
    lookups: list[dict] = [{} for _ in range(g)]
    exchanges = [step_ids] if scope == "step" else [[mbs[i] for mbs in micro_batches_per_rank] for i in range(n_mb)]
    for ids_per_rank in exchanges:
        for r, t in enumerate(lookup_traffic_all(ids_per_rank, nm, row_bytes, exchange)):
            add_traffic(lookups[r], t)
    reduces = reduce_traffic_all(step_ids, nm, grad_row_bytes, exchange)
    out = []
    for lk, rd in zip(lookups, reduces):
        row = {f"lookup_{k}": v for k, v in lk.items()}
        row.update({f"reduce_{k}": v for k, v in rd.items()})
        out.append(row)
    return out
