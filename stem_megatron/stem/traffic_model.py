"""Byte counters of a whole shard group's exchange, computed without collectives (the scale model).

Given every rank's token ids, this runs the routing functions the engine runs
(`exchange.owner_major`, `hierarchical.route_to_aggregators`, `hierarchical.node_union`) for
all ranks at once, hands each rank's per-peer counts to the engine's own counter functions
(`flat_lookup_traffic`, `lookup_traffic_hierarchical`, ...), and returns, per rank, the dict
the engine's `stats` would hold. tests/test_stem_hierarchical.py checks it against the
counters measured in gloo runs, and those against the bytes counted at the gloo calls
(testing/wire_bytes.py, which shares no code with these counters); `benchmarks.scale_model`
runs it up to 1,024 ranks.

Scopes: `microbatch` (one exchange per micro-batch, as the engine does) or `step` (one exchange
of the union of a step's micro-batches). Gradients reduce once per step either way, over each
rank's union of the step's ids (every looked-up row gets a gradient in training).

Legend: G shard ranks, U unique ids of a rank, A ids an aggregator received.
"""

from __future__ import annotations

import torch

from stem_megatron.stem.exchange import ID_BYTES, owner_major
from stem_megatron.stem.hierarchical import (
    NodeMap,
    add_traffic,
    flat_lookup_traffic,
    flat_reduce_traffic,
    lookup_meta_traffic,
    lookup_traffic_hierarchical,
    node_union,
    phase_traffic,
    reduce_meta_traffic,
    reduce_traffic_hierarchical,
    route_to_aggregators,
)
from stem_megatron.stem.ownership import owner

SCOPES = ("microbatch", "step")


def _sorted_unique(ids: torch.Tensor) -> torch.Tensor:
    """torch.unique(ids, sorted=True) by counting: ids are bounded by the vocabulary, O(N + V)."""
    ids = ids.reshape(-1).to(torch.int64)
    return torch.nonzero(torch.bincount(ids)).reshape(-1) if ids.numel() else ids


def _owner_major_unique(ids: torch.Tensor, g: int) -> torch.Tensor:
    sorted_U = _sorted_unique(ids)
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
        uniq_GG = [torch.bincount(owner(u, g), minlength=g).tolist() for u in unique]
        return [flat_lookup_traffic(uniq_GG, r, row_bytes, nm) for r in range(g)]
    sa, ra, sb, rb = _hierarchical_counts(unique, nm)
    return [lookup_traffic_hierarchical(sa[r], ra[r], sb[r], rb[r], r, nm, row_bytes) for r in range(g)]


def reduce_traffic_all(ids_per_rank: list[torch.Tensor], nm: NodeMap, grad_row_bytes: int, exchange: str) -> list[dict]:
    """Every rank's byte counters of one gradient reduce of rows touched by `ids_per_rank` (shard group part)."""
    g = nm.shard_size
    unique = [_sorted_unique(ids) for ids in ids_per_rank]
    if exchange == "flat":
        count_GG = [torch.bincount(owner(u, g), minlength=g).tolist() for u in unique]
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


def _sent_only(t: dict) -> dict:
    return {"intra": t["sent_intra"], "inter": t["sent_inter"]}


def sampled_step_bytes(
    micro_batches: dict[int, list[torch.Tensor]] | list[list[torch.Tensor]],
    nm: NodeMap,
    nodes: list[int],
    row_bytes: int,
    grad_row_bytes: int,
    exchange: str,
    scope: str,
) -> dict:
    """Mean bytes sent per rank per step (intra, inter) from the ranks of `nodes` alone.

    `micro_batches[r]` is rank r's list of micro-batches, for every rank r on `nodes`. The same
    routing functions and counters as `step_traffic_all`; only the rows an owner serves to other
    ranks are taken from the requesting side: every row served is a row requested, so summed
    over all nodes this is exact (equal to `step_traffic_all`'s mean sent bytes; tested), and
    over a sample of nodes it is the sample's estimate. Lets the scale model reach 1,024 ranks.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    g, p = nm.shard_size, nm.ranks_per_node
    ranks = [n * p + i for n in nodes for i in range(p)]
    step_ids = {r: torch.cat([m.reshape(-1) for m in micro_batches[r]]) for r in ranks}
    n_mb = len(micro_batches[ranks[0]])
    exchanges = [step_ids] if scope == "step" else [{r: micro_batches[r][i] for r in ranks} for i in range(n_mb)]
    zeros = [0] * g
    total = {"intra": 0, "inter": 0}

    def add(t):
        for k in total:
            total[k] += t[k]

    for ids in exchanges:
        unique = {r: _owner_major_unique(ids[r], g) for r in ranks}
        for r in ranks:
            if exchange == "flat":
                send = torch.bincount(owner(unique[r], g), minlength=g).tolist()
                add(_sent_only(flat_lookup_traffic([send if s == r else zeros for s in range(g)], r, 0, nm)))
                add(_sent_only(phase_traffic(send, zeros, row_bytes, r, nm)))  # rows served (= requested)
        if exchange == "hierarchical":
            for n in nodes:
                _hierarchical_sent(n, unique, nm, row_bytes, add)
    unique = {r: _sorted_unique(step_ids[r]) for r in ranks}
    for r in ranks:
        if exchange == "flat":
            send = torch.bincount(owner(unique[r], g), minlength=g).tolist()
            add(_sent_only(flat_reduce_traffic([send if s == r else zeros for s in range(g)], r, grad_row_bytes, nm)))
    if exchange == "hierarchical":
        for n in nodes:
            _hierarchical_sent(n, unique, nm, grad_row_bytes, add, reduce=True)
    return {k: v / len(ranks) for k, v in total.items()}


def _hierarchical_sent(node: int, unique: dict, nm: NodeMap, row_bytes: int, add, reduce: bool = False) -> None:
    """Bytes sent by the ranks of `node` in one hierarchical lookup (or reduce, gradient rows sent forward)."""
    g, p = nm.shard_size, nm.ranks_per_node
    ranks = range(node * p, node * p + p)
    sub = [unique[r] for r in ranks]
    send_a, routed = {}, {}
    for r, ids_U in zip(ranks, sub):
        perm_U, counts = route_to_aggregators(ids_U, r, nm)
        send_a[r], routed[r] = counts, ids_U[perm_U]
    zeros = [0] * g
    for a in ranks:
        parts = []
        for s in ranks:
            start = sum(send_a[s][:a])
            parts.append(routed[s][start : start + send_a[s][a]])
        send_b = node_union(torch.cat(parts), g)[2]
        recv_a = [send_a[s][a] if nm.node(s) == node else 0 for s in range(g)]
        meta = reduce_meta_traffic(a, nm) if reduce else lookup_meta_traffic(a, nm)
        add(_sent_only(meta))
        if reduce:  # ids + gradient rows to aggregators, node sums to owners
            add(_sent_only(phase_traffic(send_a[a], zeros, ID_BYTES + row_bytes, a, nm)))
            add(_sent_only(phase_traffic(send_b, zeros, ID_BYTES + row_bytes, a, nm)))
        else:  # A ids to aggregators, B+C ids to owners and the rows served back, D rows fanned out
            add(_sent_only(phase_traffic(send_a[a], zeros, ID_BYTES, a, nm)))
            add(_sent_only(phase_traffic(send_b, zeros, ID_BYTES + row_bytes, a, nm)))
            add(_sent_only(phase_traffic(recv_a, zeros, row_bytes, a, nm)))
