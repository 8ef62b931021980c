"""STEM tables: vocabulary-sharded storage and exchange (engine), row-sparse AdamW, process groups.

The lead's STEM MLP lives in `mlp.py`; this package's engine is what it indexes:
`StemTableEngine.lookup(ids)` -> `StemLookup` (leaf rows + inverse), `reduce_grads()` once per step,
`RowSparseAdamW.step(lr=...)`, and `table_grad_sq_norm(...)` for the global gradient norm.
"""

from stem_megatron.stem.engine import (
    StemIndexError,
    StemLookup,
    StemPrefetch,
    StemTableEngine,
    table_grad_sq_norm,
)
from stem_megatron.stem.groups import StemGroups, build_stem_groups
from stem_megatron.stem.optimizer import RowSparseAdamW

__all__ = [
    "RowSparseAdamW",
    "StemGroups",
    "StemIndexError",
    "StemLookup",
    "StemPrefetch",
    "StemTableEngine",
    "build_stem_groups",
    "table_grad_sq_norm",
]
