"""Sliding windows that score every token of a document exactly once.

A document of n ids t_0 .. t_{n-1} has targets 1 .. n-1 (target j is predicted from t_0 .. t_{j-1}).
A window holds at most `seq` input tokens and predicts the next token at each of them. Windows
advance by `stride` targets:

    window k ends at target e_k = min(seq + k * stride, n - 1)   (the last one reaches n - 1)
    its inputs start at a_k = max(0, e_k - seq)
    it scores targets e_{k-1} + 1 .. e_k   (the first window: 1 .. e_0)

so the scored ranges tile 1 .. n-1 without overlap, and every target after the first window has
at least seq - stride tokens of context (stride = seq: plain non-overlapping chunks, the cheapest
and the least context; stride = 1: full context for every token, one window per token).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    doc: int  # index of the document
    start: int  # a_k: first input position
    end: int  # e_k: last target position (inputs are start .. end-1, labels start+1 .. end)
    first_scored: int  # first target position this window scores

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def scored(self) -> int:
        return self.end - self.first_scored + 1


def document_windows(doc: int, n: int, seq: int, stride: int) -> list[Window]:
    """The windows of a document of `n` ids (n >= 2), with context `seq` and `stride` (1 <= stride <= seq)."""
    if seq < 1 or not 1 <= stride <= seq:
        raise ValueError(f"need 1 <= stride <= seq_length, got stride {stride}, seq_length {seq}")
    out, prev_end = [], 0
    k = 0
    while prev_end < n - 1:
        end = min(seq + k * stride, n - 1)
        out.append(Window(doc, max(0, end - seq), end, prev_end + 1))
        prev_end, k = end, k + 1
    return out
