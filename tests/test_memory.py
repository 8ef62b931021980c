"""The dry run's per-rank memory figures for stem_1b equal a hand count.

stem_1b: V = 128,256, h = 2048, 32 heads of 64 in 8 query groups (QKV 2048 x 3072), ffn 8192,
16 layers, STEM layers [1, 4, 8, 11, 14], untied embeddings, RMSNorm, bf16, distributed optimizer.
Bytes per dense parameter: bf16 weight 2 + fp32 gradient 4 + (fp32 main 4 + two moments 8) / DP.
Tables: fp32 row + two moments = 12 bytes per element, plus an 8-byte step counter per row.
Host tables: the device bound of stem/device_budget.py, counted by hand below.
"""

from pathlib import Path

import pytest

from stem_megatron.config import load_config
from stem_megatron.memory import format_memory, stage_memory

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "stem_1b.yaml"

ATTN_AND_NORMS = 2048 * 3072 + 2048 * 2048 + 2 * 2048  # QKV, output projection, two norms
DENSE_MLP, STEM_MLP = 3 * 2048 * 8192, 2 * 2048 * 8192  # gate + up + down; gate + down


def _ceil(a, b):
    return -(-a // b)


def test_stem_1b_tp1_pp1_dp8():
    cfg = load_config(CONFIG)
    (st,) = stage_memory(cfg, 8)
    params = 2 * 128256 * 2048 + 2048 + 16 * ATTN_AND_NORMS + 11 * DENSE_MLP + 5 * STEM_MLP
    assert params == 1_414_596_608
    assert st.dense_params == params
    assert (st.dense_weight_bytes, st.dense_grad_bytes) == (2 * params, 4 * params)
    assert st.dense_optimizer_bytes == _ceil(params, 8) * 12
    rows = 128256 // 8  # shard group = the 8 data-parallel ranks
    assert st.table_rows_local == rows == 16032
    assert st.table_bytes == rows * 5 * 8192 * 12 + rows * 8
    assert st.device_bytes == 6 * params + _ceil(params, 8) * 12 + st.table_bytes and st.host_bytes == 0


@pytest.mark.parametrize("offload", ["device", "host"])
def test_stem_1b_tp2_pp2_dp2(offload):
    cfg = load_config(CONFIG, [
        "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2", f"stem.offload={offload}",
    ])
    s0, s1 = stage_memory(cfg, 8)
    # Stage 0: embedding (vocab rows / TP), layers 0-7 (STEM 1, 4); stage 1: layers 8-15 (STEM 8, 11, 14),
    # final norm, output layer. Matrices split over TP = 2; norms replicated.
    p0 = 128256 // 2 * 2048 + 8 * (ATTN_AND_NORMS - 2 * 2048) // 2 + 8 * 2 * 2048 + 6 * DENSE_MLP // 2 + 2 * STEM_MLP // 2
    p1 = 2048 + 128256 // 2 * 2048 + 8 * (ATTN_AND_NORMS - 2 * 2048) // 2 + 8 * 2 * 2048 + 5 * DENSE_MLP // 2 + 3 * STEM_MLP // 2
    assert (s0.dense_params, s1.dense_params) == (p0, p1) == (357_859_328, 349_472_768)
    rows = 128256 // 2  # shard group = the 2 data-parallel ranks; columns 8192 / 2
    cache_rows = _ceil(rows, 10)  # stem.cache_fraction 0.1
    for st, p, n_stem in ((s0, p0, 2), (s1, p1, 3)):
        assert st.dense_weight_bytes == 2 * p and st.dense_grad_bytes == 4 * p
        assert st.dense_optimizer_bytes == _ceil(p, 2) * 12
        tables = rows * n_stem * 4096 * 12 + rows * 8
        assert st.table_bytes == tables
        dense = 6 * p + _ceil(p, 2) * 12
        if offload == "device":
            assert (st.device_bytes, st.host_bytes) == (dense + tables, 0)
        else:
            # Host tables' device bound: bf16 rows in the cache; 5 micro-batches in flight (prefetch depth 1
            # + (PP 2 + 1) warmup + 1 being folded); each: the requester's 4,096 rows in bf16 + an fp32
            # gradient; one owner read (depth 1): 2 x 4,096 requested rows and up to 8,192 misses, in bf16;
            # one step-end chunk: 7 fp32 buffers of cache_rows // 4 rows.
            row = n_stem * 4096
            assert st.table_cache_bytes == cache_rows * row * 2
            assert st.inflight_microbatches == 5
            assert st.table_inflight_bytes == 5 * 4096 * row * (2 + 4) + 8192 * row * 2 + 8192 * row * 2
            assert st.table_chunk_bytes == 7 * (cache_rows // 4) * row * 4
            bound = st.table_cache_bytes + st.table_inflight_bytes + st.table_chunk_bytes
            assert (st.device_bytes, st.host_bytes) == (dense + bound, tables)


def test_dry_run_prints_memory_per_rank(capsys):
    from stem_megatron.cli.train import main

    assert main(["--config", str(CONFIG), "--dry-run", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert format_memory(load_config(CONFIG), 8) in out
    assert "dense 1,414,596,608 params" in out and "16,032 rows x 5 layers" in out
    assert main(["--config", str(CONFIG), "--dry-run", "--world-size", "8", "stem.offload=host"]) == 0
    (st,) = stage_memory(load_config(CONFIG, ["stem.offload=host"]), 8)
    assert f"host tables on the device (bound, bytes): {st.table_device_bytes:,} = cache" in capsys.readouterr().out
    assert main(["--config", str(CONFIG), "--dry-run", "--world-size", "7"]) == 2
    assert "world_size" in capsys.readouterr().err
