"""Bytes on the wire, counted at the collective calls: an independent check of the engine's counters.

The engine's byte counters and the scale model (stem/traffic_model.py) share the counting
functions of stem/hierarchical.py, so a counter that forgets a phase agrees with the model that
forgets it too. `WireBytes` counts from what the engine actually hands to torch.distributed:
while it is active, every `all_to_all_single` and `all_gather` call is measured from the tensors
and split sizes passed (bytes to and from each peer, a rank's own segment excluded, as the
engine's counters exclude it), split into intra- and inter-node by `node_of(global rank)`, and
added under the current label. Any other collective under a label is listed in `uncounted`.

    wire = WireBytes(node_of=lambda r: r // 2)
    with wire:
        with wire.label("lookup"):
            engine.lookup(ids)
    wire.totals["lookup"]  # {"sent_intra": ..., "sent_inter": ..., "recv_intra": ..., "recv_inter": ...}

Calls outside a label pass through uncounted. For tests (one process per rank, gloo).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable

import torch
import torch.distributed as dist

KEYS = ("sent_intra", "sent_inter", "recv_intra", "recv_inter")
_OTHER = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "all_to_all",
          "send", "recv", "isend", "irecv", "gather", "scatter", "reduce")


def _row_bytes(t: torch.Tensor) -> int:
    """Bytes of one slice along dim 0 (all_to_all_single splits dim 0)."""
    return math.prod(t.shape[1:]) * t.element_size()


class WireBytes:
    def __init__(self, node_of: Callable[[int], int]):
        self.node_of = node_of
        self.totals: dict = {}
        self.uncounted: list[tuple] = []
        self._label = None
        self._saved: dict = {}

    @contextlib.contextmanager
    def label(self, name):
        prev, self._label = self._label, name
        try:
            yield
        finally:
            self._label = prev

    def _add(self, group, sent_P: list[int], recv_P: list[int]) -> None:
        """sent_P / recv_P: bytes to / from each rank of `group` (group rank order)."""
        me = dist.get_rank(group)
        my_node = self.node_of(dist.get_rank())
        t = self.totals.setdefault(self._label, dict.fromkeys(KEYS, 0))
        for p, (s, r) in enumerate(zip(sent_P, recv_P)):
            if p == me:
                continue
            where = "intra" if self.node_of(dist.get_global_rank(group, p) if group is not None else p) == my_node \
                else "inter"
            t[f"sent_{where}"] += s
            t[f"recv_{where}"] += r

    def _all_to_all_single(self, original):
        sig = inspect.signature(original)

        def wrapped(*args, **kwargs):
            if self._label is not None:
                a = sig.bind(*args, **kwargs).arguments
                out, inp, group = a["output"], a["input"], a.get("group")
                g = dist.get_world_size(group)
                in_splits = a.get("input_split_sizes") or [inp.shape[0] // g] * g
                out_splits = a.get("output_split_sizes") or [out.shape[0] // g] * g
                self._add(group, [n * _row_bytes(inp) for n in in_splits],
                          [n * _row_bytes(out) for n in out_splits])
            return original(*args, **kwargs)

        return wrapped

    def _all_gather(self, original):
        sig = inspect.signature(original)

        def wrapped(*args, **kwargs):
            if self._label is not None:
                a = sig.bind(*args, **kwargs).arguments
                parts, t, group = a["tensor_list"], a["tensor"], a.get("group")
                self._add(group, [t.numel() * t.element_size()] * len(parts),
                          [p.numel() * p.element_size() for p in parts])
            return original(*args, **kwargs)

        return wrapped

    def _other(self, name, original):
        def wrapped(*args, **kwargs):
            if self._label is not None:
                self.uncounted.append((self._label, name))
            return original(*args, **kwargs)

        return wrapped

    def __enter__(self):
        self._saved = {n: getattr(dist, n) for n in ("all_to_all_single", "all_gather", *_OTHER) if hasattr(dist, n)}
        dist.all_to_all_single = self._all_to_all_single(self._saved["all_to_all_single"])
        dist.all_gather = self._all_gather(self._saved["all_gather"])
        for n in _OTHER:
            if n in self._saved:
                setattr(dist, n, self._other(n, self._saved[n]))
        return self

    def __exit__(self, *exc):
        for n, f in self._saved.items():
            setattr(dist, n, f)
        self._saved = {}
