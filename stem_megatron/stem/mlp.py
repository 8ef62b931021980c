"""The STEM MLP: `linear_fc2( SiLU(linear_fc1(x)) * E_l[token_id] )` as a megatron-core module.

`linear_fc1` is the gate (hidden -> ffn, column-parallel, stride 1: unlike megatron's SwiGLU MLP
it holds no up-projection), `linear_fc2` the row-parallel down-projection. Keeping megatron's
names keeps local-spec and TE-spec checkpoints interchangeable.

The table rows come from the chunk's `MicroBatchRows` (stem/microbatch.py), given at
construction (`rows=` in the module spec's params): its `current` context holds the micro-batch's
rows (the one in forward, or the one whose backward runs); one exchange per micro-batch serves
every STEM layer of the model chunk, each layer reads its slot.

Legend: s sequence, b micro-batch, h hidden, f = ffn / TP (this rank's columns), U unique ids,
L STEM layers in the chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from stem_megatron.stem.microbatch import MicroBatchRows, StemContext

__all__ = ["StemContext", "StemMLP"]


class StemMLP(MegatronModule):
    """SiLU(gate(x)) * table rows, then down-projection. Returns (output, bias_or_None)."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MLPSubmodules,
        tp_group: torch.distributed.ProcessGroup | None = None,
        rows: MicroBatchRows | None = None,
        **unused,
    ):
        super().__init__(config=config)
        self.layer_number: int | None = None  # global, 1-based (set by TransformerLayer)
        self.rows = rows if rows is not None else MicroBatchRows()
        self.linear_fc1 = build_module(
            submodules.linear_fc1,
            config.hidden_size,
            config.ffn_hidden_size,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_bias_linear,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="fc1",
            tp_group=tp_group,
        )
        self.linear_fc2 = build_module(
            submodules.linear_fc2,
            config.ffn_hidden_size,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="fc2",
            tp_group=tp_group,
        )

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        ctx = self.rows.current
        if ctx is None:
            raise RuntimeError(
                f"STEM layer {self.layer_number}: no token ids; call the model through StemGPTModel.forward"
            )
        gate_sbf, gate_bias = self.linear_fc1(hidden_states)
        if gate_bias is not None:
            gate_sbf = gate_sbf + gate_bias
        rows_sbf = ctx.rows_for(self.layer_number - 1)
        if rows_sbf.shape != gate_sbf.shape:
            raise RuntimeError(
                f"STEM layer {self.layer_number}: rows {tuple(rows_sbf.shape)} do not match the gate "
                f"output {tuple(gate_sbf.shape)} (token ids must be [b, s] for the full sequence)"
            )
        inter_sbf = F.silu(gate_sbf) * rows_sbf.to(gate_sbf.dtype)
        return self.linear_fc2(inter_sbf)
