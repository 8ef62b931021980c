"""megatron-core GPT models whose chosen layers use the STEM MLP.

`build_model_chunks(cfg, engine_factory)` returns this rank's model chunks (one per virtual
pipeline stage). Dense layers use megatron's SwiGLU `MLP`; STEM layers use `StemMLP`, chosen
per layer by `ModuleSpec`. The local spec is used without Transformer Engine, the TE spec with it.

Token ids reach the STEM layers through the model's own forward (`StemGPTModel.forward` takes
`input_ids` on every pipeline stage): one table exchange per micro-batch and chunk produces a
`StemContext` that every STEM MLP of the chunk reads. The rows' lifecycle (prefetch queue,
current context, backward-start hook, gradient folding) is the chunk's `MicroBatchRows`
(stem/microbatch.py), handed to its STEM MLPs through their module spec.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from stem_megatron.megatron_version import require_tested

# Before any megatron import: an untested megatron-core stops here with one line (README, "Supported
# megatron-core"), not with whatever its first incompatible import raises.
require_tested()

from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from stem_megatron.config import ExperimentConfig
from stem_megatron.stem.microbatch import MicroBatchRows
from stem_megatron.stem.mlp import StemMLP

try:  # Transformer Engine is optional (GPU clusters / NGC containers)
    import transformer_engine  # noqa: F401
    from megatron.core.extensions.transformer_engine import (
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    HAVE_TE = True
    TE_IMPORT_ERROR = None
except Exception as _e:  # ImportError, or TE present but broken for this torch/CUDA
    HAVE_TE = False
    # Not installed is normal (CPU boxes); installed but failing to import is worth one line
    # (train.py reports it), since `transformer_impl: auto` then silently runs the local path.
    _missing = isinstance(_e, ModuleNotFoundError) and _e.name == "transformer_engine"
    TE_IMPORT_ERROR = None if _missing else f"{type(_e).__name__}: {_e}".replace("\n", " ")


# TransformerLayer warns "Unknown MLP type" for any MLP class it does not know (it then passes no
# tp_group, and StemMLP takes megatron's default TP group): expected for StemMLP, so not shown.
logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(
    lambda record: "Unknown MLP type" not in record.getMessage()
)


class Norm(torch.nn.Module):
    """RMSNorm / LayerNorm for the local spec.

    megatron's torch fallback (`WrappedTorchNorm`) refuses sequence parallelism; this one tags its
    parameters `sequence_parallel` so `finalize_model_grads` all-reduces their gradients over TP.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x):
        if self.rms:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def use_transformer_engine(cfg: ExperimentConfig) -> bool:
    impl = cfg.model.transformer_impl
    if impl == "transformer_engine":
        if not HAVE_TE:
            from stem_megatron.config import ConfigError

            raise ConfigError("model.transformer_impl=transformer_engine but Transformer Engine does not import"
                              + (f" ({TE_IMPORT_ERROR})" if TE_IMPORT_ERROR else " (not installed)"))
        return True
    if impl == "local":
        return False
    return HAVE_TE and torch.cuda.is_available()


def transformer_config(cfg: ExperimentConfig) -> TransformerConfig:
    """megatron TransformerConfig for this experiment (Llama-style: RMSNorm, SwiGLU, RoPE, no biases)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    on_gpu = torch.cuda.is_available()
    bf16 = t.precision == "bf16" or (t.precision == "auto" and on_gpu)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        context_parallel_size=p.context_parallel_size,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=not on_gpu,
        recompute_granularity=t.recompute_granularity,
        recompute_method=t.recompute_method,
        recompute_num_layers=t.recompute_num_layers,
        # Fused kernels need apex/TE/CUDA; the unfused paths compute the same function.
        bias_activation_fusion=False,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        batch_p2p_sync=on_gpu,
        # gloo trap: batch_isend_irecv posts the activation and the gradient for the same peer on the
        # same tag (PP=2 with VPP), and gloo may match them swapped: silently wrong results. The
        # unbatched path sends the two directions on two different groups.
        batch_p2p_comm=on_gpu,
    )


def _stem_mlp_spec(use_te: bool) -> ModuleSpec:
    if use_te:
        fc1, fc2 = TELayerNormColumnParallelLinear, TERowParallelLinear
    else:
        fc1, fc2 = ColumnParallelLinear, RowParallelLinear
    return ModuleSpec(module=StemMLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2))


def layer_spec(cfg: ExperimentConfig, *, stem: bool, use_te: bool) -> ModuleSpec:
    """Spec of one transformer layer: megatron's GPT layer, with the MLP swapped for STEM layers."""
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization=cfg.model.normalization)
        spec = copy.deepcopy(spec)
        spec.submodules.input_layernorm = Norm
        spec.submodules.pre_mlp_layernorm = Norm
    if stem:
        spec = copy.deepcopy(spec)
        spec.submodules.mlp = _stem_mlp_spec(use_te)
    return spec


