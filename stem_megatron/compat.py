"""megatron-core on CPU/gloo: the one place where CUDA assumptions are routed to the CPU.

megatron-core assumes CUDA in a few places (`torch.cuda.current_device()`, the CUDA RNG tracker,
`device="cuda"` factories, `Tensor.cuda()`, `param.type() == 'torch.cuda.FloatTensor'`). On a
machine without CUDA, `apply()` installs the patches below so that the real megatron-core code
(no fork, nothing vendored) runs on CPU tensors with gloo. On a CUDA machine `apply()` does
nothing. Every patch names the megatron-core site it covers; `tests/test_compat.py` checks that
each site still exists (so an upgrade that removes one is visible) and that the patched path runs.

Three mechanisms, from narrowest to widest:

1. `_CpuTorch` module proxies. A listed megatron module's global name `torch` is replaced by a
   proxy that forwards everything to the real `torch` except: `torch.cuda.*` calls used for
   placement/RNG/synchronisation (routed to the CPU), and tensor factories called with
   `device="cuda"` (created on the CPU). Only the listed modules see the proxy.
2. Scoped method patches: `Tensor.cuda` is the identity and `Tensor.type()` reports CUDA type
   strings only *during* the listed megatron functions that need it.
3. Nothing global on `torch` itself.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
from dataclasses import dataclass

import torch

_CPU = torch.device("cpu")
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "zeros_like",
              "ones_like", "empty_like")


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return _CPU
    if str(device).startswith("cuda"):
        return _CPU
    return device


class _CpuCuda(types.SimpleNamespace):
    """Stands in for `torch.cuda` inside proxied megatron modules."""

    def __getattr__(self, name):  # anything not routed below is the real torch.cuda
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return _CPU

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    @staticmethod
    def get_rng_state(*args, **kwargs):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, *args, **kwargs):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    @staticmethod
    def is_available():
        return False


class _CpuTorch(types.ModuleType):
    """Stands in for `torch` inside proxied megatron modules (see module docstring)."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORIES:

            @functools.wraps(attr)
            def factory(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _to_cpu_device(kwargs["device"])
                return attr(*args, **kwargs)

            return factory
        return attr


@dataclass(frozen=True)
class ModuleProxyPatch:
    """Replace `torch` in `module` by the CPU proxy. `site`: the code that needs it."""

    module: str
    site: str
    marker: str  # a source fragment that shows the site still exists


MODULE_PATCHES: tuple[ModuleProxyPatch, ...] = (
    ModuleProxyPatch("megatron.core.models.common.embeddings.rotary_pos_embedding",
                     "RotaryEmbedding.get_emb: inv_freq.to(torch.cuda.current_device())",
                     "torch.cuda.current_device()"),
    ModuleProxyPatch("megatron.core.tensor_parallel.layers",
                     "Column/RowParallelLinear: SP all-gather buffers and GPU-init weights on current_device",
                     "torch.cuda.current_device()"),
    ModuleProxyPatch("megatron.core.tensor_parallel.mappings",
                     "_gather_along_first_dim / _reduce_scatter_along_first_dim output buffers",
                     "device=torch.cuda.current_device()"),
    ModuleProxyPatch("megatron.core.tensor_parallel.utils",
                     "gather_split_1d_tensor / split_tensor_into_1d_equal_chunks buffers",
                     "torch.cuda.current_device()"),
    ModuleProxyPatch("megatron.core.tensor_parallel.random",
                     "CudaRNGStatesTracker.add: torch.cuda.get_rng_state / manual_seed; "
                     "model_parallel_cuda_manual_seed: torch.cuda.manual_seed",
                     "torch.cuda.get_rng_state()"),
    ModuleProxyPatch("megatron.core.tensor_parallel.data",
                     "broadcast_data: sizes tensor on device='cuda'",
                     "device='cuda'"),
    ModuleProxyPatch("megatron.core.pipeline_parallel.schedules",
                     "forward_backward_*: total_num_tokens = torch.zeros(..., device='cuda') (3 sites)",
                     'device="cuda"'),
    ModuleProxyPatch("megatron.core.pipeline_parallel.p2p_communication",
                     "_communicate_shapes / _communicate: buffers on current_device, torch.cuda.synchronize()",
                     "torch.cuda.synchronize()"),
    ModuleProxyPatch("megatron.core.transformer.utils",
                     "get_default_causal_mask: torch.ones(sq, sq, device='cuda') when attention_mask=None",
                     'device="cuda"'),
    ModuleProxyPatch("megatron.core.optimizer.optimizer",
                     "MegatronOptimizer: found_inf / _dummy_overflow_buf / _scale_one on device='cuda'",
                     "device='cuda'"),
    ModuleProxyPatch("megatron.core.optimizer.clip_grads",
                     "get_grad_norm_fp32 / clip_grad_by_total_norm_fp32 / count_zeros_fp32 buffers",
                     "device='cuda'"),
    ModuleProxyPatch("megatron.core.optimizer.grad_scaler",
                     "ConstantGradScaler / DynamicGradScaler: scale tensors on device='cuda'",
                     "device='cuda'"),
    ModuleProxyPatch("megatron.core.optimizer.distrib_optimizer",
                     "DistributedOptimizer: shard buffers on current_device",
                     "torch.cuda.current_device()"),
    ModuleProxyPatch("megatron.core.utils",
                     "local_multi_tensor_l2_norm: result on device='cuda'",
                     'device="cuda"'),
    ModuleProxyPatch("megatron.core.distributed.param_and_grad_buffer",
                     "_ParamAndGradBuffer: param/grad buffers on current_device",
                     "torch.cuda.current_device()"),
    ModuleProxyPatch("megatron.core.dist_checkpointing.strategies.filesystem_async",
                     "FileSystemWriterAsync.preload_tensors: torch.cuda.synchronize()",
                     "torch.cuda.synchronize()"),
    ModuleProxyPatch("megatron.core.dist_checkpointing.strategies.state_dict_saver",
                     "verify_global_md_reuse / _compute_failure_flags: tensors on device='cuda'",
                     "torch.cuda.current_device()"),
)


@dataclass(frozen=True)
class ScopedMethodPatch:
    """While `target` (module:qualname) runs, `Tensor.<method>` is replaced (see `_SCOPED`)."""

    target: str
    method: str  # "cuda" or "type"
    site: str
    marker: str


SCOPED_PATCHES: tuple[ScopedMethodPatch, ...] = (
    ScopedMethodPatch("megatron.core.models.common.language_module.language_module:"
                      "LanguageModule.setup_embeddings_and_output_layer", "cuda",
                      "tied embeddings with PP>1: weight.data = weight.data.cuda() before the all-reduce",
                      "weight.data.cuda()"),
    ScopedMethodPatch("megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32", "type",
                      "assert param.grad.type() == 'torch.cuda.FloatTensor'",
                      "torch.cuda.FloatTensor"),
    ScopedMethodPatch("megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__", "type",
                      "param classification by param.type() strings (TypeError on CPU tensors)",
                      "torch.cuda.BFloat16Tensor"),
    ScopedMethodPatch("megatron.core.optimizer.distrib_optimizer:"
                      "DistributedOptimizer._build_model_and_main_param_groups", "type",
                      "param classification by model_param.type() strings (TypeError on CPU tensors)",
                      "torch.cuda.FloatTensor"),
    ScopedMethodPatch("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__", "type",
                      "param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']",
                      "torch.cuda.HalfTensor"),
    ScopedMethodPatch("megatron.core.optimizer.distrib_optimizer:"
                      "DistributedOptimizer.get_parameter_state_dp_zero", "cuda",
                      "fully_reshardable checkpoint save/load: send_tensor.cuda() before the DP all-gather",
                      "send_tensor.cuda()"),
)

_REAL_TENSOR_CUDA = torch.Tensor.cuda
_REAL_TENSOR_TYPE = torch.Tensor.type


def _cuda_identity(self, *args, **kwargs):
    return self


def _cuda_type_string(self, *args, **kwargs):
    if args or kwargs:  # t.type(dtype) converts: leave it alone
        return _REAL_TENSOR_TYPE(self, *args, **kwargs)
    name = _REAL_TENSOR_TYPE(self)
    if self.device.type == "cpu" and name.startswith("torch.") and not name.startswith("torch.cuda."):
        return "torch.cuda." + name[len("torch."):]
    return name


_SCOPED = {"cuda": _cuda_identity, "type": _cuda_type_string}


@contextlib.contextmanager
def _scoped_tensor_method(method: str):
    real = _REAL_TENSOR_CUDA if method == "cuda" else _REAL_TENSOR_TYPE
    setattr(torch.Tensor, method, _SCOPED[method])
    try:
        yield
    finally:
        setattr(torch.Tensor, method, real)


def _resolve(target: str):
    module_name, qualname = target.split(":")
    owner = importlib.import_module(module_name)
    parts = qualname.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    return owner, parts[-1]


def _wrap_scoped(patch: ScopedMethodPatch) -> None:
    owner, name = _resolve(patch.target)
    raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    is_static = isinstance(raw, staticmethod)
    is_class = isinstance(raw, classmethod)
    fn = raw.__func__ if (is_static or is_class) else raw
    if getattr(fn, "__stem_compat__", False):
        return

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with _scoped_tensor_method(patch.method):
            return fn(*args, **kwargs)

    wrapped.__stem_compat__ = True
    if is_static:
        wrapped = staticmethod(wrapped)
    elif is_class:
        wrapped = classmethod(wrapped)
    setattr(owner, name, wrapped)
    if not isinstance(owner, type):  # module-level function: also fix modules that imported it by name
        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("megatron.") and getattr(mod, name, None) is fn:
                setattr(mod, name, getattr(owner, name))


_APPLIED = False


def needed() -> bool:
    """True when CUDA is absent, i.e. when `apply()` would patch anything."""
    return not torch.cuda.is_available()


def apply(force: bool = False) -> bool:
    """Install the CPU routes if CUDA is absent (or `force`). Idempotent. Returns True if active."""
    global _APPLIED
    if _APPLIED:
        return True
    if not (force or needed()):
        return False
    proxy = _CpuTorch()
    for patch in MODULE_PATCHES:
        module = importlib.import_module(patch.module)
        module.torch = proxy
    # The RNG tracker forks call these module functions directly; on CPU the "CUDA" generator is
    # the CPU default generator (saved and restored around each fork, as on GPU).
    rng = importlib.import_module("megatron.core.tensor_parallel.random")
    rng._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    rng._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    for patch in SCOPED_PATCHES:
        _wrap_scoped(patch)
    _APPLIED = True
    return True


def is_applied() -> bool:
    return _APPLIED
