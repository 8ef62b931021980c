"""Rows kept in host memory, gathered asynchronously to the compute device.

The one place that moves STEM table rows from host memory to the device: training with host
tables (`stem.offload: host`) and inference with `--tables host` both gather through
`HostRowStore`, so there is a single copy of the gather / staging / copy-stream code.

A gather runs in two stages, each overlapping the caller's compute:
1. a worker thread selects the requested rows into a staging buffer (pinned when CUDA is present,
   so the copy can be asynchronous); `index_select` on large tensors releases the GIL, so the
   thread runs while the main thread launches kernels;
2. the staged rows are copied to the device on a side stream, and an event marks their arrival.
`RowTransfer.wait()` joins the worker, makes the caller's current stream wait for the copy's
event, records the rows as used on that stream (their memory came from the copy stream's pool,
so it must not return there while the caller's kernels still read it), and returns the rows. Staging buffers form a ring (`n_staging`, 2 = double buffering): a
buffer is reused only after the copy that read it has completed, so a caller may keep at most
`n_staging` transfers in flight before waiting on the oldest.

Without CUDA the device is the host: stage 2 disappears and the worker's selection is the result
(still asynchronous with respect to the caller), so the same code path runs in CPU tests.

Legend: R rows in the store, K rows of one transfer, D the flattened row shape (e.g. L x F).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

__all__ = ["HostRowStore", "RowTransfer"]


class RowTransfer:
    """An issued gather; `wait()` returns the rows on the store's device (once; later calls return them again)."""

    def __init__(self, future: Future, event, on_done, seq: int):
        self._future, self._event, self._on_done, self.seq = future, event, on_done, seq
        self._rows: torch.Tensor | None = None

    def done(self) -> bool:
        """True once the host selection finished and, on CUDA, the copy has arrived."""
        if not self._future.done():
            return False
        return self._event is None or self._event.query()

    def wait(self) -> torch.Tensor:
        if self._rows is None:
            self._rows = self._future.result()  # re-raises a worker's exception in the caller
            self._on_done(self)
        if self._event is not None:
            # On every call: the caller's current stream may differ from an earlier call's.
            stream = torch.cuda.current_stream(self._rows.device)
            stream.wait_event(self._event)
            # The rows were allocated on the copy stream. Without this, the caching allocator hands
            # their memory to the next gather's copy as soon as the caller drops them, while kernels
            # queued on the caller's stream may still read them.
            self._rows.record_stream(stream)
        return self._rows


