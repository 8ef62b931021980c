"""What a checkpoint records about its run, and whether another run may continue from it.

Written with every save, read by the trainer, `stem-export` and `stem-reshard`:
- `stem_checkpoint.json` (`write_meta` / `read_meta`): step, data position, skipped-step counters,
  the parallel layout (`layout_of`), precision, vocabulary padding, the table index, the RNG file
  list, the tokenizer copy, versions;
- `config.yaml` (`saved_config`): the resolved experiment config;
- `tokenizer/`: a copy of `data.tokenizer` when the config names one.
`check_compatible` refuses, with one line, a run whose model or training setup cannot continue
from the checkpoint, and notes what loads but not bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from stem_megatron.config import ExperimentConfig, load_config
from stem_megatron.training import checkpoint_format as fmt
from stem_megatron.training.checkpoint_format import CheckpointError

# Fields of `model` that define the saved tensors; the others (sequence length, dropout,
# transformer_impl) may change between runs.
MODEL_SHAPE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
    "query_groups", "head_dim", "normalization", "tie_embeddings",
)
# RNG states are restored only when these layout entries are unchanged (one stream per rank).
RNG_LAYOUT_KEYS = ("world_size", "tp", "pp", "vpp", "cp", "dp")


def layout_of(cfg: ExperimentConfig, world_size: int) -> dict:
    """The parallel layout of `cfg` at `world_size` (what a checkpoint records)."""
    p = cfg.parallel
    dp = cfg.validate_world(world_size)
    shard = cfg.stem.shard_size or dp * p.context_parallel_size
    return {
        "world_size": world_size, "tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
        "vpp": p.virtual_pipeline_model_parallel_size, "cp": p.context_parallel_size, "dp": dp,
        "shard_size": shard if cfg.stem_layers else None,
        "use_distributed_optimizer": p.use_distributed_optimizer,
    }


def saved_config(ckpt_dir: str) -> ExperimentConfig:
    try:
        return load_config(os.path.join(ckpt_dir, fmt.CONFIG))
    except ValueError as e:  # ConfigError
        raise CheckpointError(f"checkpoint {ckpt_dir}: its {fmt.CONFIG} does not validate ({e})") from None


def read_meta(ckpt_dir: str) -> dict:
    try:
        with open(os.path.join(ckpt_dir, fmt.META)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {fmt.META} is unreadable ({e})") from None
    if meta.get("format") != fmt.FORMAT or meta.get("version") != fmt.VERSION:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {fmt.META} is format {meta.get('format')!r} "
                              f"version {meta.get('version')}, expected {fmt.FORMAT!r} version {fmt.VERSION}")
    return meta


def weights_only(meta: dict) -> bool:
    """A checkpoint of weights without optimizer state (`stem-import`): model keys and table
    `weight`s only; a run loading it starts its optimizers fresh (step 0, zero moments)."""
    return meta.get("dense_optimizer", "plain") is None


def check_compatible(cfg: ExperimentConfig, meta: dict, saved: ExperimentConfig, ckpt_dir: str, bf16: bool) -> list[str]:
    """Raise CheckpointError (one line) if `cfg` cannot continue from this checkpoint.

    Returns notes (one line each) on what loads, but not bit for bit: today only a vocabulary
    padding that changes with TP.
    """
    def fail(what: str) -> None:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {what}")

    for name in MODEL_SHAPE_FIELDS:
        a, b = getattr(saved.model, name), getattr(cfg.model, name)
        if a != b:
            fail(f"saved with model.{name}={a}, this run has {b}")
    if saved.stem_layers != cfg.stem_layers:
        fail(f"saved with STEM layers {saved.stem_layers}, this run has {cfg.stem_layers}")
    from stem_megatron.training.checkpoint_dense import dense_format_problem  # megatron-core line

    problem = dense_format_problem(ckpt_dir, meta)
    if problem:
        fail(problem)
    if weights_only(meta):
        pass  # no optimizer state to match: any optimizer starts fresh from the weights
    elif meta["layout"]["use_distributed_optimizer"] != cfg.parallel.use_distributed_optimizer:
        fail(f"saved with parallel.use_distributed_optimizer={meta['layout']['use_distributed_optimizer']}, this run "
             f"has {cfg.parallel.use_distributed_optimizer}; the dense optimizer state formats differ")
    if meta["bf16"] != bf16:
        fail(f"saved with {'bf16' if meta['bf16'] else 'fp32'} parameters, this run uses {'bf16' if bf16 else 'fp32'}")
    if meta["global_batch_size"] != cfg.train.global_batch_size:
        fail(f"saved with train.global_batch_size={meta['global_batch_size']}; the data position "
             f"(consumed samples {meta['consumed_samples']}) needs the same global batch, this run has "
             f"{cfg.train.global_batch_size}")
    notes = []
    tp = cfg.parallel.tensor_model_parallel_size
    padded = cfg.model.padded_vocab_size(tp)
    if meta["padded_vocab_size"] != padded:
        notes.append(
            f"vocabulary padding changes from {meta['padded_vocab_size']} to {padded} rows (TP {meta['layout']['tp']} -> "
            f"{tp}): the {cfg.model.vocab_size} vocabulary rows of the embedding/output layer load exactly, padding rows "
            "are dropped or zero-filled, and the softmax over the padded vocabulary changes slightly; for bit-exact "
            "resharding choose model.make_vocab_size_divisible_by so that both paddings agree"
        )
    return notes


def _copy_tokenizer(cfg: ExperimentConfig, ckpt_dir: str) -> dict | None:
    """Copy `data.tokenizer` (a directory or one file) into the checkpoint; returns its index entry."""
    src = cfg.data.tokenizer
    if not (src and os.path.exists(src)):
        return None
    return copy_tokenizer(src, cfg.data.tokenizer_type, ckpt_dir)


def copy_tokenizer(src: str, kind: str | None, ckpt_dir: str) -> dict:
    """Copy tokenizer `src` (a directory or one file) into checkpoint `ckpt_dir`/tokenizer; returns the
    meta's `tokenizer` entry. `kind` None: detected from the files. Also used by stem-import."""
    from stem_megatron.data.tokenizer import detect_kind

    dst = os.path.join(ckpt_dir, fmt.TOKENIZER)
    kind = kind or detect_kind(src)
    if os.path.isdir(src):
        shutil.copytree(src, dst)
        return {"kind": kind, "path": fmt.TOKENIZER}
    os.makedirs(dst)
    shutil.copy2(src, dst)
    return {"kind": kind, "path": os.path.join(fmt.TOKENIZER, os.path.basename(src))}


