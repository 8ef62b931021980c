"""What a training process does with the signals that stop it (docs/training.md, "Signals").

- SIGTERM, SIGUSR1 (preemption, a scheduler's warning): finish the step, save, exit 0.
- SIGINT (Ctrl-C): finish the step, do not save, exit 130 with the one documented line. A second
  SIGINT stops at once (KeyboardInterrupt wherever the process is), unless it comes within
  REPEAT_WINDOW_S of the first: then it is the same Ctrl-C delivered twice (to the process group
  and forwarded by the launcher, or by the launcher and torchrun).

Every rank stops after the same step: once per step `agreed()` all-reduces the strongest request
any rank holds (SIGINT over SIGTERM/SIGUSR1 over none), so it makes no difference which processes
a signal reached: the launcher, torchrun (which forwards it to every worker), every worker, or one
worker only. Stopping at a step boundary, not inside a collective, is what keeps the others from
failing in a collective with a peer gone (a traceback and SIGABRT instead of the one line).

SIGINT is deferred only inside `deferring_interrupt()` (the training loop, where a step boundary
is near); elsewhere (start-up, the final save) it raises KeyboardInterrupt at once, as `cli.run`
arranges for every command.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import torch

# Agreed stop request, ordered: the max over ranks wins.
NONE, SAVE_AND_STOP, INTERRUPT = 0, 1, 2
_SAVE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REPEAT_WINDOW_S = 1.0  # far below a person's "it is not stopping, press again", far above delivery skew


class StopSignals:
    """Signal requests of this process; `requested` names the first stop signal received."""

    def __init__(self):
        self.requested: str | None = None  # "SIGTERM" / "SIGUSR1" / "SIGINT": what this rank received
        self.interrupted = False
        self._first_interrupt = 0.0  # time.monotonic() of the first SIGINT

    def install(self) -> None:
        """SIGTERM/SIGUSR1 handlers: install before anything slow, or a signal kills the process."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _SAVE_SIGNALS:
            signal.signal(sig, self._on_save_signal)

    def _on_save_signal(self, signum, frame) -> None:
        self.requested = self.requested or signal.Signals(signum).name

    def _on_interrupt(self, signum, frame) -> None:
        now = time.monotonic()
        if self.interrupted:
            if now - self._first_interrupt > REPEAT_WINDOW_S:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            return
        self.interrupted, self._first_interrupt = True, now
        self.requested = "SIGINT"

    @contextlib.contextmanager
    def deferring_interrupt(self):
        """Within: SIGINT asks to stop after the step (see `agreed`). The handler is installed even
        when SIGINT was ignored on entry (torchrun's workers can inherit SIG_IGN from a shell)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._on_interrupt)
        try:
            yield
        finally:  # None: a handler installed from C, which cannot be put back; the default is closest
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
        if self.interrupted:  # arrived after the last agreement: still a Ctrl-C, honour it now
            raise KeyboardInterrupt

    def local(self) -> int:
        if self.interrupted:
            return INTERRUPT
        return SAVE_AND_STOP if self.requested else NONE

    def agreed(self, device) -> int:
        """The strongest request of any rank (NONE, SAVE_AND_STOP, INTERRUPT). Collective."""
        import torch.distributed as dist

        flag = torch.tensor([float(self.local())], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
