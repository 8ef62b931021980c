"""Where an engine's shard of table rows lives: device memory, or host memory with a device cache.

Each local row has a state: the fp32 master row [L, F], the two AdamW moments [L, F] and a step
counter. `DeviceRows` keeps all of it in device memory (the default, `stem.offload: device`).
`HostRows` keeps all of it in host memory (pinned when CUDA is present) and a device cache of
recently used rows with their moments (`row_cache.RowCache` decides which), so a row's update runs
on the device without moving its moments:

- read (forward): `begin_read(rows)` pins every row in the cache, and starts one host gather
  (`HostRowStore`: worker thread, pinned staging, side-stream copy) of the misses with their
  moments; `RowRead.rows()` waits for it, fills the cache slots and returns the master rows.
- update (optimizer): `read_state`/`write_state` on the touched rows, which are all resident
  (their micro-batches pinned them until the step's gradients were reduced), except rows touched
  only by another replica: those are read from and written to the host directly.
- coherence: write-through. Every update writes the new state to the cache slot and to the
  host, so the host is always current (checkpoints, exports, resharding and `full_table` read it
  as they read device tables) and eviction needs no write-back. A cached copy is never stale.

The two storages compute the same values from the same inputs: only where bytes sit differs.

Legend: R local rows, K rows of one request, C cache slots, S = 3 (weight, exp_avg, exp_avg_sq),
L layers, F local columns.
"""

from __future__ import annotations

import time

import torch

from stem_megatron.stem.host_store import HostRowStore, RowTransfer
from stem_megatron.stem.row_cache import Admission, RowCache

__all__ = ["DeviceRows", "HostRows", "RowRead", "OFFLOAD_MODES"]

OFFLOAD_MODES = ("device", "host")
STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")


class RowRead:
    """Rows requested from a storage; `rows()` gives fp32 [K, L, F] on the device (once ready)."""

    def __init__(self, rows_KLF=None, storage=None, adm: Admission | None = None, transfer: RowTransfer | None = None):
        self._rows, self._storage, self.adm, self._transfer = rows_KLF, storage, adm, transfer

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

    def release(self, read: RowRead) -> None:
        pass

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

    def after_release(self) -> None:
        pass


