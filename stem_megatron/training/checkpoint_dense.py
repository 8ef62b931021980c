"""Dense model and optimizer state through megatron's dist_checkpointing, and the workarounds it needs.

Model keys are per global layer (`non_homogeneous_layers`: STEM and dense layers have different
fc1 shapes), so they do not depend on PP/VPP; TP and DP are regular ShardedTensor grids. The
plain optimizer's state follows the parameters' sharding; the distributed optimizer is saved
`fully_reshardable` (model-space tensors). Both load at any TP/PP/VPP/DP.

megatron-core 0.16 needs four workarounds here, each explained where it is applied:
- `use_in_process_write_results`: no `multiprocessing.Manager` behind synchronous saves;
- `_rank_local_writes_deferred`: rank-local writes inside `dist_checkpointing.save` must not raise
  between its collectives (the other ranks would wait out the process-group timeout);
- `_load_dense_optimizer`: the distributed optimizer's fully_reshardable load without `step`;
- `_fix_dense_optimizer`: one `step` tensor per parameter, hyperparameters from the config.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

from stem_megatron.training.checkpoint_format import CheckpointError

DENSE_METADATA = {"non_homogeneous_layers": True, "distrib_optim_sharding_type": "fully_reshardable"}
_HYPER_KEYS = ("betas", "eps")  # lr and weight_decay are set by the trainer every step


def dense_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def sharded_state_dict(trainer, is_loading: bool) -> dict:
    # A fresh metadata dict with the group given explicitly: megatron fills a missing
    # `dp_cp_group` in place, which would outlive this process's parallel layout.
    metadata = {**DENSE_METADATA, "dp_cp_group": trainer.dp_group}
    model = {f"chunk{i}": c.sharded_state_dict(metadata=metadata) for i, c in enumerate(trainer.chunks)}
    optimizer = trainer.optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=metadata)
    return {"model": model, "optimizer": optimizer}


def use_in_process_write_results() -> None:
    """Synchronous saves collect megatron's writer results in an in-process queue, not a Manager.

    megatron's `filesystem_async` keeps the results queue of its (possibly asynchronous) writer in
    a spawned `multiprocessing.Manager` process. Our saves are synchronous: the queue is filled
    and drained by the saving process itself, so a `queue.Queue` does the same job without a
    helper process that re-imports `__main__`, that dies with its process group's SIGTERM (a
    preemption signal sent to the group would break the very save it asks for), and that outlives
    a SIGKILLed trainer. tests/test_checkpoint.py checks that the hook still exists.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()


def rank_local_write_sites() -> list[tuple[object, str, str]]:
    """(owner, attribute, what it writes) of the writes one rank makes between megatron's collectives.

    megatron-core 0.16 writes the common (non-tensor) state as rank 0's `common.pt` through
    `TorchCommonSaveStrategy.save_common`; 0.19 removed that strategy and saves the common state as a
    `ShardedObject` inside the collective torch_dist save (no `common.pt`; docs/megatron_versions.md).
    """
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    sites = [
        (FileSystemWriterAsync, "finish", ".metadata"),  # the coordinator, then a broadcast
        (serialization, "save_config", "metadata.json"),  # rank 0, then a barrier
    ]
    if writes_common_pt():
        from megatron.core.dist_checkpointing.strategies.common import TorchCommonSaveStrategy

        sites.insert(0, (TorchCommonSaveStrategy, "save_common", "common.pt"))  # rank 0, then the planning
    return sites


def dense_format_problem(ckpt_dir: str, meta: dict) -> str | None:
    """Why the installed megatron-core cannot read this checkpoint's dense state, or None.

    0.19 reads 0.16.1's `common.pt` checkpoints, but 0.16.1 cannot read 0.19's (it looks for the
    `common.pt` that 0.19 no longer writes, and fails inside megatron with a traceback)."""
    if not writes_common_pt() or os.path.exists(os.path.join(ckpt_dir, "common.pt")):
        return None
    from stem_megatron.megatron_version import installed_version

    written = str(meta.get("versions", {}).get("megatron_core", "?")).split("+")[0]  # without a git hash
    return (f"its dense state was written by megatron-core {written}, which keeps the common state inside "
            f"its shards (no common.pt); megatron-core {installed_version()} cannot read that: load it with "
            "megatron-core 0.19.x (Python 3.12)")


