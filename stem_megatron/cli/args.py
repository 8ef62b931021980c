"""Argument parsing shared by the commands: argparse whose usage errors are one line, and `type=`
helpers that refuse what a command cannot use instead of silently replacing it by a default.

    ap = OneLineParser(prog="stem-x")
    ap.add_argument("--stride", type=positive_int)              # 0, -1, 1.5, "x": one line, exit 2
    ap.add_argument("--temperature", type=nonneg_float)         # nan, inf, -0.1: refused
    ap.add_argument("--seed", type=seed)                        # 0 .. 2**64-1
    ap.add_argument("--lengths", type=int_list(positive_int))   # "64,128"; "" is refused, not "default"

Each helper raises argparse.ArgumentTypeError, which OneLineParser prints as
`prog: argument --flag: message` (exit 2). No helper imports torch, so a bad number is reported
before a command loads anything.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed and numpy take 64-bit seeds


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the project's bad-input rule); subparsers too."""

    def error(self, message):
        from stem_megatron import cli  # the one writer of one-line errors (one write, rank rules)

        cli.say(self.prog, message, every_rank=True)
        sys.exit(2)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= `low`."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in some messages
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An integer in [low, high]: for counts that bound work (tokens to generate, windows)."""

    def parse(text: str) -> int:
        value = _int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


def finite_float(text: str) -> float:
    return _float(text)


def nonneg_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def unit_interval(text: str) -> float:
    """A probability mass in (0, 1] (top-p)."""
    value = _float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def fraction(text: str) -> float:
    """A position in [0, 1] (a needle depth)."""
    value = _float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, 2**64-1], got {value}")
    return value


def int_list(item: Callable[[str], int]) -> Callable[[str], list[int]]:
    """A comma-separated, non-empty list, each element checked by `item`."""

    def parse(text: str) -> list[int]:
        parts = [x.strip() for x in text.split(",")]
        if not any(parts):
            raise argparse.ArgumentTypeError("needs at least one value (comma separated), got an empty list")
        if not all(parts):
            raise argparse.ArgumentTypeError(f"an empty element in {text!r}")
        return [item(x) for x in parts]

    parse.__name__ = "comma-separated list"
    return parse


float_list = int_list  # the same rule for any element type: float_list(fraction)


def nonblank(text: str) -> str:
    """Text that is not empty or only whitespace (an entity, a prompt)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty or blank, got {text!r}")
    return text
