"""The `stem-*` commands: one module per console script, and what every command does with a failure.

Layout and import rules (README.md, Layout; enforced by tests/test_import_rules.py):
- every console script's `main` and its argument parser live here, one module per command
  (train, preprocess, merge, train_tokenizer, sample_data, reshard, export, import_hf, eval,
  generate, edit, analyze); `python -m stem_megatron.cli.<command>` runs the same program;
- the library (the rest of `stem_megatron`, and `data_tools`) does the work and imports nothing
  from this package; its user-facing failures are `stem_megatron.errors.UserError` or its own
  error types;
- only this package imports `data_tools` (the rest of `stem_megatron` never imports `data_tools`,
  `launch` or `configs`).

What every command does with a failure: one line, the documented exit code, once.

    def main(argv=None):
        quiet_known_warnings()
        return run("stem-x", lambda: _main(argv), errors=((ConfigError, 2, ""), (CheckpointError, 4, "checkpoint error: ")))

- `run` maps the exceptions a user can cause (listed per tool in `errors`, plus `UserError`) to
  one line on stderr and an exit code; anything else is a bug and keeps its traceback. Ctrl-C
  (SIGINT) ends with one line and EXIT_INTERRUPTED, no traceback; whatever the tool leaves on
  disk is made safe by its own `finally` blocks, which still run.
- Under torchrun only rank 0 prints: the errors `run` maps are either the same on every rank
  (config validation, files every rank reads) or made so by `stem_megatron.errors.agree`, which
  every rank calls at the same point of a collective phase.
- `quiet_known_warnings` hides the third-party deprecation and future warnings that say nothing
  about the user's run (listed in KNOWN_WARNINGS, and log records in KNOWN_LOG_RECORDS); unknown
  warnings stay visible.

Exit codes (docs/errors.md): 0 done, 1 a bug (traceback), 2 input or configuration error, 3
non-finite abort, 4 checkpoint error, 130 interrupted.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable

from stem_megatron.errors import (  # noqa: F401 - re-exported: what commands need from one place
    EXIT_CHECKPOINT,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_NONFINITE,
    Errors,
    UserError,
    agree,
    classify,
    one_line,
    rank,
    te_import_failure,
)

# (category, message regex, module regex) of warnings third-party code emits on every run and that
# the user can do nothing about. Matched narrowly so that a new warning from the same place shows.
KNOWN_WARNINGS = (
    # megatron-core 0.16 TransformerConfig: its own default cuda_graph_scope triggers it.
    (UserWarning, r"full scope is deprecated", r"megatron\.core\.transformer\.transformer_config"),
    # megatron-core imports without Apex / Transformer Engine (CPU boxes): expected, reported once by us.
    (UserWarning, r".*(Apex|apex|Transformer Engine|transformer_engine).*", r"megatron\..*"),
    (DeprecationWarning, r".*", r"megatron\..*"),
    (FutureWarning, r".*", r"megatron\..*"),
    # torch.distributed.checkpoint internals used by megatron's loader/saver.
    (FutureWarning, r".*", r"torch\.distributed\.checkpoint\..*"),
    (UserWarning, r".*TypedStorage is deprecated.*", r".*"),
)

# (logger name, message prefix) of log records third-party code emits on every run, same idea.
KNOWN_LOG_RECORDS = (
    # megatron-core 0.19: every GPTModel(...) logs its deprecation in favour of HybridModel
    # (docs/megatron_versions.md); the model still builds and computes the reference function.
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED"),
)


class _DropKnownRecord(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_known_warnings() -> None:
    """Hide KNOWN_WARNINGS in this process; every other warning still shows."""
    for category, message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefix in KNOWN_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownRecord) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropKnownRecord(prefix))


# Set by launch/torchrun.sh, whose stderr filter passes each distinct `stem-...: ` line once: there
# every rank says its line. A line said by rank 0 alone is lost when another rank fails first and
# torchrun stops rank 0 before it prints (seen under load: exit 2 and no line at all).
ALL_RANKS_SAY_ENV = "STEM_ALL_RANKS_SAY"


def say(prog: str, message: str, *, every_rank: bool = False) -> None:
    """Print `prog: message` to stderr, from rank 0 only unless `every_rank` or under the launcher."""
    if every_rank or rank() == 0 or os.environ.get(ALL_RANKS_SAY_ENV) == "1":
        # One write (print writes the text and the newline apart): ranks writing the same pipe at
        # once then cannot interleave their lines (a write under PIPE_BUF bytes is atomic).
        sys.stderr.write(f"{prog}: {message}\n")
        sys.stderr.flush()


class _Interrupted:
    """SIGINT bookkeeping: the first Ctrl-C raises KeyboardInterrupt and is remembered, so that an
    error it causes afterwards (a peer rank gone from a collective) is reported as the interrupt."""

    seen = False

    @classmethod
    def handler(cls, signum, frame):
        cls.seen = True
        raise KeyboardInterrupt


def run(prog: str, body: Callable[[], int], *, errors: Errors = (), interrupted_note: str = "") -> int:
    """Run `body` (a tool's main); map user errors and Ctrl-C to one line and an exit code."""
    _Interrupted.seen = False
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:  # leave a caller's own handler (or SIG_IGN) alone
        signal.signal(signal.SIGINT, _Interrupted.handler)
    try:
        return body()
    except KeyboardInterrupt:
        return _interrupted(prog, interrupted_note)
    except SystemExit:
        raise
    except Exception as exc:
        if _Interrupted.seen:
            return _interrupted(prog, interrupted_note)
        hit = classify(exc, errors)
        if hit is None:
            raise
        reporter = getattr(exc, "reporter", "rank0")
        if reporter != "none":
            say(prog, hit[0], every_rank=reporter == "self")
        return hit[1]
    finally:
        if signal.getsignal(signal.SIGINT) is _Interrupted.handler:
            signal.signal(signal.SIGINT, previous)


def _interrupted(prog: str, note: str) -> int:
    say(prog, "interrupted (SIGINT)" + (f"; {note}" if note else ""))
    return EXIT_INTERRUPTED
