"""Where an engine's shard of table rows lives: device memory, or host memory with a device cache.

Each local row has a state: the fp32 master row [L, F], the two AdamW moments [L, F] and a step
counter. `DeviceRows` keeps all of it in device memory (the default, `stem.offload: device`).
`HostRows` keeps all of it in host memory (pinned when CUDA is present); the device holds a cache
of C rows in the compute dtype (what a forward reads: the cast of the fp32 master, no moments;
`row_cache.RowCache` picks them), allocated once, and the buffers of the reads in flight and of one
step-end chunk (device_budget.py counts them):

- read (forward): `begin_read(rows)` pins the requested rows' slots (hits, and misses that got a
  free or evictable slot), and starts one host gather (`HostRowStore`: worker thread, pinned
  staging, side-stream copy) of the misses' master rows, cast to the compute dtype on the host (a
  bf16 miss moves 2 B per element); `RowRead.rows()` waits for it, fills the
  admitted slots, copies the rows out and unpins them. Misses that found every slot pinned
  bypass the cache (served from the transfer). A slot is pinned only from admission to that copy.
- update (optimizer): `update(idx, grads, fn)` runs `fn` (the AdamW math) over the touched rows
  in chunks of `chunk_rows`, with the state read from the host copy, either streamed through the
  device (`update_on="device"`: H2D w, m, v and the gradient, D2H w, m, v) or on the host
  (`update_on="host"`: torch's multi-threaded CPU kernels; only the refreshed cached rows go H2D).
- coherence: the host copy is the truth and is written by every update (write-through); a cached
  row is refreshed from the updated chunk at the same time, so no cached copy is ever stale and
  eviction needs no write-back. Checkpoints, exports, resharding and `full_table` read the host
  copy as they read device tables.

The two storages compute the same values from the same inputs: only where bytes sit differs.

Legend: R local rows, K rows of one request (distinct), Q rows of one request (one per requester),
M misses, C cache slots, S = 3 (weight, exp_avg, exp_avg_sq), B chunk rows, L layers, F local columns.
"""

from __future__ import annotations

import time

import torch

from stem_megatron.stem.device_budget import UPDATE_CHUNK_BUFFERS, DeviceMeter, chunk_rows_for
from stem_megatron.stem.host_store import HostRowStore, RowTransfer
from stem_megatron.stem.row_cache import Admission, RowCache

__all__ = ["DeviceRows", "HostRows", "RowRead", "OFFLOAD_MODES", "UPDATE_PLACES"]

OFFLOAD_MODES = ("device", "host")
UPDATE_PLACES = ("device", "host")  # where a host-table update computes
STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")


class RowRead:
    """Rows requested from a storage; `rows()` gives fp32 [K, L, F] on the device (once ready)."""

    def __init__(self, rows_KLF=None, storage=None, adm: Admission | None = None, transfer: RowTransfer | None = None):
        self._rows, self._storage, self.adm, self._transfer = rows_KLF, storage, adm, transfer
        self.held_bytes = 0  # device bytes of this read's rows, metered until the engine drops them

    def rows(self) -> torch.Tensor:
        if self._rows is None:
            self._storage._finish_through(self)
        return self._rows


