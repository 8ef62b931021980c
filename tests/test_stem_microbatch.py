"""MicroBatchRows, the micro-batch row lifecycle, without megatron: queue, context, backward hook."""

import subprocess
import sys

import torch

from stem_megatron.stem.engine import StemTableEngine
from stem_megatron.stem.microbatch import MicroBatchRows

V, F = 30, 4


def _rows():
    engine = StemTableEngine(V, [3, 5], F, deterministic=True)
    return engine, MicroBatchRows(engine, {3: 0, 5: 1})


def test_prefetched_forwards_read_the_same_rows_as_lookups():
    engine, rows = _rows()
    ids = [torch.tensor([[1, 2, 2]]), torch.tensor([[4, 1, 9]]), torch.tensor([[7, 7, 0]])]
    for i in ids:
        rows.prefetch(i)
    assert rows.num_queued == 3
    for i in ids:
        ctx = rows.begin_forward(i.clone())  # equal ids, another tensor: still the prefetched one
        assert rows.current is ctx
        want = engine.weight[i.t(), 1]  # layer 5 = slot 1, [s, b, f]
        assert torch.equal(ctx.rows_for(5), want)
    assert rows.prefetch_hits == 3 and rows.num_queued == 0
    rows.prefetch(ids[0])
    rows.begin_forward(ids[1])  # out of order: the queue is dropped, the rows are looked up
    assert rows.prefetch_hits == 3 and rows.num_queued == 0
    engine.discard_pending()


def test_backward_hook_makes_the_context_current_and_folds_earlier_micro_batches():
    engine, rows = _rows()
    outs = []
    for i in (torch.tensor([[1, 2]]), torch.tensor([[2, 3]]), torch.tensor([[3, 4]])):
        ctx = rows.begin_forward(i)
        out = ctx.rows_for(3).sum() + 2 * ctx.rows_for(5).sum()
        out.register_hook(rows.backward_hook(ctx))
        outs.append((ctx, out))
    assert engine.num_pending == 3
    for k, (ctx, out) in enumerate(outs):  # backwards in micro-batch order, as pipeline schedules run them
        out.backward()
        assert rows.current is ctx
        assert engine.num_pending == 3 - k  # the earlier micro-batches' gradients were folded
    engine.reduce_grads()
    grad = torch.zeros(V, 2, F)
    for row, n in ((1, 1), (2, 2), (3, 2), (4, 1)):
        grad[row, 0], grad[row, 1] = n, 2 * n
    assert torch.equal(engine.grad_index, torch.tensor([1, 2, 3, 4]))
    assert torch.equal(engine.grad_values, grad[1:5])


def test_the_lifecycle_module_imports_without_megatron():
    code = ("import sys, stem_megatron.stem.microbatch, stem_megatron.stem.row_storage; "
            "assert not [m for m in sys.modules if m.startswith('megatron')]")
    subprocess.run([sys.executable, "-c", code], check=True)
