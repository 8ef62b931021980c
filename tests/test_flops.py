"""Parameter and FLOP counts: the paper's 1B figures, a tiny model counted shape by shape, and the
STEM FLOP saving (2 * hidden * ffn forward FLOPs per token per STEM layer)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from stem_megatron.config import ConfigError, ExperimentConfig, ModelConfig, load_config
from stem_megatron.flops import count_parameters, flops_per_token, format_counts

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

LLAMA_1B = ModelConfig(
    num_layers=16,
    hidden_size=2048,
    num_attention_heads=32,
    num_query_groups=8,
    ffn_hidden_size=8192,
    vocab_size=128256,
    seq_length=4096,
    rotary_base=5e5,
    tie_embeddings=False,
)


def _billions(n: int) -> float:
    return round(n / 1e9, 2)


def _experiment(model: ModelConfig, **stem) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "model": {k: getattr(model, k) for k in model.__dataclass_fields__},
            "train": {"micro_batch_size": 1, "global_batch_size": 8, "train_steps": 10},
            "data": {"mock": True},
            "stem": stem,
        }
    )


def test_llama_1b_dense_and_stem_counts():
    dense = count_parameters(LLAMA_1B)
    assert _billions(dense.total) == 1.50
    assert dense.active_per_token == dense.total and dense.tables == 0

    cfg = _experiment(LLAMA_1B, ratio="one_third")
    assert cfg.stem_layers == [1, 4, 8, 11, 14]
    stem = count_parameters(cfg)
    assert stem.num_stem_layers == 5
    assert _billions(stem.active_per_token) == 1.41
    assert _billions(stem.total) == 6.67
    assert stem.tables == 5 * 128256 * 8192
    # The paper's 6.75B is the dense total plus the tables, keeping the five removed up-projections.
    assert _billions(dense.total + stem.tables) == 6.75
    assert dense.total + stem.tables - stem.total == 5 * 2048 * 8192


def test_shipped_1b_configs_match_the_paper_shape():
    dense, stem = load_config(CONFIG_DIR / "dense_1b.yaml"), load_config(CONFIG_DIR / "stem_1b.yaml")
    assert dense.model == LLAMA_1B
    assert _billions(count_parameters(dense).total) == 1.50
    assert (_billions(count_parameters(stem).total), _billions(count_parameters(stem).active_per_token)) == (
        6.67,
        1.41,
    )


@pytest.mark.parametrize(
    ("name", "total", "active"),
    [
        ("dense_350m", 0.37, 0.37),
        ("stem_350m_third", 1.24, 0.34),
        ("stem_350m_half", 1.77, 0.33),
        ("stem_350m_all", 3.17, 0.28),
    ],
)
def test_350m_counts_as_documented(name, total, active):
    counts = count_parameters(load_config(CONFIG_DIR / f"{name}.yaml"))
    assert (_billions(counts.total), _billions(counts.active_per_token)) == (total, active)


def _enumerated_shapes(m: ModelConfig, stem_layers: list[int]) -> dict[str, tuple[int, ...]]:
    """The weights a Llama-style model with STEM layers stores, written out one by one."""
    h, f, v, d = m.hidden_size, m.ffn_hidden_size, m.vocab_size, m.head_dim
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    norm = {"weight": (h,)} if m.normalization == "RMSNorm" else {"weight": (h,), "bias": (h,)}
    shapes = {"embedding.weight": (v, h)}
    for i in range(m.num_layers):
        shapes.update({f"layers.{i}.input_norm.{k}": s for k, s in norm.items()})
        shapes[f"layers.{i}.attn.q"] = (heads * d, h)
        shapes[f"layers.{i}.attn.k"] = (groups * d, h)
        shapes[f"layers.{i}.attn.v"] = (groups * d, h)
        shapes[f"layers.{i}.attn.o"] = (h, heads * d)
        shapes.update({f"layers.{i}.mlp_norm.{k}": s for k, s in norm.items()})
        shapes[f"layers.{i}.mlp.gate"] = (f, h)
        shapes[f"layers.{i}.mlp.down"] = (h, f)
        if i in stem_layers:
            shapes[f"layers.{i}.mlp.table"] = (v, f)
        else:
            shapes[f"layers.{i}.mlp.up"] = (f, h)
    shapes.update({f"final_norm.{k}": s for k, s in norm.items()})
    if not m.tie_embeddings:
        shapes["output.weight"] = (v, h)
    return shapes


@pytest.mark.parametrize(
    ("normalization", "tied", "kv_channels", "stem_layers"),
    [
        ("RMSNorm", True, None, []),
        ("RMSNorm", True, None, [1]),
        ("LayerNorm", False, None, [0, 2]),
        ("RMSNorm", False, 6, [0, 1, 2]),  # head dim 6, not hidden / heads = 2 (RoPE needs it even)
    ],
)
def test_tiny_model_counted_shape_by_shape(normalization, tied, kv_channels, stem_layers):
    m = ModelConfig(
        num_layers=3,
        hidden_size=12,
        num_attention_heads=6,
        num_query_groups=2,
        kv_channels=kv_channels,
        ffn_hidden_size=20,
        vocab_size=37,
        seq_length=16,
        normalization=normalization,
        tie_embeddings=tied,
    )
    shapes = _enumerated_shapes(m, stem_layers)
    counts = count_parameters(m, stem_layers)
    size = {name: math.prod(s) for name, s in shapes.items()}
    tables = sum(n for name, n in size.items() if name.endswith(".table"))
    assert counts.total == sum(size.values())
    assert counts.tables == tables == len(stem_layers) * 37 * 20
    assert counts.embedding == size["embedding.weight"]
    assert counts.output_layer == size.get("output.weight", 0)
    assert counts.attention == sum(n for name, n in size.items() if ".attn." in name)
    assert counts.norms == sum(n for name, n in size.items() if "norm" in name)
    assert (
        counts.stem_mlp + counts.dense_mlp == sum(n for name, n in size.items() if ".mlp." in name) - tables
    )
    assert counts.active_per_token == counts.total - tables + len(stem_layers) * 20
    assert counts.num_stem_layers == len(stem_layers)

    # FLOPs: 2 per weight a token is multiplied by (the output layer even when tied; never the
    # embedding or a table), plus QK^T and AV over all 16 positions.
    matmul = sum(
        n for name, n in size.items() if ".attn." in name or name.endswith((".gate", ".down", ".up"))
    )
    flops = flops_per_token(m, 16, stem_layers)
    q_dim = 6 * m.head_dim
    assert flops.forward == 2 * (matmul + 37 * 12) + 3 * 2 * 2 * 16 * q_dim
    assert flops.training == 3 * flops.forward
    parts = flops.attention_projections + flops.attention_scores + flops.mlp + flops.output_layer
    assert flops.forward == parts


def test_stem_flops_drop_by_the_up_projection():
    cfg = _experiment(LLAMA_1B, ratio="one_third")
    dense, stem = flops_per_token(LLAMA_1B), flops_per_token(cfg)
    per_layer = 2 * 2048 * 8192
    assert stem.forward < dense.forward
    assert dense.forward - stem.forward == 5 * per_layer
    assert dense.training - stem.training == 3 * 5 * per_layer
    assert (dense.attention_scores, dense.output_layer) == (stem.attention_scores, stem.output_layer)
    for layers in ([0], [3, 7], list(range(16))):
        diff = dense.forward - flops_per_token(LLAMA_1B, stem_layers=layers).forward
        assert diff == len(layers) * per_layer


def test_flops_follow_6n_plus_attention():
    dense = count_parameters(LLAMA_1B)
    n_matmul = dense.total - dense.embedding - dense.norms  # untied: the output layer is in
    flops = flops_per_token(LLAMA_1B, 4096)
    assert flops.training == 6 * n_matmul + 12 * 16 * 4096 * 2048  # PaLM: 6N + 12 L T (H Q)
    assert round(flops.training / 1e9, 2) == 9.03
    causal = flops_per_token(LLAMA_1B, 4096, causal=True)
    assert causal.attention_scores * 2 == flops.attention_scores
    assert flops.training - causal.training == 3 * causal.attention_scores
    short = flops_per_token(LLAMA_1B, 1024)
    assert flops.attention_scores == 4 * short.attention_scores
    assert flops.mlp == short.mlp and short.seq_length == 1024
    assert flops_per_token(LLAMA_1B).seq_length == 4096  # defaults to model.seq_length


def test_bad_arguments():
    with pytest.raises(ConfigError, match="stem_layers"):
        count_parameters(LLAMA_1B, [16])
    with pytest.raises(ConfigError, match="stem_layers"):
        count_parameters(LLAMA_1B, [1, 1])
    with pytest.raises(ConfigError, match="seq_length"):
        flops_per_token(LLAMA_1B, 0)
    with pytest.raises(TypeError):
        count_parameters({"hidden_size": 8})


def test_format_counts_reports_stem_and_dense():
    text = format_counts(load_config(CONFIG_DIR / "stem_1b.yaml"))
    assert "5 of 16: [1, 4, 8, 11, 14]" in text
    assert "total 6.668B" in text and "active/token 1.415B" in text and "tables 5.253B" in text
    assert "training 8.522 GFLOP" in text and "5.6% fewer" in text
    dense = format_counts(load_config(CONFIG_DIR / "tiny_dense.yaml"))
    assert "none (dense model)" in dense and "padded to 50304" in dense and "fewer" not in dense


def test_dry_run_prints_the_paper_1b_figures(capsys):
    """`stem-train --dry-run` needs no process group and prints 1.50 / 1.41 / 6.67 for the 1B shapes."""
    import torch.distributed as dist

    from stem_megatron.cli.train import main

    assert main(["--config", "configs/stem_1b.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "total 6.67B, active 1.41B per token; the dense model of this shape: 1.50B" in out
    assert "stem layers  5 of 16: [1, 4, 8, 11, 14]" in out and "ratio: one_third" in out
    assert not dist.is_initialized()
    assert main(["--config", "configs/stem_1b.yaml", "--dry-run", "model.bogus=1"]) == 2
    assert "model.bogus" in capsys.readouterr().err
