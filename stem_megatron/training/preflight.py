"""What a training run checks before step 1, so that a user's mistake costs seconds, not a run.

- `check_inputs(cfg)`: the tokenizer loads and fits `model.vocab_size`; every data prefix names a
  non-empty `.bin/.idx` pair. Every rank reads the same files, so every rank finds the same
  problem; `--dry-run` runs it too (as a warning: the paper configs dry-run without their data).
- `check_outputs(cfg, summary_json, is_logger)`: `checkpoint.save` (every rank writes shards into
  it), and on the logging rank `logging.tensorboard_dir` and `--summary-json`, can be created and
  written. Today's failure mode it prevents: an unwritable save directory found at the first save,
  after all the training.

Both raise `UserError` with the exit code the docs give: 4 for `checkpoint.save`, 2 otherwise.
stem-train runs them through `errors.agree`, so a problem seen on any rank ends every rank.
"""

from __future__ import annotations

import os
import tempfile

from stem_megatron.config import ExperimentConfig
from stem_megatron.errors import EXIT_CHECKPOINT, EXIT_INPUT, UserError


def load_checked_tokenizer(cfg: ExperimentConfig):
    """The run's tokenizer, checked against `model.vocab_size` (UserError, exit 2)."""
    from stem_megatron.data.tokenizer import TokenizerError, load_tokenizer

    d = cfg.data
    if d.tokenizer is None:
        raise UserError("data.tokenizer=null: training needs the tokenizer (its end-of-document id), "
                        "also with data.mock=true")
    try:
        tokenizer = load_tokenizer(d.tokenizer, d.tokenizer_type)
    except TokenizerError as e:
        raise UserError(f"data.tokenizer: {e}") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of "
                        f"data.tokenizer={d.tokenizer} ({tokenizer.vocab_size} tokens); set model.vocab_size "
                        f">= {tokenizer.vocab_size}")
    return tokenizer


def check_data(cfg: ExperimentConfig) -> None:
    """Every prefix of `data.data_path` is a `.bin/.idx` pair holding tokens (UserError, exit 2)."""
    from stem_megatron.data.datasets import DataError, parse_blend

    if cfg.data.mock:
        return
    try:
        prefixes, _ = parse_blend(cfg.data.data_path)
    except DataError as e:
        raise UserError(str(e)) from None
    for prefix in prefixes:
        if os.path.getsize(prefix + ".bin") == 0:
            raise UserError(f"data.data_path: the dataset {prefix} holds no tokens (0 documents); "
                            "re-run stem-preprocess on an input that has documents")


def check_inputs(cfg: ExperimentConfig):
    """Tokenizer and data checks; returns the tokenizer."""
    tokenizer = load_checked_tokenizer(cfg)
    check_data(cfg)
    return tokenizer


def _writable_dir(path: str) -> str | None:
    """Create `path` (and parents) and write a probe file in it; the reason it fails, or None."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return _file_in_the_way(path) or e.strerror or str(e)
    return None


def _file_in_the_way(path: str) -> str | None:
    """'PATH is a regular file' for the first component of `path` that is one."""
    p = os.path.abspath(path)
    parts = []
    while p and p != os.path.dirname(p):
        parts.append(p)
        p = os.path.dirname(p)
    for q in reversed(parts):
        if os.path.exists(q) and not os.path.isdir(q):
            return f"{q} is a file, not a directory"
    return None


def default_log_dir(cfg: ExperimentConfig) -> str:
    """`logging.tensorboard_dir`, else `{checkpoint.save or runs/<run_name>}/tensorboard`."""
    return cfg.logging.tensorboard_dir or os.path.join(
        cfg.checkpoint.save or os.path.join("runs", cfg.logging.run_name), "tensorboard"
    )


def check_outputs(cfg: ExperimentConfig, summary_json: str | None, is_logger: bool, log_dir: str) -> None:
    """Create and probe the run's output directories (UserError: exit 4 for checkpoint.save, else 2)."""
    save = cfg.checkpoint.save
    if save:
        why = _writable_dir(save)
        if why:
            raise UserError(f"checkpoint.save={save} is not writable ({why}); nothing was trained",
                            EXIT_CHECKPOINT)
    if not is_logger:
        return
    why = _writable_dir(log_dir)
    if why:
        key = "logging.tensorboard_dir" if cfg.logging.tensorboard_dir else "the TensorBoard directory"
        raise UserError(f"{key}={log_dir} is not writable ({why}); nothing was trained", EXIT_INPUT)
    if summary_json:
        if os.path.isdir(summary_json):
            raise UserError(f"--summary-json {summary_json} is a directory; give a file path")
        why = _writable_dir(os.path.dirname(os.path.abspath(summary_json)))
        if why is None and os.path.exists(summary_json) and not os.access(summary_json, os.W_OK):
            why = "the file is read-only"
        if why:
            raise UserError(f"--summary-json {summary_json} is not writable ({why}); nothing was trained")