def writes_common_pt() -> bool:
    """Whether the installed megatron-core's dist_checkpointing.save writes `common.pt` (0.16 line)."""
    from stem_megatron.megatron_version import installed_version

    version = installed_version()
    return version is None or version.release < (0, 19)


@contextlib.contextmanager
def _rank_local_writes_deferred(errors: list[str]):
    """During a save, megatron's rank-local writes record their failure in `errors` instead of raising.

    `dist_checkpointing.save` agrees on the outcome of the tensor shard writes (it gathers every
    rank's write results and raises on all ranks), but rank 0's `common.pt` (0.16 only), the coordinator's
    `.metadata` and rank 0's `metadata.json` are written between collectives: raised there, the
    other ranks would wait in the next collective until the process-group timeout. Deferred, the
    save runs to its end on every rank and the caller agrees on the outcome.
    """
    def deferred(fn, what):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - reported after megatron's collectives
                rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
                errors.append(f"rank {rank} could not write {what} ({type(e).__name__}: {e})")
        return run

    originals = [(owner, name, owner.__dict__[name], what) for owner, name, what in rank_local_write_sites()]
    for owner, name, fn, what in originals:
        setattr(owner, name, deferred(fn, what))
    try:
        yield
    finally:
        for owner, name, fn, _ in originals:
            setattr(owner, name, fn)


class _WriterErrors(logging.Handler):
    """Collects the shard-writer errors megatron-core 0.19 only logs on the failing rank.

    0.19's FileSystemWriterAsync logs a failed write's exception ("Local worker 0 encountered an
    error: [Errno 28] No space left on device") and raises a RuntimeError naming only its type
    (docs/megatron_versions.md); 0.16.1 raises the exception itself."""

    LOGGER = "megatron.core.dist_checkpointing.strategies.filesystem_async"
    PREFIX = "Local worker "

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.PREFIX) and "encountered an error: " in message:
            self.messages.append(message.split("encountered an error: ", 1)[1])


def save(trainer, ckpt_dir: str) -> None:
    """Write the dense model and optimizer state into `ckpt_dir`. Collective over the world.

    Raises CheckpointError on this rank if its part failed; megatron's collectives complete on
    every rank either way, so call it through `checkpoint_collective.agree`.
    """
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import CheckpointException

    from stem_megatron import compat
    from stem_megatron.training import checkpoint_collective

    compat.apply()
    use_in_process_write_results()
    errors: list[str] = []
    writer_errors = _WriterErrors()
    writer_logger = logging.getLogger(_WriterErrors.LOGGER)
    writer_logger.addHandler(writer_errors)
    try:
        with _rank_local_writes_deferred(errors):
            dist_checkpointing.save(sharded_state_dict(trainer, is_loading=False), ckpt_dir,
                                    validate_access_integrity=True)
    except CheckpointException as e:  # a BaseException, raised on every rank (details on the coordinator)
        failures = sorted(e.failures.items())
        logged = checkpoint_collective.all_gather(writer_errors.messages[:1])  # collective: every rank is here
        if not failures:
            raise CheckpointError("dense state: another rank failed to write its shard") from None
        rank, (exc, _) = failures[0]
        cause = f"{type(exc).__name__}: {exc}"
        if rank < len(logged) and logged[rank]:  # 0.19: the reason is only in that rank's log
            cause += f"; the writer logged: {logged[rank][0]}"
        raise CheckpointError(f"dense state: rank {rank} could not write its shard ({cause})") from None
    finally:
        writer_logger.removeHandler(writer_errors)
    if errors:
        raise CheckpointError(f"dense state: {errors[0]}")


