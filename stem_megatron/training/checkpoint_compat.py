"""CPU routes for the megatron-core checkpoint code paths (an extension of `stem_megatron.compat`).

`compat.apply()` covers the model, schedules and optimizers. Saving and loading add three sites
that assume CUDA; they are routed with compat's own mechanisms (a `torch` proxy for a module, a
scoped `Tensor.cuda` identity for a function). `apply()` is idempotent and does nothing where CUDA
exists; `tests/test_checkpoint.py` checks that every site still exists.
"""

from __future__ import annotations

import importlib

from stem_megatron import compat

MODULE_PATCHES: tuple[compat.ModuleProxyPatch, ...] = (
    compat.ModuleProxyPatch("megatron.core.dist_checkpointing.strategies.filesystem_async",
                            "FileSystemWriterAsync.preload_tensors: torch.cuda.synchronize()",
                            "torch.cuda.synchronize()"),
    compat.ModuleProxyPatch("megatron.core.dist_checkpointing.strategies.state_dict_saver",
                            "verify_global_md_reuse / _compute_failure_flags: tensors on device='cuda'",
                            "torch.cuda.current_device()"),
)

SCOPED_PATCHES: tuple[compat.ScopedMethodPatch, ...] = (
    compat.ScopedMethodPatch("megatron.core.optimizer.distrib_optimizer:"
                             "DistributedOptimizer.get_parameter_state_dp_zero", "cuda",
                             "fully_reshardable save/load: send_tensor.cuda() before the DP all-gather",
                             "send_tensor.cuda()"),
)

_APPLIED = False


def apply() -> bool:
    """Install the checkpoint routes when CUDA is absent (after `compat.apply()`); True if active."""
    global _APPLIED
    if _APPLIED:
        return True
    if not compat.apply():
        return False
    for patch in MODULE_PATCHES:
        importlib.import_module(patch.module).torch = compat._CpuTorch()
    for patch in SCOPED_PATCHES:
        compat._wrap_scoped(patch)
    _APPLIED = True
    return True
