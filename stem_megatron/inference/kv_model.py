"""Incremental (KV-cached) forward of a `ReferenceStemLM`, for generation.

`KVModel(ref)` computes what `ref(ids)` computes, a chunk of positions at a time: each call
appends the chunk's keys and values to a `KVCache` and attends to everything cached so far. It
uses the reference's own modules and weights (projections, norms, gate / down projections), with
two differences that generation needs:
- STEM rows come from outside (`rows_bsLF`, the rows of the chunk's tokens for every STEM layer,
  in `stem_layers` order), so they can live on the device or in host memory (rows.py);
- a batch of prompts of different lengths is left-padded: `pos_bs` gives each token its
  position in its own sequence, and keys at padding positions are masked (a padding query
  attends to itself only, so no softmax row is empty and padding never reaches a real token).

Legend: b batch, s new positions, S cached positions, h hidden, n heads, g KV groups, d head dim,
L STEM layers, F ffn, v vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stem_megatron.reference import ReferenceStemLM, _rotate_half, rope_inv_freq


class KVCache:
    """Keys and values of every layer for up to `capacity` positions, and which positions are real tokens."""

    def __init__(self, ref: ReferenceStemLM, batch: int, capacity: int, device, dtype):
        c = ref.config
        shape = (batch, c.num_query_groups, capacity, c.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.num_layers)]
        self.real_bS = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0
        self.capacity = capacity


class KVModel(nn.Module):
    """`forward(ids_bs, pos_bs, real_bs, cache, rows_bsLF) -> logits_bsv` over the reference's weights."""

    def __init__(self, ref: ReferenceStemLM):
        super().__init__()
        self.ref = ref
        self.stem_layers = list(ref.config.stem_layers)
        self.slot_of_layer = {layer: slot for slot, layer in enumerate(self.stem_layers)}
        self.register_buffer("inv_freq", rope_inv_freq(ref.config), persistent=False)

    def _rope(self, pos_bs: torch.Tensor, dtype):
        # The reference's formula (fp32 angles), at each token's own position.
        freqs_bsd = pos_bs.float()[..., None] * self.inv_freq.to(pos_bs.device)
        emb_bsd = torch.cat((freqs_bsd, freqs_bsd), dim=-1)[:, None]  # [b, 1, s, d]
        return emb_bsd.cos().to(dtype), emb_bsd.sin().to(dtype)

    def _attention(self, attn, x_bsh, cos, sin, cache: KVCache, layer: int, allowed_bsS):
        c = attn.c
        b, s, _ = x_bsh.shape
        start = cache.length
        q_bnsd = attn.q_proj(x_bsh).view(b, s, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k_bgsd = attn.k_proj(x_bsh).view(b, s, c.num_query_groups, c.head_dim).transpose(1, 2)
        v_bgsd = attn.v_proj(x_bsh).view(b, s, c.num_query_groups, c.head_dim).transpose(1, 2)
        q_bnsd = q_bnsd * cos + _rotate_half(q_bnsd) * sin
        k_bgsd = k_bgsd * cos + _rotate_half(k_bgsd) * sin
        cache.k[layer][:, :, start:start + s] = k_bgsd
        cache.v[layer][:, :, start:start + s] = v_bgsd
        rep = c.num_attention_heads // c.num_query_groups
        k_bnSd = cache.k[layer][:, :, :start + s].repeat_interleave(rep, dim=1)
        v_bnSd = cache.v[layer][:, :, :start + s].repeat_interleave(rep, dim=1)
        scores = (q_bnsd @ k_bnSd.transpose(-1, -2)) / c.head_dim**0.5
        probs = scores.masked_fill(~allowed_bsS[:, None], float("-inf")).softmax(-1)
        out_bsh = (probs @ v_bnSd).transpose(1, 2).reshape(b, s, -1)
        return attn.o_proj(out_bsh)

    def forward(self, ids_bs, pos_bs, real_bs, cache: KVCache, rows_bsLF=None, head: str = "all"):
        """Logits [b, s, v] (`head="all"`), of the last position only [b, 1, v] ("last"), or None ("none").

        The output layer dominates a small model's prefill (v >> h): chunks whose logits nobody reads skip it.
        """
        b, s = ids_bs.shape
        start = cache.length
        if start + s > cache.capacity:
            raise ValueError(f"the KV cache holds {cache.capacity} positions; {start} + {s} requested")
        cache.real_bS[:, start:start + s] = real_bs
        keys = torch.arange(start + s, device=ids_bs.device)
        queries = torch.arange(start, start + s, device=ids_bs.device)
        causal_sS = keys[None, :] <= queries[:, None]
        is_self_sS = keys[None, :] == queries[:, None]
        allowed_bsS = causal_sS & (cache.real_bS[:, None, :start + s] | is_self_sS)
        ref = self.ref
        x_bsh = ref.model.embed_tokens(ids_bs)
        cos, sin = self._rope(pos_bs, x_bsh.dtype)
        for i, layer in enumerate(ref.model.layers):
            x_bsh = x_bsh + self._attention(layer.self_attn, layer.input_layernorm(x_bsh), cos, sin, cache, i,
                                            allowed_bsS)
            h_bsh = layer.post_attention_layernorm(x_bsh)
            mlp = layer.mlp
            if i in self.slot_of_layer:  # STEM: the table lookup replaced by the given rows
                h_bsh = mlp.down_proj(F.silu(mlp.gate_proj(h_bsh)) * rows_bsLF[:, :, self.slot_of_layer[i]])
            else:
                h_bsh = mlp(h_bsh, ids_bs)
            x_bsh = x_bsh + h_bsh
        cache.length = start + s
        if head == "none":
            return None
        x_bsh = ref.model.norm(x_bsh if head == "all" else x_bsh[:, -1:])
        head = ref.model.embed_tokens.weight if ref.lm_head is None else ref.lm_head.weight
        return x_bsh @ head.t()
