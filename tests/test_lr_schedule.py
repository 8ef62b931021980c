"""LR schedules: warmup, cosine, WSD, constant; tables fall back to the dense settings."""

import math

import pytest

from stem_megatron.testing.models import tiny_config
from stem_megatron.training.lr_schedule import LRSchedule, dense_schedule, table_schedule


def test_linear_warmup_then_cosine_to_min():
    s = LRSchedule(schedule="cosine", lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == pytest.approx(1.0)
    assert s(9) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert s(14) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(4, 20))


def test_wsd_is_flat_then_decays_linearly_in_the_last_fraction():
    s = LRSchedule(schedule="wsd", lr=1.0, min_lr=0.0, warmup_steps=2, total_steps=20, wsd_decay_fraction=0.25)
    assert [s(i) for i in range(2, 15)] == [1.0] * 13
    assert [s(i) for i in range(15, 20)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])


def test_constant_after_warmup():
    s = LRSchedule(schedule="constant", lr=0.5, min_lr=0.0, warmup_steps=1, total_steps=10)
    assert s(0) == 0.5 and s(9) == 0.5


def test_table_schedule_uses_its_own_settings_and_falls_back():
    cfg = tiny_config()
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.lr_schedule = 1e-3, 2, "cosine"
    assert table_schedule(cfg) == dense_schedule(cfg)
    cfg.stem.lr, cfg.stem.lr_schedule, cfg.stem.warmup_steps = 1e-2, "constant", 0
    t = table_schedule(cfg)
    assert t(0) == 1e-2 and t(5) == 1e-2 and dense_schedule(cfg)(0) == 5e-4
