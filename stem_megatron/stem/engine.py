"""Vocabulary-sharded STEM tables: storage, deduplicated lookup exchange, sparse gradient reduction.

One `StemTableEngine` holds the tables of all STEM layers of one model chunk together, as an fp32
master `weight_RLF` [rows_local, L, F/tp]. Rows are sharded round-robin over the shard group
(`owner = id % G`, `local = id // G`, vocabulary padded up to a multiple of G: ownership.py); columns are this
tensor-parallel rank's slice of the ffn; shard groups that hold the same rows are replicas.
The engine is a plain object, not an nn.Module: nothing of it enters DDP, megatron's optimizer
or its grad clipping (see `table_grad_sq_norm` for the table share of the global norm).

Step protocol (one exchange per micro-batch for all L layers, one reduction per step):
  lk = engine.lookup(ids)          # or h = engine.prefetch(ids); ...; lk = h.wait()
  y = lk.gather(slot)              # per-token rows of one layer; backward adds fp32 sums to lk's grad
  ... more micro-batches, backward ...
  engine.reduce_grads()            # -> engine.grad_index, engine.grad_values
  optimizer.step(lr=...)           # optimizer.py, touched rows only
The exchange protocol and its byte counts are in exchange.py; ordered sums in segment.py.

Legend: N tokens of a lookup, U unique ids, L layers (slots), F local ffn columns (F_full / tp),
R requests served by this owner, K locally deduplicated rows, G shard size, n touched rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from stem_megatron.stem.device_budget import REDUCE_CHUNK_BUFFERS, DeviceMeter
from stem_megatron.stem.exchange import (
    ID_EXCHANGES,
    StemIndexError,
    all_gather_rows,
    bad_id_message,
    local_meta,
    lookup_traffic,
    owner_major,
    reduce_traffic,
)
from stem_megatron.stem.hierarchical import (
    BAD_ID_WORDS,
    EXCHANGES,
    flat_lookup_traffic,
    flat_reduce_traffic,
    lookup_hierarchical,
    lookup_stats,
    node_map,
    owner_sum,
    reduce_hierarchical,
    reduce_stats,
    route_to_aggregators,
)
from stem_megatron.stem.ownership import RowOwnership
from stem_megatron.stem.row_cache import CACHE_POLICIES
from stem_megatron.stem.row_storage import OFFLOAD_MODES, UPDATE_PLACES, DeviceRows, HostRows
from stem_megatron.stem.segment import SegmentPlan, index_sum, unique_sum
from stem_megatron.stem.step_scope import step_prefetches
from stem_megatron.stem.table_init import default_init_std, fill_table_rows

__all__ = ["StemIndexError", "StemLookup", "StemPrefetch", "StemTableEngine", "table_grad_sq_norm"]


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


@dataclass(frozen=True)
class TableLayout:
    """Where this rank's shard sits in the full [vocab, L, ffn] table."""

    vocab_size: int
    padded_vocab_size: int
    layer_ids: tuple[int, ...]
    ffn_hidden_size: int
    shard_size: int
    shard_rank: int
    rows_local: int
    tp_size: int
    tp_rank: int
    col_start: int
    cols_local: int

    @property
    def ownership(self) -> RowOwnership:
        return RowOwnership(self.vocab_size, self.shard_size)


class _GatherSlot(torch.autograd.Function):
    """rows_ULF[:, slot][inverse_N] with an fp32 (and, if asked, ordered) token-to-row gradient sum.

    The backward adds the fp32 per-row sums into the lookup's own fp32 accumulator and returns no
    gradient for `rows`: handing them to autograd would round them to the compute dtype (bf16) once
    per micro-batch before the engine's fp32 fold, where dense gradients stay fp32 throughout.
    """

    @staticmethod
    def forward(ctx, rows_ULF, slot, inverse_N, lookup, inverse):
        ctx.save_for_backward(inverse_N)
        ctx.slot, ctx.lookup, ctx.inverse = slot, lookup, inverse
        return rows_ULF[:, slot].index_select(0, inverse_N)

    @staticmethod
    def backward(ctx, grad_NF):
        (inverse_N,) = ctx.saved_tensors
        n_unique = ctx.lookup.rows.shape[0]
        plan = ctx.lookup._plan(ctx.inverse)
        if plan is None:
            grad_UF = index_sum(inverse_N, grad_NF.float(), n_unique, deterministic=False)
        else:
            grad_UF = plan.index_sum(grad_NF.float(), n_unique)
        ctx.lookup._add_grad(ctx.slot, grad_UF)
        return None, None, None, None, None


