"""Map full (unsharded) reference weights to this rank's megatron model chunks, and back.

Reference names are Hugging Face Llama names (see reference.py). Megatron layouts covered:
vocabulary-parallel embedding / output rows (padded vocabulary), `linear_qkv` grouped per query
group `[q (heads/group * d) | k (d) | v (d)]` split by groups over TP, column-parallel gate
(and up for dense SwiGLU, stored `[gate_shard | up_shard]` per TP rank), row-parallel `linear_proj`
and `linear_fc2`, replicated norms. STEM tables go to the chunk's engine (rows by ownership, stem/ownership.py,
columns by TP). The same mapping applied to gradients gives the expected local gradients.
"""

from __future__ import annotations

import torch

from stem_megatron.config import ExperimentConfig


def _tp_rows(t: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    n = t.shape[0] // tp_size
    return t[tp_rank * n : (tp_rank + 1) * n]


def _tp_cols(t: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    n = t.shape[1] // tp_size
    return t[:, tp_rank * n : (tp_rank + 1) * n]


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def fused_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """megatron's `linear_qkv` weight from separate q/k/v ([g * (n/g + 2) * d, h])."""
    g = num_query_groups
    h = q.shape[1]
    d = k.shape[0] // g
    q_g = q.view(g, -1, h)
    return torch.cat([q_g, k.view(g, d, h), v.view(g, d, h)], dim=1).reshape(-1, h)


def reference_to_chunk(
    ref: dict[str, torch.Tensor],
    cfg: ExperimentConfig,
    *,
    tp_rank: int,
    tp_size: int,
    layer_offset: int,
    num_local_layers: int,
    pre_process: bool,
    post_process: bool,
) -> dict[str, torch.Tensor]:
    """This rank's chunk state (megatron names) from the full reference state (HF names)."""
    m = cfg.model
    stem = set(cfg.stem.stem_layer_indices(m.num_layers))
    vp = m.padded_vocab_size(tp_size)
    g = m.num_query_groups or m.num_attention_heads
    out: dict[str, torch.Tensor] = {}
    if pre_process:
        out["embedding.word_embeddings.weight"] = _tp_rows(_pad_rows(ref["model.embed_tokens.weight"], vp), tp_rank, tp_size)
    for j in range(num_local_layers):
        i = layer_offset + j
        r, o = f"model.layers.{i}.", f"decoder.layers.{j}."
        out[o + "input_layernorm.weight"] = ref[r + "input_layernorm.weight"]
        qkv = fused_qkv(ref[r + "self_attn.q_proj.weight"], ref[r + "self_attn.k_proj.weight"],
                        ref[r + "self_attn.v_proj.weight"], g)
        out[o + "self_attention.linear_qkv.weight"] = _tp_rows(qkv, tp_rank, tp_size)
        out[o + "self_attention.linear_proj.weight"] = _tp_cols(ref[r + "self_attn.o_proj.weight"], tp_rank, tp_size)
        out[o + "pre_mlp_layernorm.weight"] = ref[r + "post_attention_layernorm.weight"]
        gate = _tp_rows(ref[r + "mlp.gate_proj.weight"], tp_rank, tp_size)
        if i in stem:
            out[o + "mlp.linear_fc1.weight"] = gate
        else:
            up = _tp_rows(ref[r + "mlp.up_proj.weight"], tp_rank, tp_size)
            out[o + "mlp.linear_fc1.weight"] = torch.cat([gate, up])
        out[o + "mlp.linear_fc2.weight"] = _tp_cols(ref[r + "mlp.down_proj.weight"], tp_rank, tp_size)
    if post_process:
        out["decoder.final_layernorm.weight"] = ref["model.norm.weight"]
        head = ref["model.embed_tokens.weight"] if m.tie_embeddings else ref["lm_head.weight"]
        if not (m.tie_embeddings and pre_process):
            out["output_layer.weight"] = _tp_rows(_pad_rows(head, vp), tp_rank, tp_size)
    return out


def reference_tables(ref: dict[str, torch.Tensor], layer_ids: list[int], tp_rank: int, tp_size: int) -> torch.Tensor:
    """Full-vocabulary tables of the given STEM layers, this TP rank's columns: [V, L, F/tp]."""
    cols = [_tp_cols(ref[f"model.layers.{i}.mlp.stem_table.weight"], tp_rank, tp_size) for i in layer_ids]
    return torch.stack(cols, dim=1)


@torch.no_grad()
def load_reference_into_chunks(chunks, ref: dict[str, torch.Tensor], cfg: ExperimentConfig) -> None:
    """Copy full reference weights into this rank's megatron chunks (weights and STEM tables)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        tcfg = chunk.config
        local = reference_to_chunk(
            ref, cfg, tp_rank=tp_rank, tp_size=tp_size,
            layer_offset=get_transformer_layer_offset(tcfg, vp_stage=chunk.vp_stage),
            num_local_layers=get_num_layers_to_build(tcfg, vp_stage=chunk.vp_stage),
            pre_process=chunk.pre_process, post_process=chunk.post_process,
        )
        params = dict(chunk.named_parameters())
        missing = set(params) - set(local)
        if missing:
            raise KeyError(f"reference has no value for {sorted(missing)}")
        for name, value in local.items():
            params[name].copy_(value.to(params[name].dtype))
        if chunk.stem_engine is not None:
            layer_ids = sorted(chunk.stem_slot_of_layer, key=chunk.stem_slot_of_layer.get)
            load_full_table(chunk.stem_engine, reference_tables(ref, layer_ids, tp_rank, tp_size))


def owned_rows(engine, full_VLf: torch.Tensor) -> torch.Tensor:
    """The rows of a full [V, L, f] tensor that `engine` owns, in its local order (padding rows zero)."""
    return engine.layout.ownership.take_owned(full_VLf, engine.layout.shard_rank)


@torch.no_grad()
def load_full_table(engine, full_VLf: torch.Tensor) -> None:
    """Set an engine's fp32 master rows from the full-vocabulary table of its layers and TP columns."""
    engine.set_rows("weight", owned_rows(engine, full_VLf.to(engine.weight)))
