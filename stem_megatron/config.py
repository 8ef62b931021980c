"""Typed experiment configuration: one keyword-only dataclass per component, YAML + dotted overrides.

`ExperimentConfig` composes ModelConfig, ParallelConfig, StemConfig, TrainConfig, DataConfig,
LoggingConfig and CheckpointConfig. YAML is the serialised form; the command line overrides any
field with `section.field=value` (`train.lr=3e-4`). Unknown keys, wrong types and inconsistent
values raise `ConfigError` with a one-line message naming the key and the rule.

Checks that need the world size (data-parallel size, `stem.shard_size` dividing it, the global
batch) live in `ExperimentConfig.validate_world(world_size)`, called by the trainer once the
process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the key and the rule."""


STEM_RATIOS = ("one_third", "half", "all")
LR_SCHEDULES = ("cosine", "wsd", "constant")


@dataclass(kw_only=True)
class ModelConfig:
    """Transformer shape (Llama-style: RMSNorm, SwiGLU, RoPE, optional GQA)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int  # the tokenizer's vocabulary; padded internally for TP / table sharding
    seq_length: int
    num_query_groups: int | None = None  # GQA: KV heads; None = one per attention head
    kv_channels: int | None = None  # head dim; None = hidden_size // num_attention_heads
    rotary_base: float = 10000.0  # RoPE theta
    normalization: str = "RMSNorm"  # RMSNorm | LayerNorm
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = True  # share input embedding and output layer
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    transformer_impl: str = "auto"  # auto (TE when importable and on GPU) | local | transformer_engine


@dataclass(kw_only=True)
class ParallelConfig:
    """megatron-core parallel layout; the data-parallel size is world // (TP * PP * CP)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None  # model chunks per pipeline rank
    sequence_parallel: bool = False
    context_parallel_size: int = 1  # needs Transformer Engine
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False


@dataclass(kw_only=True)
class StemConfig:
    """Which layers are STEM layers, and how their tables are stored and optimised.

    `layers` (explicit 0-based global layer indices) and `ratio` are mutually exclusive; neither
    means a dense model. Placement rule for `ratio`: k = floor(L / 3), floor(L / 2) or L STEM
    layers, at indices floor((j + 0.5) * L / k) for j in 0..k-1 (evenly spaced, centred).
    """

    layers: list[int] | None = None
    ratio: str | None = None  # one_third | half | all
    shard_size: int | None = None  # STEM shard group size; None = the whole DP x CP group
    init_std: float | None = None  # None = xavier-normal over (vocab, ffn): sqrt(2 / (V + F))
    lr: float | None = None  # None = train.lr
    min_lr: float | None = None  # None = train.min_lr
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # None = train.warmup_steps
    lr_schedule: str | None = None  # None = train.lr_schedule
    deterministic: bool = False  # bitwise-reproducible sparse gradient accumulation


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation and schedule. Batch sizes are in sequences."""

    micro_batch_size: int
    global_batch_size: int
    train_steps: int
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 0
    decay_steps: int | None = None  # None = train_steps - warmup_steps
    wsd_decay_fraction: float = 0.1  # WSD: fraction of steps in the final decay
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global norm over dense and table gradients; 0 disables
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    seed: int = 1234
    recompute_granularity: str | None = None  # None | full | selective
    recompute_method: str | None = None  # uniform | block (full recompute)
    recompute_num_layers: int | None = None
    eval_interval: int = 100  # steps; 0 disables
    eval_iters: int = 10
    max_skipped_steps: int = 10  # non-finite loss/grad: skip the step; abort after this many in a row


@dataclass(kw_only=True)
class DataConfig:
    """Indexed datasets (Megatron .bin/.idx) and the tokenizer that made them."""

    data_path: list = field(default_factory=list)  # [prefix] or [w1, prefix1, w2, prefix2, ...]
    split: str = "98,2,0"  # train, valid, test weights
    tokenizer: str | None = None  # tokenizer.json, *.tiktoken, *.model, or a vocab.json+merges.txt dir
    tokenizer_type: str | None = None  # overrides detection from the path
    cache_path: str | None = None  # index cache; None = next to the data
    mock: bool = False  # synthetic random tokens (tests, dry runs); ignores data_path
    num_workers: int = 0
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False


@dataclass(kw_only=True)
class LoggingConfig:
    log_interval: int = 10
    tensorboard_dir: str | None = None  # None = {checkpoint.save or runs/<name>}/tensorboard
    run_name: str = "stem"


@dataclass(kw_only=True)
class CheckpointConfig:
    save: str | None = None  # directory; None = no checkpoints
    load: str | None = None  # directory or a checkpoint inside it; None = resume from `save` if present
    save_interval: int = 0  # steps; 0 = only at the end
    keep_last: int = 3


@dataclass(kw_only=True)
class ExperimentConfig:
    model: ModelConfig
    train: TrainConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    stem: StemConfig = field(default_factory=StemConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
