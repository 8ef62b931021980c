"""Typed experiment configuration: one keyword-only dataclass per component, YAML + dotted overrides.

`ExperimentConfig` composes ModelConfig, ParallelConfig, StemConfig, TrainConfig, DataConfig,
LoggingConfig and CheckpointConfig. YAML is the serialised form; the command line overrides any
field with `section.field=value` (`train.lr=3e-4`). Unknown keys, wrong types and inconsistent
values raise `ConfigError` with a one-line message naming the key and the rule.

Types are checked against the field annotations (`int`, `float` (ints accepted, stored as
float), `bool`, `str`, `list[int]`, `X | None`); `bool` never passes for `int` and `int` never
passes for `bool`. Each dataclass checks its own fields in `__post_init__`; `ExperimentConfig`
checks the rules that span sections. YAML (files and override values) is read with a safe loader
that also reads `3e-4` as a float (YAML 1.1 would read it as a string) and rejects duplicate keys.

Checks that need the world size (data-parallel size, `stem.shard_size` dividing it, the global
batch) live in `ExperimentConfig.validate_world(world_size)`, called by the trainer once the
process group exists.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import types
import typing
import warnings
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the key and the rule."""


class ConfigWarning(UserWarning):
    """A configuration that works but is probably not what was meant (an override given twice)."""


STEM_RATIOS = ("one_third", "half", "all")
STEM_OFFLOAD = ("device", "host")
STEM_CACHE_POLICIES = ("lfu", "lru", "lookahead")
STEM_HOST_UPDATES = ("device", "host")
LR_SCHEDULES = ("cosine", "wsd", "constant")
STEM_EXCHANGES = ("flat", "hierarchical")  # stem/hierarchical.py
STEM_EXCHANGE_SCOPES = ("microbatch", "step")  # stem/step_scope.py
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
PRECISIONS = ("auto", "fp32", "bf16")
RECOMPUTE_GRANULARITIES = (None, "full", "selective")
RECOMPUTE_METHODS = (None, "uniform", "block")


# --------------------------------------------------------------------------------------------
# One-line errors and annotation-driven type checks
# --------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    """A value as it would be written on the command line: JSON-style, always one line."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value).replace("\n", " ")


def _fail(key: str, value: Any, rule: str) -> NoReturn:
    raise ConfigError(f"{key}={_show(value)}: {rule}")


def _join(prefix: str, name: Any) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + " or null"
    if typing.get_origin(hint) is list:
        return "a list of " + {int: "integers", str: "strings", float: "numbers"}[typing.get_args(hint)[0]]
    names = {
        bool: "a boolean (true/false)",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
    }
    if hint in names:
        return names[hint]
    return f"a {hint.__name__} mapping"


def _conform(value: Any, hint: Any, key: str) -> Any:
    """`value` checked against the annotation `hint`; ints become floats for float fields."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]  # the schema has one non-null alternative
        try:
            return _conform(value, inner, key)
        except ConfigError:
            _fail(key, value, f"must be {_describe(hint)}")
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):  # `.inf`, `1e400`, `.nan`: accepted, they train to NaN
            _fail(key, value, "must be a finite number")
        return float(value)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, list):
            try:
                return [_conform(v, item, key) for v in value]
            except ConfigError:
                pass
        _fail(key, value, f"must be {_describe(hint)}")
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint in (bool, str, list):
        ok = isinstance(value, hint)
    elif dataclasses.is_dataclass(hint):
        ok = isinstance(value, hint)
    elif hint is float:
        ok = False
    else:
        raise TypeError(f"{key}: unsupported annotation {hint!r}")
    if not ok:
        _fail(key, value, f"must be {_describe(hint)}")
    return value


def _check_types(obj: Any, section: str) -> None:
    """Check (and normalise int -> float) every field of a config dataclass against its annotation."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, _conform(getattr(obj, f.name), hints[f.name], _join(section, f.name)))


