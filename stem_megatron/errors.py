"""The failures a user can cause, as library code raises them: one line and a documented exit code.

Library modules (trainer, preflight, checkpoint, data_tools...) raise `UserError` or their own error
types; the commands in `stem_megatron/cli/` map them to one line on stderr and the exit code
(`stem_megatron.cli.run`). Nothing here prints or exits.

Exit codes (docs/errors.md): 0 done, 1 a bug (traceback), 2 input or configuration error, 3
non-finite abort, 4 checkpoint error, 130 interrupted.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterable

EXIT_INPUT = 2
EXIT_NONFINITE = 3
EXIT_CHECKPOINT = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'd command

Errors = Iterable[tuple[type, int, str]]  # (exception type, exit code, message prefix)


class UserError(Exception):
    """A failure the user can fix: a one-line message and the exit code it ends with.

    `reporter`: who prints it under torchrun: "rank0" (the error is the same on every rank),
    "self" (only this rank knows it) or "none" (a consequence of another rank's reported error).
    """

    def __init__(self, message: str, code: int = EXIT_INPUT, reporter: str = "rank0"):
        super().__init__(message.replace("\n", " "))
        self.code = code
        self.reporter = reporter


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
