"""Step-scope exchange: one table exchange for all of a step's micro-batches (`exchange_scope: step`).

`step_prefetches(engine, ids_list)` de-duplicates the ids of every micro-batch of a step (of one
model chunk) together and runs the engine's exchange (flat or hierarchical) once, with grad
disabled, into a step buffer of the union's rows. Each micro-batch's handle then cuts its own
lookup out of that buffer: its unique ids' rows, copied into a leaf of their own, registered
with the engine exactly like a per-micro-batch lookup. Gradients therefore accumulate, fold and
reduce (once per step) along the same path as `exchange_scope: microbatch`, with the same values:
bitwise equal rows and table gradients in deterministic mode.

Bytes: the step's unique-token fraction instead of each micro-batch's. Cost: the step buffer,
[U_step, L, F] in the compute dtype, held until the last micro-batch's lookup is cut out
(reported as `step_buffer_bytes` in the lookups' stats, with `step_rows` = U_step).

Legend: N tokens of the step, n of one micro-batch, U unique ids of the step, u of a micro-batch.
"""

from __future__ import annotations

import torch

SCOPES = ("microbatch", "step")


def step_prefetches(engine, ids_list: list[torch.Tensor]) -> list:
    """One StemPrefetch per micro-batch of `ids_list`, all served by one exchange of their union.

    Collective over the shard group now (every shard rank passes its step's micro-batches);
    waiting the handles is local. Handles may be waited in any order.
    """
    from stem_megatron.stem.engine import StemPrefetch  # engine imports this module's users only

    shapes = [ids.shape for ids in ids_list]
    sizes = [int(ids.numel()) for ids in ids_list]
    ids_N = torch.cat([ids.reshape(-1).to(device=engine.device, dtype=torch.int64) for ids in ids_list])
    shared = {"handle": engine.prefetch(ids_N), "lookup": None, "left": len(ids_list)}
    starts = [sum(sizes[:i]) for i in range(len(sizes))]

    def finish(i: int):
        if shared["lookup"] is None:
            with torch.no_grad():  # the step buffer is not a leaf: micro-batches get their own
                shared["lookup"] = shared["handle"].wait()
            shared["handle"] = None
        step = shared["lookup"]
        inverse_n = step.inverse.reshape(-1)[starts[i] : starts[i] + sizes[i]]
        rows_u, inverse_n = torch.unique(inverse_n, sorted=True, return_inverse=True)
        stats = dict(step.stats)
        stats["step_rows"] = int(step.rows.shape[0])
        stats["step_buffer_bytes"] = step.rows.numel() * step.rows.element_size()
        mb = engine._complete(
            step.rows.index_select(0, rows_u), None, inverse_n, shapes[i], step.unique_ids[rows_u], stats
        )
        shared["left"] -= 1
        if shared["left"] == 0:
            shared["lookup"] = None  # the last micro-batch is cut out: free the step buffer
        return mb

    return [StemPrefetch(engine, lambda i=i: finish(i)) for i in range(len(ids_list))]
