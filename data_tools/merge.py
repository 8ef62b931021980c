"""`stem-merge`: concatenate Megatron indexed datasets into one, in the order given.

    stem-merge --input parts/p0_text_document parts/p1_text_document --output-prefix data/c_text_document

writes `data/c_text_document.bin/.idx`: the bytes megatron-core's
`IndexedDatasetBuilder.add_index` (Megatron-LM's `tools/merge_datasets.py`) would write, so the
merge of `stem-preprocess --partition 0/N .. N-1/N` is byte-identical to one unpartitioned run.
Unlike `add_index`, which holds every document's length and pointer as Python lists, the index
is streamed in chunks: memory stays bounded whatever the number of documents. `.bin` files are
copied in 1 MiB blocks. Every input is checked before anything is written: its index
consistent, its `.bin` exactly as long as the index counts. Output goes to `.partial` files
renamed into place at the end (`data_tools.writer`), the `.idx` last; the command refuses an
output that is an input, or that exists without `--overwrite` (stem_megatron.outputs).

Exit status: 0 on success, 1 on an error (one line on stderr), 2 on bad arguments or output, 130
on Ctrl-C (one line; the `.partial` files are removed).
"""

from __future__ import annotations

import os
import shutil
import struct
import warnings
from dataclasses import dataclass

import numpy as np

from data_tools.writer import PARTIAL, _remove_default_cache

with warnings.catch_warnings():  # megatron.core's import warns about missing TE/apex: irrelevant here
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

PROG = "stem-merge"
_CHUNK = 1 << 20  # index entries per read/write
# header, version (u64 = 1), dtype code (u8), sequence count (u64), document count (u64)
_FIXED = len(_INDEX_HEADER) + 8 + 1 + 8 + 8


class MergeError(ValueError):
    """A missing, unreadable or incompatible input; one-line message."""


@dataclass
class _Index:
    prefix: str
    dtype_code: int
    sequences: int
    documents: int
    idx: np.memmap | None  # the whole .idx as bytes (None when empty of entries)

    def section(self, offset: int, dtype, count: int) -> np.ndarray:
        return np.frombuffer(self.idx, dtype=dtype, count=count, offset=offset)

    def lengths(self) -> np.ndarray:  # int32 [sequences]
        return self.section(_FIXED, np.int32, self.sequences)

    def document_indices(self) -> np.ndarray:  # int64 [documents], starts with 0
        return self.section(_FIXED + 12 * self.sequences, np.int64, self.documents)


def _read_index(prefix: str) -> _Index:
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise MergeError(f"input dataset not found: {path}")
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_FIXED)
    if len(head) < _FIXED or not head.startswith(_INDEX_HEADER):
        raise MergeError(f"not a Megatron index: {idx_path}")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[len(_INDEX_HEADER) :])
    if version != 1:
        raise MergeError(f"unsupported index version {version}: {idx_path}")
    if size != _FIXED + 12 * sequences + 8 * documents:
        # a multimodal index carries a mode byte per sequence; stem-preprocess never writes one
        raise MergeError(f"index size does not match its counts (multimodal or truncated?): {idx_path}")
    idx = np.memmap(idx_path, dtype=np.uint8, mode="r") if size else None
    index = _Index(prefix, code, sequences, documents, idx)
    _check_sizes(index, bin_path)
    return index


def _check_sizes(index: _Index, bin_path: str) -> None:
    """MergeError unless the .bin holds exactly the tokens its .idx counts (megatron reads a
    shorter one past its end; a longer one shifts every later input's documents in the merge)."""
    try:
        itemsize = DType.size(DType.dtype_from_code(index.dtype_code))
    except (KeyError, ValueError):
        raise MergeError(f"unknown token dtype code {index.dtype_code}: {index.prefix}.idx") from None
    if index.documents < 1 or (index.document_indices()[[0, -1]] != [0, index.sequences]).any():
        raise MergeError(f"document index does not match its sequences (corrupt?): {index.prefix}.idx")
    want = int(index.lengths().sum(dtype=np.int64)) * itemsize if index.sequences else 0
    have = os.path.getsize(bin_path)
    if have != want:
        what = "truncated" if have < want else "longer than its index says"
        raise MergeError(f"{bin_path} is {have:,} bytes, its .idx counts {want:,} ({what}); nothing written")


def merge(inputs: list[str], output_prefix: str) -> tuple[int, int]:
    """Write `output_prefix.bin/.idx` from `inputs` in order; returns (documents, tokens)."""
    if not inputs:
        raise MergeError("no input datasets given")
    indices = [_read_index(p) for p in inputs]
    codes = {i.dtype_code for i in indices}
    if len(codes) != 1:
        names = ", ".join(f"{i.prefix} ({DType.dtype_from_code(i.dtype_code).__name__})" for i in indices)
        raise MergeError(f"inputs have different token dtypes: {names}")
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in inputs}:
        raise MergeError(f"output {output_prefix} is also an input")
    code = codes.pop()
    itemsize = DType.size(DType.dtype_from_code(code))
    sequences = sum(i.sequences for i in indices)
    # each input's leading 0 is dropped except the first's (as add_index does)
    documents = 1 + sum(i.documents - 1 for i in indices)
    if documents == 1:  # empty partitions are fine, an empty dataset is not (training would fail on it)
        raise MergeError("the inputs hold no documents; nothing written")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)

    bin_partial, idx_partial = output_prefix + ".bin" + PARTIAL, output_prefix + ".idx" + PARTIAL
    try:
        with open(bin_partial, "wb") as out:
            for i in indices:
                with open(i.prefix + ".bin", "rb") as src:
                    shutil.copyfileobj(src, out, _CHUNK)
        with open(idx_partial, "wb") as out:
            out.write(_INDEX_HEADER + struct.pack("<QBQQ", 1, code, sequences, documents))
            for i in indices:  # lengths, int32
                lengths = i.lengths()
                for s in range(0, i.sequences, _CHUNK):
                    out.write(lengths[s : s + _CHUNK].tobytes())
            pointer = 0  # byte offset of the next sequence in the merged .bin
            tokens = 0
            for i in indices:  # pointers, int64: running sum of length * itemsize
                lengths = i.lengths()
                for s in range(0, i.sequences, _CHUNK):
                    block = lengths[s : s + _CHUNK].astype(np.int64) * itemsize
                    ends = np.cumsum(block) + pointer
                    out.write((ends - block).tobytes())
                    pointer = int(ends[-1])
                tokens += int(lengths.sum(dtype=np.int64))
            out.write(struct.pack("<q", 0))
            offset = 0  # sequences before this input
            for i in indices:  # document indices, int64, shifted by the sequences before
                doc = i.document_indices()
                for s in range(1, i.documents, _CHUNK):
                    out.write((doc[s : s + _CHUNK] + offset).tobytes())
                offset += i.sequences
        for partial in (bin_partial, idx_partial):
            with open(partial, "rb") as f:
                os.fsync(f.fileno())
        if os.path.exists(output_prefix + ".idx"):
            os.remove(output_prefix + ".idx")
        os.replace(bin_partial, output_prefix + ".bin")
        _remove_default_cache(output_prefix)
        os.replace(idx_partial, output_prefix + ".idx")
    finally:
        for partial in (bin_partial, idx_partial):
            if os.path.exists(partial):
                os.remove(partial)
    return documents - 1, tokens