def load(trainer, ckpt_dir: str) -> None:
    """Load the dense model and optimizer state (any layout) into the set-up trainer. Collective."""
    from megatron.core import dist_checkpointing

    from stem_megatron import compat

    compat.apply()
    hyper = [[{k: g[k] for k in _HYPER_KEYS} for g in opt.param_groups] for opt in dense_optimizers(trainer.optimizer)]
    if trainer.cfg.parallel.use_distributed_optimizer:
        with torch.no_grad():
            for opt in dense_optimizers(trainer.optimizer):
                if len(opt.optimizer.state) == 0:  # state_dict() needs allocated state and a step
                    opt._init_optimizer_states_with_dummy_values()
    request = sharded_state_dict(trainer, is_loading=True)
    with torch.no_grad():
        loaded = dist_checkpointing.load(request, ckpt_dir, validate_access_integrity=True)
        for i, chunk in enumerate(trainer.chunks):
            chunk.load_state_dict(loaded["model"][f"chunk{i}"], strict=True)
        _load_dense_optimizer(trainer.optimizer, loaded["optimizer"])
    _fix_dense_optimizer(trainer, hyper)


def load_weights_only(trainer, ckpt_dir: str) -> None:
    """Model weights of a weights-only checkpoint (`stem-import`); the dense optimizer keeps its fresh
    state and its main copies (bf16, distributed optimizer) are refreshed from the loaded weights."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from stem_megatron import compat

    compat.apply()
    metadata = {**DENSE_METADATA, "dp_cp_group": trainer.dp_group}
    # Weights only: the modules' `_extra_state` objects (empty for the local spec, FP8 scaling for
    # Transformer Engine) are not in such a checkpoint and keep their fresh values.
    request = {f"chunk{i}": extract_matching_values(c.sharded_state_dict(metadata=metadata),
                                                    lambda v: not isinstance(v, ShardedObject))[0]
               for i, c in enumerate(trainer.chunks)}
    with torch.no_grad():
        loaded = dist_checkpointing.load(request, ckpt_dir, validate_access_integrity=True)
        for i, chunk in enumerate(trainer.chunks):
            missing, unexpected = chunk.load_state_dict(loaded[f"chunk{i}"], strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            if missing or unexpected:
                raise CheckpointError(f"checkpoint {ckpt_dir}: weights-only load: missing {missing[:3]}, "
                                      f"unexpected {unexpected[:3]}")
    trainer.optimizer.reload_model_params()


def _load_dense_optimizer(optimizer, state: dict) -> None:
    """megatron's optimizer load, with the torch-AdamW `step` kept out of the fully_reshardable path.

    `DistributedOptimizer.load_parameter_state_from_fully_reshardable` copies every state
    tensor of a parameter from the checkpoint's model-space tensors, `step` included, which
    that format does not store (KeyError: 'step'). The step comes from the param groups
    (loaded first); the parameter tensors are loaded with it set aside.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = dense_optimizers(optimizer)
    if len(opts) != 1:
        raise CheckpointError(f"the dense optimizer chains {len(opts)} optimizers; checkpoints support one")
    opt = opts[0]
    if not (isinstance(opt, DistributedOptimizer) and state.get("param_state_sharding_type") == "fully_reshardable"):
        optimizer.load_state_dict(state)
        return
    state = dict(state)
    param_state = state.pop("param_state")
    state.pop("param_state_sharding_type")
    opt.load_state_dict(state)
    steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
    opt.load_parameter_state_from_fully_reshardable(param_state)
    for p, step in steps.items():
        opt.optimizer.state[p]["step"] = step.detach().clone()


def _fix_dense_optimizer(trainer, hyper) -> None:
    """After megatron's load: one `step` tensor per parameter, hyperparameters from the config.

    The distributed optimizer's torch-optimizer load path gives every parameter the same
    `step` tensor; AdamW's in-place `step += 1` would then advance it once per parameter.
    """
    for opt, groups in zip(dense_optimizers(trainer.optimizer), hyper):
        for state in opt.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].detach().clone()
        for group, want in zip(opt.param_groups, groups):
            diff = {k: (group[k], v) for k, v in want.items() if group[k] != v}
            if diff:
                trainer.metrics.line("checkpoint: dense optimizer " + ", ".join(
                    f"{k} {a} -> {b}" for k, (a, b) in diff.items()) + " (the config's values are used)")
            group.update(want)
