"""STEM table shards on disk: one safetensors file per writer, rows addressed by global id.

A table file holds the rows one shard rank owns (round-robin, ownership.py), for every STEM layer
of that rank's model chunks and for one tensor-parallel column slice:

    rows                   int64 [n]      global row ids, increasing (padding ids >= vocab dropped)
    layers.{i}.weight      fp32  [n, f]   table rows of global layer i, columns col_start.. +f
    layers.{i}.exp_avg     fp32  [n, f]   RowSparseAdamW moments
    layers.{i}.exp_avg_sq  fp32  [n, f]
    layers.{i}.step        int64 [n]      per-row update counters (the same for every layer of an engine)

The header's `__metadata__` records vocab_size, ffn_hidden_size, col_start, cols, shard_rank,
shard_size, tp_rank, tp_size. Any layout reads what it needs through `TableReader`: for each of
its rows and columns, the file(s) holding them are memory-mapped and only those rows are read
(`np.memmap` fancy indexing: pages of other rows are never touched when a row is >= one page).
Files are written by a streaming writer (no second copy of the table in memory) in the
safetensors format, so `safetensors.safe_open` reads them too.

Legend: n rows in a file, f columns in a file, R rows of the reading engine, L engine layers.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

KINDS = ("weight", "exp_avg", "exp_avg_sq")  # fp32 [n, f] per layer; "step" is int64 [n] per layer
_DTYPES = {"F32": np.float32, "I64": np.int64}
_CODES = {torch.float32: "F32", torch.int64: "I64"}


class TableFormatError(ValueError):
    """A table file is not what its header or the checkpoint index says; one-line message."""


@dataclass
class LazyTensor:
    """A tensor produced only when the writer reaches it (offline resharding of large tables)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def write_table_file(path: str, tensors: Iterable[tuple[str, torch.Tensor | LazyTensor]], metadata: dict) -> int:
    """Stream (name, tensor) pairs into a safetensors file at `path`, fsync it; returns its size.

    Tensors are CPU fp32 / int64; each is made contiguous (or produced, for a LazyTensor) one at a
    time while writing, so at most one tensor is copied at once.
    """
    tensors = list(tensors)
    header: dict = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    offset = 0
    for name, t in tensors:
        if t.dtype not in _CODES:
            raise TypeError(f"{name}: table files hold float32 or int64, got {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, t in tensors:
            if isinstance(t, LazyTensor):
                shape, t = t.shape, t.make()
                if tuple(t.shape) != tuple(shape) or t.dtype not in _CODES:
                    raise ValueError(f"{name}: produced {tuple(t.shape)} {t.dtype}, announced {shape}")
            f.write(memoryview(t.detach().cpu().contiguous().numpy()).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset


class TableFile:
    """A memory-mapped table file: `meta` (ints), `layers`, `array(name)` -> read-only np.memmap."""

    def __init__(self, path: str, label: str | None = None):
        self.path = path
        self.label = label or path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file size {size}")
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise TableFormatError(f"{self.label}: not a readable table file ({e})") from None
        self._data_start = 8 + n
        self._size = size
        meta = header.pop("__metadata__", {})
        try:
            self.meta = {k: int(meta[k]) for k in (
                "vocab_size", "ffn_hidden_size", "col_start", "cols", "shard_rank", "shard_size", "tp_rank", "tp_size"
            )}
        except (KeyError, ValueError) as e:
            raise TableFormatError(f"{self.label}: table metadata is missing or not an integer ({e})") from None
        self._entries = header
        self.layers = sorted({int(k.split(".")[1]) for k in header if k.startswith("layers.")})

    def array(self, name: str) -> np.ndarray:
        entry = self._entries.get(name)
        if entry is None:
            raise TableFormatError(f"{self.label}: no tensor {name!r}")
        dtype = _DTYPES.get(entry["dtype"])
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if dtype is None or end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise TableFormatError(f"{self.label}: tensor {name!r} has an inconsistent header entry {entry}")
        if self._data_start + end > self._size:
            raise TableFormatError(f"{self.label}: tensor {name!r} ends past the end of the file (truncated)")
        if end == begin:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape)


def engine_file_tensors(engine, state: dict) -> tuple[list[tuple[str, torch.Tensor]], dict]:
    """The (name, tensor) list and metadata of one engine's rows (padding rows dropped).

    `state` is the engine's RowSparseAdamW state (exp_avg, exp_avg_sq, step).
    """
    lay = engine.layout
    n = lay.ownership.num_owned(lay.shard_rank)  # the real rows are a prefix of the local rows
    out = [("rows", lay.ownership.owned_ids(lay.shard_rank))]
    for slot, layer in enumerate(lay.layer_ids):
        out.append((f"layers.{layer}.weight", engine.weight[:n, slot].cpu()))
        out.append((f"layers.{layer}.exp_avg", state["exp_avg"][:n, slot].cpu()))
        out.append((f"layers.{layer}.exp_avg_sq", state["exp_avg_sq"][:n, slot].cpu()))
        out.append((f"layers.{layer}.step", state["step"][:n].cpu()))
    meta = dict(
        vocab_size=lay.vocab_size, ffn_hidden_size=lay.ffn_hidden_size, col_start=lay.col_start,
        cols=lay.cols_local, shard_rank=lay.shard_rank, shard_size=lay.shard_size,
        tp_rank=lay.tp_rank, tp_size=lay.tp_size,
    )
    return out, meta


def merge_engine_files(parts: list[tuple[list, dict]]) -> tuple[list, dict]:
    """One file's content from several engines of the same rank (virtual pipeline chunks)."""
    names, tensors = set(), []
    meta = parts[0][1]
    for part, m in parts:
        if m != meta:
            raise ValueError(f"engines of one rank disagree on their layout: {m} vs {meta}")
        for name, t in part:
            if name == "rows" and "rows" in names:
                continue
            names.add(name)
            tensors.append((name, t))
    return tensors, meta


@dataclass
class TableTarget:
    """Where rows go: global ids [R], columns [col_start, col_start + cols) of `ffn_hidden_size`."""

    row_ids: torch.Tensor
    col_start: int
    cols: int


class TableReader:
    """Reads rows of any layout from the table files listed in a checkpoint's table index."""

    def __init__(self, root: str, index: dict):
        self.vocab_size = int(index["vocab_size"])
        self.ffn_hidden_size = int(index["ffn_hidden_size"])
        self.layers = [int(i) for i in index["layers"]]
        self.files: list[TableFile] = []
        for entry in index["files"]:
            tf = TableFile(os.path.join(root, entry["path"]), label=entry["path"])
            if tf.meta["vocab_size"] != self.vocab_size or tf.meta["ffn_hidden_size"] != self.ffn_hidden_size:
                raise TableFormatError(f"{entry['path']}: vocab/ffn {tf.meta} differ from the index")
            if sorted(tf.layers) != sorted(int(i) for i in entry["layers"]):
                raise TableFormatError(f"{entry['path']}: holds layers {tf.layers}, the index says {entry['layers']}")
            self.files.append(tf)
        self._rows: dict[int, np.ndarray] = {}

    def _file_rows(self, k: int) -> np.ndarray:
        if k not in self._rows:
            rows = np.asarray(self.files[k].array("rows"))
            if rows.size and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= self.vocab_size):
                raise TableFormatError(f"{self.files[k].label}: row ids are not increasing ids in [0, vocab)")
            self._rows[k] = rows
        return self._rows[k]

    def _column_groups(self, layer: int) -> dict[tuple[int, int], list[int]]:
        """Files holding `layer`, grouped by column range; the ranges must tile [0, ffn) exactly."""
        groups: dict[tuple[int, int], list[int]] = {}
        for k, tf in enumerate(self.files):
            if layer in tf.layers:
                f0 = tf.meta["col_start"]
                groups.setdefault((f0, f0 + tf.meta["cols"]), []).append(k)
        edge = 0
        for f0, f1 in sorted(groups):
            if f0 != edge or f1 <= f0:
                raise TableFormatError(
                    f"layer {layer}: table files cover columns {sorted(groups)}, which do not tile 0..{self.ffn_hidden_size - 1}"
                )
            edge = f1
        if edge != self.ffn_hidden_size:
            raise TableFormatError(f"layer {layer}: table files cover columns up to {edge}, not {self.ffn_hidden_size}")
        return groups

    def read_layer(self, layer: int, target: TableTarget, kinds=KINDS) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({kind: fp32 [R, cols]}, step int64 [R]) of `layer` for the target's rows and columns.

        Rows with ids >= vocab (padding) are zero. Raises TableFormatError unless every other
        row is found exactly once in each column range that overlaps the target's columns.
        """
        if layer not in self.layers:
            raise TableFormatError(f"the checkpoint has no STEM table for layer {layer} (it has {self.layers})")
        ids = target.row_ids.cpu().numpy().astype(np.int64)
        want = np.nonzero(ids < self.vocab_size)[0]
        c0, c1 = target.col_start, target.col_start + target.cols
        out = {k: torch.zeros(ids.size, target.cols, dtype=torch.float32) for k in kinds}
        step = torch.zeros(ids.size, dtype=torch.int64)
        first_group = True
        for (f0, f1), members in sorted(self._column_groups(layer).items()):
            a, b = max(c0, f0), min(c1, f1)
            if a >= b:
                continue
            hits = np.zeros(ids.size, dtype=np.int64)
            for k in members:
                tf, rows = self.files[k], self._file_rows(k)
                if rows.size == 0:
                    continue
                pos = np.searchsorted(rows, ids[want]).clip(max=rows.size - 1)
                hit = rows[pos] == ids[want]
                dst, src = want[hit], pos[hit]
                if dst.size == 0:
                    continue
                hits[dst] += 1
                dst_t = torch.from_numpy(dst)
                for kind in kinds:
                    arr = tf.array(f"layers.{layer}.{kind}")
                    if arr.shape != (rows.size, f1 - f0):
                        raise TableFormatError(
                            f"{tf.label}: layers.{layer}.{kind} has shape {arr.shape}, expected {(rows.size, f1 - f0)}"
                        )
                    out[kind][dst_t, a - c0 : b - c0] = torch.from_numpy(np.ascontiguousarray(arr[src, a - f0 : b - f0]))
                if first_group:
                    arr = tf.array(f"layers.{layer}.step")
                    step[dst_t] = torch.from_numpy(np.ascontiguousarray(arr[src]))
            bad = np.nonzero(hits[want] != 1)[0]
            if bad.size:
                r = int(want[bad[0]])
                raise TableFormatError(
                    f"layer {layer}: row {int(ids[r])} (columns {f0}..{f1 - 1}) is in {int(hits[r])} table files, "
                    "expected exactly 1 (missing or overlapping shards)"
                )
            first_group = False
        return out, step
