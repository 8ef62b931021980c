"""bf16 training against fp32 from the same weights and data: one helper for the CPU test
(tests/test_training_precision.py, gloo) and the GPU test (tests/test_gpu.py, NCCL).

`train_run` trains the tiny test model for `steps` steps at `train.precision` (the project's
precision config: bf16 = megatron `Float16Module` + its mixed-precision optimizer with fp32 main
weights, STEM rows in bf16 for compute, fp32 table masters and row gradients) and reports the
losses with the dtypes that show which path ran. `assert_bf16_tracks_fp32` is the comparison.
"""

from __future__ import annotations

import torch

# CPU bound on |loss_bf16 - loss_fp32| at every step, relative to the fp32 loss: bf16's unit
# roundoff 2^-9 (the error of rounding the loss value itself to bf16). Why it holds: matmuls
# accumulate in fp32 and the loss is a mean over every token of the step, so per-element bf16
# roundings (each <= 2^-9 relative) average out instead of adding up, and dense weights and tables
# are updated in fp32 masters, so rounding does not compound from step to step. Measured on the
# 2-core CPU (megatron-core 0.16.1): at most 2.5e-4 relative over 6 steps, 8x below the bound.
# Why it is tight enough: the band is narrower than every step-to-step move of the fp32 loss here
# (asserted by the CPU test), so a bf16 run that loses or repeats a dense update leaves it (seen by
# skipping one bf16 dense optimizer step: off by 1.4% at the next step). A skipped *table* update
# stays inside it at this size (tables move the loss little in 6 steps): table updates are
# checked by the engine's own tests, not by this bound.
CPU_LOSS_RTOL = 2.0**-9


def train_run(rank, world_size, precision: str, steps: int) -> dict:
    """Train `steps` steps (distributed worker; `run_distributed` passes rank, world_size)."""
    from stem_megatron.testing.models import TokenDataset, reference_model, tiny_config
    from stem_megatron.training.trainer import Trainer

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on a GPU too
    torch.backends.cudnn.allow_tf32 = False
    cfg = tiny_config()
    cfg.train.precision, cfg.train.train_steps, cfg.train.warmup_steps = precision, steps, 1
    cfg.train.lr, cfg.stem.lr = 3e-3, 1e-2
    trainer = Trainer(cfg)
    trainer.setup(datasets=(TokenDataset(64, cfg.model.seq_length, 60, seed=3), None))
    # The same weights for both precisions, realistically scaled (embeddings and tables std 0.02).
    state = {k: v * 0.02 if "embed" in k or "stem_table" in k else v
             for k, v in reference_model(cfg, seed=0).state_dict().items()}
    trainer.load_full_weights(state)
    losses = [trainer.train_step().loss for _ in range(steps)]
    engine = trainer.engines[0]
    return {
        "losses": losses,
        "dense_dtypes": sorted({str(p.dtype) for c in trainer.chunks for p in c.parameters()}),
        "table_dtype": str(engine.weight.dtype),
        "table_grad_dtype": str(engine.grad_values.dtype),  # the last step's reduced row gradients
        "row_compute_dtype": str(engine.compute_dtype),
        "devices": sorted({p.device.type for c in trainer.chunks for p in c.parameters()} | {engine.weight.device.type}),
    }


def train_both(rank, world_size, steps: int) -> dict:
    """fp32 then bf16 in one process (process start-up dominates these tiny runs)."""
    from megatron.core import parallel_state

    fp32 = train_run(rank, world_size, "fp32", steps)
    parallel_state.destroy_model_parallel()  # the second Trainer initialises its own groups
    return {"fp32": fp32, "bf16": train_run(rank, world_size, "bf16", steps)}


def assert_bf16_tracks_fp32(fp32: dict, bf16: dict, device: str, rtol: float) -> None:
    """bf16 really ran (bf16 dense params and rows, losses not identical to fp32), tables kept fp32
    masters and fp32 row gradients, the loss went down, and every step's loss is within `rtol` of fp32's."""
    assert fp32["devices"] == bf16["devices"] == [device], (fp32["devices"], bf16["devices"])
    assert fp32["dense_dtypes"] == ["torch.float32"] and bf16["dense_dtypes"] == ["torch.bfloat16"], bf16
    assert fp32["row_compute_dtype"] == "torch.float32" and bf16["row_compute_dtype"] == "torch.bfloat16"
    assert bf16["table_dtype"] == bf16["table_grad_dtype"] == "torch.float32", bf16
    a_s, b_s = bf16["losses"], fp32["losses"]
    assert a_s != b_s, "bf16 losses equal fp32 bit for bit: bf16 compute did not run"
    assert a_s[-1] < a_s[0] - 0.05, a_s
    for step, (a, b) in enumerate(zip(a_s, b_s)):
        assert abs(a - b) <= rtol * abs(b), f"step {step + 1}: bf16 loss {a} vs fp32 {b} (bound {rtol * abs(b):.3g})"