def block_spec(cfg: ExperimentConfig, tcfg: TransformerConfig, *, use_te: bool, vp_stage: int | None):
    """This pipeline stage's (and virtual stage's) layer specs, each STEM or dense by global index."""
    stem_layers = set(cfg.stem.stem_layer_indices(cfg.model.num_layers))
    offset = get_transformer_layer_offset(tcfg, vp_stage=vp_stage)
    n_local = get_num_layers_to_build(tcfg, vp_stage=vp_stage)
    specs = [layer_spec(cfg, stem=(offset + i) in stem_layers, use_te=use_te) for i in range(n_local)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=TENorm if use_te else Norm)


class StemGPTModel(GPTModel):
    """GPTModel whose STEM layers read table rows exchanged once per micro-batch.

    `engine_factory(layer_ids)` builds the table engine for this chunk's STEM layers (global 0-based
    indices); it is not called for a chunk without STEM layers. The engine is a plain object, not a
    submodule: tables stay out of DDP, of `Float16Module`'s cast and of megatron's optimizer.
    """

    def __init__(self, *args, engine_factory: Callable | None = None, rope_from_position_ids: bool = False,
                 transformer_layer_spec=None, **kwargs):
        rows = MicroBatchRows()
        super().__init__(*args, transformer_layer_spec=_with_rows(transformer_layer_spec, rows), **kwargs)
        self.stem_rows = rows
        # megatron 0.16.1's GPTModel computes RoPE for positions 0..S-1 and ignores position_ids
        # (they only feed learned absolute embeddings); document resets need RoPE at the given ids.
        self.rope_from_position_ids = rope_from_position_ids
        self.stem_mlps: list[StemMLP] = [m for m in self.modules() if isinstance(m, StemMLP)]
        layer_ids = [m.layer_number - 1 for m in self.stem_mlps]
        self.stem_slot_of_layer = {layer: slot for slot, layer in enumerate(layer_ids)}
        self.stem_engine = None
        if layer_ids:
            if engine_factory is None:
                raise ValueError("the model has STEM layers but no engine_factory was given")
            self.stem_engine = engine_factory(layer_ids)
            rows.bind(self.stem_engine, self.stem_slot_of_layer)

    @property
    def stem_prefetch_hits(self) -> int:
        """Lookups served by a prefetch (for tests and logging)."""
        return self.stem_rows.prefetch_hits

    def prefetch_stem(self, input_ids: torch.Tensor) -> None:
        """Start the table exchange for a coming micro-batch (its ids are known before its forward).

        Routing and owner-side gathers run now; the rows' return all-to-all stays in flight until
        that micro-batch's forward. Every rank of the STEM shard group must prefetch the same
        micro-batches in the same order (data-parallel ranks run the same schedule).
        """
        if self.stem_engine is not None:
            self.stem_rows.prefetch(input_ids)

    def prefetch_stem_step(self, ids_list: list[torch.Tensor]) -> None:
        """`stem.exchange_scope: step`: one exchange for all of a step's micro-batches, queued in order."""
        if self.stem_engine is not None:
            self.stem_rows.prefetch_step(ids_list)

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        emb_S11D = out[1]
        if not self.rope_from_position_ids or emb_S11D is None or position_ids is None:
            return out
        # Per-token angles: row p of the table for positions 0..S-1 is position p's (S >= every id).
        # [S, B, 1, D] broadcasts over heads in megatron's unfused rotary application (apply_rope_fusion
        # is off); each sample then gets its own positions.
        emb_SB1D = emb_S11D[:, 0].index_select(0, position_ids.t().reshape(-1))
        emb_SB1D = emb_SB1D.view(position_ids.shape[1], position_ids.shape[0], *emb_S11D.shape[2:])
        return (out[0], emb_SB1D, *out[2:])

    def forward(self, input_ids, position_ids, attention_mask, *args, stem_ids=None, **kwargs):
        """GPTModel.forward; `stem_ids` [b, s] (default `input_ids`) are the ids the STEM tables are
        read at, so knowledge editing can change the rows without changing the input text."""
        ctx = None
        if self.stem_engine is not None:
            if input_ids is None:
                raise ValueError("STEM layers need input_ids on every pipeline stage")
            table_ids = input_ids if stem_ids is None else stem_ids
            if table_ids.shape != input_ids.shape:
                raise ValueError(f"stem_ids {tuple(table_ids.shape)} must have the shape of input_ids "
                                 f"{tuple(input_ids.shape)}")
            ctx = self.stem_rows.begin_forward(table_ids)
        out = super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        if ctx is not None and torch.is_grad_enabled() and out.requires_grad:
            # At this micro-batch's backward start: its rows current again (recompute), earlier ones folded.
            out.register_hook(self.stem_rows.backward_hook(ctx))
        return out