class DeviceRows:
    """Rows, moments and step counters in device memory; reads are immediate."""

    offload = "device"

    def __init__(self, weight_RLF: torch.Tensor):
        self.weight = weight_RLF
        self._state: dict | None = None
        self.stats = {"h2d_bytes": 0, "d2h_bytes": 0, "gather_seconds": 0.0, "wait_seconds": 0.0}

    def state(self) -> dict:
        """exp_avg, exp_avg_sq (fp32 like weight) and step (int64 [R]); allocated on first use."""
        if self._state is None:
            w = self.weight
            self._state = {
                "exp_avg": torch.zeros_like(w),
                "exp_avg_sq": torch.zeros_like(w),
                "step": torch.zeros(w.shape[0], dtype=torch.int64, device=w.device),
            }
        return self._state

    def begin_read(self, rows_K: torch.Tensor, pin: bool, weights_K: torch.Tensor | None = None) -> RowRead:
        return RowRead(rows_KLF=self.weight.index_select(0, rows_K))

    def update(self, idx_n, g_nLF, fn) -> None:
        """state[idx_n] = fn(weight, exp_avg, exp_avg_sq, step, gradient) of those rows, in one piece."""
        self.write_state(idx_n, *fn(*self.read_state(idx_n), g_nLF))

    def release(self, read: RowRead) -> None:
        pass

    def finish_all(self) -> None:
        pass

    reads_in_flight = 0

    def read_state(self, idx_n):
        st = self.state()
        return (self.weight.index_select(0, idx_n), st["exp_avg"].index_select(0, idx_n),
                st["exp_avg_sq"].index_select(0, idx_n), st["step"].index_select(0, idx_n))

    def write_state(self, idx_n, w_nLF, m_nLF, v_nLF, step_n) -> None:
        st = self.state()
        self.weight.index_copy_(0, idx_n, w_nLF)
        st["exp_avg"].index_copy_(0, idx_n, m_nLF)
        st["exp_avg_sq"].index_copy_(0, idx_n, v_nLF)
        st["step"].index_copy_(0, idx_n, step_n)

    def set_rows(self, name: str, values, slot: int | None) -> None:
        target = self.weight if name == "weight" else self.state()[name]
        (target if slot is None else target[:, slot]).copy_(values)

    def step_done(self) -> None:
        pass


