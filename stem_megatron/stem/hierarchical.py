"""Node-aware routing of the STEM table exchange: pure routing functions, byte counters, collectives.

The shard group's G ranks sit on M nodes of P consecutive shard ranks each: shard rank
r = node * P + local. An id's owner is o = id % G (exchange.py). Its *aggregator* on node n is
the rank of n with the owner's local index, `n * P + o % P`. Ranks with one local index across
the nodes form a rail; only rail peers talk across nodes. Work split: aggregator l handles the
ids owned by local index l of every node, 1/P of the node's ids (round-robin ownership keeps it
balanced), so every rank of a node aggregates and every rail carries 1/P of the node's traffic.

Lookup (`lookup_hierarchical`), per exchange:
  A. each rank sends its unique ids to their aggregators on its node            (intra-node)
  B. each aggregator de-duplicates what it received (its rail's share of the node's union)
     and sends each id once to the owner                                        (inter-node, rail)
  C. owners gather the rows and send them back along the rail                   (inter-node, rail)
  D. aggregators fan the rows out to the node's ranks that asked                (intra-node)
Gradients (`reduce_hierarchical`) travel the reverse way: each rank's de-duplicated rows go to
their aggregator, which sums its node's contributions (one row per id per node crosses the
node boundary) and sends them to the owner, which sums the nodes. Rows equal the flat exchange
exactly; gradients equal it in fp32, and bitwise in deterministic mode because the flat owner
then sums in the same association (`owner_sum`: node-local ranks first, then nodes).

The routing functions below (`route_to_aggregators`, `node_union`, `owner_major`) are what the
engine runs and what `benchmarks.scale_model` runs to simulate a world without collectives;
`phase_traffic` turns one phase's per-peer counts into intra- and inter-node bytes for both.

Legend: G shard-group size, P shard ranks per node, M nodes, U unique ids of a rank,
A ids an aggregator received, V an aggregator's de-duplicated ids, R ids an owner serves,
K locally de-duplicated gradient rows, L layers, F local ffn columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from stem_megatron.stem.exchange import ID_BYTES, owner_major
from stem_megatron.stem.ownership import local_row, owner
from stem_megatron.stem.segment import unique_sum

EXCHANGES = ("flat", "hierarchical")
BAD_ID_WORDS = 2  # [n_bad, first_bad_id] all-gathered before any variable-size collective


@dataclass(frozen=True)
class NodeMap:
    """G shard ranks on M nodes of P consecutive shard ranks (shard rank = node * P + local)."""

    shard_size: int  # G
    ranks_per_node: int  # P: shard ranks per node

    def __post_init__(self) -> None:
        if self.ranks_per_node < 1 or self.shard_size % self.ranks_per_node:
            raise ValueError(
                f"{self.shard_size} STEM shard ranks do not split into nodes of {self.ranks_per_node}"
            )

    @property
    def nodes(self) -> int:
        return self.shard_size // self.ranks_per_node

    def node(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def node_peers(self, rank: int) -> list[bool]:
        """[G] True for the shard ranks on `rank`'s node (itself included)."""
        return [self.node(r) == self.node(rank) for r in range(self.shard_size)]

    def rail_peers(self, rank: int) -> list[bool]:
        """[G] True for the shard ranks with `rank`'s local index (itself included)."""
        p = self.ranks_per_node
        return [r % p == rank % p for r in range(self.shard_size)]