def _with_rows(block_spec, rows: MicroBatchRows):
    """A copy of `block_spec` whose STEM MLP specs pass `rows` to the modules they build."""
    if block_spec is None or not hasattr(block_spec, "layer_specs"):
        return block_spec
    specs = []
    for spec in block_spec.layer_specs:
        mlp = getattr(spec.submodules, "mlp", None)
        if isinstance(mlp, ModuleSpec) and mlp.module is StemMLP:
            mlp = copy.copy(mlp)
            mlp.params = {**(mlp.params or {}), "rows": rows}
            sub = copy.copy(spec.submodules)
            sub.mlp = mlp
            spec = copy.copy(spec)
            spec.submodules = sub
        specs.append(spec)
    out = copy.copy(block_spec)
    out.layer_specs = specs
    return out


def build_model_chunks(cfg: ExperimentConfig, engine_factory: Callable | None = None) -> list[StemGPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), on the current device.

    Needs megatron parallel_state to be initialised with cfg's layout.
    """
    tcfg = transformer_config(cfg)
    use_te = use_transformer_engine(cfg)
    if use_te and cfg.data.reset_attention_mask:
        # TE's causal attention ignores an explicit mask; document masking would need packed (THD)
        # sequences with cu_seqlens, which this trainer does not build.
        raise ValueError("data.reset_attention_mask=true needs model.transformer_impl=local "
                         "(the Transformer Engine attention would ignore the document mask)")
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    tp = cfg.parallel.tensor_model_parallel_size
    chunks = []
    for vp_stage in range(vpp) if vpp else [None]:
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        model = StemGPTModel(
            config=tcfg,
            transformer_layer_spec=block_spec(cfg, tcfg, use_te=use_te, vp_stage=vp_stage),
            vocab_size=cfg.model.padded_vocab_size(tp),
            max_sequence_length=cfg.model.seq_length,
            pre_process=pre,
            post_process=post,
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=cfg.model.rotary_base,
            rope_scaling=cfg.model.rope_scaling_factor is not None,
            rope_scaling_factor=cfg.model.rope_scaling_factor or 8.0,
            vp_stage=vp_stage,
            engine_factory=engine_factory,
            rope_from_position_ids=cfg.data.reset_position_ids,
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


def stem_engine_factory(cfg: ExperimentConfig) -> Callable | None:
    """Engine factory for `build_model_chunks`, or None for a dense model.

    Builds the STEM shard/replica groups (a collective: every rank calls this once, after
    `initialize_model_parallel`). Tables are fp32 masters; rows used in compute follow the model's
    dtype (bf16 on GPU).
    """
    if not cfg.stem.stem_layer_indices(cfg.model.num_layers):
        return None
    from stem_megatron.stem.engine import StemTableEngine
    from stem_megatron.stem.groups import build_stem_groups
    from stem_megatron.stem.ownership import RowOwnership

    groups = build_stem_groups(cfg.stem.shard_size)
    tcfg = transformer_config(cfg)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    rows_local = RowOwnership(cfg.model.vocab_size, groups.shard_size).rows_local

    def factory(layer_ids: list[int]):
        return StemTableEngine(
            vocab_size=cfg.model.vocab_size,
            layer_ids=layer_ids,
            ffn_hidden_size=cfg.model.ffn_hidden_size,
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            tp_size=parallel_state.get_tensor_model_parallel_world_size(),
            shard_group=groups.shard_group,
            replica_group=groups.replica_group,
            init_std=cfg.stem.init_std,
            seed=cfg.train.seed,
            compute_dtype=tcfg.params_dtype,
            device=device,
            deterministic=cfg.stem.deterministic,
            exchange=cfg.stem.exchange,
            ranks_per_node=cfg.stem.ranks_per_node or _local_world_size(),
            offload=cfg.stem.offload,
            cache_rows=cfg.stem.cache_rows_for(rows_local),
            cache_policy=cfg.stem.cache_policy,
            host_update=cfg.stem.host_update,
        )

    return factory


def _local_world_size() -> int:
    """Ranks per node: torchrun's LOCAL_WORLD_SIZE; without it, one node holds the whole world."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
