"""The device memory of host tables: its bound (for the dry run) and a meter of what is held (for the trainer).

Host tables (`offload="host"`) hold on the device, per engine:
- the row cache: `cache_rows` slots of rows [L, F] in the compute dtype (the cast of the fp32
  master that forwards read), allocated once (never grows);
- the exchange buffers of the micro-batches in flight: on the requester side, from the row
  all-to-all until the gradient is folded (prefetch depth + pipeline warmup micro-batches), the
  received rows (compute dtype) and the fp32 row-gradient accumulator; on the owner side, only
  from the prefetch until its rows are sent (at most `prefetch_depth` reads), the rows of the
  read (one per request) and the misses fetched from the host, both in the compute dtype.
  These are the exchange buffers device tables have too, plus the misses;
- the chunk buffers of the step's end: one round of the gradient reduce (send, receive, owner
  sum and its workspace) or one chunk of the update (weights, two moments, gradient and the
  update's temporaries), never both at once.
`device_bound_bytes` is the worst case of that sum (every token of a micro-batch a distinct row,
every requester asking this owner). `DeviceMeter` adds up the bytes of the tensors the engine
actually holds (their `numel * element_size` at allocation, subtracted when dropped) and keeps
the peak; the trainer reports it and tests check it against the bound. Arithmetic only: the
engine and `memory.py` (the dry run) call these, with no config in between.

Legend: T tokens of one micro-batch, U its unique ids, R rows an owner serves for one micro-batch,
M rows it fetches from the host, B rows of one chunk, G shard size, L layers, F local columns.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DeviceMeter", "DeviceBound", "device_bound_bytes", "chunk_rows_for", "inflight_microbatches",
           "UPDATE_CHUNK_BUFFERS", "REDUCE_CHUNK_BUFFERS"]

# fp32 [B, L, F] tensors alive at once in one update chunk: weight, exp_avg, exp_avg_sq, gradient,
# and the update's temporaries (scaled gradient, denominator, step term): optimizer.adamw_rows.
UPDATE_CHUNK_BUFFERS = 7
# One reduce round moves at most B rows each way per rank: send B + receive B + owner sum output B
# + its ordered-sum workspace B.
REDUCE_CHUNK_BUFFERS = 4


def chunk_rows_for(cache_rows: int) -> int:
    """Rows of one reduce round / update chunk: a quarter of the cache (at least 1), so the
    step-end buffers (7 fp32 buffers of B rows) stay within 1.75 x a cache of fp32 rows (3.5 x bf16)."""
    return max(1, cache_rows // 4)


def inflight_microbatches(prefetch_depth: int, num_microbatches: int, pp: int, vpp: int = 1) -> int:
    """Micro-batches of one model chunk whose exchange buffers can be alive at once: `prefetch_depth`
    issued ahead, the ones forwarded and not yet backwarded (1F1B warmup: up to pp per virtual
    stage), plus the last one backwarded (folded when the next backward starts)."""
    return min(num_microbatches, prefetch_depth + (pp + 1) * vpp + 1)


@dataclass(frozen=True)
class DeviceBound:
    cache_bytes: int
    inflight_bytes: int  # all in-flight micro-batches together
    chunk_bytes: int

    @property
    def total(self) -> int:
        return self.cache_bytes + self.inflight_bytes + self.chunk_bytes


def device_bound_bytes(
    *, cache_rows: int, rows_local: int, vocab_size: int, layers: int, cols: int, compute_bytes: int,
    shard_size: int, tokens_per_microbatch: int, inflight: int, prefetch_depth: int, chunk_rows: int | None = None,
) -> DeviceBound:
    """Worst-case device bytes of one host-table engine (see the module docstring): `inflight`
    requester-side micro-batches, `prefetch_depth` owner-side reads."""
    row = layers * cols
    chunk = chunk_rows_for(cache_rows) if chunk_rows is None else chunk_rows
    t = tokens_per_microbatch
    u = min(vocab_size, t)  # requester: unique ids of one micro-batch
    r = shard_size * min(t, rows_local)  # owner: every requester's ids of this micro-batch owned here
    m = min(rows_local, r)  # owner: distinct rows fetched from the host
    requester = u * row * (compute_bytes + 4)
    owner = (r + m) * row * compute_bytes
    chunk_b = max(UPDATE_CHUNK_BUFFERS, REDUCE_CHUNK_BUFFERS) * chunk * row * 4
    return DeviceBound(cache_rows * row * compute_bytes, inflight * requester + min(inflight, prefetch_depth) * owner,
                       chunk_b)


class DeviceMeter:
    """Bytes of the device tensors a host-table engine holds, by part, with the peak of their sum."""

    PARTS = ("cache", "inflight", "chunk")

    def __init__(self):
        self.now = dict.fromkeys(self.PARTS, 0)
        self.peak = 0
        self.peak_parts = dict(self.now)  # the parts at the peak

    def add(self, part: int | str, nbytes: int) -> None:
        self.now[part] += int(nbytes)
        total = sum(self.now.values())
        if total > self.peak:
            self.peak, self.peak_parts = total, dict(self.now)

    def sub(self, part: str, nbytes: int) -> None:
        self.now[part] -= int(nbytes)
        if self.now[part] < 0:
            raise RuntimeError(f"DeviceMeter: more {part} bytes released than held")
