"""Metrics: TensorBoard scalars and one concise console line per interval, on rank 0 only."""

from __future__ import annotations

import os
import sys
import time


class MetricsLogger:
    def __init__(self, log_dir: str | None, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.log_dir = log_dir
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(log_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(name, value, step)

    def line(self, text: str) -> None:
        if self.enabled:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
