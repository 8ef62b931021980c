"""The CPU compatibility layer: every patched megatron-core site exists in the installed release
exactly when the patch says it does, and the patches work.

Each patch names the megatron-core versions that have its site. For the installed release (each CI
lane runs this file on its own: 0.16.1 on Python 3.11, 0.19.x on Python 3.12), a patch that applies
must find its site (an upgrade that removes one fails here and names it) and a patch that does not
apply must find none (its range is not too narrow). The behavioural tests run megatron code paths
that fail on a CUDA-less machine without the layer (shown in a fresh interpreter) and pass with it.
"""

import importlib
import inspect
import subprocess
import sys
import textwrap

import pytest
import torch

from stem_megatron import compat, megatron_version
from stem_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is inactive where CUDA exists")

INSTALLED = megatron_version.installed_version()


def test_installed_megatron_is_a_tested_release():
    assert megatron_version.tested_line(INSTALLED) is not None, (
        f"megatron-core {INSTALLED} is outside {megatron_version.TESTED_RANGE}")


def _module_source(name: str) -> str:
    return inspect.getsource(importlib.import_module(name))


def _function_source(target: str) -> str:
    module_name, qualname = target.split(":")
    owner = importlib.import_module(module_name)
    for part in qualname.split("."):
        owner = getattr(owner, part)
    return inspect.getsource(inspect.unwrap(owner))


def _check_site(patch, has_site: bool, where: str) -> None:
    if compat.applies(patch, INSTALLED):
        assert has_site, f"{where}: site gone in megatron-core {INSTALLED} ({patch.site}); narrow `versions`"
    else:
        assert not has_site, (f"{where}: site present in megatron-core {INSTALLED}, outside the patch's "
                              f"versions {patch.versions!r} ({patch.site}); widen `versions`")


@pytest.mark.parametrize("patch", compat.MODULE_PATCHES,
                         ids=lambda p: p.module.rsplit(".", 1)[-1] + "@" + p.versions)
def test_every_module_site_matches_its_versions(patch):
    _check_site(patch, patch.marker in _module_source(patch.module), patch.module)


@pytest.mark.parametrize("patch", compat.SCOPED_PATCHES, ids=lambda p: p.target.rsplit(":", 1)[-1])
def test_every_scoped_site_matches_its_versions(patch):
    _check_site(patch, patch.marker in _function_source(patch.target), patch.target)


@pytest.mark.parametrize("patch", compat.FUNCTION_PATCHES, ids=lambda p: p.target.rsplit(":", 1)[-1])
def test_every_replaced_function_exists(patch):
    module_name, name = patch.target.split(":")
    module = importlib.import_module(module_name)
    _check_site(patch, callable(getattr(module, name, None)), patch.target)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


CAUSAL_MASK = """
    {apply}
    from megatron.core.transformer.utils import get_default_causal_mask
    m = get_default_causal_mask(4)
    assert m.device.type == "cpu" and m.shape == (4, 4) and m[0, 1] and not m[1, 0]
    print("OK")
"""


def test_causal_mask_needs_and_gets_the_patch():
    without = _run(CAUSAL_MASK.format(apply=""))
    assert without.returncode != 0 and "CUDA" in without.stderr
    with_ = _run(CAUSAL_MASK.format(apply="from stem_megatron import compat; compat.apply()"))
    assert with_.returncode == 0, with_.stderr[-2000:]


def _rng_and_optimizer(rank, world_size):
    import torch.distributed as dist
    compat.apply()  # before importing megatron functions by name: they are wrapped in place
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32

    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    # The model-parallel RNG fork saves/restores the default generator around its own stream.
    before = torch.get_rng_state()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        a = torch.rand(3)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before), "fork leaked into the default generator"
    assert not torch.equal(a, b), "the tracker stream did not advance"
    # Norm and clipping on CPU grads (device='cuda' buffers and the type() assert are routed).
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    norm = get_grad_norm_fp32([p.grad], grad_stats_parallel_group=dist.group.WORLD)
    assert abs(norm - 6.0) < 1e-6
    clip_grad_by_total_norm_fp32([p], max_norm=3.0, total_norm=norm)
    assert torch.allclose(p.grad, torch.full((4,), 1.5), atol=1e-4)
    assert torch.Tensor.type is compat._REAL_TENSOR_TYPE, "scoped Tensor.type patch leaked"


def test_rng_tracker_and_grad_clipping_run_on_cpu():
    run_distributed(_rng_and_optimizer, world_size=1, timeout=120)


def test_apply_is_inactive_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(compat, "_APPLIED", False)
    assert compat.apply() is False


def _ddp_grad_sync(rank, world_size):
    compat.apply()
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.initialize_model_parallel(1, 1)
    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1)
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 2, bias=False)
    ddp = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  module=module)
    x = torch.randn(3, 4)
    ddp(x).square().sum().backward()
    # megatron 0.19: start_grad_sync asks torch.cuda.current_stream() before every reduction.
    finalize_model_grads([ddp])
    want = 2 * (x @ module.weight.detach().t()).t() @ x
    assert torch.allclose(module.weight.main_grad, want, atol=1e-5)


def test_ddp_gradient_reduction_runs_on_cpu():
    run_distributed(_ddp_grad_sync, world_size=1, timeout=120)
