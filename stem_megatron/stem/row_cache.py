"""Which table rows stay in a device cache: slot map, pin counts and eviction policies.

Bookkeeping only (no row data): `RowCache` maps local row ids to cache slots, counts how many
reads in flight pin each slot, and picks victims among unpinned slots. The storage that moves
the row data (row_storage.py) and the offline hit-rate benchmark share it, so the benchmark
measures the policies the trainer runs.

Policies (lowest score is evicted first):
- `lfu`: per-row use counts (token-weighted), multiplied by `lfu_decay` at every `tick()`
  (one tick per step), so frequency follows the data rather than the whole history;
- `lru`: time of the last admission;
- `lookahead`: rows whose next use is known (ids of prefetched micro-batches and of the rest of
  the step, given by `announce`) are kept by nearness of that use (Belady within the window);
  rows without a known use fall back to their LFU count.
A pinned slot (a read in flight has not copied it out yet) is never a victim. The number of slots
is fixed at `capacity`, so the device allocation behind it is sized once: a miss that finds no
free or unpinned slot *bypasses* the cache (slot -1; the storage serves it from its transfer
buffer, an in-flight buffer of that micro-batch, and does not keep it).

Legend: K rows of one request, C cache slots (= capacity), R rows in the table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CACHE_POLICIES", "Admission", "RowCache"]

CACHE_POLICIES = ("lfu", "lru", "lookahead")
_KNOWN = 2.0**50  # lookahead: a row with a known next use outranks every LFU count


@dataclass
class Admission:
    """The result of `RowCache.admit`: every requested row has a pinned slot."""

    slots_K: torch.Tensor  # int64 slot of each requested row; -1: a miss that bypasses the cache
    miss_K: torch.Tensor  # bool: the row was not resident and must be fetched
    evicted: torch.Tensor  # int64 row ids dropped from the cache to make room


class RowCache:
    def __init__(self, capacity: int, num_rows: int, policy: str = "lfu", lfu_decay: float = 0.5):
        if policy not in CACHE_POLICIES:
            raise ValueError(f"cache policy must be one of {CACHE_POLICIES}, got {policy!r}")
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1 row, got {capacity}")
        self.capacity, self.num_rows, self.policy, self.lfu_decay = int(capacity), int(num_rows), policy, lfu_decay
        self.slot_of_R = torch.full((num_rows,), -1, dtype=torch.int64)
        self.row_of_C = torch.full((capacity,), -1, dtype=torch.int64)
        self.pins_C = torch.zeros(capacity, dtype=torch.int64)
        self.count_R = torch.zeros(num_rows, dtype=torch.float64)  # lfu (and lookahead fallback)
        self.last_R = torch.zeros(num_rows, dtype=torch.float64)  # lru clock
        self.next_use_R = torch.full((num_rows,), float("inf"), dtype=torch.float64)  # lookahead
        self.clock = 0
        self._next_after: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        self.evicted_pinned = 0  # invariant counter: must stay 0 (checked by tests)
        self.evictions = 0  # rows dropped to make room
        self.bypassed = 0  # misses served without a slot (every slot pinned by reads in flight)

    # ---------------------------------------------------------------- policy inputs
    def tick(self) -> None:
        """One step passed: LFU counts decay."""
        self.count_R.mul_(self.lfu_decay)

    def announce(self, future_rows: list[torch.Tensor]) -> None:
        """Rows of the coming admissions, in order (lookahead): admission clock + 1 + i uses future_rows[i].

        Each row's next use is set now; when an announced admission happens, its rows' next use
        moves on to their following announced use (or none).
        """
        self.next_use_R.fill_(float("inf"))
        self._next_after = {}
        for pos in range(len(future_rows) - 1, -1, -1):
            rows = future_rows[pos].reshape(-1).to("cpu", torch.int64)
            t = float(self.clock + 1 + pos)
            self._next_after[t] = (rows, self.next_use_R[rows].clone())  # the use after this one
            self.next_use_R[rows] = t

    # ---------------------------------------------------------------- admission / release
    @property
    def num_slots(self) -> int:
        return self.row_of_C.numel()

    def resident(self, rows_K: torch.Tensor) -> torch.Tensor:
        return self.slot_of_R[rows_K] >= 0

    def _scores(self, slots: torch.Tensor) -> torch.Tensor:
        rows = self.row_of_C[slots]
        if self.policy == "lru":
            return self.last_R[rows]
        if self.policy == "lfu":
            return self.count_R[rows]
        nxt = self.next_use_R[rows]
        known = torch.isfinite(nxt) & (nxt > self.clock)
        return torch.where(known, _KNOWN - nxt, self.count_R[rows])

    def admit(self, rows_K: torch.Tensor, weights_K: torch.Tensor | None = None) -> Admission:
        """Give every row of `rows_K` (unique local ids) a slot if one is free or evictable, and pin it;
        misses need fetching (those left with slot -1 bypass the cache).

        weights_K: uses per row (token counts) for LFU; 1 each if None.
        """
        rows_K = rows_K.reshape(-1).to("cpu", torch.int64)
        self.clock += 1
        after = self._next_after.pop(float(self.clock), None)
        if after is not None:
            self.next_use_R[after[0]] = after[1]
        w = torch.ones(rows_K.numel(), dtype=torch.float64) if weights_K is None else weights_K.to("cpu", torch.float64)
        self.count_R.index_add_(0, rows_K, w)
        self.last_R[rows_K] = float(self.clock)
        slots_K = self.slot_of_R[rows_K].clone()
        miss_K = slots_K < 0
        n_miss = int(miss_K.sum())
        evicted = torch.empty(0, dtype=torch.int64)
        if n_miss:
            free = (self.row_of_C < 0).nonzero().flatten()
            need = n_miss - free.numel()
            if need > 0:
                # Victims: resident, unpinned, and not requested now (requested hits get pinned below).
                hit_slots = slots_K[~miss_K]
                cand = ((self.row_of_C >= 0) & (self.pins_C == 0)).clone()
                cand[hit_slots] = False
                cand_slots = cand.nonzero().flatten()
                k = min(need, cand_slots.numel())
                if k:
                    order = torch.argsort(self._scores(cand_slots), stable=True)[:k]
                    victims = cand_slots[order]
                    evicted = self.row_of_C[victims]
                    self._drop(victims)
                    free = torch.cat([free, victims])
            n_slot = min(n_miss, free.numel())  # the rest bypass: every other slot is pinned
            self.bypassed += n_miss - n_slot
            miss_idx = miss_K.nonzero().flatten()[:n_slot]
            new_slots = free[:n_slot]
            slots_K[miss_idx] = new_slots
            self.row_of_C[new_slots] = rows_K[miss_idx]
            self.slot_of_R[rows_K[miss_idx]] = new_slots
        held = slots_K[slots_K >= 0]
        self.pins_C.index_add_(0, held, torch.ones_like(held))
        return Admission(slots_K=slots_K, miss_K=miss_K, evicted=evicted)

    def _drop(self, slots: torch.Tensor) -> None:
        self.evicted_pinned += int((self.pins_C[slots] > 0).sum())
        self.evictions += slots.numel()
        self.slot_of_R[self.row_of_C[slots]] = -1
        self.row_of_C[slots] = -1

    def unpin(self, slots_K: torch.Tensor) -> None:
        """Release one pin of each slot (its read copied the rows out); -1 (bypassed rows) is skipped."""
        slots_K = slots_K.to("cpu", torch.int64)
        slots_K = slots_K[slots_K >= 0]
        self.pins_C.index_add_(0, slots_K, torch.full_like(slots_K, -1))
        if bool((self.pins_C < 0).any()):
            raise RuntimeError("RowCache: a slot was unpinned more often than pinned")

    def clear(self) -> None:
        """Forget every row (after the backing rows were rewritten, e.g. a checkpoint load)."""
        if bool((self.pins_C > 0).any()):
            raise RuntimeError("RowCache.clear with rows of micro-batches in flight")
        self.slot_of_R.fill_(-1)
        self.row_of_C.fill_(-1)