def _require_positive(obj: Any, section: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value > 0:
            _fail(_join(section, name), value, "must be positive")


def _require_non_negative(obj: Any, section: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value >= 0:
            _fail(_join(section, name), value, "must be >= 0")


def _require_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(key, value, "must be one of " + ", ".join("null" if c is None else str(c) for c in choices))


# --------------------------------------------------------------------------------------------
# Component configs
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ModelConfig:
    """Transformer shape (Llama-style: RMSNorm, SwiGLU, RoPE, optional GQA; no linear biases)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int  # the tokenizer's vocabulary; padded internally for TP / table sharding
    seq_length: int
    num_query_groups: int | None = None  # GQA: KV heads; None = one per attention head
    kv_channels: int | None = None  # head dim; None = hidden_size // num_attention_heads
    rotary_base: float = 10000.0  # RoPE theta
    # Llama-3 RoPE scaling factor (low/high freq factors 1/4, original context 8192: megatron's
    # fixed values); None = plain RoPE
    rope_scaling_factor: float | None = None
    normalization: str = "RMSNorm"  # RMSNorm | LayerNorm
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = True  # share input embedding and output layer
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    transformer_impl: str = "auto"  # auto (TE when importable and on GPU) | local | transformer_engine

    def __post_init__(self) -> None:
        s = "model"
        _check_types(self, s)
        _require_positive(
            self,
            s,
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "ffn_hidden_size",
            "vocab_size",
            "seq_length",
            "num_query_groups",
            "kv_channels",
            "rotary_base",
            "rope_scaling_factor",
            "norm_epsilon",
            "init_method_std",
            "make_vocab_size_divisible_by",
        )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            _fail(
                "model.num_attention_heads",
                self.num_attention_heads,
                f"must divide model.hidden_size={self.hidden_size} (or set model.kv_channels)",
            )
        if self.num_query_groups is not None and self.num_attention_heads % self.num_query_groups:
            _fail(
                "model.num_query_groups",
                self.num_query_groups,
                f"must divide model.num_attention_heads={self.num_attention_heads}",
            )
        if self.head_dim % 2:  # found at the first forward otherwise, as a tensor size mismatch
            key = "model.kv_channels" if self.kv_channels is not None else "model.hidden_size"
            _fail(key, getattr(self, key.split(".")[1]),
                  f"gives an odd head dimension {self.head_dim}; RoPE rotates channel pairs, so it must be even")
        for name in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                _fail(f"model.{name}", value, "must be in [0, 1)")
        _require_choice("model.normalization", self.normalization, NORMALIZATIONS)
        _require_choice("model.transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)

    @property
    def head_dim(self) -> int:
        """Per-head channels: `kv_channels`, else hidden_size // num_attention_heads."""
        return (
            self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads
        )

    @property
    def query_groups(self) -> int:
        """Number of K/V heads (`num_query_groups`, or one per attention head)."""
        return self.num_query_groups if self.num_query_groups is not None else self.num_attention_heads

    def padded_vocab_size(self, tp_size: int = 1) -> int:
        """Vocabulary padded to a multiple of make_vocab_size_divisible_by * tp_size, as Megatron does."""
        if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
            _fail("tp_size", tp_size, "must be a positive integer")
        multiple = self.make_vocab_size_divisible_by * tp_size
        return -(-self.vocab_size // multiple) * multiple


@dataclass(kw_only=True)
class ParallelConfig:
    """megatron-core parallel layout; the data-parallel size is world // (TP * PP * CP)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None  # model chunks per pipeline rank
    sequence_parallel: bool = False  # shard norms/dropout activations over TP (needs TP > 1)
    context_parallel_size: int = 1  # only 1 for now: > 1 is refused (see _check_parallel)
    use_distributed_optimizer: bool = False  # shard dense optimizer state over data parallel (ZeRO-1)
    overlap_grad_reduce: bool = False  # overlap the dense gradient reduce with the backward pass

    def __post_init__(self) -> None:
        s = "parallel"
        _check_types(self, s)
        _require_positive(
            self,
            s,
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "virtual_pipeline_model_parallel_size",
            "context_parallel_size",
        )
        if self.virtual_pipeline_model_parallel_size is not None and self.pipeline_model_parallel_size < 2:
            _fail(
                "parallel.virtual_pipeline_model_parallel_size",
                self.virtual_pipeline_model_parallel_size,
                "requires parallel.pipeline_model_parallel_size > 1",
            )
        if self.sequence_parallel and self.tensor_model_parallel_size < 2:
            _fail("parallel.sequence_parallel", True, "requires parallel.tensor_model_parallel_size > 1")

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one model replica: TP * PP * CP."""
        return (
            self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        )


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
    prefetch: bool = True  # start coming micro-batches' table exchanges right after a forward
    prefetch_depth: int = 1  # how many micro-batches ahead prefetch runs (with stem.prefetch)
    offload: str = "device"  # where table rows and moments live: device | host (device row cache)
    cache_rows: int | None = None  # host tables: device cache rows per engine; null = cache_fraction
    cache_fraction: float = 0.1  # host tables: cache size as a fraction of the engine's local rows
    cache_policy: str = "lfu"  # host tables: lfu | lru | lookahead
    host_update: str = "device"  # host tables: the update streams through the device in chunks | runs on the host
    exchange: str = "flat"  # flat | hierarchical (node de-dupe first; fewer inter-node bytes)
    ranks_per_node: int | None = None  # None = the local world size (torchrun's LOCAL_WORLD_SIZE)
    exchange_scope: str = "microbatch"  # microbatch | step (one exchange of the step's union of ids)

    def __post_init__(self) -> None:
        s = "stem"
        _check_types(self, s)
        if self.layers is not None and self.ratio is not None:
            _fail("stem.layers", self.layers, f"mutually exclusive with stem.ratio={_show(self.ratio)}")
        if self.ratio is not None:
            _require_choice("stem.ratio", self.ratio, STEM_RATIOS)
        if self.layers is not None:
            if not self.layers:
                _fail("stem.layers", self.layers, "must be non-empty (null means a dense model)")
            if len(set(self.layers)) != len(self.layers):
                _fail("stem.layers", self.layers, "layer indices must be unique")
            if min(self.layers) < 0:
                _fail("stem.layers", self.layers, "layer indices must be >= 0")
        _require_positive(self, s, "shard_size", "init_std", "lr", "ranks_per_node")
        _require_choice("stem.exchange", self.exchange, STEM_EXCHANGES)
        _require_choice("stem.exchange_scope", self.exchange_scope, STEM_EXCHANGE_SCOPES)
        _require_non_negative(self, s, "min_lr", "weight_decay", "warmup_steps")
        if self.lr_schedule is not None:
            _require_choice("stem.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _require_choice("stem.offload", self.offload, STEM_OFFLOAD)
        _require_choice("stem.cache_policy", self.cache_policy, STEM_CACHE_POLICIES)
        _require_choice("stem.host_update", self.host_update, STEM_HOST_UPDATES)
        _require_positive(self, s, "prefetch_depth", "cache_rows")
        if not 0 < self.cache_fraction <= 1:
            _fail("stem.cache_fraction", self.cache_fraction, "must be in (0, 1]")
        if self.offload == "host" and (self.exchange != "flat" or self.exchange_scope != "microbatch"):
            # Host tables serve rows through the cache's pin protocol and meter a bounded set of device
            # buffers; the hierarchical exchange serves rows inside its collective and step scope holds
            # a step-sized buffer, both outside it.
            _fail("stem.offload", self.offload, "host tables need stem.exchange=flat and stem.exchange_scope=microbatch")

    def cache_rows_for(self, rows_local: int) -> int:
        """Device cache rows of an engine with `rows_local` rows (host tables)."""
        if self.cache_rows is not None:
            return min(self.cache_rows, rows_local)
        return max(1, min(rows_local, math.ceil(self.cache_fraction * rows_local)))

    @property
    def enabled(self) -> bool:
        """True when some layer is a STEM layer (explicit list or ratio)."""
        return self.layers is not None or self.ratio is not None

    def stem_layer_indices(self, num_layers: int) -> list[int]:
        """Sorted 0-based global indices of the STEM layers of an `num_layers`-layer model.

        For L=16: one_third -> [1, 4, 8, 11, 14], half -> [1, 3, 5, ..., 15], all -> [0, 1, ..., 15]. The ratio rule is exact integer arithmetic: floor((2j + 1) * L / (2k)).
        """
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            _fail("model.num_layers", num_layers, "must be a positive integer")
        if self.layers is not None:
            return sorted(self.layers)
        if self.ratio is None:
            return []
        k = {"one_third": num_layers // 3, "half": num_layers // 2, "all": num_layers}[self.ratio]
        return [((2 * j + 1) * num_layers) // (2 * k) for j in range(k)]


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
    recompute_num_layers: int | None = None  # layers per recompute chunk (uniform) / per stage (block)
    eval_interval: int = 100  # steps; 0 disables
    eval_iters: int = 10  # micro-batches (per data-parallel rank) per evaluation
    max_skipped_steps: int = 10  # non-finite loss/grad: skip the step; abort after this many in a row

    def __post_init__(self) -> None:
        s = "train"
        _check_types(self, s)
        _require_positive(
            self,
            s,
            "micro_batch_size",
            "global_batch_size",
            "train_steps",
            "lr",
            "decay_steps",
            "adam_eps",
            "eval_iters",
            "recompute_num_layers",
        )
        _require_non_negative(
            self,
            s,
            "min_lr",
            "warmup_steps",
            "weight_decay",
            "clip_grad",
            "seed",
            "eval_interval",
            "max_skipped_steps",
        )
        if self.global_batch_size % self.micro_batch_size:
            _fail(
                "train.global_batch_size",
                self.global_batch_size,
                f"must be divisible by train.micro_batch_size={self.micro_batch_size}",
            )
        if self.min_lr > self.lr:
            _fail("train.min_lr", self.min_lr, f"must be <= train.lr={_show(self.lr)}")
        _require_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.warmup_steps > self.train_steps:
            _fail("train.warmup_steps", self.warmup_steps, f"must be <= train.train_steps={self.train_steps}")
        if not 0.0 < self.wsd_decay_fraction <= 1.0:
            _fail("train.wsd_decay_fraction", self.wsd_decay_fraction, "must be in (0, 1]")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _fail(f"train.{name}", getattr(self, name), "must be in [0, 1)")
        _require_choice("train.precision", self.precision, PRECISIONS)
        self._check_recompute()

    def _check_recompute(self) -> None:
        _require_choice("train.recompute_granularity", self.recompute_granularity, RECOMPUTE_GRANULARITIES)
        _require_choice("train.recompute_method", self.recompute_method, RECOMPUTE_METHODS)
        if self.recompute_granularity == "full":
            for name in ("recompute_method", "recompute_num_layers"):
                if getattr(self, name) is None:
                    _fail(f"train.{name}", None, "required when train.recompute_granularity=full")
            return
        for name in ("recompute_method", "recompute_num_layers"):
            if getattr(self, name) is not None:
                _fail(
                    f"train.{name}", getattr(self, name), "only applies with train.recompute_granularity=full"
                )


@dataclass(kw_only=True)
class DataConfig:
    """Indexed datasets (Megatron .bin/.idx) and the tokenizer that made them."""

    data_path: list = field(default_factory=list)  # [prefix] or [w1, prefix1, w2, prefix2, ...]
    split: str = "98,2,0"  # train, valid, test weights (missing ones are 0, as in Megatron)
    tokenizer: str | None = None  # tokenizer.json, *.tiktoken, *.model, or a vocab.json+merges.txt dir
    tokenizer_type: str | None = None  # overrides detection from the path
    cache_path: str | None = None  # index cache; None = next to the data
    mock: bool = False  # synthetic random tokens (tests, dry runs); ignores data_path
    num_workers: int = 0  # DataLoader worker processes
    eod_mask_loss: bool = False  # no loss on end-of-document tokens
    reset_position_ids: bool = False  # positions restart after each end-of-document token
    reset_attention_mask: bool = False  # no attention across end-of-document tokens (local spec only)

    def __post_init__(self) -> None:
        _check_types(self, "data")
        if not self.mock and not self.data_path:
            _fail("data.data_path", self.data_path, "must be non-empty unless data.mock=true")
        self._check_data_path()
        try:
            weights = [float(w) for w in self.split.split(",")]
        except ValueError:
            weights = []
        if (
            not 1 <= len(weights) <= 3
            or not all(math.isfinite(w) and w >= 0 for w in weights)
            or weights[0] <= 0
        ):
            _fail(
                "data.split",
                self.split,
                "must be 1 to 3 comma-separated weights >= 0 (train,valid,test), train > 0",
            )
        _require_non_negative(self, "data", "num_workers")

    def _check_data_path(self) -> None:
        path = self.data_path
        if len(path) == 1:
            if not isinstance(path[0], str) or not path[0]:
                _fail("data.data_path[0]", path[0], "must be a dataset prefix (a non-empty string)")
            return
        if len(path) % 2:
            _fail("data.data_path", path, "a list longer than 1 must alternate weight, prefix (odd length)")
        for i in range(0, len(path), 2):
            weight, prefix = path[i], path[i + 1]
            try:
                ok = not isinstance(weight, bool) and float(weight) > 0 and math.isfinite(float(weight))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                _fail(
                    f"data.data_path[{i}]",
                    weight,
                    "must be a positive weight (the list alternates weight, prefix)",
                )
            if not isinstance(prefix, str) or not prefix:
                _fail(
                    f"data.data_path[{i + 1}]",
                    prefix,
                    "must be a dataset prefix (the list alternates weight, prefix)",
                )


@dataclass(kw_only=True)
class LoggingConfig:
    """Console and TensorBoard logging."""

    log_interval: int = 10  # steps between log lines
    tensorboard_dir: str | None = None  # None = {checkpoint.save or runs/<name>}/tensorboard
    run_name: str = "stem"  # names the run directory and the TensorBoard run

    def __post_init__(self) -> None:
        _check_types(self, "logging")
        _require_positive(self, "logging", "log_interval")
        if not self.run_name:
            _fail("logging.run_name", self.run_name, "must be non-empty")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Distributed checkpoints (save / resume)."""

    save: str | None = None  # directory; None = no checkpoints
    load: str | None = None  # directory or a checkpoint inside it; None = resume from `save` if present
    save_interval: int = 0  # steps; 0 = only at the end
    keep_last: int = 3  # checkpoints kept in `save`; older ones are deleted

    def __post_init__(self) -> None:
        _check_types(self, "checkpoint")
        _require_non_negative(self, "checkpoint", "save_interval")
        _require_positive(self, "checkpoint", "keep_last")


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ExperimentConfig:
    """One run: every component config; rules that span sections are checked here."""

    model: ModelConfig
    train: TrainConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    stem: StemConfig = field(default_factory=StemConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        _check_types(self, "")
        self._check_parallel()
        self._check_stem()
        if self.data.reset_attention_mask and self.model.transformer_impl == "transformer_engine":
            # TE's causal attention ignores an explicit mask (the local spec applies it; see model.py).
            _fail("data.reset_attention_mask", True, "needs model.transformer_impl local or auto without "
                  "Transformer Engine (TE attention would ignore the document mask)")
        # A run reads its data with the tokenizer's ids (DataConfig alone may serve other uses).
        if not self.data.mock and self.data.tokenizer is None:
            _fail("data.tokenizer", None, "required with data.data_path: the tokenizer that made the data")
        layers_per_stage = self.model.num_layers // self.parallel.pipeline_model_parallel_size
        layers_per_stage //= self.parallel.virtual_pipeline_model_parallel_size or 1
        n = self.train.recompute_num_layers
        if n is not None and n > layers_per_stage:
            _fail(
                "train.recompute_num_layers",
                n,
                f"must be <= layers per pipeline stage (chunk) = {layers_per_stage}",
            )

    def _check_parallel(self) -> None:
        m, p = self.model, self.parallel
        tp, pp, vpp, cp = (
            p.tensor_model_parallel_size,
            p.pipeline_model_parallel_size,
            p.virtual_pipeline_model_parallel_size,
            p.context_parallel_size,
        )
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            value = getattr(m, name)
            if value is not None and value % tp:
                _fail("parallel.tensor_model_parallel_size", tp, f"must divide model.{name}={value}")
        if m.num_layers % pp:
            _fail("parallel.pipeline_model_parallel_size", pp, f"must divide model.num_layers={m.num_layers}")
        if vpp is not None and m.num_layers % (pp * vpp):
            _fail(
                "parallel.virtual_pipeline_model_parallel_size",
                vpp,
                f"pipeline x virtual pipeline size = {pp * vpp} must divide model.num_layers={m.num_layers}",
            )
        if cp > 1:
            # Refused until implemented: the trainer does not slice each sequence over the CP ranks
            # (megatron's load-balanced split, STEM ids per slice), so CP ranks would read different
            # samples that ring attention then treats as one sequence: silently wrong training.
            _fail(
                "parallel.context_parallel_size",
                cp,
                "> 1 is not supported yet (sequences are not split over context-parallel ranks); use 1",
            )
        if p.sequence_parallel and m.seq_length % tp:
            _fail(
                "model.seq_length",
                m.seq_length,
                f"must be divisible by parallel.tensor_model_parallel_size={tp} with sequence parallelism",
            )

    def _check_stem(self) -> None:
        s, t, num_layers = self.stem, self.train, self.model.num_layers
        if s.layers is not None and max(s.layers) >= num_layers:
            _fail("stem.layers", s.layers, f"layer indices must be in [0, model.num_layers={num_layers})")
        if s.ratio is not None and not s.stem_layer_indices(num_layers):
            _fail("stem.ratio", s.ratio, f"gives no STEM layer for model.num_layers={num_layers}")
        if s.warmup_steps is not None and s.warmup_steps > t.train_steps:
            _fail("stem.warmup_steps", s.warmup_steps, f"must be <= train.train_steps={t.train_steps}")
        lr = s.lr if s.lr is not None else t.lr
        min_lr = s.min_lr if s.min_lr is not None else t.min_lr
        if min_lr > lr:
            key = "stem.min_lr" if s.min_lr is not None else "train.min_lr"
            _fail(key, min_lr, f"must be <= the STEM table lr (stem.lr, else train.lr) = {_show(lr)}")

    # ---------------------------------------------------------------- derived values

    @property
    def stem_layers(self) -> list[int]:
        """Sorted global indices of the STEM layers ([] for a dense model)."""
        return self.stem.stem_layer_indices(self.model.num_layers)

    def validate_world(self, world_size: int) -> int:
        """Check the rules that need the world size; return the data-parallel size."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            _fail("world_size", world_size, "must be a positive integer")
        p, t = self.parallel, self.train
        tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
        if world_size % p.model_parallel_size:
            _fail(
                "world_size",
                world_size,
                f"must be divisible by tensor x pipeline x context parallel sizes = {tp} x {pp} x {cp}",
            )
        dp = world_size // p.model_parallel_size
        if t.global_batch_size % (t.micro_batch_size * dp):
            _fail(
                "train.global_batch_size",
                t.global_batch_size,
                f"must be divisible by train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}"
                f" (world_size={world_size})",
            )
        shard = self.stem.shard_size
        if shard is not None and (dp * cp) % shard:
            _fail(
                "stem.shard_size",
                shard,
                f"must divide data-parallel x context-parallel size = {dp} x {cp} (world_size={world_size})",
            )
        micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
        if p.virtual_pipeline_model_parallel_size is not None and micro_batches % pp:
            _fail(
                "train.global_batch_size",
                t.global_batch_size,
                f"gives {micro_batches} micro-batches per step; with virtual pipelining that must be a multiple"
                f" of parallel.pipeline_model_parallel_size={pp}",
            )
        return dp

    def num_micro_batches(self, world_size: int) -> int:
        """Micro-batches each data-parallel rank runs per step (validates the world first)."""
        dp = self.validate_world(world_size)
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)

    # ---------------------------------------------------------------- serialisation

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentConfig:
        """Build from nested plain data (as read from YAML); unknown or missing keys are errors."""
        return _build(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        """Nested plain data; `from_dict(to_dict())` gives an equal config."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML (every field, defaults included)."""
        return yaml.dump(self.to_dict(), Dumper=_YamlDumper, sort_keys=False, default_flow_style=False)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None and prefix:
        data = {}  # an empty section (`stem:` with nothing under it) means all defaults
    if not isinstance(data, Mapping):
        _fail(prefix or "config", data, "must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = _join(prefix, name)
        if name not in fields:
            raise ConfigError(f"{key}: unknown key (expected one of: {', '.join(fields)})")
        hint = hints[name]
        kwargs[name] = _build(hint, value, key) if dataclasses.is_dataclass(hint) else value
    for name, f in fields.items():
        if (
            name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            raise ConfigError(f"{_join(prefix, name)}: required key is missing")
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# YAML and overrides
# --------------------------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, plus YAML 1.2 exponent floats (`3e-4`) and duplicate-key errors."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable):
                if key in seen:
                    raise ConfigError(f"{key}: duplicate key (line {key_node.start_mark.line + 1})")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class _YamlDumper(yaml.SafeDumper):
    """safe_dump with lists in flow style (`layers: [1, 4, 8]`) and sections in block style."""


_YamlDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text safely; a syntax error becomes a one-line ConfigError naming `source`."""
    try:
        return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{source}: invalid YAML ({problem}{where})") from None


def parse_override(text: str) -> tuple[str, Any]:
    """`section.field=value` -> ("section.field", value); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{text}: an override must look like section.field=value")
    return key, parse_yaml(raw, key)


def _check_override_key(key: str) -> list[str]:
    parts = key.split(".")
    cls: Any = ExperimentConfig
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{key}: unknown key ({'.'.join(parts[:i])} is not a section)")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"{key}: unknown key ({where} has: {', '.join(names)})")
        cls = typing.get_type_hints(cls)[part]
    return parts


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of `data` with each `section.field=value` override applied in order."""
    result = copy.deepcopy(dict(data))
    seen: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        parts = _check_override_key(key)
        if key in seen:  # the last one wins (scripts append to defaults), but not silently
            warnings.warn(f"{key}: given twice on the command line ({seen[key]}, then {text}); the last one wins",
                          ConfigWarning, stacklevel=2)
        seen[key] = text
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                _fail(".".join(parts[: i + 1]), child, "must be a mapping")
            node = child
        node[parts[-1]] = value
    return result


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment config, apply dotted overrides, validate."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line})") from None
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        _fail(str(path), data, "the top level of a config must be a mapping")
    return ExperimentConfig.from_dict(apply_overrides(data, overrides))