class HostRows:
    """Rows, moments and steps in host memory; a device cache of `capacity` rows (see module doc)."""

    offload = "host"

    def __init__(self, weight_RLF: torch.Tensor, device, capacity: int, policy: str = "lfu"):
        n, n_layers, n_cols = weight_RLF.shape
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.host_RSLF = torch.zeros((n, 3, n_layers, n_cols), dtype=torch.float32, pin_memory=on_cuda)
        self.host_RSLF[:, 0].copy_(weight_RLF)
        self.step_R = torch.zeros(n, dtype=torch.int64, pin_memory=on_cuda)
        self.store = HostRowStore(self.host_RSLF, device=self.device)
        self.cache = RowCache(min(capacity, n), n, policy)
        self.slots_CSLF = torch.empty((self.cache.num_slots, 3, n_layers, n_cols), dtype=torch.float32, device=self.device)
        self._state = {"exp_avg": self.host_RSLF[:, 1], "exp_avg_sq": self.host_RSLF[:, 2], "step": self.step_R}
        self.stats = {"h2d_bytes": 0, "d2h_bytes": 0, "gather_seconds": 0.0, "wait_seconds": 0.0,
                      "hit_rows": 0, "req_rows": 0, "hit_weight": 0.0, "req_weight": 0.0,
                      "host_updates": 0}
        self._row_bytes = 3 * n_layers * n_cols * 4
        self._unfinished: list[RowRead] = []

    @property
    def weight(self) -> torch.Tensor:
        """The current fp32 master rows [R, L, F] (host memory; write-through keeps them current)."""
        return self.host_RSLF[:, 0]

    def state(self) -> dict:
        return self._state

    # ------------------------------------------------------------ forward reads
    def begin_read(self, rows_K: torch.Tensor, pin: bool, weights_K: torch.Tensor | None = None) -> RowRead:
        """Pin `rows_K` (local ids; several shard ranks may ask for the same row) in the cache and start
        gathering the misses from the host."""
        rows_cpu = rows_K.cpu()
        rows_K, inverse_K = torch.unique(rows_cpu, return_inverse=True)
        if weights_K is None:
            weights_K = torch.ones(rows_cpu.numel(), dtype=torch.float64)
        weights_K = torch.zeros(rows_K.numel(), dtype=torch.float64).index_add_(0, inverse_K, weights_K.double().cpu())
        adm = self.cache.admit(rows_K, weights_K)
        if self.cache.num_slots > self.slots_CSLF.shape[0]:  # overflow: rows of micro-batches in flight
            grown = self.slots_CSLF.new_empty((self.cache.num_slots, *self.slots_CSLF.shape[1:]))
            grown[: self.slots_CSLF.shape[0]] = self.slots_CSLF
            self.slots_CSLF = grown
        n_miss = int(adm.miss_K.sum())
        w = weights_K
        self.stats["req_rows"] += rows_K.numel()
        self.stats["hit_rows"] += rows_K.numel() - n_miss
        self.stats["req_weight"] += float(w.sum())
        self.stats["hit_weight"] += float(w[~adm.miss_K].sum())
        transfer = None
        if n_miss:
            transfer = self.store.gather(rows_K[adm.miss_K])
            self.stats["h2d_bytes"] += n_miss * self._row_bytes
        read = RowRead(storage=self, adm=adm, transfer=transfer)
        read.inverse = inverse_K.to(self.device)
        self._unfinished.append(read)
        return read

    def _finish_through(self, read: RowRead) -> None:
        """Finish reads in issue order up to `read`: a later read may hit a slot an earlier read's
        miss is still filling."""
        while self._unfinished:
            r = self._unfinished.pop(0)
            r._rows, r._storage = self._finish(r), None
            if r is read:
                return

    def _finish(self, read: RowRead) -> torch.Tensor:
        adm = read.adm
        slots_K = adm.slots_K.to(self.device)
        if read._transfer is not None:
            t0 = time.perf_counter()
            data_MSLF = read._transfer.wait()
            self.stats["wait_seconds"] += time.perf_counter() - t0
            self.slots_CSLF.index_copy_(0, slots_K[adm.miss_K.to(self.device)], data_MSLF)
            self.stats["gather_seconds"] = self.store.gather_seconds
        return self.slots_CSLF[:, 0].index_select(0, slots_K.index_select(0, read.inverse))

    def release(self, read: RowRead) -> None:
        """Unpin a read's rows (after its gradient has been reduced and applied)."""
        if read.adm is not None:
            self.cache.unpin(read.adm.slots_K)
            read.adm = None

    def step_done(self) -> None:
        """After an optimizer step: LFU counts decay."""
        self.cache.tick()
        self.stats["gather_seconds"] = self.store.gather_seconds
        self.stats["evictions"] = self.cache.evictions
        self.stats["evicted_pinned"] = self.cache.evicted_pinned
        self.stats["peak_slots"] = self.cache.num_slots

    def after_release(self) -> None:
        """Drop overflow rows (beyond capacity) that no micro-batch holds any more."""
        self.cache.shrink()

    # ------------------------------------------------------------ optimizer access
    def read_state(self, idx_n):
        slot_n = self.cache.slot_of_R[idx_n.cpu()]
        res_n = slot_n >= 0
        if bool(res_n.all()):
            s_nSLF = self.slots_CSLF.index_select(0, slot_n.to(self.device))
        else:  # rows touched only on another replica: read from the host through the gather path
            s_nSLF = self.slots_CSLF.new_empty((idx_n.numel(), *self.slots_CSLF.shape[1:]))
            res_d = res_n.to(self.device)
            s_nSLF[res_d] = self.slots_CSLF.index_select(0, slot_n[res_n].to(self.device))
            s_nSLF[~res_d] = self.store.read(idx_n.cpu()[~res_n])
            self.stats["host_updates"] += int((~res_n).sum())
            self.stats["h2d_bytes"] += int((~res_n).sum()) * self._row_bytes
        step_n = self.step_R.index_select(0, idx_n.cpu()).to(self.device)
        # Contiguous like the device storage's: the update then runs the same kernels (bitwise equal).
        return s_nSLF[:, 0].contiguous(), s_nSLF[:, 1].contiguous(), s_nSLF[:, 2].contiguous(), step_n

    def write_state(self, idx_n, w_nLF, m_nLF, v_nLF, step_n) -> None:
        """Write-through: the cache slots of resident rows and the host copy of every row."""
        s_nSLF = torch.stack([w_nLF, m_nLF, v_nLF], dim=1)
        idx_cpu = idx_n.cpu()
        slot_n = self.cache.slot_of_R[idx_cpu]
        res_n = slot_n >= 0
        if bool(res_n.any()):
            res_d = res_n.to(self.device)
            self.slots_CSLF.index_copy_(0, slot_n[res_n].to(self.device), s_nSLF[res_d])
        self.store.write(idx_cpu, s_nSLF)
        self.step_R.index_copy_(0, idx_cpu, step_n.cpu())
        self.stats["d2h_bytes"] += idx_n.numel() * (self._row_bytes + 8)

    def set_rows(self, name: str, values, slot: int | None) -> None:
        """Overwrite a whole state tensor (checkpoint load, conversion); cached copies are dropped."""
        self.store.synchronize()
        if name == "step":
            self.step_R.copy_(values)
        else:
            target = self.host_RSLF[:, ("weight", "exp_avg", "exp_avg_sq").index(name)]
            (target if slot is None else target[:, slot]).copy_(values)
        self.cache.clear()
