"""What only a GPU can show: the CUDA paths of the model, the table engine and bf16 training.

Marked `gpu`: skipped with that reason on machines without CUDA (`make test-gpu`, `make gpu-check`).
Ranks use NCCL, one GPU each; the references run on the CPU in fp32 (TF32 is off on both sides).

Legend: B batch, S sequence, L layers, F columns, n touched rows.
"""

import pytest
import torch

from stem_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.gpu


def _no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _model_matches_reference(rank, world_size, layout):
    """test_model_equivalence's check (logits, loss, dense and table gradients at 1e-5) on CUDA."""
    from test_model_equivalence import _check_layout

    _no_tf32()
    _check_layout(rank, world_size, layout)  # builds the model on this rank's GPU (asserted below)
    from stem_megatron.model import build_model_chunks  # noqa: F401

    return torch.cuda.get_device_name(), torch.cuda.max_memory_allocated() > 0


def test_fp32_cuda_model_matches_reference_tp1():
    (name, used_gpu), = run_distributed(_model_matches_reference, world_size=1, args=({},), backend="nccl",
                                        timeout=400)
    assert used_gpu, f"the model did not run on {name}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="TP=2 over NCCL needs 2 GPUs; this machine has fewer")
def test_fp32_cuda_model_matches_reference_tp2_nccl():
    run_distributed(_model_matches_reference, world_size=2, args=(dict(tp=2),), backend="nccl", timeout=400)


def _engine_step(device, compute_dtype, deterministic):
    """Lookups, gather backward over 3 micro-batches, reduce, one optimizer step: all results on the CPU."""
    from stem_megatron.stem.engine import StemTableEngine
    from stem_megatron.stem.optimizer import RowSparseAdamW

    engine = StemTableEngine(vocab_size=3000, layer_ids=[0, 2], ffn_hidden_size=64, init_std=0.02, seed=3,
                             device=device, compute_dtype=compute_dtype, deterministic=deterministic)
    init_RLF = engine.weight.cpu()
    opt = RowSparseAdamW([engine], eps=1e-3, weight_decay=0.1)  # eps >> fp32 rounding of near-zero grads
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(3):
        ids_BS = torch.randint(0, 400, (4, 256), generator=gen)
        grads_BSF = [torch.randn(4, 256, 64, generator=gen).to(compute_dtype) for _ in range(2)]
        lk = engine.lookup(ids_BS)
        engine.fold_before(lk)
        rows.append(lk.gather(1).detach().float().cpu())
        for slot in range(2):
            lk.gather(slot).backward(grads_BSF[slot].to(device))
    engine.reduce_grads()
    index_n, values_nLF = engine.grad_index.cpu(), engine.grad_values.cpu()
    opt.step(lr=1e-2, grad_scale=0.5)
    return rows, index_n, values_nLF, engine.weight.cpu(), init_RLF


@pytest.mark.parametrize("deterministic", [False, True])
def test_table_engine_on_cuda_matches_cpu(deterministic):
    """Init, lookup rows, the fp32 row gradients from bf16 compute, and the sparse AdamW step."""
    cpu = _engine_step("cpu", torch.bfloat16, deterministic)
    gpu = _engine_step("cuda", torch.bfloat16, deterministic)
    # The init hashes agree up to the last ulp of log/cos; the bf16 rows then up to one bf16 ulp.
    assert torch.allclose(gpu[4], cpu[4], rtol=1e-6, atol=1e-7), (gpu[4] - cpu[4]).abs().max()
    for r_cpu, r_gpu in zip(cpu[0], gpu[0]):
        assert torch.allclose(r_gpu, r_cpu, rtol=2**-7, atol=1e-6), "bf16 rows differ"
    assert torch.equal(cpu[1], gpu[1]), "touched rows differ"
    # fp32 sums of the same bf16 token gradients, summed in different orders.
    assert torch.allclose(gpu[2], cpu[2], rtol=1e-5, atol=1e-5), (gpu[2] - cpu[2]).abs().max()
    assert torch.allclose(gpu[3], cpu[3], rtol=1e-5, atol=1e-6), (gpu[3] - cpu[3]).abs().max()


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


def test_bf16_training_on_cuda_tracks_fp32():
    """Same weights and data: bf16 (Float16Module, megatron's bf16 optimizer, bf16 rows) follows the
    fp32 run step by step and reduces the loss; tables keep fp32 masters and fp32 row gradients.
    The same helper runs on CPU in tests/test_training_precision.py (with its tighter CPU bound)."""
    from stem_megatron.testing.precision import assert_bf16_tracks_fp32, train_run

    steps = 8
    fp32 = run_distributed(train_run, world_size=1, args=("fp32", steps), backend="nccl", timeout=400)[0]
    bf16 = run_distributed(train_run, world_size=1, args=("bf16", steps), backend="nccl", timeout=400)[0]
    assert_bf16_tracks_fp32(fp32, bf16, "cuda", rtol=0.01)
