"""Hugging Face model of an exported STEM transformer (copied into every `stem-export` directory).

transformers' Llama with one change: in the layers of `config.stem_layers` the MLP's
up-projection is a token-indexed table (`mlp.stem_table`, an Embedding [stem_table_vocab_size, ffn]):

    y = down_proj( SiLU(gate_proj(x)) * stem_table[stem_ids] )

STEM ids. `forward(input_ids, ..., stem_ids=None, stem_rows=None, stem_rows_mask=None)`:
- `stem_ids` [b, s] (default: `input_ids`) are the rows the STEM layers read at each position;
  pass other ids to make a position read another token's rows.
- `stem_rows` {layer index: [b, s, ffn]} replaces the table rows of that layer by given values
  where `stem_rows_mask` [b, s] (bool; default: everywhere) is true. Layers not in the dict read
  their table. This is the hook for editing what a position "knows" without touching the table.
`generate()` uses the generated ids themselves as STEM ids (each decoding step passes the new
tokens as `input_ids`); ids or rows given to `forward` must match `input_ids` in shape.

The embedding keeps megatron's padded vocabulary (`vocab_size`), so logits have that many
columns; the rows past the tokenizer's vocabulary are padding. This file imports only torch and
transformers (it is loaded with `trust_remote_code=True` through `auto_map` in config.json).

Legend: b batch, s sequence, h hidden, f ffn.
"""

import torch
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_stem import StemLlamaConfig

# forward() keyword arguments that the STEM layers read; dense layers and attention never see them.
STEM_KWARGS = ("stem_ids", "stem_rows", "stem_rows_mask")


class StemLlamaMLP(nn.Module):
    """SwiGLU whose up-projection is the row of a per-layer table selected by the position's STEM id."""

    def __init__(self, config: StemLlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.stem_table = nn.Embedding(config.stem_table_vocab_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x_bsh, stem_ids_bs, rows_bsf=None, mask_bs=None):
        up_bsf = self.stem_table(stem_ids_bs)
        if rows_bsf is not None:
            rows_bsf = rows_bsf.to(up_bsf)
            up_bsf = rows_bsf if mask_bs is None else torch.where(mask_bs[..., None], rows_bsf, up_bsf)
        return self.down_proj(nn.functional.silu(self.gate_proj(x_bsh)) * up_bsf)


class StemLlamaDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer; STEM layers pass the STEM ids to their MLP."""

    def __init__(self, config: StemLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.layer_idx = layer_idx
        self.is_stem = layer_idx in config.stem_layers
        if self.is_stem:
            self.mlp = StemLlamaMLP(config)

    def forward(self, hidden_states, stem_ids=None, stem_rows=None, stem_rows_mask=None, **kwargs):
        # Everything else (mask, positions, cache, ...) goes to attention untouched, whatever its
        # name in this transformers version: the layer's own logic is only the two residual blocks.
        residual_bsh = hidden_states
        attn_bsh, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = residual_bsh + attn_bsh
        x_bsh = self.post_attention_layernorm(hidden_states)
        if self.is_stem:
            if stem_ids is None:
                raise ValueError("a STEM layer needs stem_ids (or input_ids): inputs_embeds alone are not enough")
            rows_bsf = None if stem_rows is None else stem_rows.get(self.layer_idx)
            return hidden_states + self.mlp(x_bsh, stem_ids, rows_bsf, stem_rows_mask)
        return hidden_states + self.mlp(x_bsh)


class StemLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = StemLlamaConfig
    config: StemLlamaConfig
    _no_split_modules = ["StemLlamaDecoderLayer"]


class StemLlamaModel(StemLlamaPreTrainedModel, LlamaModel):
    def __init__(self, config: StemLlamaConfig):
        StemLlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(StemLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, *args, stem_ids=None, stem_rows=None, stem_rows_mask=None, **kwargs):
        if stem_ids is None:
            stem_ids = input_ids
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        for name, t in (("stem_ids", stem_ids), ("stem_rows_mask", stem_rows_mask)):
            if t is not None and ref is not None and tuple(t.shape[:2]) != tuple(ref.shape[:2]):
                raise ValueError(f"{name} has shape {tuple(t.shape)}; the input is {tuple(ref.shape[:2])} "
                                 "(generate() passes only new tokens: use stem_ids with forward())")
        return super().forward(input_ids, *args, stem_ids=stem_ids, stem_rows=stem_rows,
                               stem_rows_mask=stem_rows_mask, **kwargs)


class StemLlamaForCausalLM(StemLlamaPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: StemLlamaConfig):
        StemLlamaPreTrainedModel.__init__(self, config)
        self.model = StemLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["StemLlamaForCausalLM", "StemLlamaModel", "StemLlamaPreTrainedModel"]
