"""What only a GPU can show: the CUDA paths of the model, the table engine and bf16 training.

Marked `gpu`: skipped with that reason on machines without CUDA (`make test-gpu` runs them).
"""

import pytest
import torch

from stem_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.gpu


def _model_matches_reference(rank, world_size):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from stem_megatron.convert import load_reference_into_chunks
    from stem_megatron.model import build_model_chunks, stem_engine_factory
    from stem_megatron.parallel import initialize_model_parallel
    from stem_megatron.testing.models import forward_backward, make_batches, reference_model, tiny_config

    cfg = tiny_config()
    initialize_model_parallel(cfg)
    chunks = build_model_chunks(cfg, stem_engine_factory(cfg))
    assert next(chunks[0].parameters()).is_cuda and chunks[0].stem_engine.weight.is_cuda
    ref = reference_model(cfg, seed=0)
    load_reference_into_chunks(chunks, ref.state_dict(), cfg)
    ddp = [DistributedDataParallel(config=c.config, ddp_config=DistributedDataParallelConfig(), module=c) for c in chunks]
    batches = [{k: v.cuda() for k, v in b.items()} for b in make_batches(cfg, 2)]
    loss = forward_backward(ddp, cfg, batches)
    ref = ref.cuda()
    want = torch.stack([ref.loss(b["tokens"], b["labels"]) for b in batches]).mean().item()
    assert abs(loss - want) <= 1e-4 * abs(want), (loss, want)


def test_fp32_model_matches_reference_on_cuda():
    run_distributed(_model_matches_reference, world_size=1, backend="nccl", timeout=300)


def test_deterministic_engine_is_bitwise_reproducible_on_cuda():
    from stem_megatron.stem.engine import StemTableEngine

    def run():
        engine = StemTableEngine(vocab_size=5000, layer_ids=[0, 1], ffn_hidden_size=256, init_std=0.02, seed=3,
                                 device="cuda", compute_dtype=torch.bfloat16, deterministic=True)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            ids = torch.randint(0, 300, (8, 512), generator=gen).cuda()
            lk = engine.lookup(ids)
            (lk.gather(0).float().square().sum() + lk.gather(1).float().sum()).backward()
        engine.reduce_grads()
        return engine.grad_index.cpu(), engine.grad_values.cpu()

    (i1, v1), (i2, v2) = run(), run()
    assert torch.equal(i1, i2) and torch.equal(v1, v2)


def _bf16_training(rank, world_size):
    from stem_megatron.testing.models import TokenDataset, tiny_config
    from stem_megatron.training.trainer import Trainer

    cfg = tiny_config()
    cfg.train.precision, cfg.train.train_steps, cfg.train.warmup_steps, cfg.train.lr = "bf16", 8, 1, 1e-2
    trainer = Trainer(cfg)
    trainer.setup(datasets=(TokenDataset(64, cfg.model.seq_length, 60, seed=3), None))
    return [trainer.train_step().loss for _ in range(8)]


def test_bf16_training_reduces_the_loss_on_cuda():
    losses = run_distributed(_bf16_training, world_size=1, backend="nccl", timeout=300)[0]
    assert losses[-1] < losses[0] - 0.1, losses
