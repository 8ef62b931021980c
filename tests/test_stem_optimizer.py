"""Row-sparse AdamW semantics, pinned: lazy moments, per-row step counters, weight decay on touch.

The oracle for "lazy" is torch.optim.AdamW itself: a row of the table must evolve bitwise like a
one-row parameter with its own torch AdamW that is stepped only at the steps where the row is
touched (with that step's lr). Untouched rows and their state never change.

Legend: V vocab, L layers, F columns.
"""

import pytest
import torch

from stem_megatron.stem.engine import StemTableEngine
from stem_megatron.stem.optimizer import RowSparseAdamW

V, LAYERS, F = 6, [0, 2], 4
BETAS, EPS, WD = (0.9, 0.95), 1e-8, 0.1


def _engine():
    return StemTableEngine(vocab_size=V, layer_ids=LAYERS, ffn_hidden_size=F, init_std=0.3, seed=3)


def _set_grads(engine, rows, grads_nLF):
    engine.grad_index = torch.tensor(rows, dtype=torch.int64)
    engine.grad_values = grads_nLF


def test_every_row_touched_equals_torch_adamw():
    e = _engine()
    p = torch.nn.Parameter(e.weight.clone())
    ref = torch.optim.AdamW([p], lr=1.0, betas=BETAS, eps=EPS, weight_decay=WD)
    opt = RowSparseAdamW([e], betas=BETAS, eps=EPS, weight_decay=WD)
    gen = torch.Generator().manual_seed(0)
    for lr in (1e-2, 3e-2, 5e-3, 2e-2):
        g = torch.randn(V, 2, F, generator=gen)
        p.grad = g.clone()
        ref.param_groups[0]["lr"] = lr
        ref.step()
        _set_grads(e, list(range(V)), g.clone())
        opt.step(lr=lr)
        assert torch.equal(e.weight, p.detach())


def test_lazy_rows_follow_their_own_adamw_only_when_touched():
    e = _engine()
    init = e.weight.clone()
    opt = RowSparseAdamW([e], betas=BETAS, eps=EPS, weight_decay=WD)
    rows = [torch.nn.Parameter(init[r].clone()) for r in range(V)]
    oracles = [torch.optim.AdamW([p], lr=1.0, betas=BETAS, eps=EPS, weight_decay=WD) for p in rows]
    schedule = [([0, 1], 1e-2), ([1], 2e-2), ([0, 1, 3], 4e-2), ([3], 1e-2), ([0], 3e-2)]
    gen = torch.Generator().manual_seed(1)
    for step, (touched, lr) in enumerate(schedule):
        g = torch.randn(len(touched), 2, F, generator=gen)
        before_w, before_state = e.weight.clone(), {k: v.clone() for k, v in opt.state[0].items()}
        _set_grads(e, touched, g)
        opt.step(lr=lr)
        for i, r in enumerate(touched):
            rows[r].grad = g[i].clone()
            oracles[r].param_groups[0]["lr"] = lr
            oracles[r].step()
        for r in range(V):
            assert torch.equal(e.weight[r], rows[r].detach()), (step, r)
            if r not in touched:  # untouched: row and all its state bitwise unchanged
                assert torch.equal(e.weight[r], before_w[r])
                for k in ("exp_avg", "exp_avg_sq", "step"):
                    assert torch.equal(opt.state[0][k][r], before_state[k][r])
    assert opt.state[0]["step"].tolist() == [3, 3, 0, 2, 0, 0]
    # Rows never touched keep their init, weight decay included.
    assert torch.equal(e.weight[[2, 4, 5]], init[[2, 4, 5]])
    # Dense AdamW would have moved row 0 at step 2 on its momentum; lazy did not (pinned above),
    # so the lazy table differs from a dense run of the same gradients.
    dense = torch.nn.Parameter(init.clone())
    dense_opt = torch.optim.AdamW([dense], lr=1.0, betas=BETAS, eps=EPS, weight_decay=WD)
    gen = torch.Generator().manual_seed(1)
    for touched, lr in schedule:
        g = torch.randn(len(touched), 2, F, generator=gen)
        dense.grad = torch.zeros_like(dense)
        dense.grad[touched] = g
        dense_opt.param_groups[0]["lr"] = lr
        dense_opt.step()
    assert not torch.equal(dense.detach()[0], e.weight[0])


def test_grad_scale_multiplies_gradients():
    a, b = _engine(), _engine()
    oa, ob = RowSparseAdamW([a], weight_decay=WD), RowSparseAdamW([b], weight_decay=WD)
    g = torch.randn(2, 2, F)
    for _ in range(2):
        _set_grads(a, [1, 4], g.clone())
        oa.step(lr=1e-2, grad_scale=0.25)
        _set_grads(b, [1, 4], g * 0.25)
        ob.step(lr=1e-2)
    assert torch.equal(a.weight, b.weight)
    assert torch.equal(oa.state[0]["exp_avg_sq"], ob.state[0]["exp_avg_sq"])


def test_state_dict_resume_is_exact():
    gen = torch.Generator().manual_seed(2)
    grads = [([0, 5], torch.randn(2, 2, F, generator=gen)) for _ in range(4)]
    a = _engine()
    oa = RowSparseAdamW([a], weight_decay=WD)
    for rows, g in grads[:2]:
        _set_grads(a, rows, g)
        oa.step(lr=1e-2)
    saved_e, saved_o = a.state_dict(), oa.state_dict()
    saved_e = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in saved_e.items()}
    saved_o["engines"] = [
        {k: (v.clone() if torch.is_tensor(v) else v) for k, v in d.items()} for d in saved_o["engines"]
    ]
    b = _engine()
    ob = RowSparseAdamW([b])  # hyper-parameters come from the checkpoint
    b.load_state_dict(saved_e)
    ob.load_state_dict(saved_o)
    assert ob.weight_decay == WD
    for rows, g in grads[2:]:
        for e, o in ((a, oa), (b, ob)):
            _set_grads(e, rows, g)
            o.step(lr=1e-2)
    assert torch.equal(a.weight, b.weight)
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(oa.state[0][k], ob.state[0][k])
    other = StemTableEngine(vocab_size=V + 1, layer_ids=LAYERS, ffn_hidden_size=F)
    with pytest.raises(ValueError, match="does not match"):
        RowSparseAdamW([other]).load_state_dict(saved_o)


def test_no_gradient_is_a_no_op():
    e = _engine()
    opt = RowSparseAdamW([e], weight_decay=WD)
    before = e.weight.clone()
    opt.step(lr=1.0)  # nothing reduced yet
    _set_grads(e, [], torch.empty(0, 2, F))
    opt.step(lr=1.0)
    assert torch.equal(e.weight, before) and e.version == 2  # each step invalidates prefetches
    with pytest.raises(ValueError, match="betas"):
        RowSparseAdamW([e], betas=(1.0, 0.9))