class StemLookup:
    """The rows of one micro-batch's unique ids, for all L layers of the engine.

    rows: [U, L, F] compute dtype, a leaf (requires_grad = grad mode when the lookup completed).
    inverse: int64 of the ids' shape; per-token rows of slot l are rows[:, l][inverse].
    unique_ids: [U] global ids in owner-major order (by id % G, then increasing id).
    stats: this lookup's byte and load counters (see exchange.lookup_traffic).
    Gradients: `gather`'s backward adds fp32 row sums into an fp32 [U, L, F] accumulator owned by
    the lookup; other uses of `rows` (plain indexing) land in `rows.grad`. `take_grad` sums both.
    """

    def __init__(self, rows_ULF, inverse, unique_ids_U, stats, deterministic):
        self.rows = rows_ULF
        self.inverse = inverse
        self.unique_ids = unique_ids_U
        self.stats = stats
        self._deterministic = deterministic
        self._segment_plans: list[tuple[torch.Tensor, SegmentPlan]] = []
        self._grad_ULF: torch.Tensor | None = None  # fp32, allocated by the first gather backward
        self._metered = 0  # host tables: device bytes of this lookup in the engine's meter, until folded

    def _add_grad(self, slot: int, grad_UF: torch.Tensor) -> None:
        if self._grad_ULF is None:
            self._grad_ULF = torch.zeros(self.rows.shape, dtype=torch.float32, device=grad_UF.device)
        self._grad_ULF[:, slot] += grad_UF

    def take_grad(self) -> torch.Tensor | None:
        """This lookup's row gradient, fp32 [U, L, F] (None if no backward reached it); clears it."""
        grad_ULF, self._grad_ULF = self._grad_ULF, None
        if self.rows.grad is not None:
            extra_ULF = self.rows.grad.float()
            grad_ULF = extra_ULF if grad_ULF is None else grad_ULF + extra_ULF
            self.rows.grad = None
        return grad_ULF

    def _plan(self, inverse: torch.Tensor) -> SegmentPlan | None:
        """The ordered token-to-row summation schedule (deterministic engines), built once per inverse."""
        if not self._deterministic:
            return None
        for known, plan in self._segment_plans:
            if known is inverse:
                return plan
        plan = SegmentPlan(inverse.reshape(-1))
        self._segment_plans.append((inverse, plan))
        return plan

    def gather(self, slot: int, inverse: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token rows of slot `slot`: [*inverse.shape, F] (default: this lookup's `inverse`, the
        ids' shape; a permuted inverse, e.g. `inverse.t().contiguous()` for megatron's sequence-first
        activations, gives contiguous rows in that order). Prefer this to `rows[:, slot][inverse]`:
        its backward sums tokens in fp32, in a fixed order when the engine is deterministic."""
        inverse = self.inverse if inverse is None else inverse
        out_NF = _GatherSlot.apply(self.rows, slot, inverse.reshape(-1), self, inverse)
        return out_NF.view(*inverse.shape, self.rows.shape[-1])


class StemPrefetch:
    """An issued lookup: ids routed and rows gathered on the owners; the row all-to-all may be in flight.

    `wait()` completes it once and returns the StemLookup. Waiting after the engine's weights
    changed (an optimizer step between prefetch and wait) raises: the rows would be stale.
    """

    def __init__(self, engine, finish, advance=None):
        self._engine, self._finish, self._version = engine, finish, engine.version
        self._advance = advance  # host tables: rows arrive from the host, then their all-to-all starts
        self._lookup: StemLookup | None = None

    def advance(self) -> None:
        """Start this lookup's row all-to-all (host tables: after its cache misses arrived). Once."""
        if self._advance is not None:
            advance, self._advance = self._advance, None
            advance()

    def wait(self) -> StemLookup:
        if self._lookup is None:
            if self._engine.version != self._version:
                raise RuntimeError(
                    "STEM prefetch crossed an optimizer step: its rows were read before the update; "
                    "prefetch after optimizer.step()"
                )
            t0 = time.perf_counter()
            self._engine._advance_through(self)
            self._lookup = self._finish()
            self._engine.exposed_wait_seconds += time.perf_counter() - t0
            self._finish = None
        return self._lookup


class StemTableEngine:
    """Sharded tables of the STEM layers `layer_ids` of one model chunk (see the module docstring)."""

    def __init__(
        self,
        vocab_size: int,
        layer_ids: list[int],
        ffn_hidden_size: int,
        tp_rank: int = 0,
        tp_size: int = 1,
        shard_group=None,
        replica_group=None,
        init_std: float | None = 0.02,
        seed: int = 1234,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        deterministic: bool = False,
        id_exchange: str = "alltoall",
        exchange: str = "flat",
        ranks_per_node: int | None = None,
        offload: str = "device",
        cache_rows: int | None = None,
        cache_policy: str = "lfu",
        host_update: str = "device",
        chunk_rows: int | None = None,
    ):
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if not layer_ids or len(set(layer_ids)) != len(layer_ids):
            raise ValueError(f"layer_ids must be a non-empty list of distinct ints, got {layer_ids}")
        if tp_size <= 0 or not 0 <= tp_rank < tp_size or ffn_hidden_size % tp_size:
            raise ValueError(
                f"ffn_hidden_size {ffn_hidden_size} must split over tp_size {tp_size} (tp_rank {tp_rank})"
            )
        if id_exchange not in ID_EXCHANGES:
            raise ValueError(f"id_exchange must be one of {ID_EXCHANGES}, got {id_exchange!r}")
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
        if exchange == "hierarchical" and ranks_per_node is None:
            raise ValueError("the hierarchical exchange needs ranks_per_node")
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        if offload == "host" and (cache_rows is None or cache_rows < 1 or cache_policy not in CACHE_POLICIES):
            raise ValueError(f"host tables need cache_rows >= 1 and a cache_policy in {CACHE_POLICIES}, "
                             f"got {cache_rows}, {cache_policy!r}")
        if host_update not in UPDATE_PLACES:
            raise ValueError(f"host_update must be one of {UPDATE_PLACES}, got {host_update!r}")
        if offload == "host" and exchange == "hierarchical":
            # The hierarchical owner serves rows inside its collective (hierarchical.py), outside the
            # host cache's pin/advance protocol: not combined yet.
            raise ValueError("host tables (offload=host) with the hierarchical exchange are not supported yet")
        g = _group_size(shard_group)
        self.shard_group = shard_group if g > 1 else None
        self.replica_group = replica_group if _group_size(replica_group) > 1 else None
        self.shard_global_ranks = (
            dist.get_process_group_ranks(shard_group)
            if g > 1
            else [dist.get_rank() if dist.is_initialized() else 0]
        )
        own = RowOwnership(vocab_size, g)
        cols = ffn_hidden_size // tp_size
        self.layout = TableLayout(
            vocab_size=vocab_size,
            padded_vocab_size=own.padded_vocab_size,
            layer_ids=tuple(int(i) for i in layer_ids),
            ffn_hidden_size=ffn_hidden_size,
            shard_size=g,
            shard_rank=_group_rank(self.shard_group),
            rows_local=own.rows_local,
            tp_size=tp_size,
            tp_rank=tp_rank,
            col_start=tp_rank * cols,
            cols_local=cols,
        )
        self.replica_rank = _group_rank(self.replica_group)
        self.num_replicas = _group_size(self.replica_group)
        self.compute_dtype = compute_dtype
        self.device = torch.device(device)
        self.deterministic = deterministic
        self.id_exchange = id_exchange
        self.exchange = exchange
        # nodes of the shard group (hierarchical.py); None = unknown (flat, no intra/inter counters)
        self.node_map = None
        if ranks_per_node is not None:
            try:
                self.node_map = node_map(self.shard_global_ranks, ranks_per_node)
            except ValueError:
                if exchange == "hierarchical":
                    raise
                # flat works on any layout; it only loses the intra/inter counters
        self.init_std = default_init_std(vocab_size, ffn_hidden_size) if init_std is None else float(init_std)
        self.seed = seed
        init_RLF = torch.empty(
            self.layout.rows_local, len(layer_ids), cols, dtype=torch.float32,
            device=self.device if offload == "device" else "cpu",
        )
        fill_table_rows(
            init_RLF,
            self.global_rows().to(init_RLF.device),
            list(self.layout.layer_ids),
            self.layout.col_start,
            self.init_std,
            seed,
            vocab_size,
        )
        # Row storage (row_storage.py): device memory, or host memory with a device row cache.
        self.offload = offload
        # Host tables meter the device bytes they hold (device_budget.py): cache, in-flight, chunks.
        self._meter = DeviceMeter() if offload == "host" else None
        self._rows = DeviceRows(init_RLF) if offload == "device" else HostRows(
            init_RLF, self.device, int(cache_rows), cache_policy, update_on=host_update, chunk_rows=chunk_rows,
            meter=self._meter, compute_dtype=compute_dtype)
        self._unadvanced: list[StemPrefetch] = []  # issued prefetches whose row all-to-all has not started
        self.exposed_wait_seconds = 0.0  # time forwards spent waiting for their rows (StemPrefetch.wait)
        self.version = 0  # bumped by every optimizer update of `weight`
        self.grad_index: torch.Tensor | None = None
        self.grad_values: torch.Tensor | None = None
        self.stats: dict = {}
        self._pending: list[StemLookup] = []
        self._folded: tuple[torch.Tensor, torch.Tensor] | None = None  # (sorted ids, fp32 sums) of folded lookups

    # ----------------------------------------------------------------- layout helpers
    @property
    def layer_ids(self) -> tuple[int, ...]:
        return self.layout.layer_ids

    def slot_of(self, layer_id: int) -> int:
        """Slot (index into rows' second dim) of a global layer id."""
        return self.layout.layer_ids.index(layer_id)

    def global_rows(self) -> torch.Tensor:
        """[rows_local] global row id of each local row (ids >= vocab_size are padding)."""
        return self.layout.ownership.global_rows(self.layout.shard_rank, self.device)

    @property
    def weight(self) -> torch.Tensor:
        """fp32 master rows [rows_local, L, F], current (device memory, or host memory with host tables).

        Read-only for code outside stem/: writes go through `set_rows` / `write_row_state`.
        """
        return self._rows.weight

    def mark_updated(self) -> None:
        """Called by every optimizer step (on every rank, rows touched or not) and by checkpoint loads."""
        self.version += 1
        self._rows.step_done()

    # ----------------------------------------------------------------- row state (optimizer, checkpoints)
    def row_state(self) -> dict:
        """The rows' optimizer state, full local tensors: exp_avg, exp_avg_sq (fp32 like weight), step (int64)."""
        return self._rows.state()

    def read_row_state(self, idx_n: torch.Tensor):
        """(weight, exp_avg, exp_avg_sq [n, L, F] fp32, step [n] int64) of local rows idx_n, on the device."""
        return self._rows.read_state(idx_n)

    def write_row_state(self, idx_n, w_nLF, m_nLF, v_nLF, step_n) -> None:
        """Store the updated state of local rows idx_n (wherever they live) and bump the version."""
        self._rows.write_state(idx_n, w_nLF, m_nLF, v_nLF, step_n)
        self.mark_updated()

    def set_rows(self, name: str, values: torch.Tensor, slot: int | None = None) -> None:
        """Overwrite all local rows of `name` (weight, exp_avg, exp_avg_sq: [rows_local, L, F], or
        [rows_local, F] for one `slot`; step: [rows_local]), e.g. from a checkpoint. Bumps the version."""
        if name not in ("weight", "exp_avg", "exp_avg_sq", "step"):
            raise ValueError(f"unknown row state {name!r}")
        if self.offload == "host" and (self._unadvanced or self._rows.reads_in_flight):
            raise RuntimeError("set_rows on host tables with lookups in flight (their cached rows would go stale)")
        with torch.no_grad():
            self._rows.set_rows(name, values, slot)
        self.mark_updated()

    def offload_stats(self) -> dict:
        """Cumulative counters of the row storage: h2d_bytes, d2h_bytes, gather_seconds, wait_seconds,
        and with host tables hit_rows / req_rows (per unique row) and hit_weight / req_weight."""
        return {**self._rows.stats, "exposed_wait_seconds": self.exposed_wait_seconds}

    def _advance_through(self, handle: StemPrefetch) -> None:
        """Start the row all-to-alls of every prefetch issued up to `handle`, in issue order (the
        order is the same on every shard rank, so the collectives match)."""
        while self._unadvanced:
            h = self._unadvanced.pop(0)
            h.advance()
            if h is handle:
                return

    def announce(self, future_ids: list[torch.Tensor]) -> None:
        """Host tables with the `lookahead` policy: the ids of the coming micro-batches, in order.

        Collective over the shard group (every shard rank announces the same number of micro-batches,
        as it runs the same schedule); each owner learns which of its rows are needed when, so its
        cache keeps them instead of rows with no known use. A no-op for other storages and policies.
        """
        cache = getattr(self._rows, "cache", None)
        if cache is None or cache.policy != "lookahead":
            return
        g, me = self.layout.shard_size, self.layout.shard_rank
        uniq = [torch.unique(ids.reshape(-1).to("cpu", torch.int64)) for ids in future_ids]
        pos_P = torch.cat([torch.full_like(u, i) for i, u in enumerate(uniq)]) if uniq else torch.empty(0, dtype=torch.int64)
        ids_P = torch.cat(uniq) if uniq else torch.empty(0, dtype=torch.int64)
        pairs_2P = torch.stack([pos_P, ids_P])
        if g > 1:  # every rank's (position, id) pairs; padded to the longest with position -1
            n = torch.tensor([pairs_2P.shape[1]], dtype=torch.int64, device=self.device)
            width = max(int(c.item()) for c in all_gather_rows(n, self.shard_group, g))
            padded = torch.full((2, width), -1, dtype=torch.int64)
            padded[:, : pairs_2P.shape[1]] = pairs_2P
            parts = all_gather_rows(padded.to(self.device), self.shard_group, g)
            pairs_2P = torch.cat([p.cpu() for p in parts], dim=1)
            pairs_2P = pairs_2P[:, pairs_2P[0] >= 0]
        own = self.layout.ownership
        mine = (own.owner(pairs_2P[1]) == me) & (pairs_2P[1] < self.layout.vocab_size) & (pairs_2P[1] >= 0)
        pos_P, rows_P = pairs_2P[0, mine], own.local_row(pairs_2P[1, mine])
        cache.announce([rows_P[pos_P == i] for i in range(len(future_ids))])

    # ----------------------------------------------------------------- forward exchange
    def prefetch(self, ids: torch.Tensor) -> StemPrefetch:
        """Route `ids` and gather rows on the owners now; the rows' return all-to-all runs async.

        Collective over the shard group: every shard rank calls prefetch/lookup in the same order.
        Raises StemIndexError on every shard rank if any rank has an id outside [0, vocab).
        """
        lay = self.layout
        ids_N = ids.reshape(-1).to(device=self.device, dtype=torch.int64)
        g, me = lay.shard_size, lay.shard_rank
        meta_M, unique_U, inverse_N, _ = local_meta(ids_N, lay.vocab_size, g)
        row_bytes = len(lay.layer_ids) * lay.cols_local * torch.finfo(self.compute_dtype).bits // 8
        if g == 1:
            self._raise_on_bad_ids([meta_M.tolist()])
            # Token counts per row weight the cache's LFU counts and its hit rate (host tables).
            count_U = torch.bincount(inverse_N, minlength=unique_U.numel()) if self.offload == "host" else None
            read = self._rows.begin_read(unique_U, pin=True, weights_K=count_U)
            stats = lookup_traffic(
                [meta_M[2:3].tolist()], [meta_M[3:4].tolist()], 0, row_bytes, self.id_exchange
            )
            return StemPrefetch(
                self,
                lambda: self._complete(self._served(read), None, inverse_N, ids.shape, unique_U, stats, read),
            )

        if self.exchange == "hierarchical":
            return self._prefetch_hierarchical(ids, meta_M, unique_U, inverse_N, row_bytes)

        # C1: bad-id flags and the request matrices, before any variable-size collective.
        meta_GM = torch.stack(all_gather_rows(meta_M, self.shard_group, g)).tolist()
        self._raise_on_bad_ids(meta_GM)
        uniq_GG = [row[2 : 2 + g] for row in meta_GM]
        tok_GG = [row[2 + g :] for row in meta_GM]
        send_G = uniq_GG[me]
        recv_G = [uniq_GG[s][me] for s in range(g)]

        # C2: ids to their owners.
        if self.id_exchange == "alltoall":
            req_R = ids_N.new_empty(sum(recv_G))
            dist.all_to_all_single(req_R, unique_U, recv_G, send_G, group=self.shard_group)
        else:
            max_u = max(sum(row) for row in uniq_GG)
            padded_U = ids_N.new_zeros(max_u)
            padded_U[: unique_U.numel()] = unique_U
            lists = all_gather_rows(padded_U, self.shard_group, g)
            req_R = torch.cat([lists[s][sum(uniq_GG[s][:me]) :][: uniq_GG[s][me]] for s in range(g)])

        # Owners gather (host tables: hits now, misses from the host in the background);
        # C3: rows back, arriving owner-major = in unique_U order.
        count_R = None
        if self.offload == "host" and self.id_exchange == "alltoall":  # token counts travel with the ids
            count_R = req_R.new_empty(req_R.numel())
            dist.all_to_all_single(count_R, torch.bincount(inverse_N, minlength=unique_U.numel()), recv_G, send_G,
                                   group=self.shard_group)
        read = self._rows.begin_read(lay.ownership.local_row(req_R), pin=True, weights_K=count_R)
        sent: dict = {}

        def start_rows():
            served_RLF = self._served(read)
            sent["rows"] = served_RLF.new_empty((unique_U.numel(), *served_RLF.shape[1:]))
            self._meter_add("inflight", sent["rows"])  # the requester's rows, until folded
            sent["work"] = dist.all_to_all_single(
                sent["rows"], served_RLF, send_G, recv_G, group=self.shard_group, async_op=True
            )

        stats = lookup_traffic(uniq_GG, tok_GG, me, row_bytes, self.id_exchange)
        if self.node_map is not None and self.id_exchange == "alltoall":
            traffic = flat_lookup_traffic(uniq_GG, me, row_bytes, self.node_map)
            stats.update(lookup_stats(traffic, int(ids_N.numel()), int(unique_U.numel())))
        handle = StemPrefetch(
            self,
            lambda: self._complete(sent["rows"], sent["work"], inverse_N, ids.shape, unique_U, stats, read),
            advance=start_rows,
        )
        self._unadvanced.append(handle)
        if self.offload == "device":  # rows are ready: start their return now, as before
            self._advance_through(handle)
        return handle

    def _meter_add(self, part: str, t: torch.Tensor) -> int:
        """Host tables: count a device buffer (its bytes, returned) in the meter; 0 otherwise."""
        if self._meter is None:
            return 0
        n = t.numel() * t.element_size()
        self._meter.add(part, n)
        return n

    def _served(self, read) -> torch.Tensor:
        """The owner's rows of a read in the compute dtype (the cast copy is metered with the read)."""
        rows_RLF = read.rows()
        served_RLF = rows_RLF.to(self.compute_dtype)
        if served_RLF is not rows_RLF:
            read.held_bytes += self._meter_add("inflight", served_RLF)
        return served_RLF

    def _serve_rows(self, req_R: torch.Tensor) -> torch.Tensor:
        """The owner side of an exchange: rows of the global ids req_R (all owned here), compute dtype."""
        return self.weight.index_select(0, self.layout.ownership.local_row(req_R)).to(self.compute_dtype)

    def _prefetch_hierarchical(self, ids, meta_M, unique_U, inverse_N, row_bytes) -> StemPrefetch:
        """Node-aware lookup (hierarchical.py); unique_ids end up in aggregator-major order."""
        lay = self.layout
        g, me = lay.shard_size, lay.shard_rank
        meta_GM = torch.stack(all_gather_rows(meta_M[:BAD_ID_WORDS], self.shard_group, g)).tolist()
        self._raise_on_bad_ids(meta_GM)
        perm_U, send_a = route_to_aggregators(unique_U, me, self.node_map)
        position_U = torch.empty_like(perm_U)
        position_U[perm_U] = torch.arange(perm_U.numel(), device=perm_U.device)
        unique_U, inverse_N = unique_U[perm_U], position_U[inverse_N]
        rows_ULF, work, traffic, n_agg = lookup_hierarchical(
            unique_U, send_a, me, self.node_map, self.shard_group, self._serve_rows, row_bytes
        )
        stats = lookup_stats(traffic, int(inverse_N.numel()), int(unique_U.numel()), n_agg)
        return StemPrefetch(
            self, lambda: self._complete(rows_ULF, work, inverse_N, ids.shape, unique_U, stats)
        )

    def _raise_on_bad_ids(self, meta_GM: list[list[int]]) -> None:
        """Raise StemIndexError on every rank of the shard x replica (data-parallel) group if any had a bad id.

        The shard group already shares its flags (meta_GM). Replica groups exchange a 3-number
        summary too, so ranks whose own shard group was clean raise as well instead of hanging in
        the step's gradient reduction.
        """
        msg = bad_id_message(meta_GM, self.layout.vocab_size, self.shard_global_ranks)
        if self.replica_group is not None:
            bad = [(r, row[1]) for r, row in enumerate(meta_GM) if row[0] > 0]
            mine = [1, bad[0][1], self.shard_global_ranks[bad[0][0]]] if bad else [0, 0, -1]
            summary = torch.tensor(mine, dtype=torch.int64, device=self.device)
            for row in all_gather_rows(summary, self.replica_group, self.num_replicas):
                n_bad, first, grank = row.tolist()
                if msg is None and n_bad:
                    msg = (f"token id {first} is outside the vocabulary [0, {self.layout.vocab_size}) on global "
                           f"rank {grank} (another STEM shard group holding the same rows)")
        if msg:
            raise StemIndexError(msg)

    def _complete(self, rows_ULF, work, inverse_N, shape, unique_U, stats, read=None) -> StemLookup:
        """`read`: the owner-side RowRead to unpin once reduced (None: rows served outside the
        row storage's read protocol, as the hierarchical exchange and step-scope slices do)."""
        if work is not None:
            work.wait()
        rows_ULF = rows_ULF.detach().requires_grad_(torch.is_grad_enabled())
        lk = StemLookup(rows_ULF, inverse_N.view(shape), unique_U, stats, self.deterministic)
        if self._meter is not None:
            # The owner's side of this read is done (its rows were sent); the requester's rows (and
            # fp32 gradient accumulator, allocated by the first backward) stay until folded.
            counted = read is not None and self.layout.shard_size > 1  # start_rows metered the receive buffer
            if read is not None:
                self._rows.release(read)
            lk._metered = rows_ULF.numel() * rows_ULF.element_size() if counted else self._meter_add("inflight", rows_ULF)
            if rows_ULF.requires_grad:
                lk._metered += rows_ULF.numel() * 4
                self._meter.add("inflight", rows_ULF.numel() * 4)
            else:  # no gradient to fold: the caller owns the rows from here
                self._meter.sub("inflight", lk._metered)
                lk._metered = 0
        if rows_ULF.requires_grad:
            self._pending.append(lk)
        self.stats.update(stats)
        return lk

    def lookup(self, ids: torch.Tensor) -> StemLookup:
        """prefetch(ids).wait(): one exchange for all L layers."""
        return self.prefetch(ids).wait()

    def prefetch_step(self, ids_list: list[torch.Tensor]) -> list[StemPrefetch]:
        """Step scope: one exchange for the union of a step's micro-batches (step_scope.py)."""
        return step_prefetches(self, ids_list)

    # ----------------------------------------------------------------- backward reduction
    def reduce_grads(self) -> None:
        """Sum every pending lookup's fp32 row gradient into owner-side sparse row gradients.

        Collective over the shard group and then the replica group. Result: `grad_index` (sorted
        local rows touched anywhere in the replica x shard group, int64) and `grad_values`
        (fp32 [n, L, F]); replicas end with identical values. Clears the pending lookups.
        """
        if self.offload == "host":
            with torch.no_grad():
                return self._reduce_grads_host()
        lay = self.layout
        g, me = lay.shard_size, lay.shard_rank
        shape_LF = (len(lay.layer_ids), lay.cols_local)
        with torch.no_grad():
            # Local dedupe over micro-batches: one row per id leaves this rank.
            self.fold_completed(len(self._pending))
            if self._folded is None:
                ids_K = torch.empty(0, dtype=torch.int64, device=self.device)
                grads_KLF = torch.empty(0, *shape_LF, dtype=torch.float32, device=self.device)
            else:
                ids_K, grads_KLF = self._folded
            self._folded = None
            grad_row_bytes = shape_LF[0] * shape_LF[1] * 4
            shard_stats = None
            if g > 1 and self.exchange == "hierarchical":
                index_n, values_nLF, traffic = reduce_hierarchical(
                    ids_K, grads_KLF, me, self.node_map, self.shard_group, self.deterministic, grad_row_bytes
                )
                shard_stats = reduce_stats(traffic)
                count_GG, me = [[0]], 0  # reduce_traffic below then counts the replica part only
            elif g > 1:
                perm_K, send = owner_major(ids_K, g)
                ids_K, grads_KLF = ids_K[perm_K], grads_KLF[perm_K]
                count_GG = torch.stack(all_gather_rows(send, self.shard_group, g)).tolist()
                send_G, recv_G = count_GG[me], [count_GG[s][me] for s in range(g)]
                ids_R = ids_K.new_empty(sum(recv_G))
                dist.all_to_all_single(ids_R, ids_K, recv_G, send_G, group=self.shard_group)
                grads_RLF = grads_KLF.new_empty((ids_R.numel(), *shape_LF))
                dist.all_to_all_single(grads_RLF, grads_KLF, recv_G, send_G, group=self.shard_group)
                # Owner-side accumulation; sources arrive in shard-rank order (fixed); deterministic
                # sums associate as the hierarchical exchange does (node first), see owner_sum.
                index_n, values_nLF = owner_sum(ids_R, grads_RLF, recv_G, self.node_map, self.deterministic)
                if self.node_map is not None:
                    shard_stats = reduce_stats(flat_reduce_traffic(count_GG, me, grad_row_bytes, self.node_map))
            else:
                count_GG = [[ids_K.numel()]]
                index_n, values_nLF = ids_K, grads_KLF
            replica_sizes = [index_n.numel()]
            if self.replica_group is not None:
                index_n, values_nLF, replica_sizes = self._replica_sum(index_n, values_nLF)
        self.grad_index, self.grad_values = index_n, values_nLF
        stats = reduce_traffic(count_GG, me, grad_row_bytes, index_n.numel(), replica_sizes)
        if shard_stats is not None:
            if self.exchange == "hierarchical":  # shard part from hierarchical.py, replica part above
                for k in ("reduce_bytes_sent", "reduce_bytes_received"):
                    stats[k] += shard_stats[k]
            shard_stats.update(stats)
            stats = shard_stats
        self.stats.update(stats)

    def _reduce_grads_host(self) -> None:
        """`reduce_grads` for host tables, in rounds of at most `chunk_rows` gradient rows per rank.

        The same sums as the device path (bitwise in deterministic mode): every id's contributions
        still arrive in one all-to-all, in shard-rank order, and are summed by `owner_sum`; only
        which ids travel together changes. Rounds cover runs of owner-local rows (bins of
        `chunk_rows // G` local rows, packed while every rank sends and receives at most
        `chunk_rows` rows), so each rank's device buffers stay within one round. The fold (this
        rank's step gradient) and the result (`grad_index`, `grad_values`: local rows, fp32 [n, L, F])
        are in host memory.
        """
        lay = self.layout
        g, me = lay.shard_size, lay.shard_rank
        shape_LF = (len(lay.layer_ids), lay.cols_local)
        grad_row_bytes = shape_LF[0] * shape_LF[1] * 4
        self.fold_completed(len(self._pending))
        if self._folded is None:
            ids_K = torch.empty(0, dtype=torch.int64)
            grads_KLF = torch.empty(0, *shape_LF, dtype=torch.float32)
        else:
            ids_K, grads_KLF = self._folded
        self._folded = None
        chunk = self._rows.chunk_rows
        shard_stats = None
        if g > 1:
            width = max(1, chunk // g)
            n_bins = -(-lay.rows_local // width)
            bin_K, owner_K = (ids_K // g) // width, ids_K % g
            count_BG = torch.zeros(n_bins * g, dtype=torch.int64).index_add_(
                0, bin_K * g + owner_K, torch.ones_like(ids_K)).view(n_bins, g)
            count_SBG = torch.stack(all_gather_rows(count_BG.reshape(-1).to(self.device), self.shard_group, g)).cpu()
            count_SBG = count_SBG.view(g, n_bins, g)
            count_GG = count_SBG.sum(1).tolist()
            send_SB, recv_BG = count_SBG.sum(2), count_SBG.sum(0)  # rows each rank sends / owner gets, per bin
            idx_parts, val_parts = [], []
            start = 0
            while start < n_bins:
                end = start + 1  # one bin always fits: at most `width` local rows per owner from each rank
                while (end < n_bins and int(send_SB[:, start : end + 1].sum(1).max()) <= chunk
                       and int(recv_BG[start : end + 1].sum(0).max()) <= chunk):
                    end += 1
                sel_K = (bin_K >= start) & (bin_K < end)
                send_G = count_SBG[me, start:end].sum(0).tolist()
                recv_G = count_SBG[:, start:end, me].sum(1).tolist()
                start = end
                ids_k = ids_K[sel_K]
                perm_k = torch.sort(ids_k % g, stable=True).indices  # owner-major across the round's bins
                ids_k = ids_k[perm_k].to(self.device)
                grads_kLF = grads_KLF[sel_K][perm_k].to(self.device)
                ids_R = ids_k.new_empty(sum(recv_G))
                grads_RLF = grads_kLF.new_empty((ids_R.numel(), *shape_LF))
                # send, receive, owner sum and its ordered-sum workspace (device_budget.REDUCE_CHUNK_BUFFERS)
                held = REDUCE_CHUNK_BUFFERS * max(ids_k.numel(), ids_R.numel()) * grad_row_bytes
                self._meter.add("chunk", held)
                dist.all_to_all_single(ids_R, ids_k, recv_G, send_G, group=self.shard_group)
                dist.all_to_all_single(grads_RLF, grads_kLF, recv_G, send_G, group=self.shard_group)
                idx_r, vals_rLF = owner_sum(ids_R, grads_RLF, recv_G, self.node_map, self.deterministic)
                idx_parts.append(idx_r.cpu())
                val_parts.append(vals_rLF.cpu())
                self._meter.sub("chunk", held)
                if self.device.type != "cpu":
                    self._rows.stats["h2d_bytes"] += grads_kLF.numel() * 4
                    self._rows.stats["d2h_bytes"] += vals_rLF.numel() * 4
            index_n, values_nLF = torch.cat(idx_parts), torch.cat(val_parts)
            if self.node_map is not None:
                shard_stats = reduce_stats(flat_reduce_traffic(count_GG, me, grad_row_bytes, self.node_map))
        else:
            count_GG = [[ids_K.numel()]]
            index_n, values_nLF = ids_K, grads_KLF
        replica_sizes = [index_n.numel()]
        if self.replica_group is not None:
            index_n, values_nLF, replica_sizes = self._replica_sum_chunked(index_n, values_nLF, chunk)
        self.grad_index, self.grad_values = index_n, values_nLF
        stats = reduce_traffic(count_GG, me, grad_row_bytes, index_n.numel(), replica_sizes)
        if g > 1:  # the counts all-gather carries one count per (bin, owner), not per owner
            extra = (g - 1) * (n_bins - 1) * g * 8
            stats["reduce_bytes_sent"] += extra
            stats["reduce_bytes_received"] += extra
        if shard_stats is not None:
            shard_stats.update(stats)
            stats = shard_stats
        self.stats.update(stats)

    def _replica_sum_chunked(self, index_n, values_nLF, chunk: int):
        """`_replica_sum` with host-memory rows: the union's all-reduce runs in device chunks of
        `chunk` rows (element-wise sums: the same bits as one all-reduce of the whole union)."""
        r, group = self.num_replicas, self.replica_group
        count = torch.tensor([index_n.numel()], dtype=torch.int64, device=self.device)
        sizes = [int(c.item()) for c in all_gather_rows(count, group, r)]
        padded = torch.full((max(sizes),), -1, dtype=torch.int64, device=self.device)
        padded[: index_n.numel()] = index_n.to(self.device)
        union = torch.unique(torch.cat(all_gather_rows(padded, group, r))).cpu()
        union = union[union >= 0]
        # rows touched only on other replicas: updated here from their gradients alone (counter for tests)
        self.stats["replica_only_rows"] = int(union.numel() - index_n.numel())
        pos_n = torch.searchsorted(union, index_n)
        out_nLF = values_nLF.new_zeros((union.numel(), *values_nLF.shape[1:]))
        row_bytes = values_nLF[0:1].numel() * 4
        for a in range(0, union.numel(), chunk):
            b = min(chunk, union.numel() - a)
            mine = (pos_n >= a) & (pos_n < a + b)
            buf_bLF = torch.zeros((b, *values_nLF.shape[1:]), dtype=torch.float32, device=self.device)
            self._meter.add("chunk", 2 * b * row_bytes)  # the buffer and this rank's rows on their way in
            buf_bLF.index_copy_(0, (pos_n[mine] - a).to(self.device), values_nLF[mine].to(self.device))
            dist.all_reduce(buf_bLF, group=group)
            out_nLF[a : a + b] = buf_bLF.cpu()
            self._meter.sub("chunk", 2 * b * row_bytes)
        return union, out_nLF, sizes

    def _replica_sum(self, index_n, values_nLF):
        """Union of touched rows over the replica group, summed by one all-reduce of the union."""
        r, group = self.num_replicas, self.replica_group
        count = torch.tensor([index_n.numel()], dtype=torch.int64, device=self.device)
        sizes = [int(c.item()) for c in all_gather_rows(count, group, r)]
        padded = index_n.new_full((max(sizes),), -1)
        padded[: index_n.numel()] = index_n
        union = torch.unique(torch.cat(all_gather_rows(padded, group, r)))
        union = union[union >= 0]
        buf_nLF = values_nLF.new_zeros((union.numel(), *values_nLF.shape[1:]))
        buf_nLF.index_copy_(0, torch.searchsorted(union, index_n), values_nLF)
        dist.all_reduce(buf_nLF, group=group)
        return union, buf_nLF, sizes

    def fold_completed(self, n: int) -> None:
        """Sum the row gradients of the first `n` pending lookups into this rank's local accumulator.

        Local only (no communication). Call it once those lookups' backward is complete, e.g. when a
        later micro-batch's backward starts (schedules run each chunk's backwards in micro-batch
        order): the step's table-gradient memory is then bounded by the union of its unique ids,
        not by the sum over micro-batches. `reduce_grads` folds whatever is left.
        """
        done, self._pending = self._pending[:n], self._pending[n:]
        # Host tables fold into host memory: the device keeps no step-sized gradient buffer.
        to = torch.device("cpu") if self.offload == "host" else None
        with torch.no_grad():
            keys, vals = [], []
            for lk in done:
                grad_ULF = lk.take_grad()  # fp32 sums: no rounding to the compute dtype on the way
                if grad_ULF is not None:
                    keys.append(lk.unique_ids if to is None else lk.unique_ids.to(to))
                    vals.append(grad_ULF if to is None else grad_ULF.to(to))
                    if to is not None and self.device.type != "cpu":
                        self._rows.stats["d2h_bytes"] += grad_ULF.numel() * 4
                self._unmeter(lk)
            if not keys:
                return
            if self._folded is not None:
                keys.insert(0, self._folded[0])
                vals.insert(0, self._folded[1])
            self._folded = unique_sum(torch.cat(keys), torch.cat(vals), self.deterministic)

    def fold_before(self, lookup: StemLookup) -> None:
        """`fold_completed` for every pending lookup made before `lookup`."""
        for i, lk in enumerate(self._pending):
            if lk is lookup:
                if i:
                    self.fold_completed(i)
                return

    def _unmeter(self, lk: StemLookup) -> None:
        if self._meter is not None and lk._metered:
            self._meter.sub("inflight", lk._metered)
            lk._metered = 0

    def zero_grad(self) -> None:
        """Drop the reduced gradient (pending lookups are kept: they belong to the coming step)."""
        self.grad_index, self.grad_values = None, None

    def discard_pending(self) -> None:
        """Forget lookups made with grad enabled whose gradients will never be reduced."""
        for lk in self._pending:
            self._unmeter(lk)
        self._pending = []
        self._folded = None

    def apply_update(self, fn) -> None:
        """Run the optimizer's row update `fn(w, m, v, step, g) -> (w, m, v, step)` on the touched rows
        (grad_index / grad_values) wherever they live, then bump the version (every rank, touched
        rows or not: rows it prefetched from other owners are stale after their update too).
        Device tables: one piece on the device. Host tables: chunks (row_storage.HostRows.update)."""
        if self.grad_index is not None and self.grad_index.numel():
            with torch.no_grad():
                self._rows.update(self.grad_index, self.grad_values, fn)
        self.mark_updated()

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    # ----------------------------------------------------------------- whole-table views, checkpoints
    def full_table(self) -> torch.Tensor:
        """fp32 [vocab, L, F] of this TP rank's columns, padding removed. Collective over the shard group."""
        lay = self.layout
        weight = self.weight.to(self.device)  # host tables: gathered where the collectives run
        parts = (
            all_gather_rows(weight, self.shard_group, lay.shard_size)
            if lay.shard_size > 1
            else [weight]
        )
        table = torch.stack(parts, dim=1)  # [rows_local, G, L, F]: global row = local * G + g
        return table.reshape(lay.padded_vocab_size, *self.weight.shape[1:])[: lay.vocab_size]

    def state_dict(self) -> dict:
        """This rank's shard: the fp32 master rows and the layout they belong to."""
        return {"weight": self.weight, "layout": self.layout.__dict__.copy()}

    def load_state_dict(self, state: dict) -> None:
        if state["layout"] != self.layout.__dict__:
            raise ValueError(
                f"STEM table checkpoint layout {state['layout']} does not match {self.layout.__dict__}"
            )
        self.set_rows("weight", state["weight"])


def table_grad_sq_norm(engines: list[StemTableEngine], group=None, device=None) -> torch.Tensor:
    """Global sum of squares of all table gradients, each element counted once (fp32 scalar).

    Replicas hold identical gradients, so only replica rank 0 contributes; TP ranks hold disjoint
    columns, shard ranks disjoint rows, pipeline stages disjoint layers. Collective over `group`
    (None: the world): every rank calls it, with or without engines.
    """
    if device is None:
        device = (
            engines[0].device if engines else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
    total = torch.zeros((), dtype=torch.float64, device=device)
    for e in engines:
        if e.replica_rank == 0 and e.grad_values is not None:  # host tables: summed in host memory
            total += e.grad_values.double().pow(2).sum().to(device)
    if dist.is_initialized():
        dist.all_reduce(total, group=group)
    return total.float()