class HostRowStore:
    """`rows_R*` in host memory and an asynchronous gather of any subset onto `device`.

    rows: a host tensor [R, ...]; kept (not copied) unless `pin` asks for a pinned copy. The
      caller owns it and may update it in place between transfers (e.g. an optimizer step);
      a transfer reads the rows as they are when its worker runs.
    device: where gathered rows go. out_dtype: their dtype (the cast happens on the host, so a
      bf16 transfer moves half the bytes of fp32 masters).
    """

    def __init__(
        self,
        rows: torch.Tensor,
        device: torch.device | str = "cpu",
        out_dtype: torch.dtype | None = None,
        pin: bool | None = None,
        n_staging: int = 2,
    ):
        if rows.device.type != "cpu":
            raise ValueError(f"HostRowStore rows must be in host memory, got a tensor on {rows.device}")
        if n_staging < 1:
            raise ValueError(f"n_staging must be >= 1, got {n_staging}")
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        pin = self.on_cuda if pin is None else pin
        self.rows = rows.pin_memory() if pin and not rows.is_pinned() else rows
        self.out_dtype = out_dtype or rows.dtype
        self.row_shape = tuple(rows.shape[1:])
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stem-host-gather")
        self._stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        # Staging ring: slot i is free when _busy[i] is None; else it holds the transfer using it.
        self._staging: list[torch.Tensor | None] = [None] * n_staging
        self._busy: list[RowTransfer | None] = [None] * n_staging
        self._in_flight: deque[RowTransfer] = deque()
        self._lock = threading.Lock()
        self._seq = 0
        self.bytes_to_device = 0  # host -> device bytes moved by gathers (counter for metrics)
        self.gather_seconds = 0.0  # worker time spent selecting rows (host gather time)

    @property
    def num_rows(self) -> int:
        return self.rows.shape[0]

    def _staging_buffer(self, slot: int, k: int) -> torch.Tensor:
        buf = self._staging[slot]
        if buf is None or buf.shape[0] < k:
            # Grow geometrically: pinned allocations are slow, so reuse beats exact sizing.
            n = max(k, 0 if buf is None else 2 * buf.shape[0])
            buf = torch.empty((n, *self.row_shape), dtype=self.out_dtype, pin_memory=self.on_cuda)
            self._staging[slot] = buf
        return buf[:k]

    def _free_slot(self) -> int:
        """A staging slot whose last copy has completed (blocks on the oldest one if none has)."""
        for i, t in enumerate(self._busy):
            if t is None or t.done():
                self._busy[i] = None
                return i
        oldest = min(range(len(self._busy)), key=lambda i: self._busy[i].seq)
        t = self._busy[oldest]
        t.wait()
        t._event.synchronize()  # the host may now overwrite the staging buffer the copy read
        self._busy[oldest] = None
        return oldest

    def gather(self, idx_K: torch.Tensor) -> RowTransfer:
        """Start gathering rows `idx_K` (int64, any device); returns a handle whose wait() gives [K, ...]."""
        idx_K = idx_K.reshape(-1).to("cpu", torch.int64)
        if idx_K.numel() and (int(idx_K.min()) < 0 or int(idx_K.max()) >= self.num_rows):
            raise IndexError(f"row ids must be in [0, {self.num_rows}), got [{int(idx_K.min())}, {int(idx_K.max())}]")
        k = idx_K.numel()
        slot = self._free_slot() if self.on_cuda else None
        event = torch.cuda.Event() if self.on_cuda else None

        def work() -> torch.Tensor:
            t0 = time.perf_counter()
            if not self.on_cuda:
                out_KD = self.rows.index_select(0, idx_K)
                out_KD = out_KD if out_KD.dtype == self.out_dtype else out_KD.to(self.out_dtype)
                self.gather_seconds += time.perf_counter() - t0
                return out_KD
            staged_KD = self._staging_buffer(slot, k)
            if self.rows.dtype == self.out_dtype:
                torch.index_select(self.rows, 0, idx_K, out=staged_KD)
            else:
                staged_KD.copy_(self.rows.index_select(0, idx_K))
            self.gather_seconds += time.perf_counter() - t0
            with torch.cuda.stream(self._stream):
                out_KD = staged_KD.to(self.device, non_blocking=True)
                event.record(self._stream)
            return out_KD

        with self._lock:
            self._seq += 1
            transfer = RowTransfer(self._pool.submit(work), event, self._retire, self._seq)
            self._in_flight.append(transfer)
            if slot is not None:
                self._busy[slot] = transfer
        # Counted on CPU too (host = device there): the bytes a GPU run would copy, for metrics/tests.
        self.bytes_to_device += k * self._row_bytes()
        return transfer

    def _row_bytes(self) -> int:
        n = 1
        for d in self.row_shape:
            n *= d
        return n * torch.empty((), dtype=self.out_dtype).element_size()

    def _retire(self, transfer: RowTransfer) -> None:
        with self._lock:
            try:
                self._in_flight.remove(transfer)
            except ValueError:
                pass

    def read(self, idx_K: torch.Tensor) -> torch.Tensor:
        """Synchronous gather: rows `idx_K` on the device."""
        return self.gather(idx_K).wait()

    def write(self, idx_K: torch.Tensor, values_KD: torch.Tensor) -> None:
        """rows[idx_K] = values (from any device; cast to the store's dtype). Synchronous.

        Waits for every transfer in flight first: a gather issued before a write must not see
        half-written rows (the caller asked for the rows as they were).
        """
        self.synchronize()
        idx_K = idx_K.reshape(-1).to("cpu", torch.int64)
        with torch.no_grad():
            self.rows.index_copy_(0, idx_K, values_KD.to("cpu", self.rows.dtype))

    def synchronize(self) -> None:
        """Wait for every transfer in flight."""
        while self._in_flight:
            self._in_flight[0].wait()

    def close(self) -> None:
        self.synchronize()
        self._pool.shutdown(wait=True)

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        try:
            self._pool.shutdown(wait=False)
        except Exception:
            pass
