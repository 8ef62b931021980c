"""Per-rank memory of a layout, for `stem-train --dry-run --world-size N`: does a config fit a GPU?

Counted, per pipeline stage (all TP and DP ranks of a stage hold the same amounts):
- dense weights (megatron's sharding: embedding and output layer split over TP by vocabulary rows,
  QKV / gate / up column-parallel, output projections / down row-parallel, norms replicated; a
  tied embedding is held by the first and the last stage when PP > 1), their gradients (fp32:
  DDP reduces in fp32) and the optimizer state (bf16: fp32 main copy + two moments; fp32: two
  moments), divided over data-parallel x context-parallel ranks with the distributed optimizer;
- STEM tables of the stage's STEM layers: rows_local = ceil(V / G) rows x this TP rank's F / TP
  columns, fp32 master + two fp32 moments, and an int64 step counter per row and engine; with
  `stem.offload: host` they are in host memory and the device holds, per engine, the bound of
  `stem.device_budget.device_bound_bytes`: the row cache (cache rows x L x F / TP fp32 master rows,
  allocated once), the exchange buffers of the micro-batches in flight (prefetch depth + pipeline
  warmup, worst case: every token a distinct row) and one step-end chunk (reduce round or update
  chunk). The trainer meters the same buffers (`stem/device_peak_bytes`) and stays within it.
Not counted: activations, the step's table gradients and exchange buffers of device tables,
DDP bucket and distributed-optimizer padding, CUDA context and allocator slack.
`train.precision: auto` is counted as bf16 (what it means on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from stem_megatron.config import ExperimentConfig
from stem_megatron.stem.device_budget import device_bound_bytes, inflight_microbatches
from stem_megatron.stem.ownership import RowOwnership

__all__ = ["StageMemory", "stage_memory", "format_memory"]


@dataclass(frozen=True)
class StageMemory:
    stage: int
    dense_params: int  # dense parameters on one rank of this stage
    dense_weight_bytes: int
    dense_grad_bytes: int
    dense_optimizer_bytes: int
    stem_layers: tuple[int, ...]
    table_rows_local: int  # rows of each engine on this rank
    table_bytes: int  # fp32 rows + 2 moments + step counters (host or device, see offload)
    table_cache_bytes: int  # host tables: device row cache, else 0
    offload: str
    table_inflight_bytes: int = 0  # host tables: exchange buffers of the micro-batches in flight (bound)
    table_chunk_bytes: int = 0  # host tables: one step-end chunk (reduce round or update chunk)
    inflight_microbatches: int = 0

    @property
    def table_device_bytes(self) -> int:
        """Device bytes of the stage's tables: the whole shard, or the host tables' bound."""
        if self.offload == "device":
            return self.table_bytes
        return self.table_cache_bytes + self.table_inflight_bytes + self.table_chunk_bytes

    @property
    def device_bytes(self) -> int:
        tables = self.table_device_bytes
        return self.dense_weight_bytes + self.dense_grad_bytes + self.dense_optimizer_bytes + tables

    @property
    def host_bytes(self) -> int:
        return self.table_bytes if self.offload == "host" else 0


def _stage_chunks(cfg: ExperimentConfig, stage: int) -> list[list[int]]:
    """Global layer indices of each model chunk of pipeline stage `stage` (virtual stages interleaved)."""
    p = cfg.parallel
    pp, vpp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size or 1
    n = cfg.model.num_layers // (pp * vpp)
    return [list(range((v * pp + stage) * n, (v * pp + stage + 1) * n)) for v in range(vpp)]


def stage_memory(cfg: ExperimentConfig, world_size: int) -> list[StageMemory]:
    """Per-rank bytes of every pipeline stage of `cfg` on `world_size` ranks."""
    dp = cfg.validate_world(world_size)
    m, p, s = cfg.model, cfg.parallel, cfg.stem
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.head_dim
    vocab_rows = m.padded_vocab_size(tp) // tp * h  # one TP rank's embedding / output layer
    norm = h if m.normalization == "RMSNorm" else 2 * h
    attn = h * (m.num_attention_heads + 2 * m.query_groups) * d // tp + m.num_attention_heads * d // tp * h
    stem_set = set(cfg.stem_layers)
    bf16 = cfg.train.precision in ("bf16", "auto")
    shards = dp * cp if p.use_distributed_optimizer else 1
    group = s.shard_size or dp * cp
    rows_local = RowOwnership(m.vocab_size, group).rows_local
    out = []
    for stage in range(pp):
        layers = [i for chunk in _stage_chunks(cfg, stage) for i in chunk]
        params = 0
        if stage == 0:
            params += vocab_rows
        if stage == pp - 1:
            params += norm + (vocab_rows if not m.tie_embeddings or pp > 1 else 0)
        for i in layers:
            params += attn + 2 * norm + (2 if i in stem_set else 3) * h * f // tp
        weight_b = params * (2 if bf16 else 4)
        grad_b = params * 4
        opt_b = -(-params // shards) * (12 if bf16 else 8)
        stem_layers = tuple(i for i in layers if i in stem_set)
        engines = [c for c in _stage_chunks(cfg, stage) if stem_set.intersection(c)]
        table_b = rows_local * len(stem_layers) * (f // tp) * 12 + rows_local * 8 * len(engines)
        parts = [0, 0, 0]
        inflight = 0
        if s.offload == "host":
            t = cfg.train
            n_mb = t.global_batch_size // (t.micro_batch_size * dp)
            vpp = p.virtual_pipeline_model_parallel_size or 1
            inflight = inflight_microbatches(s.prefetch_depth, n_mb, pp, vpp)
            for c in engines:
                b = device_bound_bytes(
                    cache_rows=s.cache_rows_for(rows_local), rows_local=rows_local, vocab_size=m.vocab_size,
                    layers=len(stem_set.intersection(c)), cols=f // tp, compute_bytes=2 if bf16 else 4,
                    shard_size=group, tokens_per_microbatch=t.micro_batch_size * m.seq_length, inflight=inflight,
                    prefetch_depth=s.prefetch_depth,
                )
                parts = [parts[0] + b.cache_bytes, parts[1] + b.inflight_bytes, parts[2] + b.chunk_bytes]
        out.append(StageMemory(stage, params, weight_b, grad_b, opt_b, stem_layers, rows_local, table_b,
                               parts[0], s.offload, parts[1], parts[2], inflight))
    return out


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def format_memory(cfg: ExperimentConfig, world_size: int) -> str:
    p = cfg.parallel
    dp = cfg.validate_world(world_size)
    lines = [
        f"memory per rank  world {world_size} = TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size}"
        f" x CP {p.context_parallel_size} x DP {dp}; "
        f"{'distributed' if p.use_distributed_optimizer else 'plain'} optimizer; tables on the {cfg.stem.offload}"
        " (activations, table gradients and buffers not counted)",
    ]
    for st in stage_memory(cfg, world_size):
        lines.append(
            f"  stage {st.stage}: dense {st.dense_params:,} params: weights {_gib(st.dense_weight_bytes)}, "
            f"grads {_gib(st.dense_grad_bytes)}, optimizer {_gib(st.dense_optimizer_bytes)}"
        )
        if st.stem_layers:
            where = "device" if st.offload == "device" else "host"
            lines.append(
                f"           tables {list(st.stem_layers)}: {st.table_rows_local:,} rows x {len(st.stem_layers)} layers, "
                f"rows + moments {_gib(st.table_bytes)} on the {where}"
            )
            if st.offload == "host":
                lines.append(
                    f"           host tables on the device (bound, bytes): {st.table_device_bytes:,} = cache "
                    f"{st.table_cache_bytes:,} + {st.inflight_microbatches} micro-batches in flight "
                    f"{st.table_inflight_bytes:,} + step-end chunk {st.table_chunk_bytes:,} ({_gib(st.table_device_bytes)}; "
                    "in flight = worst-case exchange buffers, every token a distinct row owned here)"
                )
        lines.append(f"           total: device {_gib(st.device_bytes)}, host {_gib(st.host_bytes)}")
    return "\n".join(lines)
