"""N training steps with the sharded table engine equal N steps of an independent single-process reference.

The reference is the plain-PyTorch `ReferenceStemLM` with a full [V, F] table per STEM layer, trained
by torch.optim.AdamW for dense weights (no weight decay on 1-D parameters, as megatron's optimizer)
and a lazy row-sparse AdamW with per-row step counters for the tables (stem/reference.py's
`ReferenceTable.adamw_step` semantics), one global gradient norm and clipping over both. The
megatron side runs the real trainer at DP=2 with tables sharded over 2 ranks, and at TP=2 x DP=2.
"""

import math

import pytest
import torch

from stem_megatron.testing.distributed import run_distributed
from stem_megatron.testing.models import TokenDataset

STEPS = 4


def _config(**layout):
    from stem_megatron.testing.models import tiny_config

    cfg = tiny_config(**layout)
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.train_steps = 3e-3, 2, STEPS
    cfg.train.clip_grad = 1.0
    cfg.stem.lr = 1e-2
    return cfg


def _megatron_losses(rank, world_size, layout):
    from stem_megatron.testing.models import reference_model
    from stem_megatron.training.trainer import Trainer

    cfg = _config(**layout)
    trainer = Trainer(cfg)
    trainer.setup(datasets=(TokenDataset(64, cfg.model.seq_length, 60, seed=3), None))
    trainer.load_full_weights(reference_model(cfg, seed=0).state_dict())
    return [(r.loss, r.grad_norm) for r in (trainer.train_step() for _ in range(STEPS))]


def _reference_losses():
    from stem_megatron.testing.models import reference_model
    from stem_megatron.training.lr_schedule import dense_schedule, table_schedule

    cfg = _config()
    t = cfg.train
    ref = reference_model(cfg, seed=0)
    data = TokenDataset(64, cfg.model.seq_length, 60, seed=3)
    tables = {n: p for n, p in ref.named_parameters() if "stem_table" in n}
    dense = [(n, p) for n, p in ref.named_parameters() if n not in tables]
    groups = [
        {"params": [p for n, p in dense if p.dim() > 1], "weight_decay": t.weight_decay},
        {"params": [p for n, p in dense if p.dim() == 1], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    state = {n: (torch.zeros_like(p), torch.zeros_like(p), torch.zeros(p.shape[0], dtype=torch.int64))
             for n, p in tables.items()}
    lr_dense, lr_table = dense_schedule(cfg), table_schedule(cfg)
    out = []
    for step in range(STEPS):
        batch = [data[(step * t.global_batch_size + i) % len(data)] for i in range(t.global_batch_size)]
        tokens = torch.stack([b["tokens"] for b in batch])
        labels = torch.stack([b["labels"] for b in batch])
        opt.zero_grad()
        for p in tables.values():
            p.grad = None
        loss = ref.loss(tokens, labels).mean()
        loss.backward()
        norm = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in ref.parameters()))
        coef = t.clip_grad / (norm + 1e-6) if norm > t.clip_grad else 1.0
        for _, p in dense:
            p.grad.mul_(coef)
        for g in opt.param_groups:
            g["lr"] = lr_dense(step)
        opt.step()
        touched = torch.zeros(cfg.model.vocab_size, dtype=torch.bool)
        touched[tokens.unique()] = True
        lr = lr_table(step)
        b1, b2 = t.adam_beta1, t.adam_beta2
        with torch.no_grad():
            for n, w in tables.items():
                m, v, k = state[n]
                g = w.grad * coef
                k += touched.long()
                mask = touched.view(-1, 1)
                m.copy_(torch.where(mask, b1 * m + (1 - b1) * g, m))
                v.copy_(torch.where(mask, b2 * v + (1 - b2) * g * g, v))
                kk = k.clamp(min=1).double().view(-1, 1)
                upd = (lr / (1 - b1**kk)) * m.double() / ((v.double() / (1 - b2**kk)).sqrt() + t.adam_eps)
                decayed = w * (1 - lr * cfg.stem.weight_decay)
                w.copy_(torch.where(mask, decayed - upd.float(), w))
        out.append((loss.item(), norm))
    return out


@pytest.fixture(scope="module")
def reference():
    return _reference_losses()


@pytest.mark.parametrize("name,world,layout", [
    ("dp2_shard2", 2, dict()),
    ("tp2_dp2_shard2", 4, dict(tp=2)),
    ("dp2_shard2_deterministic", 2, dict(deterministic=True)),
])
def test_sharded_training_matches_single_process_reference(reference, name, world, layout):
    got = run_distributed(_megatron_losses, world_size=world, args=(layout,), timeout=400)[0]
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, reference)):
        assert abs(loss - ref_loss) <= 2e-5 * abs(ref_loss), f"{name} step {step + 1}: loss {loss} vs {ref_loss}"
        assert abs(norm - ref_norm) <= 2e-4 * ref_norm, f"{name} step {step + 1}: grad norm {norm} vs {ref_norm}"
    assert reference[-1][0] < reference[0][0]
