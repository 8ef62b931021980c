"""A plain-PyTorch STEM transformer (no megatron imports): the single-process reference.

Llama-style (RMSNorm, RoPE, GQA, SwiGLU) with Hugging Face Llama parameter names; STEM layers
replace `mlp.up_proj` by `mlp.stem_table` ([V, F]): `down(SiLU(gate(x)) * table[ids])`.
Used by the tests as the independent reference for the megatron model, and by export as the
model class that loads an exported checkpoint.

Knowledge editing (stem_megatron/editing.py) reads the table at other ids than the embedding:
`forward(ids, stem_ids=...)` looks the STEM rows up at `stem_ids` (default `ids`), and
`row_overrides={layer: (mask_bs, rows_nf)}` replaces, in STEM layer `layer` (global 0-based index),
the rows at the positions where the bool mask `[b, s]` is True by `rows_nf` (n = mask.sum(), in
row-major order of the mask), after the lookup.

`forward(ids, position_ids=...)` rotates each token at its own position `[b, s]` (default 0..s-1;
document resets restart positions inside a packed sequence) with the causal mask unchanged.

Legend: b batch, s sequence, h hidden, n heads, g KV groups, d head dim, f ffn, v vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(kw_only=True)
class ReferenceConfig:
    vocab_size: int  # embedding / output rows
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    stem_layers: list[int] = field(default_factory=list)
    table_vocab_size: int | None = None  # STEM table rows; None = vocab_size
    rotary_base: float = 10000.0
    rope_scaling_factor: float | None = None  # Llama-3 RoPE scaling (low/high 1/4, context 8192); None = plain
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = True


def rope_inv_freq(c: ReferenceConfig, device=None) -> torch.Tensor:
    """RoPE inverse frequencies [d/2] (fp32), with Llama-3 scaling when `c.rope_scaling_factor` is set:
    wavelengths above 8192 (original context / low factor 1) are slowed by the factor, those below
    8192 / 4 (high factor) kept, and those between interpolated smoothly."""
    d = c.head_dim
    inv_freq = 1.0 / (c.rotary_base ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    factor = c.rope_scaling_factor
    if factor is None:
        return inv_freq
    context, low, high = 8192.0, 1.0, 4.0
    wavelen = 2 * math.pi / inv_freq
    smooth = ((context / wavelen - low) / (high - low)).clamp(0.0, 1.0)  # 0 at the long end, 1 at the short
    blended = (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > context / low, inv_freq / factor,
                       torch.where(wavelen < context / high, inv_freq, blended))


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_query_groups * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_query_groups * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x_bsh, cos_sd, sin_sd):
        c = self.c
        b, s, _ = x_bsh.shape
        q_bnsd = self.q_proj(x_bsh).view(b, s, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k_bgsd = self.k_proj(x_bsh).view(b, s, c.num_query_groups, c.head_dim).transpose(1, 2)
        v_bgsd = self.v_proj(x_bsh).view(b, s, c.num_query_groups, c.head_dim).transpose(1, 2)
        q_bnsd = q_bnsd * cos_sd + _rotate_half(q_bnsd) * sin_sd
        k_bgsd = k_bgsd * cos_sd + _rotate_half(k_bgsd) * sin_sd
        rep = c.num_attention_heads // c.num_query_groups
        k_bnsd = k_bgsd.repeat_interleave(rep, dim=1)
        v_bnsd = v_bgsd.repeat_interleave(rep, dim=1)
        scores = (q_bnsd @ k_bnsd.transpose(-1, -2)) / c.head_dim**0.5
        causal = torch.ones(s, s, dtype=torch.bool, device=x_bsh.device).triu(1)
        probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
        out_bsh = (probs @ v_bnsd).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(out_bsh)


class SwiGLU(nn.Module):
    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(c.ffn_hidden_size, c.hidden_size, bias=False)

    def forward(self, x_bsh, ids_bs):
        return self.down_proj(F.silu(self.gate_proj(x_bsh)) * self.up_proj(x_bsh))


class StemFFN(nn.Module):
    """down(SiLU(gate(x)) * E[ids]): the up-projection replaced by a token-indexed table."""

    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.ffn_hidden_size, bias=False)
        self.stem_table = nn.Embedding(c.table_vocab_size or c.vocab_size, c.ffn_hidden_size)
        self.down_proj = nn.Linear(c.ffn_hidden_size, c.hidden_size, bias=False)

    def forward(self, x_bsh, ids_bs, override=None):
        rows_bsf = self.stem_table(ids_bs)
        if override is not None:
            mask_bs, rows_nf = override
            rows_bsf = rows_bsf.masked_scatter(mask_bs.unsqueeze(-1), rows_nf.to(rows_bsf.dtype))
        return self.down_proj(F.silu(self.gate_proj(x_bsh)) * rows_bsf)


class Block(nn.Module):
    def __init__(self, c: ReferenceConfig, stem: bool):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(c.hidden_size, eps=c.norm_epsilon)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = nn.RMSNorm(c.hidden_size, eps=c.norm_epsilon)
        self.mlp = StemFFN(c) if stem else SwiGLU(c)

    def forward(self, x_bsh, ids_bs, cos_sd, sin_sd, override=None):
        x_bsh = x_bsh + self.self_attn(self.input_layernorm(x_bsh), cos_sd, sin_sd)
        if override is None:
            return x_bsh + self.mlp(self.post_attention_layernorm(x_bsh), ids_bs)
        return x_bsh + self.mlp(self.post_attention_layernorm(x_bsh), ids_bs, override)


class Backbone(nn.Module):
    def __init__(self, c: ReferenceConfig):
        super().__init__()
        stem = set(c.stem_layers)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, i in stem) for i in range(c.num_layers))
        self.norm = nn.RMSNorm(c.hidden_size, eps=c.norm_epsilon)


class ReferenceStemLM(nn.Module):
    """forward(ids [b, s]) -> logits [b, s, vocab]; `loss(ids, labels)` -> per-token losses [b, s].

    forward's optional `stem_ids` [b, s] and `row_overrides` are described in the module docstring.
    """

    def __init__(self, c: ReferenceConfig):
        super().__init__()
        self.config = c
        self.model = Backbone(c)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def _rope(self, s, device, dtype, position_ids_bs=None):
        """cos, sin [s, d] for positions 0..s-1, or [b, 1, s, d] (broadcast over heads) at `position_ids_bs`."""
        inv_freq = rope_inv_freq(self.config, device)
        if position_ids_bs is None:
            freqs = torch.outer(torch.arange(s, dtype=torch.float32, device=device), inv_freq)
        else:
            freqs = (position_ids_bs.float()[..., None] * inv_freq)[:, None]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, ids_bs: torch.Tensor, stem_ids: torch.Tensor | None = None,
                row_overrides: dict | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        stem_ids_bs = ids_bs if stem_ids is None else stem_ids
        if stem_ids_bs.shape != ids_bs.shape:
            raise ValueError(f"stem_ids {tuple(stem_ids_bs.shape)} must have the shape of ids {tuple(ids_bs.shape)}")
        overrides = row_overrides or {}
        if not set(overrides) <= set(self.config.stem_layers):
            raise ValueError(f"row_overrides for layers {sorted(set(overrides) - set(self.config.stem_layers))}, "
                             f"which are not STEM layers ({self.config.stem_layers})")
        x_bsh = self.model.embed_tokens(ids_bs)
        if position_ids is not None and position_ids.shape != ids_bs.shape:
            raise ValueError(f"position_ids {tuple(position_ids.shape)} must have the shape of ids {tuple(ids_bs.shape)}")
        cos_sd, sin_sd = self._rope(ids_bs.shape[1], ids_bs.device, x_bsh.dtype, position_ids)
        for i, layer in enumerate(self.model.layers):
            x_bsh = layer(x_bsh, stem_ids_bs, cos_sd, sin_sd, overrides.get(i))
        x_bsh = self.model.norm(x_bsh)
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return x_bsh @ head.t()

    def loss(self, ids_bs: torch.Tensor, labels_bs: torch.Tensor) -> torch.Tensor:
        logits_bsv = self.forward(ids_bs)
        return F.cross_entropy(logits_bsv.flatten(0, 1).float(), labels_bs.flatten(), reduction="none").view_as(
            labels_bs
        )
