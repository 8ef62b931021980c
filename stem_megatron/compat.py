"""megatron-core on CPU/gloo: the one place where CUDA assumptions are routed to the CPU.

megatron-core assumes CUDA in a few places (`torch.cuda.current_device()`, the CUDA RNG tracker,
`device="cuda"` factories, `Tensor.cuda()`, `param.type() == 'torch.cuda.FloatTensor'`). On a
machine without CUDA, `apply()` installs the patches below so that the real megatron-core code
(no fork, nothing vendored) runs on CPU tensors with gloo. On a CUDA machine `apply()` does
nothing. Every patch names the megatron-core site it covers and the megatron-core versions that
have it (`versions`, a PEP 440 specifier). `apply()` installs the patches whose `versions` contain
the installed release (every patch whose target exists, for an untested release let through by
STEM_ALLOW_UNTESTED_MEGATRON=1; see `megatron_version.py`). `tests/test_compat.py` checks, for the
installed release, that each patch that applies finds its site (an upgrade that removes one is
visible) and that each patch that does not apply finds none (the range is not too narrow), and
that the patched paths run. Each CI lane runs it on its own release (0.16.1, 0.19.x).

Three mechanisms, from narrowest to widest:

1. `_CpuTorch` module proxies. A listed megatron module's global name `torch` is replaced by a
   proxy that forwards everything to the real `torch` except: `torch.cuda.*` calls used for
   placement/RNG/synchronisation (routed to the CPU), and tensor factories called with
   `device="cuda"` (created on the CPU). Only the listed modules see the proxy.
2. Scoped method patches: `Tensor.cuda` is the identity and `Tensor.type()` reports CUDA type
   strings only *during* the listed megatron functions that need it.
3. Nothing global on `torch` itself.

Sites by release: docs/megatron_versions.md.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
from dataclasses import dataclass

import torch
from packaging.specifiers import SpecifierSet

from stem_megatron import megatron_version

_CPU = torch.device("cpu")
# `versions` of a site seen in both tested lines (0.16.1 and 0.19.x). The upper bound is the newest
# release examined: a newer tested line must widen it, and test_compat then checks every site again.
BOTH_LINES = ">=0.16.1,<0.20"
NEW_IN_0_19 = ">=0.19,<0.20"  # absent from 0.16.1, present in 0.19.2 (0.17/0.18 were not examined)
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


class _CpuStream:
    """Stands in for a CUDA stream on the CPU: work is already ordered, so waits and syncs are no-ops."""

    def wait_event(self, event):
        return None

    def wait_stream(self, stream):
        return None

    def synchronize(self):
        return None

    def record_event(self, event=None):
        return event

    def query(self):
        return True


_CPU_STREAM = _CpuStream()


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

    @staticmethod
    def current_stream(*args, **kwargs):
        return _CPU_STREAM

    @staticmethod
    def default_stream(*args, **kwargs):
        return _CPU_STREAM


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
    """Replace `torch` in `module` by the CPU proxy. `site`: the code that needs it.

    A module may appear more than once (one entry per site, each with its own `versions`); it is
    proxied when any of its entries applies."""

    module: str
    site: str
    marker: str  # a source fragment that shows the site exists
    versions: str  # PEP 440 specifier of the megatron-core releases that have the site


MODULE_PATCHES: tuple[ModuleProxyPatch, ...] = (
    ModuleProxyPatch("megatron.core.models.common.embeddings.rotary_pos_embedding",
                     "RotaryEmbedding.get_emb: inv_freq.to(torch.cuda.current_device())",
                     "torch.cuda.current_device()", BOTH_LINES),
    ModuleProxyPatch("megatron.core.tensor_parallel.layers",
                     "Column/RowParallelLinear: SP all-gather buffers and GPU-init weights on current_device",
                     "torch.cuda.current_device()", BOTH_LINES),
    ModuleProxyPatch("megatron.core.tensor_parallel.mappings",
                     "_gather_along_first_dim / _reduce_scatter_along_first_dim output buffers",
                     "device=torch.cuda.current_device()", BOTH_LINES),
    ModuleProxyPatch("megatron.core.tensor_parallel.utils",
                     "gather_split_1d_tensor / split_tensor_into_1d_equal_chunks buffers",
                     "torch.cuda.current_device()", BOTH_LINES),
    ModuleProxyPatch("megatron.core.tensor_parallel.random",
                     "CudaRNGStatesTracker.add: torch.cuda.get_rng_state / manual_seed; "
                     "model_parallel_cuda_manual_seed: torch.cuda.manual_seed",
                     "torch.cuda.get_rng_state()", BOTH_LINES),
    ModuleProxyPatch("megatron.core.tensor_parallel.data",
                     "broadcast_data: sizes tensor on device='cuda'",
                     "device='cuda'", BOTH_LINES),
    ModuleProxyPatch("megatron.core.pipeline_parallel.schedules",
                     "forward_backward_*: total_num_tokens = torch.zeros(..., device='cuda') (3 sites)",
                     'device="cuda"', BOTH_LINES),
    ModuleProxyPatch("megatron.core.pipeline_parallel.p2p_communication",
                     "_communicate_shapes / _communicate: buffers on current_device, torch.cuda.synchronize()",
                     "torch.cuda.synchronize()", BOTH_LINES),
    ModuleProxyPatch("megatron.core.transformer.utils",
                     "get_default_causal_mask: torch.ones(sq, sq, device='cuda') when attention_mask=None",
                     'device="cuda"', BOTH_LINES),
    ModuleProxyPatch("megatron.core.optimizer.optimizer",
                     "MegatronOptimizer: found_inf / _dummy_overflow_buf / _scale_one on device='cuda'",
                     "device='cuda'", BOTH_LINES),
    ModuleProxyPatch("megatron.core.optimizer.clip_grads",
                     "get_grad_norm_fp32 / clip_grad_by_total_norm_fp32 / count_zeros_fp32 buffers",
                     "device='cuda'", BOTH_LINES),
    ModuleProxyPatch("megatron.core.optimizer.grad_scaler",
                     "ConstantGradScaler / DynamicGradScaler: scale tensors on device='cuda'",
                     "device='cuda'", BOTH_LINES),
    ModuleProxyPatch("megatron.core.optimizer.distrib_optimizer",
                     "DistributedOptimizer: shard buffers on current_device",
                     "torch.cuda.current_device()", BOTH_LINES),
    ModuleProxyPatch("megatron.core.utils",
                     "local_multi_tensor_l2_norm: result on device='cuda'",
                     'device="cuda"', BOTH_LINES),
    ModuleProxyPatch("megatron.core.distributed.param_and_grad_buffer",
                     "_ParamAndGradBuffer: param/grad buffers on current_device",
                     "torch.cuda.current_device()", BOTH_LINES),
    ModuleProxyPatch("megatron.core.dist_checkpointing.strategies.filesystem_async",
                     "FileSystemWriterAsync.preload_tensors: torch.cuda.synchronize()",
                     "torch.cuda.synchronize()", BOTH_LINES),
    ModuleProxyPatch("megatron.core.dist_checkpointing.strategies.state_dict_saver",
                     "verify_global_md_reuse / _compute_failure_flags: tensors on device='cuda'",
                     "torch.cuda.current_device()", BOTH_LINES),
    # New in 0.19: waits on CUDA-graph replay events before every grad reduction (DDP, also without
    # overlap_grad_reduce: finalize_model_grads -> start_grad_sync). The CPU stream's waits are no-ops.
    ModuleProxyPatch("megatron.core.distributed.param_and_grad_buffer",
                     "_ParamAndGradBucketGroup.start_grad_sync: current_stream = torch.cuda.current_stream()",
                     "current_stream = torch.cuda.current_stream()", NEW_IN_0_19),
    ModuleProxyPatch("megatron.core.optimizer.optimizer",
                     "MegatronOptimizer._has_grad_norm_group (grad-norm groups): flag on device='cuda'",
                     "flag = torch.tensor([1 if local else 0], dtype=torch.int, device='cuda')", NEW_IN_0_19),
)


@dataclass(frozen=True)
class ScopedMethodPatch:
    """While `target` (module:qualname) runs, `Tensor.<method>` is replaced (see `_SCOPED`)."""

    target: str
    method: str  # "cuda" or "type"
    site: str
    marker: str
    versions: str  # PEP 440 specifier of the megatron-core releases that have the site


SCOPED_PATCHES: tuple[ScopedMethodPatch, ...] = (
    ScopedMethodPatch("megatron.core.models.common.language_module.language_module:"
                      "LanguageModule.setup_embeddings_and_output_layer", "cuda",
                      "tied embeddings with PP>1: weight.data = weight.data.cuda() before the all-reduce",
                      "weight.data.cuda()", BOTH_LINES),
    ScopedMethodPatch("megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32", "type",
                      "assert param.grad.type() == 'torch.cuda.FloatTensor'",
                      "torch.cuda.FloatTensor", BOTH_LINES),
    ScopedMethodPatch("megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__", "type",
                      "param classification by param.type() strings (TypeError on CPU tensors)",
                      "torch.cuda.BFloat16Tensor", BOTH_LINES),
    ScopedMethodPatch("megatron.core.optimizer.distrib_optimizer:"
                      "DistributedOptimizer._build_model_and_main_param_groups", "type",
                      "param classification by model_param.type() strings (TypeError on CPU tensors)",
                      "torch.cuda.FloatTensor", BOTH_LINES),
    ScopedMethodPatch("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__", "type",
                      "param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']",
                      "torch.cuda.HalfTensor", BOTH_LINES),
    ScopedMethodPatch("megatron.core.optimizer.distrib_optimizer:"
                      "DistributedOptimizer.get_parameter_state_dp_zero", "cuda",
                      "fully_reshardable checkpoint save/load: send_tensor.cuda() before the DP all-gather",
                      "send_tensor.cuda()", BOTH_LINES),
)

@dataclass(frozen=True)
class FunctionPatch:
    """Replace the module function `target` (module:name) by `_REPLACEMENTS[replacement]`."""

    target: str
    replacement: str
    site: str
    versions: str


# The RNG tracker's forks call these module functions directly; on CPU the "CUDA" generator is the
# CPU default generator (saved and restored around each fork, as on GPU).
FUNCTION_PATCHES: tuple[FunctionPatch, ...] = (
    FunctionPatch("megatron.core.tensor_parallel.random:_get_cuda_rng_state", "get_rng_state",
                  "CudaRNGStatesTracker.fork: saves the CUDA generator state", BOTH_LINES),
    FunctionPatch("megatron.core.tensor_parallel.random:_set_cuda_rng_state", "set_rng_state",
                  "CudaRNGStatesTracker.fork / add: restores the CUDA generator state", BOTH_LINES),
)
_REPLACEMENTS = {
    "get_rng_state": lambda *args, **kwargs: torch.get_rng_state(),
    "set_rng_state": lambda new_state, *args, **kwargs: torch.set_rng_state(new_state),
}

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
    # Checked on CUDA machines too: the model's use of megatron APIs is only tested on these lines.
    version = megatron_version.require_tested()  # one line (or the override's warning) if untested
    if not (force or needed()):
        return False
    tested = megatron_version.tested_line(version) is not None
    proxy = _CpuTorch()
    for patch in MODULE_PATCHES:
        if tested and not applies(patch, version):
            continue
        module = _import_or_none(patch.module, required=tested)
        if module is not None:
            module.torch = proxy
    for patch in FUNCTION_PATCHES:
        if tested and not applies(patch, version):
            continue
        try:
            owner, name = _resolve(patch.target)
        except (ImportError, AttributeError):
            if tested:
                raise
            continue
        setattr(owner, name, _REPLACEMENTS[patch.replacement])
    for patch in SCOPED_PATCHES:
        if tested and not applies(patch, version):
            continue
        try:
            _wrap_scoped(patch)
        except (ImportError, AttributeError, KeyError):
            if tested:
                raise
    _APPLIED = True
    return True


def applies(patch, version) -> bool:
    """Whether `patch` is declared for megatron-core `version` (a packaging Version)."""
    return version is not None and SpecifierSet(patch.versions).contains(version)


def _import_or_none(module_name: str, required: bool):
    try:
        return importlib.import_module(module_name)
    except ImportError:
        if required:
            raise
        return None  # an untested release without this module: nothing to route there


def is_applied() -> bool:
    return _APPLIED