class HostRows:
    """Rows, moments and steps in host memory; a device cache of `capacity` master rows (module doc)."""

    offload = "host"

    def __init__(self, weight_RLF: torch.Tensor, device, capacity: int, policy: str = "lfu",
                 update_on: str = "device", chunk_rows: int | None = None, meter: DeviceMeter | None = None,
                 compute_dtype: torch.dtype = torch.float32):
        if update_on not in UPDATE_PLACES:
            raise ValueError(f"update_on must be one of {UPDATE_PLACES}, got {update_on!r}")
        n, n_layers, n_cols = weight_RLF.shape
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.host_RSLF = torch.zeros((n, 3, n_layers, n_cols), dtype=torch.float32, pin_memory=on_cuda)
        self.host_RSLF[:, 0].copy_(weight_RLF)
        self.step_R = torch.zeros(n, dtype=torch.int64, pin_memory=on_cuda)
        # Misses move the master row only, cast to the compute dtype on the host: moments never leave
        # the host for a read, and the cache holds exactly what a forward reads.
        self.compute_dtype = compute_dtype
        self.store = HostRowStore(self.host_RSLF[:, 0], device=self.device, out_dtype=compute_dtype)
        self.cache = RowCache(min(capacity, n), n, policy)
        self.meter = meter if meter is not None else DeviceMeter()
        # The one cache allocation, sized from the capacity and never grown.
        self.slots_CLF = torch.empty((self.cache.capacity, n_layers, n_cols), dtype=compute_dtype, device=self.device)
        self.meter.add("cache", self.slots_CLF.numel() * self.slots_CLF.element_size())
        self.update_on = update_on
        self.chunk_rows = chunk_rows or chunk_rows_for(self.cache.capacity)
        self._state = {"exp_avg": self.host_RSLF[:, 1], "exp_avg_sq": self.host_RSLF[:, 2], "step": self.step_R}
        self.stats = {"h2d_bytes": 0, "d2h_bytes": 0, "gather_seconds": 0.0, "wait_seconds": 0.0,
                      "hit_rows": 0, "req_rows": 0, "hit_weight": 0.0, "req_weight": 0.0,
                      "host_updates": 0, "update_seconds": 0.0}
        self._row_bytes = n_layers * n_cols * 4  # one fp32 master row
        self._read_row_bytes = n_layers * n_cols * self.slots_CLF.element_size()  # one row as reads move it
        self._unfinished: list[RowRead] = []

    @property
    def weight(self) -> torch.Tensor:
        """The current fp32 master rows [R, L, F] (host memory; always current: write-through)."""
        return self.host_RSLF[:, 0]

    def state(self) -> dict:
        return self._state

    # ------------------------------------------------------------ forward reads
    def begin_read(self, rows_Q: torch.Tensor, pin: bool, weights_K: torch.Tensor | None = None) -> RowRead:
        """Pin the slots of `rows_Q` (local ids; several shard ranks may ask for the same row) and start
        gathering the misses from the host. weights_K: tokens per requested row (LFU counts, hit rate)."""
        rows_cpu = rows_Q.cpu()
        rows_K, inverse_Q = torch.unique(rows_cpu, return_inverse=True)
        weights_Q = torch.ones(rows_cpu.numel(), dtype=torch.float64) if weights_K is None else weights_K
        w_K = torch.zeros(rows_K.numel(), dtype=torch.float64).index_add_(0, inverse_Q, weights_Q.double().cpu())
        adm = self.cache.admit(rows_K, w_K)
        n_miss = int(adm.miss_K.sum())
        self.stats["req_rows"] += rows_K.numel()
        self.stats["hit_rows"] += rows_K.numel() - n_miss
        self.stats["req_weight"] += float(w_K.sum())
        self.stats["hit_weight"] += float(w_K[~adm.miss_K].sum())
        transfer = None
        if n_miss:
            transfer = self.store.gather(rows_K[adm.miss_K])
            self.stats["h2d_bytes"] += n_miss * self._read_row_bytes
            self.meter.add("inflight", n_miss * self._read_row_bytes)  # the misses' device copy
        read = RowRead(storage=self, adm=adm, transfer=transfer)
        read.inverse = inverse_Q
        self._unfinished.append(read)
        return read

    def _finish_through(self, read: RowRead | None) -> None:
        """Finish reads in issue order up to `read` (None: all): a later read may hit a slot an
        earlier read's miss is still filling."""
        while self._unfinished:
            r = self._unfinished.pop(0)
            r._rows, r._storage = self._finish(r), None
            r.held_bytes = r._rows.numel() * r._rows.element_size()
            self.meter.add("inflight", r.held_bytes)  # until the engine has sent the rows on
            if r is read:
                return

    def _finish(self, read: RowRead) -> torch.Tensor:
        adm = read.adm
        slot_Q = adm.slots_K.index_select(0, read.inverse)
        miss_Q = adm.miss_K.index_select(0, read.inverse)
        # Hits (and, below, misses) go straight into the per-request rows: no [K] intermediate.
        rows_QLF = self.slots_CLF.index_select(0, slot_Q.clamp(min=0).to(self.device))
        if read._transfer is not None:
            t0 = time.perf_counter()
            data_MLF = read._transfer.wait()
            self.stats["wait_seconds"] += time.perf_counter() - t0
            kept_M = adm.slots_K[adm.miss_K] >= 0  # admitted misses fill their slots, bypassed ones do not
            if bool(kept_M.any()):
                self.slots_CLF.index_copy_(0, adm.slots_K[adm.miss_K][kept_M].to(self.device),
                                           data_MLF[kept_M.to(self.device)])
            pos_K = torch.cumsum(adm.miss_K, 0) - 1  # row of each miss in data_MLF
            miss_d = miss_Q.to(self.device)
            rows_QLF[miss_d] = data_MLF.index_select(0, pos_K.index_select(0, read.inverse)[miss_Q].to(self.device))
            self.stats["gather_seconds"] = self.store.gather_seconds
            self.meter.sub("inflight", data_MLF.numel() * data_MLF.element_size())
        self.cache.unpin(adm.slots_K)  # the rows are copied out: the slots may be reused
        read.adm = None
        return rows_QLF

    def finish_all(self) -> None:
        """Complete every read in flight (their slots filled and unpinned)."""
        self._finish_through(None)

    @property
    def reads_in_flight(self) -> int:
        return len(self._unfinished)

    def release(self, read: RowRead) -> None:
        """Drop the metered bytes of a read's rows (the engine sent them on / the lookup is done)."""
        self.meter.sub("inflight", read.held_bytes)
        read.held_bytes = 0

    def step_done(self) -> None:
        """After an optimizer step: LFU counts decay; counters refreshed."""
        self.cache.tick()
        self.stats["gather_seconds"] = self.store.gather_seconds
        self.stats["evictions"] = self.cache.evictions
        self.stats["evicted_pinned"] = self.cache.evicted_pinned
        self.stats["bypassed_rows"] = self.cache.bypassed
        self.stats["cache_slots"] = self.slots_CLF.shape[0]
        self.stats["device_peak_bytes"] = self.meter.peak
        self.stats["device_peak_parts"] = dict(self.meter.peak_parts)

    # ------------------------------------------------------------ optimizer access
    def update(self, idx_n: torch.Tensor, g_nLF: torch.Tensor, fn) -> None:
        """state[idx_n] = fn(w, m, v, step, g) in chunks of `chunk_rows` rows, on the device (streamed)
        or on the host; the host copy is written and cached copies refreshed (write-through)."""
        t0 = time.perf_counter()
        self.finish_all()  # reads in flight fill their slots with the rows as they were, first
        self.store.synchronize()  # no gather may read a half-written row
        idx_n = idx_n.to("cpu", torch.int64)
        dev = self.device if self.update_on == "device" else torch.device("cpu")
        host_w, host_m, host_v = self.host_RSLF[:, 0], self.host_RSLF[:, 1], self.host_RSLF[:, 2]
        for a in range(0, idx_n.numel(), self.chunk_rows):
            idx_b = idx_n[a : a + self.chunk_rows]
            b = idx_b.numel()
            chunk_bytes = UPDATE_CHUNK_BUFFERS * b * self._row_bytes if dev == self.device else 0
            self.meter.add("chunk", chunk_bytes)  # w, m, v, g and the update's temporaries
            w, m, v = (t.index_select(0, idx_b).to(dev) for t in (host_w, host_m, host_v))
            g = g_nLF[a : a + b].to(dev)
            w, m, v, step = fn(w, m, v, self.step_R.index_select(0, idx_b).to(dev), g)
            slot_b = self.cache.slot_of_R.index_select(0, idx_b)
            cached_b = slot_b >= 0
            if bool(cached_b.any()):  # refresh the cached copies from the updated chunk
                fresh = w[cached_b.to(w.device)].to(self.compute_dtype).to(self.device)
                self.slots_CLF.index_copy_(0, slot_b[cached_b].to(self.device), fresh)
                if dev != self.device:
                    self.stats["h2d_bytes"] += fresh.numel() * fresh.element_size()
            for host, new in ((host_w, w), (host_m, m), (host_v, v)):
                host.index_copy_(0, idx_b, new.to("cpu"))
            self.step_R.index_copy_(0, idx_b, step.to("cpu"))
            if dev == self.device:  # streamed: the state came in and goes back out
                self.stats["h2d_bytes"] += b * (4 * self._row_bytes + 8)
                self.stats["d2h_bytes"] += b * (3 * self._row_bytes + 8)
            self.stats["host_updates"] += b
            self.meter.sub("chunk", chunk_bytes)
        self.stats["update_seconds"] += time.perf_counter() - t0

    def read_state(self, idx_n):
        """(weight, exp_avg, exp_avg_sq, step) of local rows idx_n on the device, from the host copy."""
        idx = idx_n.to("cpu", torch.int64)
        self.store.synchronize()
        return (*(self.host_RSLF[:, s].index_select(0, idx).to(self.device) for s in range(3)),
                self.step_R.index_select(0, idx).to(self.device))

    def write_state(self, idx_n, w_nLF, m_nLF, v_nLF, step_n) -> None:
        """Write-through of whole rows' state: host copy, and the cached master rows."""
        self.finish_all()
        self.store.synchronize()
        idx = idx_n.to("cpu", torch.int64)
        for s, new in enumerate((w_nLF, m_nLF, v_nLF)):
            self.host_RSLF[:, s].index_copy_(0, idx, new.to("cpu"))
        self.step_R.index_copy_(0, idx, step_n.to("cpu"))
        slot_n = self.cache.slot_of_R.index_select(0, idx)
        cached = slot_n >= 0
        if bool(cached.any()):
            self.slots_CLF.index_copy_(0, slot_n[cached].to(self.device),
                                       w_nLF[cached.to(w_nLF.device)].to(self.compute_dtype).to(self.device))

    def set_rows(self, name: str, values, slot: int | None) -> None:
        """Overwrite a whole state tensor (checkpoint load, conversion); cached copies are dropped."""
        self.store.synchronize()
        if name == "step":
            self.step_R.copy_(values)
        else:
            target = self.host_RSLF[:, ("weight", "exp_avg", "exp_avg_sq").index(name)]
            (target if slot is None else target[:, slot]).copy_(values)
        self.cache.clear()
