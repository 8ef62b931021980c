"""What every `stem-*` command does with a failure: one line, the documented exit code, once.

    def main(argv=None):
        quiet_known_warnings()
        return run("stem-x", lambda: _main(argv), errors=((ConfigError, 2, ""), (CheckpointError, 4, "checkpoint error: ")))

- `run` maps the exceptions a user can cause (listed per tool in `errors`, plus `UserError`) to
  one line on stderr and an exit code; anything else is a bug and keeps its traceback. Ctrl-C
  (SIGINT) ends with one line and EXIT_INTERRUPTED, no traceback; whatever the tool leaves on
  disk is made safe by its own `finally` blocks, which still run.
- Under torchrun only rank 0 prints: the errors `run` maps are either the same on every rank
  (config validation, files every rank reads) or made so by `agree`, which every rank calls at
  the same point of a collective phase.
- `quiet_known_warnings` hides the third-party deprecation and future warnings that say nothing
  about the user's run (listed in KNOWN_WARNINGS, and log records in KNOWN_LOG_RECORDS); unknown
  warnings stay visible.

Exit codes (docs/training.md, docs/data.md, docs/checkpoints.md): 0 done, 1 a bug (traceback),
2 input or configuration error, 3 non-finite abort, 4 checkpoint error, 130 interrupted.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable

EXIT_INPUT = 2
EXIT_NONFINITE = 3
EXIT_CHECKPOINT = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'd command

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

Errors = Iterable[tuple[type, int, str]]  # (exception type, exit code, message prefix)


class _DropKnownRecord(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


class UserError(Exception):
    """A failure the user can fix: a one-line message and the exit code it ends with.

    `reporter`: who prints it under torchrun: "rank0" (the error is the same on every rank),
    "self" (only this rank knows it) or "none" (a consequence of another rank's reported error).
    """

    def __init__(self, message: str, code: int = EXIT_INPUT, reporter: str = "rank0"):
        super().__init__(message.replace("\n", " "))
        self.code = code
        self.reporter = reporter


def quiet_known_warnings() -> None:
    """Hide KNOWN_WARNINGS in this process; every other warning still shows."""
    for category, message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefix in KNOWN_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownRecord) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropKnownRecord(prefix))


def rank() -> int:
    """This process's global rank from torchrun's environment (0 outside torchrun)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def classify(exc: BaseException, errors: Errors) -> tuple[str, int] | None:
    """(one-line message, exit code) for an error the user caused; None for anything else."""
    if isinstance(exc, UserError):
        return str(exc), exc.code
    te = te_import_failure(exc)
    if te is not None:
        return te, EXIT_INPUT
    for kind, code, prefix in errors:
        if isinstance(exc, kind):
            return prefix + one_line(exc), code
    return None


def te_import_failure(exc: BaseException) -> str | None:
    """The one line for a Transformer Engine that is installed but breaks on import, or None.

    megatron-core imports TE when it is present and only tolerates it being absent, so a broken
    install (a missing CUDA library, a version mismatch) fails every import of megatron.core.
    """
    if not isinstance(exc, ImportError | OSError):
        return None
    frames = traceback.extract_tb(exc.__traceback__)
    text = str(exc)
    if not (any("transformer_engine" in f.filename for f in frames)
            or "transformer_engine" in text or "transformer-engine" in text):
        return None
    return (f"Transformer Engine is installed but does not import ({type(exc).__name__}: {one_line(exc)}); "
            "megatron-core cannot load with it: repair it, or remove it (pip uninstall transformer-engine) "
            "to train with model.transformer_impl=local")


def one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:  # "PATH: Permission denied", not "[Errno 13] ..."
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc).replace("\n", " ")


def say(prog: str, message: str, *, every_rank: bool = False) -> None:
    """Print `prog: message` to stderr, from rank 0 only unless `every_rank`."""
    if every_rank or rank() == 0:
        print(f"{prog}: {message}", file=sys.stderr, flush=True)


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


def agree(fn: Callable, *args, errors: Errors = (), group=None):
    """Run `fn(*args)` on every rank; if any rank fails, raise the first failing rank's error as a
    UserError with its exit code on every rank. Collective: every rank must call it at the same point.

    An error not in `errors` (a bug) prints its traceback on the rank that hit it and ends every
    rank with exit code 1.
    """
    import torch.distributed as dist

    out, err = None, None
    try:
        out = fn(*args)
    except Exception as exc:  # noqa: BLE001 - any rank's failure must reach every rank
        hit = classify(exc, errors)
        if hit is None:
            traceback.print_exc()
            hit = (f"rank {rank()}: {type(exc).__name__}: {exc} (traceback above)", 1)
        err = hit
    if dist.is_initialized():
        errs = [None] * dist.get_world_size(group)
        dist.all_gather_object(errs, err, group=group)
        err = next((e for e in errs if e is not None), None)
    if err is not None:
        raise UserError(*err)
    return out
