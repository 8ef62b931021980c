"""Parameter and FLOP counts for dense and STEM models: pure arithmetic on the config, nothing allocated.

Parameters (`count_parameters`) use the tokenizer's real vocabulary, not the TP-padded one, and
count what a Llama-style megatron model stores: no linear biases; a norm has `hidden` weights
(RMSNorm) or `2 * hidden` (LayerNorm, weight + bias); two norms per layer plus a final one; an
untied output layer adds `vocab * hidden`. A STEM layer stores gate and down (`2 * hidden * ffn`)
and a table (`vocab * ffn`) instead of the dense gate, up and down (`3 * hidden * ffn`).

`active_per_token` counts every non-table parameter (the input embedding in full, as the usual
"active parameters" figure does) plus the one table row (`ffn` values) each STEM layer reads per
token. STEM tables are memory, not compute.

FLOPs (`flops_per_token`) follow the PaLM / Megatron model-FLOPs convention used for MFU: a
multiply-add is 2 FLOPs; only matmuls count (norms, SiLU, the gating product, softmax and RoPE
are O(ffn) or O(hidden) per token, are identical in dense and STEM layers, and are left out);
training = 3 x forward (backward = 2 x forward). So training FLOPs/token = 6 * N_matmul + the
attention-score term, where N_matmul counts every weight a token is multiplied by: Q, K, V and
output projections, the MLP matmuls and the output layer (tied or not), but not the input
embedding or the STEM tables, which are gathers (0 FLOPs). A STEM layer's MLP is the gate and
down matmuls only: `4 * hidden * ffn` forward FLOPs per token, `2 * hidden * ffn` less than dense.

Attention scores: QK^T and AV each cost `2 * seq * n_heads * head_dim` forward FLOPs per token
when every query is charged for all `seq` keys (non-causal), as PaLM's `6N + 12 * L * H * Q * T`
does; that is the default, so numbers compare with published MFU figures. `causal=True` halves
the term (the work a causal flash-attention kernel actually does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stem_megatron.config import ConfigError, ExperimentConfig, ModelConfig


@dataclass(kw_only=True, frozen=True)
class ParamCounts:
    """Stored parameters by component; `total` is their sum."""

    total: int  # every stored parameter: dense weights + STEM tables
    active_per_token: int  # non-table parameters + one row (ffn values) per STEM table
    embedding: int  # input embedding, vocab x hidden (real vocab)
    output_layer: int  # untied output projection, hidden x vocab; 0 when tied
    attention: int  # Q, K, V and output projections of all layers
    dense_mlp: int  # gate, up and down of the dense layers
    stem_mlp: int  # gate and down of the STEM layers (their dense part)
    tables: int  # STEM tables: n_stem x vocab x ffn
    norms: int  # two norms per layer + the final norm
    num_stem_layers: int

    @property
    def non_table(self) -> int:
        """Dense (non-table) parameters: what the dense optimizer and DDP hold."""
        return self.total - self.tables


@dataclass(kw_only=True, frozen=True)
class FlopCounts:
    """Matmul FLOPs per token (multiply-add = 2); `forward` is the sum of the four parts."""

    forward: int
    training: int  # 3 x forward
    attention_projections: int  # Q, K, V and output projections
    attention_scores: int  # QK^T and AV
    mlp: int  # dense layers: gate, up, down; STEM layers: gate, down (the table is a gather)
    output_layer: int  # logits over the real vocabulary
    seq_length: int
    causal: bool  # whether the score term was halved for causal masking


def _resolve(
    cfg: ExperimentConfig | ModelConfig, stem_layers: Sequence[int] | None
) -> tuple[ModelConfig, list[int]]:
    if isinstance(cfg, ExperimentConfig):
        model, layers = cfg.model, cfg.stem_layers if stem_layers is None else list(stem_layers)
    elif isinstance(cfg, ModelConfig):
        model, layers = cfg, [] if stem_layers is None else list(stem_layers)
    else:
        raise TypeError(f"expected an ExperimentConfig or ModelConfig, got {type(cfg).__name__}")
    if len(set(layers)) != len(layers) or any(not 0 <= i < model.num_layers for i in layers):
        raise ConfigError(
            f"stem_layers={layers}: must be unique indices in [0, model.num_layers={model.num_layers})"
        )
    return model, layers


def _attention_params_per_layer(m: ModelConfig) -> int:
    q_dim = m.num_attention_heads * m.head_dim
    kv_dim = m.query_groups * m.head_dim
    return m.hidden_size * (q_dim + 2 * kv_dim) + q_dim * m.hidden_size


def count_parameters(
    cfg: ExperimentConfig | ModelConfig, stem_layers: Sequence[int] | None = None
) -> ParamCounts:
    """Parameter counts of the model; STEM layers from `cfg` (an ExperimentConfig) unless given."""
    m, layers = _resolve(cfg, stem_layers)
    h, f, v, n_layers, n_stem = m.hidden_size, m.ffn_hidden_size, m.vocab_size, m.num_layers, len(layers)
    norm = h if m.normalization == "RMSNorm" else 2 * h
    embedding = v * h
    output_layer = 0 if m.tie_embeddings else v * h
    attention = n_layers * _attention_params_per_layer(m)
    dense_mlp = (n_layers - n_stem) * 3 * h * f
    stem_mlp = n_stem * 2 * h * f
    tables = n_stem * v * f
    norms = (2 * n_layers + 1) * norm
    total = embedding + output_layer + attention + dense_mlp + stem_mlp + tables + norms
    return ParamCounts(
        total=total,
        active_per_token=total - tables + n_stem * f,
        embedding=embedding,
        output_layer=output_layer,
        attention=attention,
        dense_mlp=dense_mlp,
        stem_mlp=stem_mlp,
        tables=tables,
        norms=norms,
        num_stem_layers=n_stem,
    )


def flops_per_token(
    cfg: ExperimentConfig | ModelConfig,
    seq_length: int | None = None,
    stem_layers: Sequence[int] | None = None,
    *,
    causal: bool = False,
) -> FlopCounts:
    """Matmul FLOPs per token for a `seq_length`-token sequence (default: model.seq_length)."""
    m, layers = _resolve(cfg, stem_layers)
    s = m.seq_length if seq_length is None else seq_length
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
        raise ConfigError(f"seq_length={s!r}: must be a positive integer")
    h, f, n_layers, n_stem = m.hidden_size, m.ffn_hidden_size, m.num_layers, len(layers)
    q_dim = m.num_attention_heads * m.head_dim
    projections = 2 * n_layers * _attention_params_per_layer(m)
    scores = n_layers * 2 * 2 * s * q_dim  # QK^T and AV, each 2 * s * q_dim
    if causal:
        scores //= 2
    mlp = 2 * ((n_layers - n_stem) * 3 * h * f + n_stem * 2 * h * f)
    output = 2 * h * m.vocab_size
    forward = projections + scores + mlp + output
    return FlopCounts(
        forward=forward,
        training=3 * forward,
        attention_projections=projections,
        attention_scores=scores,
        mlp=mlp,
        output_layer=output,
        seq_length=s,
        causal=causal,
    )


def _scaled(n: float, suffixes: tuple[str, str, str]) -> str:
    """1234567 -> '1.235M' with suffixes for 1e9, 1e6, 1e3."""
    for scale, suffix in zip((1e9, 1e6, 1e3), suffixes):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{suffix}"
    return f"{n:.0f}"


def _params(n: int) -> str:
    return _scaled(n, ("B", "M", "K"))


def _flops(n: int) -> str:
    return _scaled(n, (" G", " M", " K")) + "FLOP"


def format_counts(cfg: ExperimentConfig) -> str:
    """Human-readable block for the dry run: shape, STEM layers, parameters and FLOPs per token."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    layers = cfg.stem_layers
    p = count_parameters(cfg)
    fl = flops_per_token(cfg)
    if layers:
        saved = 1 - fl.forward / flops_per_token(cfg, stem_layers=[]).forward
        stem_line = f"{len(layers)} of {m.num_layers}: {layers}"
        vs_dense = f"; {saved:.1%} fewer than the dense model of this shape"
    else:
        stem_line, vs_dense = "none (dense model)", ""

    return "\n".join(
        [
            f"model        {m.num_layers} layers, hidden {m.hidden_size}, ffn {m.ffn_hidden_size}, "
            f"{m.num_attention_heads} heads / {m.query_groups} query groups (head dim {m.head_dim}), "
            f"seq {m.seq_length}",
            f"vocab        {m.vocab_size} (padded to {m.padded_vocab_size(tp)} at TP={tp}; counts use the real "
            f"vocab), embeddings {'tied' if m.tie_embeddings else 'untied'}",
            f"stem layers  {stem_line}",
            f"parameters   total {_params(p.total)} ({p.total:,}); active/token {_params(p.active_per_token)}; "
            f"tables {_params(p.tables)}; non-table {_params(p.non_table)}",
            f"billions     total {p.total / 1e9:.2f}B, active {p.active_per_token / 1e9:.2f}B per token; "
            f"the dense model of this shape: {count_parameters(cfg, stem_layers=[]).total / 1e9:.2f}B",
            f"  embedding {_params(p.embedding)}, output layer {_params(p.output_layer)}, attention {_params(p.attention)}, "
            f"dense MLP {_params(p.dense_mlp)}, STEM gate+down {_params(p.stem_mlp)}, norms {_params(p.norms)}",
            f"FLOPs/token  forward {_flops(fl.forward)}, training {_flops(fl.training)} "
            f"(6N + non-causal attention at seq {fl.seq_length}; tables are gathers: 0 FLOPs){vs_dense}",
        ]
    )
