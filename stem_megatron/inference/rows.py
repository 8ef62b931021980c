"""STEM rows for generation: tables on the device, or in host memory behind `HostRowStore`.

Both sources hold every STEM layer's table stacked by token id (`[V, L, F]`, one gather serves
all layers of a token, as in training) and answer `fetch(uniq_U)` with a pending result whose
`rows()` is `[U, L, F]` on the compute device. `fetch` only starts the work, so a caller can
fetch chunk i+1 before computing chunk i (double buffering).

`HostTables` keeps the tables in host memory; every host-to-device row movement goes through
`stem_megatron.stem.host_store.HostRowStore` (worker-thread gather into pinned staging buffers,
copy on a side stream; the same class moves rows for training's host offload). A small LRU cache
of recently used rows on the device (`cache_rows`) serves repeated tokens without a transfer:
hits are copied out of the cache when the fetch starts, so a later eviction cannot change them,
and the fetched misses are inserted when they arrive.

Legend: V vocabulary (table rows), L STEM layers, F ffn, U unique ids of one fetch, C cache rows.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from stem_megatron.stem.host_store import HostRowStore


def take_tables(ref) -> torch.Tensor | None:
    """The reference's STEM tables stacked `[V, L, F]` (stem_layers order), removed from the model.

    None for a dense model. Removing them keeps one copy of the tables in memory.
    """
    layers = list(ref.config.stem_layers)
    if not layers:
        return None
    tables_VLF = torch.stack([ref.model.layers[i].mlp.stem_table.weight.detach() for i in layers], dim=1)
    for i in layers:
        del ref.model.layers[i].mlp.stem_table
    return tables_VLF


class _Ready:
    def __init__(self, rows_ULF):
        self._rows = rows_ULF

    def rows(self) -> torch.Tensor:
        return self._rows


class DeviceTables:
    """Tables on the compute device; a fetch is an index_select."""

    kind = "device"

    def __init__(self, tables_VLF: torch.Tensor, device):
        self.tables_VLF = tables_VLF.to(device)
        self.device = torch.device(device)

    def fetch(self, uniq_U: torch.Tensor) -> _Ready:
        return _Ready(self.tables_VLF.index_select(0, uniq_U.to(self.device)))

    def stats(self) -> dict:
        return {"tables": "device"}

    def close(self) -> None:
        pass


class _HostFetch:
    def __init__(self, owner, hit_pos, hit_rows, miss_pos, miss_ids, transfer, n):
        self.owner, self.hit_pos, self.hit_rows = owner, hit_pos, hit_rows
        self.miss_pos, self.miss_ids, self.transfer, self.n = miss_pos, miss_ids, transfer, n
        self._rows = None

    def rows(self) -> torch.Tensor:
        if self._rows is None:
            o = self.owner
            rows_ULF = torch.empty((self.n, *o.row_shape), dtype=o.dtype, device=o.device)
            if self.hit_rows is not None:
                rows_ULF[self.hit_pos] = self.hit_rows
            if self.transfer is not None:
                missed_KLF = self.transfer.wait()
                rows_ULF[self.miss_pos] = missed_KLF
                o._insert(self.miss_ids, missed_KLF)
            self._rows = rows_ULF
        return self._rows


class HostTables:
    """Tables in host memory, gathered through `HostRowStore`, with an LRU cache of `cache_rows` rows on the device."""

    kind = "host"

    def __init__(self, tables_VLF: torch.Tensor, device, cache_rows: int = 4096, n_staging: int = 2):
        self.device = torch.device(device)
        self.store = HostRowStore(tables_VLF.cpu(), device=self.device, n_staging=n_staging)
        self.row_shape = tuple(tables_VLF.shape[1:])
        self.dtype = tables_VLF.dtype
        # A cache never holds more distinct ids than the table has rows: capping changes no hit or
        # miss, and bounds the allocation whatever --cache-rows says.
        cache_rows = min(cache_rows, tables_VLF.shape[0])
        self.cache_CLF = torch.empty((cache_rows, *self.row_shape), dtype=self.dtype, device=self.device)
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # id -> cache slot, least recently used first
        self.free = list(range(cache_rows - 1, -1, -1))
        self.hits = self.misses = 0

    def fetch(self, uniq_U: torch.Tensor) -> _HostFetch:
        ids = uniq_U.tolist()
        hit_pos, hit_slots, miss_pos, miss_ids = [], [], [], []
        for pos, t in enumerate(ids):
            slot = self.slot_of.get(t)
            if slot is None:
                miss_pos.append(pos)
                miss_ids.append(t)
            else:
                self.slot_of.move_to_end(t)
                hit_pos.append(pos)
                hit_slots.append(slot)
        self.hits += len(hit_pos)
        self.misses += len(miss_pos)
        hit_rows = None
        if hit_slots:  # copied now: a later eviction must not change these rows
            hit_rows = self.cache_CLF.index_select(0, torch.tensor(hit_slots, device=self.device))
        transfer = self.store.gather(torch.tensor(miss_ids, dtype=torch.long)) if miss_ids else None
        return _HostFetch(self, hit_pos, hit_rows, miss_pos, miss_ids, transfer, len(ids))

    def _insert(self, ids: list[int], rows_KLF: torch.Tensor) -> None:
        if not self.cache_CLF.shape[0]:
            return
        keep, slots = [], []
        for k, t in enumerate(ids[-self.cache_CLF.shape[0]:], start=max(0, len(ids) - self.cache_CLF.shape[0])):
            if t in self.slot_of:  # fetched twice while in flight (double buffering): keep the cached copy
                self.slot_of.move_to_end(t)
                continue
            if self.free:
                slot = self.free.pop()
            else:
                _, slot = self.slot_of.popitem(last=False)
            self.slot_of[t] = slot
            keep.append(k)
            slots.append(slot)
        if slots:
            idx = torch.tensor(slots, device=self.device)
            self.cache_CLF.index_copy_(0, idx, rows_KLF[torch.tensor(keep, device=rows_KLF.device)])

    def stats(self) -> dict:
        total = self.hits + self.misses
        return {"tables": "host", "cache_rows": self.cache_CLF.shape[0], "row_hits": self.hits,
                "row_misses": self.misses, "hit_rate": self.hits / total if total else None,
                "bytes_to_device": self.store.bytes_to_device}

    def close(self) -> None:
        self.store.close()
