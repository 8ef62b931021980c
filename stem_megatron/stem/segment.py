"""Sums of rows that share an index: the fast path (index_add_) and an ordered, deterministic path.

`index_sum(index_N, values_NX, size, deterministic)` is `zeros(size, X).index_add_(0, index, values)`.
On a GPU index_add_ accumulates with atomics, so the order of the additions (and the rounding)
changes between runs. The deterministic path never relies on that: it sorts the index stably
(ties keep their input order), then adds each segment as a pairwise tree in that fixed order,
log2(longest segment) rounds of element-wise adds on disjoint positions, and finally writes one
value per segment. For a given input it gives the same bits on every run and every device count.

Legend: N input rows, X trailing dims (flattened or not), K distinct indices.
"""

from __future__ import annotations

import torch


class SegmentPlan:
    """The fixed summation schedule of one index: built once, applied to any number of value tensors
    (a lookup's inverse serves every layer's backward and every recompute)."""

    def __init__(self, index_N: torch.Tensor):
        n = index_N.numel()
        device = index_N.device
        self.order_N = torch.sort(index_N, stable=True).indices
        index_s = index_N.index_select(0, self.order_N)
        is_start_N = torch.ones(n, dtype=torch.bool, device=device)
        is_start_N[1:] = index_s[1:] != index_s[:-1]
        self.starts_K = torch.nonzero(is_start_N).squeeze(1)
        self.keys_K = index_s.index_select(0, self.starts_K)
        seg_N = torch.cumsum(is_start_N, 0) - 1
        ends_K = torch.cat([self.starts_K[1:], self.starts_K.new_tensor([n])])
        end_N = ends_K.index_select(0, seg_N)
        pos_N = torch.arange(n, device=device) - self.starts_K.index_select(0, seg_N)
        longest = int((ends_K - self.starts_K).max().item()) if n else 0
        # Pairwise tree inside each segment: at stride s, position p (p % 2s == 0) adds p + s.
        self.rounds: list[tuple[torch.Tensor, torch.Tensor]] = []
        cand = torch.arange(n, device=device)
        stride = 1
        while stride < longest:
            cand = cand[(pos_N.index_select(0, cand) % (2 * stride)) == 0]
            partner = cand + stride
            ok = partner < end_N.index_select(0, cand)
            self.rounds.append((cand[ok], partner[ok]))
            stride *= 2

    def segment_sums(self, values_NX: torch.Tensor) -> torch.Tensor:
        """[K, X] sums in the plan's order, K = distinct indices (ascending, `keys_K`)."""
        vals_NX = values_NX.index_select(0, self.order_N)  # a copy: safe to add into
        for dst, src in self.rounds:
            summed = vals_NX.index_select(0, dst) + vals_NX.index_select(0, src)
            vals_NX.index_copy_(0, dst, summed)  # destinations are distinct: no accumulation race
        return vals_NX.index_select(0, self.starts_K)

    def index_sum(self, values_NX: torch.Tensor, size: int) -> torch.Tensor:
        out = values_NX.new_zeros((size, *values_NX.shape[1:]))
        return out.index_copy_(0, self.keys_K, self.segment_sums(values_NX))


def index_sum(index_N: torch.Tensor, values_NX: torch.Tensor, size: int, deterministic: bool) -> torch.Tensor:
    """[size, X] with row i = sum of values_NX rows whose index is i (zeros where none)."""
    out = values_NX.new_zeros((size, *values_NX.shape[1:]))
    if index_N.numel() == 0:
        return out
    if not deterministic:
        return out.index_add_(0, index_N, values_NX)
    return SegmentPlan(index_N).index_sum(values_NX, size)


def unique_sum(
    keys_N: torch.Tensor, values_NX: torch.Tensor, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted distinct keys K, per-key sums K x X)."""
    if keys_N.numel() == 0:
        return keys_N.new_empty(0), values_NX.new_zeros((0, *values_NX.shape[1:]))
    if deterministic:
        plan = SegmentPlan(keys_N)
        return plan.keys_K, plan.segment_sums(values_NX)
    keys_K, inverse_N = torch.unique(keys_N, sorted=True, return_inverse=True)
    sums_KX = values_NX.new_zeros((keys_K.numel(), *values_NX.shape[1:]))
    return keys_K, sums_KX.index_add_(0, inverse_N, values_NX)
