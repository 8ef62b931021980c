"""The training loop: layout-independent losses, gradient accumulation, the non-finite policy.

Every run starts from the same reference weights (mapped into each layout) and the same data, so
per-step losses must agree across (TP, PP, DP) layouts and micro-batch splits to fp32 tolerance.
"""

import pytest
import torch

from stem_megatron.testing.distributed import run_distributed
from stem_megatron.testing.models import TokenDataset

STEPS = 10


def _train(rank, world_size, layout, steps, poison=(), max_skipped=10, parallel=None, prefetch=True):
    from stem_megatron.testing.models import reference_model, tiny_config
    from stem_megatron.training.trainer import NonFiniteAbort, Trainer

    cfg = tiny_config(**layout)
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.train_steps = 3e-3, 2, steps
    cfg.train.max_skipped_steps = max_skipped
    for key, value in (parallel or {}).items():
        setattr(cfg.parallel, key, value)
    cfg.stem.prefetch = prefetch
    cfg.stem.lr = 1e-2
    trainer = Trainer(cfg)
    data = TokenDataset(64, cfg.model.seq_length, 60, seed=3)
    trainer.setup(datasets=(data, None))
    trainer.load_full_weights(reference_model(cfg, seed=0).state_dict())
    trainer.poison_steps = set(poison)
    out = []
    try:
        for _ in range(steps):
            r = trainer.train_step()
            weights = sum(p.detach().double().sum().item() for c in trainer.chunks for p in c.parameters())
            weights += sum(e.weight.double().sum().item() for e in trainer.engines)
            hits = sum(c.stem_prefetch_hits for c in trainer.chunks)
            out.append((r.loss, r.grad_norm, r.skipped, weights, hits))
    except NonFiniteAbort as e:
        out.append(("abort", str(e)))
    return out


def _losses(world, layout, steps=STEPS, parallel=None):
    args = (layout, steps, (), 10, parallel)
    return [o[0] for o in run_distributed(_train, world_size=world, args=args, timeout=300)[0]]


@pytest.fixture(scope="module")
def baseline():
    return _losses(1, {})


@pytest.mark.parametrize(
    "name,world,layout,parallel",
    [
        ("dp2", 2, dict(), None),
        ("tp2", 2, dict(tp=2), None),
        ("pp2", 2, dict(pp=2), None),
        ("dp2_distributed_optimizer_overlap", 2, dict(), dict(use_distributed_optimizer=True, overlap_grad_reduce=True)),
    ],
)
def test_layouts_give_the_same_losses(baseline, name, world, layout, parallel):
    # Rank 0 always reports the global loss (all ranks agree on it).
    got = _losses(world, layout, parallel=parallel)
    assert len(got) == STEPS
    for step, (a, b) in enumerate(zip(got, baseline)):
        assert abs(a - b) <= 2e-5 * abs(b), f"layout {name} (TP,PP,DP) step {step + 1}: loss {a} vs {b}"
    assert baseline[-1] < baseline[0], "training did not reduce the loss"


@pytest.mark.parametrize("name,world,layout", [("dp2_sharded", 2, dict()), ("pp2_vpp2", 2, dict(pp=2, vpp=2))])
def test_prefetching_the_next_micro_batch_changes_nothing(name, world, layout):
    on, off = (run_distributed(_train, world_size=world, args=(layout, 3, (), 10, None, p), timeout=300)[0]
               for p in (True, False))
    assert [o[:2] for o in on] == [o[:2] for o in off], f"{name}: prefetch on {on} vs off {off}"
    assert on[-1][4] > 0 and off[-1][4] == 0, "the prefetched exchanges were not used"


def test_gradient_accumulation_matches_one_big_micro_batch():
    one = _losses(1, dict(micro_batch_size=8, global_batch_size=8), steps=4)
    four = _losses(1, dict(micro_batch_size=2, global_batch_size=8), steps=4)
    for step, (a, b) in enumerate(zip(one, four)):
        assert abs(a - b) <= 2e-5 * abs(b), f"step {step + 1}: 1x8 loss {a} vs 4x2 loss {b}"


def test_nonfinite_step_is_skipped_then_training_continues():
    poisoned = run_distributed(_train, world_size=1, args=({}, 4, (1,)), timeout=300)[0]
    assert [o[2] for o in poisoned] == [False, True, False, False]
    # The skipped step changed no weight (dense or table); the steps after it update again.
    assert poisoned[1][3] == poisoned[0][3]
    assert poisoned[2][3] != poisoned[1][3] and poisoned[3][3] != poisoned[2][3]
    assert all(o[0] == o[0] for i, o in enumerate(poisoned) if i != 1), "non-skipped losses must be finite"


def test_nonfinite_abort_after_exactly_k_consecutive_skips():
    """K = train.max_skipped_steps = 2. Step 1 is poisoned alone (skipped; the good step 2 resets the
    count), then steps 3, 4, 5, ... are: exactly K = 2 more skipped steps, then the abort at step 5."""
    k = 2
    out = run_distributed(_train, world_size=1, args=({}, 7, (0, 2, 3, 4, 5, 6), k), timeout=300)[0]
    assert [o[2] for o in out[:-1]] == [True, False, True, True], out
    assert out[-1][0] == "abort", out
    assert out[-1][1].startswith(f"{k + 1} consecutive steps") and f"max_skipped_steps={k})" in out[-1][1], out
    assert out[3][3] == out[1][3], "a skipped step changed the weights"


def _train_precision(rank, world_size, precision):
    from stem_megatron.testing.models import tiny_config
    from stem_megatron.training.trainer import Trainer

    cfg = tiny_config()
    cfg.train.precision, cfg.train.train_steps, cfg.train.warmup_steps, cfg.train.lr = precision, 6, 1, 1e-2
    trainer = Trainer(cfg)  # megatron's own init (std 0.02): a realistically scaled model
    trainer.setup(datasets=(TokenDataset(64, cfg.model.seq_length, 60, seed=3), None))
    losses = [trainer.train_step().loss for _ in range(6)]
    dense_dtypes = {p.dtype for c in trainer.chunks for p in c.parameters()}
    engine = trainer.engines[0]
    lookup = engine.lookup(torch.tensor([[1, 2, 3]]))
    return losses, dense_dtypes, engine.weight.dtype, lookup.rows.dtype


def test_bf16_mixed_precision_keeps_fp32_master_tables():
    """The GPU precision path (Float16Module, megatron's bf16 optimizer) also runs on CPU and tracks fp32."""
    fp32 = run_distributed(_train_precision, world_size=2, args=("fp32",), timeout=300)[0]
    bf16 = run_distributed(_train_precision, world_size=2, args=("bf16",), timeout=300)[0]
    assert fp32[1] == {torch.float32} and bf16[1] == {torch.bfloat16}
    assert bf16[2] == torch.float32 and bf16[3] == torch.bfloat16  # fp32 master rows, bf16 compute rows
    assert bf16[0][-1] < bf16[0][0] - 0.05, bf16[0]
    for step, (a, b) in enumerate(zip(bf16[0], fp32[0])):
        assert abs(a - b) < 0.01 * b, f"step {step + 1}: bf16 loss {a} vs fp32 {b}"
