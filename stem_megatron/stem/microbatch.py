"""The life of one micro-batch's table rows on a model chunk, in one place.

1. prefetch: `MicroBatchRows.prefetch(ids)` issues the engine's exchange for a coming micro-batch
   (routing and owner-side gathers now, the rows' return in flight); issued prefetches queue in
   order.
2. forward: `begin_forward(ids)` takes the queued prefetch of these ids (or looks them up) and
   makes a `StemContext` the current one; every STEM layer of the chunk reads its slot from
   `current` (`StemContext.rows_for`).
3. backward start: under pipeline schedules a chunk runs later micro-batches' forwards before
   earlier ones' backwards, so `backward_hook(ctx)` (registered on the chunk's output) makes the
   micro-batch's context current again when its backward starts (activation recompute reads it)
   and folds the row gradients of the earlier micro-batches, whose backwards are then complete.
4. folding / reduction: the engine (`fold_before`, `reduce_grads`) owns the gradients.

Plain Python over a `StemTableEngine`: no megatron, so it is testable on its own
(tests/test_stem_microbatch.py). The model chunk owns one and passes it to its STEM layers at
construction; nothing sets per-forward state on modules.

Legend: b micro-batch, s sequence, f local ffn columns, U unique ids, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["MicroBatchRows", "StemContext"]


@dataclass
class StemContext:
    """The rows of one micro-batch for every STEM layer of a model chunk.

    lookup: the chunk engine's `StemLookup` for the micro-batch's ids `[b, s]` (leaf rows
    `[U, L, f]`: gradients from every layer and from activation recompute accumulate into
    the lookup in fp32, `lookup.take_grad()`); slot_of_layer: global 0-based layer index -> slot in L.
    """

    lookup: object
    slot_of_layer: dict[int, int]
    inverse_sb: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.inverse_sb = self.lookup.inverse.t().contiguous()  # megatron's activations are [s, b, ...]

    def rows_for(self, layer_index: int) -> torch.Tensor:
        """Per-token rows [s, b, f] (contiguous) of the STEM layer with global 0-based index `layer_index`."""
        return self.lookup.gather(self.slot_of_layer[layer_index], self.inverse_sb)


class MicroBatchRows:
    """Prefetch queue, current context and backward-start hook of one model chunk (module docstring)."""

    def __init__(self, engine=None, slot_of_layer: dict[int, int] | None = None):
        self.engine = engine
        self.slot_of_layer = dict(slot_of_layer or {})
        self._queue: list[tuple[torch.Tensor, object]] = []  # (ids, StemPrefetch), in issue order
        self._current: StemContext | None = None
        self.prefetch_hits = 0  # forwards served by a prefetch

    def bind(self, engine, slot_of_layer: dict[int, int]) -> None:
        """Attach the chunk's engine (once, when the chunk is built: the engine needs its layer ids)."""
        if self.engine is not None:
            raise RuntimeError("MicroBatchRows is already bound to an engine")
        self.engine, self.slot_of_layer = engine, dict(slot_of_layer)

    @property
    def current(self) -> StemContext | None:
        """The context the STEM layers read: the micro-batch in forward, or in backward (recompute)."""
        return self._current

    def use(self, ctx: StemContext | None) -> None:
        """Make `ctx` current directly (a context built by hand: layer tests and benchmarks)."""
        self._current = ctx

    def prefetch(self, ids: torch.Tensor) -> None:
        """Start the exchange of a coming micro-batch. Every rank of the shard group must prefetch
        the same micro-batches in the same order (data-parallel ranks run the same schedule)."""
        self._queue.append((ids, self.engine.prefetch(ids)))

    def prefetch_step(self, ids_list: list[torch.Tensor]) -> None:
        """Step scope: one exchange for a whole step's micro-batches (engine.prefetch_step), queued
        in order; each micro-batch's forward then takes its own handle as with `prefetch`."""
        self._queue.extend(zip(ids_list, self.engine.prefetch_step(ids_list)))

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    def _lookup(self, ids: torch.Tensor):
        if self._queue:
            queued, handle = self._queue[0]
            if queued is ids or (queued.shape == ids.shape and torch.equal(queued, ids)):
                self._queue.pop(0)
                self.prefetch_hits += 1
                return handle.wait()
            for _, stale in self._queue:  # a different order than prefetched: complete and drop
                stale.wait()
            self._queue.clear()
        return self.engine.lookup(ids)

    def begin_forward(self, ids: torch.Tensor) -> StemContext:
        """The rows of micro-batch `ids` ([b, s]) as the current context."""
        self._current = StemContext(lookup=self._lookup(ids), slot_of_layer=self.slot_of_layer)
        return self._current

    def backward_hook(self, ctx: StemContext):
        """A tensor hook for the chunk's output: at the start of ctx's backward, ctx is current again
        and the earlier micro-batches' row gradients are folded."""

        def hook(grad):
            self._current = ctx
            self.engine.fold_before(ctx.lookup)
            return None

        return hook
