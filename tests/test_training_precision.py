"""bf16 training against fp32 on the CPU (torch has bf16 kernels there): bounds the numerical gap
of the bf16 path (megatron Float16Module + mixed-precision optimizer, bf16 STEM rows, fp32 table
masters and row gradients) without a GPU. The helper and the bound's justification are in
stem_megatron/testing/precision.py; tests/test_gpu.py runs the same helper on CUDA.
"""

from stem_megatron.testing.distributed import run_distributed
from stem_megatron.testing.precision import CPU_LOSS_RTOL, assert_bf16_tracks_fp32, train_both

STEPS = 6


def test_bf16_training_on_cpu_tracks_fp32_within_bf16_roundoff():
    runs = run_distributed(train_both, world_size=1, args=(STEPS,), timeout=400)[0]
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert_bf16_tracks_fp32(fp32, bf16, "cpu", rtol=CPU_LOSS_RTOL)
    # The band is narrower than any one update's effect on the fp32 loss: a lost or doubled step shows.
    band = CPU_LOSS_RTOL * max(fp32["losses"])
    moves = [abs(a - b) for a, b in zip(fp32["losses"], fp32["losses"][1:])]
    assert band < min(moves), (band, moves)
