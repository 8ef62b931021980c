"""Learning-rate schedules: linear warmup, then cosine decay, WSD (warmup-stable-decay) or constant.

`learning_rate(step, ...)` is the LR used for optimizer update number `step + 1` (step counts
completed updates). Dense parameters and STEM tables each get their own schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class LRSchedule:
    schedule: str  # cosine | wsd | constant
    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    decay_steps: int | None = None  # cosine: steps of decay after warmup (None = the rest)
    wsd_decay_fraction: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "cosine":
            decay = self.decay_steps or max(self.total_steps - self.warmup_steps, 1)
            progress = min((step - self.warmup_steps) / decay, 1.0)
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
        if self.schedule == "wsd":
            decay_len = max(int(round(self.wsd_decay_fraction * self.total_steps)), 1)
            decay_start = self.total_steps - decay_len
            if step < decay_start:
                return self.lr
            progress = min((step - decay_start + 1) / decay_len, 1.0)
            return self.lr + (self.min_lr - self.lr) * progress
        raise ValueError(f"unknown lr schedule {self.schedule!r}")


def dense_schedule(cfg) -> LRSchedule:
    t = cfg.train
    return LRSchedule(schedule=t.lr_schedule, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                      total_steps=t.train_steps, decay_steps=t.decay_steps, wsd_decay_fraction=t.wsd_decay_fraction)


def table_schedule(cfg) -> LRSchedule:
    """The STEM tables' schedule: each stem.* field falls back to the train.* one."""
    t, s = cfg.train, cfg.stem
    pick = lambda own, default: default if own is None else own  # noqa: E731
    return LRSchedule(schedule=pick(s.lr_schedule, t.lr_schedule), lr=pick(s.lr, t.lr),
                      min_lr=pick(s.min_lr, t.min_lr), warmup_steps=pick(s.warmup_steps, t.warmup_steps),
                      total_steps=t.train_steps, decay_steps=t.decay_steps,
                      wsd_decay_fraction=t.wsd_decay_fraction)