def write_meta(trainer, ckpt_dir: str, table_files: list[dict]) -> None:
    """Rank 0: config.yaml, the tokenizer copy and stem_checkpoint.json of the trainer's state."""
    import megatron.core
    import torch

    cfg = trainer.cfg
    with open(os.path.join(ckpt_dir, fmt.CONFIG), "w") as f:
        f.write(cfg.to_yaml())
    tokenizer = _copy_tokenizer(cfg, ckpt_dir)
    layout = layout_of(cfg, trainer.info.world_size)
    meta = {
        "format": fmt.FORMAT, "version": fmt.VERSION, "step": trainer.step,
        "consumed_samples": trainer.step * cfg.train.global_batch_size,
        "global_batch_size": cfg.train.global_batch_size,
        "skipped_steps": trainer.skipped_steps, "consecutive_skips": trainer.consecutive_skips,
        "lr": trainer.dense_lr(trainer.step), "table_lr": trainer.table_lr(trainer.step),
        "layout": layout, "bf16": bool(trainer.bf16),
        "padded_vocab_size": cfg.model.padded_vocab_size(cfg.parallel.tensor_model_parallel_size),
        "dense_optimizer": "distributed_fully_reshardable" if cfg.parallel.use_distributed_optimizer else "plain",
        "tables": {
            "vocab_size": cfg.model.vocab_size, "ffn_hidden_size": cfg.model.ffn_hidden_size,
            "layers": cfg.stem_layers, "files": sorted(table_files, key=lambda e: e["path"]),
        } if cfg.stem_layers else None,
        "rng": {"layout": {k: layout[k] for k in RNG_LAYOUT_KEYS},
                "files": [os.path.join(fmt.RNG, f"rank{r:05d}.pt") for r in range(trainer.info.world_size)]},
        "tokenizer": tokenizer,
        "versions": {"torch": torch.__version__, "megatron_core": megatron.core.__version__},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    fmt.write_json_atomic(os.path.join(ckpt_dir, fmt.META), meta)
