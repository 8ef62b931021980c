"""Write Megatron indexed datasets (`.bin` + `.idx`) so that no half-written pair ever looks complete.

`IndexedOutput` writes through megatron-core's `IndexedDatasetBuilder` into
`{path}.bin.partial` / `{path}.idx.partial`. `commit()` finalizes the index, then removes any
old `{path}.idx`, renames the `.bin` into place and renames the `.idx` last: a run killed at any
point leaves either the previous pair, a `.bin` without its `.idx`, or only `.partial` files,
none of which `IndexedDataset.exists` accepts. `abort()` removes the partial files.

Replacing a dataset also removes megatron-core's default index cache for it, `{path}/cache/`
(document / sample / shuffle indices are keyed by path and settings, not by content, so the old
ones would be silently reused for the new data). Caches under a custom `data.cache_path` are
not tracked: clear them by hand after re-preprocessing a prefix.

Token dtype follows megatron-core: uint16 when the vocabulary has fewer than 65500 entries,
else int32 (`token_dtype`).
"""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np

with warnings.catch_warnings():  # megatron.core's import warns about missing TE/apex: irrelevant here
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

PARTIAL = ".partial"


def token_dtype(vocab_size: int) -> type:
    """The .bin dtype for a vocabulary: numpy.uint16 below 65500 entries, else numpy.int32."""
    return DType.optimal_dtype(vocab_size)


def output_path(prefix: str, key: str) -> str:
    """Megatron-LM's naming: `{prefix}_{key}_document` (+ .bin / .idx)."""
    return f"{prefix}_{key}_document"


class IndexedOutput:
    """One `{path}.bin/.idx` pair, written to partial files and committed atomically."""

    def __init__(self, path: str, dtype: type) -> None:
        self.path = path
        self.dtype = dtype
        self.bin_partial = path + ".bin" + PARTIAL
        self.idx_partial = path + ".idx" + PARTIAL
        self.num_documents = 0
        self.num_tokens = 0
        self._builder = IndexedDatasetBuilder(self.bin_partial, dtype=dtype)
        self._closed = False

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as concatenated ids and per-document lengths."""
        start = 0
        for length in lengths.tolist():
            doc = tokens[start : start + length]
            self._builder.add_document(doc, [length])
            start += length
        self.num_documents += len(lengths)
        self.num_tokens += int(start)

    def commit(self) -> None:
        """Finalize the index and move the pair into place (.idx last)."""
        self._builder.finalize(self.idx_partial)
        self._closed = True
        for partial in (self.bin_partial, self.idx_partial):
            with open(partial, "rb") as f:
                os.fsync(f.fileno())
        final_bin, final_idx = self.path + ".bin", self.path + ".idx"
        if os.path.exists(final_idx):
            os.remove(final_idx)
        os.replace(self.bin_partial, final_bin)
        _remove_default_cache(self.path)
        os.replace(self.idx_partial, final_idx)

    def abort(self) -> None:
        """Close and remove the partial files; any previous output is left as it was."""
        if not self._closed:
            self._builder.data_file.close()
            self._closed = True
        for partial in (self.bin_partial, self.idx_partial):
            if os.path.exists(partial):
                os.remove(partial)


def _remove_default_cache(path: str) -> None:
    """Delete `{path}/cache` (megatron's index cache next to the data), and `{path}/` once it is empty."""
    cache = os.path.join(path, "cache")
    if os.path.isdir(cache):
        shutil.rmtree(cache)
        if not os.listdir(path):
            os.rmdir(path)