def node_map(shard_global_ranks: list[int], ranks_per_node: int) -> NodeMap:
    """The NodeMap of a shard group from its members' global ranks (node = global rank // ranks_per_node).

    Megatron and `build_stem_groups` give each node a run of consecutive shard ranks; anything
    else (a node holding non-consecutive or unequal shares) is refused with a one-line error.
    """
    if ranks_per_node < 1:
        raise ValueError(f"stem.ranks_per_node must be >= 1, got {ranks_per_node}")
    nodes = [r // ranks_per_node for r in shard_global_ranks]
    runs = [nodes[0]]
    for n in nodes[1:]:
        if n != runs[-1]:
            runs.append(n)
    per_node = len(nodes) // len(runs)
    if len(set(runs)) != len(runs) or per_node * len(runs) != len(nodes) or any(
        nodes[i] != nodes[i - i % per_node] for i in range(len(nodes))
    ):
        raise ValueError(
            f"STEM shard group (global ranks {shard_global_ranks}) does not sit on nodes of "
            f"{ranks_per_node} ranks as equal runs of consecutive shard ranks"
        )
    return NodeMap(len(nodes), per_node)


# ---------------------------------------------------------------------------- routing (pure)
def route_to_aggregators(ids_U: torch.Tensor, rank: int, nm: NodeMap) -> tuple[torch.Tensor, list[int]]:
    """(stable permutation grouping ids by aggregator, ids per destination [G]).

    Only `rank`'s node peers get ids. Owner-major input gives (aggregator, owner, id) order.
    """
    g, p = nm.shard_size, nm.ranks_per_node
    local_U = owner(ids_U, g) % p  # the aggregator's (= the owner's) local index
    perm_U = torch.sort(local_U, stable=True).indices
    send_G = [0] * g
    base = nm.node(rank) * p
    send_G[base : base + p] = torch.bincount(local_U, minlength=p).tolist()
    return perm_U, send_G


def node_union(ids_A: torch.Tensor, shard_size: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """An aggregator's received ids -> (its de-duplicated ids V owner-major, inverse A -> V, ids per owner [G])."""
    sorted_V, inverse_A = torch.unique(ids_A, sorted=True, return_inverse=True)
    perm_V, counts_G = owner_major(sorted_V, shard_size)
    position_V = torch.empty_like(perm_V)
    position_V[perm_V] = torch.arange(perm_V.numel(), device=perm_V.device)
    return sorted_V[perm_V], position_V[inverse_A], counts_G.tolist()


def owner_sum(
    ids_R: torch.Tensor, values_RX: torch.Tensor, recv_G: list[int], nm: NodeMap | None, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat owner's sum of gradient rows arriving from all G sources in shard-rank order.

    Deterministic with several nodes: summed per (node, id) first, then over nodes, which is the
    hierarchical exchange's association, so the two agree bitwise. Returns (sorted local rows, sums).
    """
    g = len(recv_G)
    if nm is None or not deterministic or nm.nodes == 1 or nm.ranks_per_node == 1:
        return unique_sum(local_row(ids_R, g), values_RX, deterministic)
    source_R = torch.repeat_interleave(
        torch.arange(g, device=ids_R.device), torch.tensor(recv_G, device=ids_R.device)
    )
    m = nm.nodes
    keys, sums = unique_sum(ids_R * m + source_R // nm.ranks_per_node, values_RX, True)
    return unique_sum(local_row(keys // m, g), sums, True)


# ---------------------------------------------------------------------------- byte counters
def phase_traffic(send_G: list[int], recv_G: list[int], elem_bytes: int, rank: int, nm: NodeMap) -> dict:
    """Bytes `rank` sends to and receives from other ranks in one all-to-all phase, intra vs inter node.

    A rank's own segment is a local copy and not counted; node peers are a contiguous run.
    """
    lo = nm.node(rank) * nm.ranks_per_node
    hi = lo + nm.ranks_per_node
    s_intra, r_intra = sum(send_G[lo:hi]) - send_G[rank], sum(recv_G[lo:hi]) - recv_G[rank]
    s_inter, r_inter = sum(send_G) - send_G[rank] - s_intra, sum(recv_G) - recv_G[rank] - r_intra
    return {
        "sent_intra": s_intra * elem_bytes,
        "sent_inter": s_inter * elem_bytes,
        "recv_intra": r_intra * elem_bytes,
        "recv_inter": r_inter * elem_bytes,
    }


def add_traffic(total: dict, part: dict) -> dict:
    for k, v in part.items():
        total[k] = total.get(k, 0) + v
    return total


def peer_counts(mask_G: list[bool]) -> list[int]:
    """Split sizes of a one-int-per-peer count exchange over the peers in `mask_G`."""
    return [1 if m else 0 for m in mask_G]


def flat_lookup_traffic(uniq_GG: list[list[int]], rank: int, row_bytes: int, nm: NodeMap) -> dict:
    """Intra/inter bytes of the flat lookup (C1 all-gather, ids to owners, rows back) on `rank`."""
    g = nm.shard_size
    meta = [(2 + 2 * g) if r != rank else 0 for r in range(g)]  # exchange.META_FIXED + 2G int64
    t = phase_traffic(meta, meta, ID_BYTES, rank, nm)
    send_G, recv_G = uniq_GG[rank], [uniq_GG[s][rank] for s in range(g)]
    add_traffic(t, phase_traffic(send_G, recv_G, ID_BYTES, rank, nm))
    return add_traffic(t, phase_traffic(recv_G, send_G, row_bytes, rank, nm))


def flat_reduce_traffic(count_GG: list[list[int]], rank: int, grad_row_bytes: int, nm: NodeMap) -> dict:
    """Intra/inter bytes of the flat gradient reduce (counts all-gather, ids + fp32 rows to owners)."""
    g = nm.shard_size
    meta = [g if r != rank else 0 for r in range(g)]
    t = phase_traffic(meta, meta, ID_BYTES, rank, nm)
    send_G, recv_G = count_GG[rank], [count_GG[s][rank] for s in range(g)]
    return add_traffic(t, phase_traffic(send_G, recv_G, ID_BYTES + grad_row_bytes, rank, nm))


def _prefixed(prefix: str, t: dict) -> dict:
    out = {f"{prefix}bytes_{k}": v for k, v in t.items()}
    out[f"{prefix}bytes_sent"] = t["sent_intra"] + t["sent_inter"]
    out[f"{prefix}bytes_received"] = t["recv_intra"] + t["recv_inter"]
    return out


def lookup_stats(t: dict, n_tokens: int, n_unique: int, n_aggregated: int | None = None) -> dict:
    """The stats dict of a lookup from its traffic totals (keys shared by flat and hierarchical)."""
    out = _prefixed("", t)
    out.update(n_tokens=n_tokens, n_unique=n_unique, unique_fraction=n_unique / n_tokens if n_tokens else 0.0)
    if n_aggregated is not None:
        out["n_aggregated"] = n_aggregated  # ids this rank de-duplicated for its node and rail
    return out


def reduce_stats(t: dict) -> dict:
    return _prefixed("reduce_", t)


# ---------------------------------------------------------------------------- collectives
def _exchange_counts(send_G: list[int], mask_G: list[bool], group, device) -> list[int]:
    """Tell each peer in `mask_G` how many elements it gets; returns what each peer sends me [G]."""
    splits = peer_counts(mask_G)
    send = torch.tensor([c for c, m in zip(send_G, mask_G) if m], dtype=torch.int64, device=device)
    recv = torch.empty(sum(splits), dtype=torch.int64, device=device)
    dist.all_to_all_single(recv, send, splits, splits, group=group)
    it = iter(recv.tolist())
    return [next(it) if m else 0 for m in mask_G]


def _all_to_all(inp: torch.Tensor, send_G: list[int], recv_G: list[int], group, async_op=False):
    out = inp.new_empty((sum(recv_G), *inp.shape[1:]))
    work = dist.all_to_all_single(out, inp.contiguous(), recv_G, send_G, group=group, async_op=async_op)
    return (out, work) if async_op else out


def lookup_meta_traffic(rank: int, nm: NodeMap) -> dict:
    """Bytes of a hierarchical lookup's small collectives on `rank`: the bad-id all-gather
    ([n_bad, first_bad_id] over the shard group) and the two one-int-per-peer count exchanges."""
    c = [BAD_ID_WORDS if r != rank else 0 for r in range(nm.shard_size)]
    t = phase_traffic(c, c, ID_BYTES, rank, nm)
    return add_traffic(t, reduce_meta_traffic(rank, nm))


def reduce_meta_traffic(rank: int, nm: NodeMap) -> dict:
    """Bytes of the two one-int-per-peer count exchanges (node peers, rail peers) on `rank`."""
    t: dict = {}
    for mask in (nm.node_peers(rank), nm.rail_peers(rank)):
        c = [1 if m and r != rank else 0 for r, m in enumerate(mask)]
        add_traffic(t, phase_traffic(c, c, ID_BYTES, rank, nm))
    return t


def lookup_hierarchical(unique_U, send_a, rank, nm: NodeMap, group, serve, row_bytes):
    """Phases A-D for one rank's unique ids in send order (`route_to_aggregators`, counts send_a).

    `serve(req_R)` gathers the owner's rows for global ids req_R. Returns (rows [U, ...] in the
    order of unique_U once `work` completes, work, traffic dict, number of ids aggregated here).
    """
    device = unique_U.device
    recv_a = _exchange_counts(send_a, nm.node_peers(rank), group, device)
    ids_A = _all_to_all(unique_U, send_a, recv_a, group)  # A: ids to aggregators
    union_V, inverse_A, send_b = node_union(ids_A, nm.shard_size)
    recv_b = _exchange_counts(send_b, nm.rail_peers(rank), group, device)
    req_R = _all_to_all(union_V, send_b, recv_b, group)  # B: node-unique ids to owners
    rows_V = _all_to_all(serve(req_R), recv_b, send_b, group)  # C: rows back along the rail
    # D: rows fan out to the node's requesters, arriving in each requester's send order
    rows_U, work = _all_to_all(rows_V.index_select(0, inverse_A), recv_a, send_a, group, async_op=True)
    t = lookup_traffic_hierarchical(send_a, recv_a, send_b, recv_b, rank, nm, row_bytes)
    return rows_U, work, t, union_V.numel()


def lookup_traffic_hierarchical(send_a, recv_a, send_b, recv_b, rank, nm: NodeMap, row_bytes) -> dict:
    """All bytes of one hierarchical lookup on `rank` from its phase A and B counts."""
    t = lookup_meta_traffic(rank, nm)
    add_traffic(t, phase_traffic(send_a, recv_a, ID_BYTES, rank, nm))
    add_traffic(t, phase_traffic(send_b, recv_b, ID_BYTES, rank, nm))
    add_traffic(t, phase_traffic(recv_b, send_b, row_bytes, rank, nm))
    return add_traffic(t, phase_traffic(recv_a, send_a, row_bytes, rank, nm))


def reduce_hierarchical(ids_K, grads_KX, rank, nm: NodeMap, group, deterministic, grad_row_bytes):
    """Sum gradient rows (sorted unique ids_K) on their owners via the node aggregators.

    Returns (sorted local rows of this owner, fp32 sums, traffic dict).
    """
    device = ids_K.device
    g = nm.shard_size
    node, rail = nm.node_peers(rank), nm.rail_peers(rank)
    perm_K, send_a = route_to_aggregators(ids_K, rank, nm)
    recv_a = _exchange_counts(send_a, node, group, device)
    ids_A = _all_to_all(ids_K[perm_K], send_a, recv_a, group)
    grads_A = _all_to_all(grads_KX[perm_K], send_a, recv_a, group)
    # node sum: sources arrive in node-local rank order
    ids_V, sums_V = unique_sum(ids_A, grads_A, deterministic)
    perm_V, counts_G = owner_major(ids_V, g)
    send_b = counts_G.tolist()
    recv_b = _exchange_counts(send_b, rail, group, device)
    ids_R = _all_to_all(ids_V[perm_V], send_b, recv_b, group)
    grads_R = _all_to_all(sums_V[perm_V], send_b, recv_b, group)
    # owner sum: nodes arrive in node order, one row per id each
    index_n, values_n = unique_sum(local_row(ids_R, g), grads_R, deterministic)
    t = reduce_traffic_hierarchical(send_a, recv_a, send_b, recv_b, rank, nm, grad_row_bytes)
    return index_n, values_n, t


def reduce_traffic_hierarchical(send_a, recv_a, send_b, recv_b, rank, nm: NodeMap, grad_row_bytes) -> dict:
    """All bytes of one hierarchical gradient reduce on `rank` from its phase A and B counts."""
    t = reduce_meta_traffic(rank, nm)
    add_traffic(t, phase_traffic(send_a, recv_a, ID_BYTES + grad_row_bytes, rank, nm))
    return add_traffic(t, phase_traffic(send_b, recv_b, ID_BYTES + grad_row_bytes, rank, nm))
