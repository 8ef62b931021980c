"""The STEM shard-group exchange protocol: request routing, bad-id check, collectives, byte counts.

Rows are owned round-robin over the shard group of size G: `owner = id % G`, `local = id // G`
(ownership.py).
A lookup on rank r (see engine.py for the storage side) runs, over the shard group:

1. local: `unique_U, inverse_N = unique(ids_N)`; unique ids sorted by (owner, id) ("owner-major").
2. C1, one all-gather of a small int64 vector per rank: [n_bad, first_bad_id, unique ids per owner
   (G), tokens per owner (G)]. Every rank now holds the G x G request matrices and knows whether
   any rank saw an out-of-range id, so all ranks raise the same StemIndexError *before* any
   variable-size collective (a bad id can never hang the group or fetch a wrong row).
3. C2, ids to owners: all-to-all with the split sizes from C1 (default), or an all-gather of every
   rank's owner-major ids padded to the largest U (`id_exchange="allgather"`).
4. owners gather their rows (`weight[local]`, cast to the compute dtype).
5. C3, rows back to the requesters: all-to-all with the transposed splits; it arrives owner-major,
   i.e. already in the order of `unique_U`, so it becomes the lookup's leaf rows with no copy.

Byte counts (`lookup_traffic`) are payload bytes to and from *other* ranks (a rank's own segment
of an all-to-all is a local copy and not counted); the naive reference is the same exchange
per token (id out, row back for every token whose owner is another rank), without the C1 vector.

Legend: N tokens, U unique ids, G shard-group size, R requests served by this owner.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from stem_megatron.stem.ownership import owner

ID_BYTES = 8  # int64 ids on the wire
META_FIXED = 2  # [n_bad, first_bad_id] ahead of the two per-owner count vectors
ID_EXCHANGES = ("alltoall", "allgather")


class StemIndexError(ValueError):
    """A token id outside [0, vocab); raised with the same one-line message on every shard rank."""


def owner_major(unique_U: torch.Tensor, shard_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(permutation putting sorted unique ids in (owner, id) order, unique ids per owner [G])."""
    owner_U = owner(unique_U, shard_size)
    perm_U = torch.sort(owner_U, stable=True).indices
    counts_G = torch.bincount(owner_U, minlength=shard_size)
    return perm_U, counts_G


def local_meta(
    ids_N: torch.Tensor, vocab_size: int, shard_size: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(meta [2 + 2G] int64, unique_U owner-major, inverse_N into it, owner-major perm) of a lookup.

    With any bad id the counts are zero and the other three are None: the caller raises after C1.
    """
    meta = torch.zeros(META_FIXED + 2 * shard_size, dtype=torch.int64, device=ids_N.device)
    bad_N = (ids_N < 0) | (ids_N >= vocab_size)
    n_bad = int(bad_N.sum().item())
    if n_bad:
        meta[0] = n_bad
        meta[1] = ids_N[bad_N][0]
        return meta, None, None, None
    sorted_U, inverse_N = torch.unique(ids_N, sorted=True, return_inverse=True)
    perm_U, uniq_per_owner_G = owner_major(sorted_U, shard_size)
    rank_of_U = torch.empty_like(perm_U)
    rank_of_U[perm_U] = torch.arange(perm_U.numel(), device=perm_U.device)
    meta[META_FIXED : META_FIXED + shard_size] = uniq_per_owner_G
    meta[META_FIXED + shard_size :] = torch.bincount(owner(ids_N, shard_size), minlength=shard_size)
    return meta, sorted_U[perm_U], rank_of_U[inverse_N], perm_U


def bad_id_message(meta_GM: list[list[int]], vocab_size: int, global_ranks: list[int]) -> str | None:
    """The one-line error for the first shard rank that saw an out-of-range id, or None."""
    bad = [(r, row[0], row[1]) for r, row in enumerate(meta_GM) if row[0] > 0]
    if not bad:
        return None
    r, n_bad, first = bad[0]
    more = f"; {len(bad) - 1} other shard rank(s) also had bad ids" if len(bad) > 1 else ""
    return (
        f"token id {first} is outside the vocabulary [0, {vocab_size}) on STEM shard rank {r} "
        f"(global rank {global_ranks[r]}, {n_bad} bad id(s) there){more}"
    )


def all_gather_rows(t: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def lookup_traffic(
    uniq_GG: list[list[int]],
    tok_GG: list[list[int]],
    rank: int,
    row_bytes: int,
    id_exchange: str,
) -> dict:
    """Byte counters of one lookup on `rank` from the C1 matrices ([requester][owner])."""
    g = len(uniq_GG)
    meta_bytes = (g - 1) * (META_FIXED + 2 * g) * ID_BYTES
    out_remote = sum(uniq_GG[rank][o] for o in range(g) if o != rank)  # my ids owned elsewhere
    in_remote = sum(uniq_GG[s][rank] for s in range(g) if s != rank)  # others' ids that I own
    if id_exchange == "alltoall":
        ids_sent, ids_recv = out_remote * ID_BYTES, in_remote * ID_BYTES
    else:  # every rank sends its padded list to every other rank
        max_u = max(sum(row) for row in uniq_GG)
        ids_sent = ids_recv = (g - 1) * max_u * ID_BYTES
    tok_out = sum(tok_GG[rank][o] for o in range(g) if o != rank)
    tok_in = sum(tok_GG[s][rank] for s in range(g) if s != rank)
    rows_per_owner = [sum(uniq_GG[s][o] for s in range(g)) for o in range(g)]
    n_unique, n_tokens = sum(uniq_GG[rank]), sum(tok_GG[rank])
    return {
        "bytes_sent": meta_bytes + ids_sent + in_remote * row_bytes,
        "bytes_received": meta_bytes + ids_recv + out_remote * row_bytes,
        "naive_bytes": (tok_out + tok_in) * (ID_BYTES + row_bytes),
        "n_tokens": n_tokens,
        "n_unique": n_unique,
        "unique_fraction": n_unique / n_tokens if n_tokens else 0.0,
        "rows_per_owner": rows_per_owner,
        "rows_per_owner_max": max(rows_per_owner),
        "rows_per_owner_mean": sum(rows_per_owner) / g,
    }


def reduce_traffic(
    count_GG: list[list[int]], rank: int, grad_row_bytes: int, union_rows: int, replica_sizes: list[int]
) -> dict:
    """Byte counters of one reduce_grads on `rank`.

    Shard part: C1 counts all-gather, ids and fp32 gradient rows by all-to-all ([sender][owner]).
    Replica part (R replicas): counts and padded row indices by all-gather, then an all-reduce of
    the union rows, counted as a ring all-reduce (2 (R-1)/R of the buffer each way).
    """
    g = len(count_GG)
    out_remote = sum(count_GG[rank][o] for o in range(g) if o != rank)
    in_remote = sum(count_GG[s][rank] for s in range(g) if s != rank)
    shard_meta = (g - 1) * g * ID_BYTES
    sent = shard_meta + out_remote * (ID_BYTES + grad_row_bytes)
    recv = shard_meta + in_remote * (ID_BYTES + grad_row_bytes)
    r = len(replica_sizes)
    if r > 1:
        index_bytes = (r - 1) * (1 + max(replica_sizes)) * ID_BYTES
        ring = 2 * (r - 1) * union_rows * grad_row_bytes // r
        sent += index_bytes + ring
        recv += index_bytes + ring
    return {"reduce_bytes_sent": sent, "reduce_bytes_received": recv, "reduce_rows_touched": union_rows}
