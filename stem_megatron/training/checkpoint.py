"""Save and resume a `Trainer`: megatron dist_checkpointing for dense state, table files for STEM.

    trainer.checkpointer = Checkpointer(cfg.checkpoint)
    trainer.setup()               # ends with checkpointer.resume(trainer)
    trainer.train()               # maybe_save() after each step, save() on SIGTERM/SIGUSR1 and at the end

What a checkpoint holds (layout in checkpoint_format.py):
- dense model weights and the dense optimizer state through `megatron.core.dist_checkpointing`
  (torch_dist). Model keys are per global layer (`non_homogeneous_layers`: STEM and dense layers
  have different fc1 shapes), so they do not depend on PP/VPP; TP and DP are regular ShardedTensor
  grids. The plain optimizer's state follows the parameters' sharding; the distributed optimizer is
  saved `fully_reshardable` (model-space tensors). Both load at any TP/PP/VPP/DP.
- STEM tables and RowSparseAdamW state: one file per writing rank, rows by global id (table_io.py);
  any layout reads the rows and columns it owns.
- step, consumed samples, skipped-step counters, the layouts, versions (`stem_checkpoint.json`);
  the LR schedules are pure functions of the step; the data position is step x global batch.
- RNG states of every rank (restored when the parallel layout is the same, otherwise reported).
- the resolved config and a copy of the tokenizer.

Resume order: the latest checkpoint in `checkpoint.save` if there is one (a restarted job
continues), else `checkpoint.load` (`--load`), else a fresh start. Every rank verifies a share of
the manifest (size, sha256) before anything is read; every error is agreed across ranks and
raised as the same one-line `CheckpointError` on all of them.
"""

from __future__ import annotations

import os
import random
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

from stem_megatron.config import CheckpointConfig, ExperimentConfig, load_config
from stem_megatron.training import checkpoint_format as fmt
from stem_megatron.training.checkpoint_format import CheckpointError
from stem_megatron.training.table_io import (
    TableFormatError,
    TableReader,
    TableTarget,
    engine_file_tensors,
    merge_engine_files,
    write_table_file,
)

__all__ = ["CheckpointError", "Checkpointer", "check_compatible", "layout_of", "saved_config"]

DENSE_METADATA = {"non_homogeneous_layers": True, "distrib_optim_sharding_type": "fully_reshardable"}
# Fields of `model` that define the saved tensors; the others (sequence length, dropout,
# transformer_impl) may change between runs.
MODEL_SHAPE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
    "query_groups", "head_dim", "normalization", "tie_embeddings",
)
RNG_LAYOUT_KEYS = ("world_size", "tp", "pp", "vpp", "cp", "dp")
_HYPER_KEYS = ("betas", "eps")  # lr and weight_decay are set by the trainer every step


# ---------------------------------------------------------------------------------- helpers
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# Every checkpoint collective spans the world group: all ranks write, hash and verify a share.
def _world_group():
    return dist.group.WORLD


def _agree(fn, *args, **kwargs):
    """Run fn on every rank; if any rank raised, raise the first rank's error on all of them."""
    err, out = None, None
    try:
        out = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any rank's failure must reach every rank
        err = f"{e}" if isinstance(e, CheckpointError | TableFormatError) else f"{type(e).__name__}: {e}"
    if dist.is_initialized():
        errs = [None] * _world()
        dist.all_gather_object(errs, err, group=_world_group())
        err = next((e for e in errs if e), None)
    if err:
        raise CheckpointError(err.replace("\n", " "))
    return out


def _all_gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj, group=_world_group())
    return out


def _broadcast(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_world_group())
    return box[0]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=_world_group())


def layout_of(cfg: ExperimentConfig, world_size: int) -> dict:
    """The parallel layout of `cfg` at `world_size` (what a checkpoint records)."""
    p = cfg.parallel
    dp = cfg.validate_world(world_size)
    shard = cfg.stem.shard_size or dp * p.context_parallel_size
    return {
        "world_size": world_size, "tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
        "vpp": p.virtual_pipeline_model_parallel_size, "cp": p.context_parallel_size, "dp": dp,
        "shard_size": shard if cfg.stem_layers else None,
        "use_distributed_optimizer": p.use_distributed_optimizer,
    }


def saved_config(ckpt_dir: str) -> ExperimentConfig:
    try:
        return load_config(os.path.join(ckpt_dir, fmt.CONFIG))
    except ValueError as e:  # ConfigError
        raise CheckpointError(f"checkpoint {ckpt_dir}: its {fmt.CONFIG} does not validate ({e})") from None


def read_meta(ckpt_dir: str) -> dict:
    import json

    try:
        with open(os.path.join(ckpt_dir, fmt.META)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {fmt.META} is unreadable ({e})") from None
    if meta.get("format") != fmt.FORMAT or meta.get("version") != fmt.VERSION:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {fmt.META} is format {meta.get('format')!r} "
                              f"version {meta.get('version')}, expected {fmt.FORMAT!r} version {fmt.VERSION}")
    return meta


def check_compatible(cfg: ExperimentConfig, meta: dict, saved: ExperimentConfig, ckpt_dir: str, bf16: bool) -> list[str]:
    """Raise CheckpointError (one line) if `cfg` cannot continue from this checkpoint.

    Returns notes (one line each) on what loads, but not bit for bit: today only a vocabulary
    padding that changes with TP.
    """
    def fail(what: str) -> None:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {what}")

    for name in MODEL_SHAPE_FIELDS:
        a, b = getattr(saved.model, name), getattr(cfg.model, name)
        if a != b:
            fail(f"saved with model.{name}={a}, this run has {b}")
    if saved.stem_layers != cfg.stem_layers:
        fail(f"saved with STEM layers {saved.stem_layers}, this run has {cfg.stem_layers}")
    if meta["layout"]["use_distributed_optimizer"] != cfg.parallel.use_distributed_optimizer:
        fail(f"saved with parallel.use_distributed_optimizer={meta['layout']['use_distributed_optimizer']}, this run "
             f"has {cfg.parallel.use_distributed_optimizer}; the dense optimizer state formats differ")
    if meta["bf16"] != bf16:
        fail(f"saved with {'bf16' if meta['bf16'] else 'fp32'} parameters, this run uses {'bf16' if bf16 else 'fp32'}")
    if meta["global_batch_size"] != cfg.train.global_batch_size:
        fail(f"saved with train.global_batch_size={meta['global_batch_size']}; the data position "
             f"(consumed samples {meta['consumed_samples']}) needs the same global batch, this run has "
             f"{cfg.train.global_batch_size}")
    notes = []
    tp = cfg.parallel.tensor_model_parallel_size
    padded = cfg.model.padded_vocab_size(tp)
    if meta["padded_vocab_size"] != padded:
        notes.append(
            f"vocabulary padding changes from {meta['padded_vocab_size']} to {padded} rows (TP {meta['layout']['tp']} -> "
            f"{tp}): the {cfg.model.vocab_size} vocabulary rows of the embedding/output layer load exactly, padding rows "
            "are dropped or zero-filled, and the softmax over the padded vocabulary changes slightly; for bit-exact "
            "resharding choose model.make_vocab_size_divisible_by so that both paddings agree"
        )
    return notes


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


def _dense_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------- the checkpointer
class Checkpointer:
    """Saves to `cfg.save`, resumes from it (or from `cfg.load`); see the module docstring."""

    def __init__(self, cfg: CheckpointConfig):
        self.cfg = cfg
        self.last_saved_step: int | None = None
        self.loaded: str | None = None
        self.loaded_step: int | None = None

    # ------------------------------------------------------------------ dense state
    @staticmethod
    def _sharded_state_dict(trainer, is_loading: bool) -> dict:
        # A fresh metadata dict with the group given explicitly: megatron fills a missing
        # `dp_cp_group` in place, which would outlive this process's parallel layout.
        metadata = {**DENSE_METADATA, "dp_cp_group": trainer.dp_group}
        model = {f"chunk{i}": c.sharded_state_dict(metadata=metadata) for i, c in enumerate(trainer.chunks)}
        optimizer = trainer.optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=metadata)
        return {"model": model, "optimizer": optimizer}

    # ------------------------------------------------------------------ save
    def maybe_save(self, trainer) -> str | None:
        """Save when `save_interval` divides the step."""
        if self.cfg.save and self.cfg.save_interval and trainer.step % self.cfg.save_interval == 0:
            return self.save(trainer)
        return None

    def save(self, trainer, final: bool = False) -> str | None:
        """Write a checkpoint of the trainer's current state to `cfg.save`; returns its path (None: no save dir).

        Collective over the world. `final` only changes the log line.
        """
        root = self.cfg.save
        step = trainer.step
        if root is None or self.last_saved_step == step:
            return None
        name = fmt.step_dir_name(step)
        if self.loaded_step == step and self.loaded == os.path.join(root, name):
            self.last_saved_step = step  # resumed here and nothing changed since: it is on disk
            return self.loaded
        from megatron.core import dist_checkpointing

        from stem_megatron import compat

        compat.apply()
        use_in_process_write_results()
        t0 = time.perf_counter()
        tmp = os.path.join(root, fmt.TMP_PREFIX + name)
        if _rank() == 0:
            os.makedirs(root, exist_ok=True)
            fmt.clean_stale(root)
            os.makedirs(tmp)
        _barrier()
        dist_checkpointing.save(self._sharded_state_dict(trainer, is_loading=False), tmp,
                                validate_access_integrity=True)
        # Failures of one rank's writes (a full disk) are agreed, so no rank waits in a collective.
        table_entry = _agree(self._write_tables, trainer, tmp)
        _agree(self._write_rng, tmp)
        entries = _all_gather(table_entry)
        _agree(lambda: self._write_meta(trainer, tmp, [e for e in entries if e is not None]) if _rank() == 0 else None)
        files = self._hash_files(tmp)
        final_dir = os.path.join(root, name)
        pruned = _agree(self._publish, tmp, root, name, step, files)
        if _rank() == 0:
            size = sum(e["size"] for e in files.values())
            trainer.metrics.line(
                f"checkpoint: saved step {step} to {final_dir} ({size / 2**20:.1f} MiB, {len(files)} files, "
                f"{time.perf_counter() - t0:.1f} s)" + (" [final]" if final else "")
                + (f"; removed {', '.join(pruned)}" if pruned else "")
            )
        self.last_saved_step = step
        return final_dir

    def _publish(self, tmp: str, root: str, name: str, step: int, files: dict) -> list[str]:
        """Rank 0: manifest, directory fsyncs, atomic rename, `latest`, pruning; returns pruned names."""
        if _rank() != 0:
            return []
        fmt.fsync_dirs(tmp)
        fmt.write_manifest(tmp, step, files)
        fmt.publish(tmp, root, name)
        return fmt.prune(root, self.cfg.keep_last)

    @staticmethod
    def _write_tables(trainer, tmp: str) -> dict | None:
        """Replica 0 of every shard group writes its rows of all its engines; returns the index entry."""
        engines = trainer.engines
        if not engines or engines[0].replica_rank != 0:
            return None
        parts = [engine_file_tensors(e, st) for e, st in zip(engines, trainer.table_optimizer.state)]
        tensors, meta = merge_engine_files(parts)
        rel = os.path.join(fmt.TABLES, f"rank{_rank():05d}.safetensors")
        os.makedirs(os.path.join(tmp, fmt.TABLES), exist_ok=True)
        write_table_file(os.path.join(tmp, rel), tensors, meta)
        layers = sorted(i for e in engines for i in e.layout.layer_ids)
        return {"path": rel, "layers": layers, **meta}

    @staticmethod
    def _write_rng(tmp: str) -> None:
        os.makedirs(os.path.join(tmp, fmt.RNG), exist_ok=True)
        path = os.path.join(tmp, fmt.RNG, f"rank{_rank():05d}.pt")
        with open(path, "wb") as f:
            torch.save(_rng_state(), f)
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def _write_meta(trainer, tmp: str, table_files: list[dict]) -> None:
        import megatron.core

        cfg = trainer.cfg
        with open(os.path.join(tmp, fmt.CONFIG), "w") as f:
            f.write(cfg.to_yaml())
        tokenizer = None
        src = cfg.data.tokenizer
        if src and os.path.exists(src):
            from stem_megatron.data.tokenizer import detect_kind

            dst = os.path.join(tmp, fmt.TOKENIZER)
            if os.path.isdir(src):
                shutil.copytree(src, dst)
                tokenizer = {"kind": cfg.data.tokenizer_type or detect_kind(src), "path": fmt.TOKENIZER}
            else:
                os.makedirs(dst)
                shutil.copy2(src, dst)
                tokenizer = {"kind": cfg.data.tokenizer_type or detect_kind(src),
                             "path": os.path.join(fmt.TOKENIZER, os.path.basename(src))}
        layout = layout_of(cfg, trainer.info.world_size)
        meta = {
            "format": fmt.FORMAT, "version": fmt.VERSION, "step": trainer.step,
            "consumed_samples": trainer.step * cfg.train.global_batch_size,
            "global_batch_size": cfg.train.global_batch_size,
            "skipped_steps": trainer.skipped_steps, "consecutive_skips": trainer.consecutive_skips,
            "lr": trainer.dense_lr(trainer.step), "table_lr": trainer.table_lr(trainer.step),
            "layout": layout, "bf16": bool(trainer.bf16),
            "padded_vocab_size": cfg.model.padded_vocab_size(cfg.parallel.tensor_model_parallel_size),
            "dense_optimizer": "distributed_fully_reshardable" if cfg.parallel.use_distributed_optimizer else "plain",
            "tables": {
                "vocab_size": cfg.model.vocab_size, "ffn_hidden_size": cfg.model.ffn_hidden_size,
                "layers": cfg.stem_layers, "files": sorted(table_files, key=lambda e: e["path"]),
            } if cfg.stem_layers else None,
            "rng": {"layout": {k: layout[k] for k in RNG_LAYOUT_KEYS},
                    "files": [os.path.join(fmt.RNG, f"rank{r:05d}.pt") for r in range(trainer.info.world_size)]},
            "tokenizer": tokenizer,
            "versions": {"torch": torch.__version__, "megatron_core": megatron.core.__version__},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        fmt.write_json_atomic(os.path.join(tmp, fmt.META), meta)

    @staticmethod
    def _hash_files(ckpt_dir: str) -> dict[str, dict]:
        """Every rank hashes (and fsyncs) a size-balanced share of the files; all ranks get the full table."""
        names = _broadcast(fmt.list_files(ckpt_dir) if _rank() == 0 else None)
        sizes = {n: os.path.getsize(os.path.join(ckpt_dir, n)) for n in names} if _rank() == 0 else None
        share = _broadcast(fmt.split_by_size(sizes, _world()) if _rank() == 0 else None)[_rank()]
        mine = _agree(fmt.describe_files, ckpt_dir, share)
        return {k: v for part in _all_gather(mine) for k, v in part.items()}

    # ------------------------------------------------------------------ load
    def resume(self, trainer) -> str | None:
        """Load the latest checkpoint of `cfg.save`, else `cfg.load`; None when starting fresh."""
        ckpt = None
        if self.cfg.save:
            ckpt = _agree(fmt.resolve, self.cfg.save)
            if ckpt and self.cfg.load:
                trainer.metrics.line(f"checkpoint: {self.cfg.save} has a checkpoint; resuming from it, not from "
                                     f"checkpoint.load={self.cfg.load}")
        if ckpt is None and self.cfg.load:
            ckpt = _agree(fmt.resolve, self.cfg.load)
            if ckpt is None:
                raise CheckpointError(f"checkpoint.load={self.cfg.load}: no checkpoint there")
        if ckpt is None:
            return None
        self.load(trainer, ckpt)
        return ckpt

    def _verify(self, ckpt: str) -> dict:
        manifest = _agree(fmt.read_manifest, ckpt)
        sizes = {n: e["size"] for n, e in manifest["files"].items()}
        share = fmt.split_by_size(sizes, _world())[_rank()]
        _agree(fmt.verify, ckpt, share)
        return manifest

    def load(self, trainer, ckpt: str) -> None:
        """Load checkpoint directory `ckpt` into the set-up trainer (any layout). Collective."""
        from megatron.core import dist_checkpointing

        from stem_megatron import compat

        t0 = time.perf_counter()
        self._verify(ckpt)
        meta = _agree(read_meta, ckpt)
        saved = _agree(saved_config, ckpt)
        notes = _agree(check_compatible, trainer.cfg, meta, saved, ckpt, bool(trainer.bf16))
        compat.apply()
        now = layout_of(trainer.cfg, trainer.info.world_size)
        hyper = [[{k: g[k] for k in _HYPER_KEYS} for g in opt.param_groups] for opt in _dense_optimizers(trainer.optimizer)]
        if trainer.cfg.parallel.use_distributed_optimizer:
            with torch.no_grad():
                for opt in _dense_optimizers(trainer.optimizer):
                    if len(opt.optimizer.state) == 0:  # state_dict() needs allocated state and a step
                        opt._init_optimizer_states_with_dummy_values()
        request = self._sharded_state_dict(trainer, is_loading=True)
        with torch.no_grad():
            loaded = dist_checkpointing.load(request, ckpt, validate_access_integrity=True)
            for i, chunk in enumerate(trainer.chunks):
                chunk.load_state_dict(loaded["model"][f"chunk{i}"], strict=True)
            self._load_dense_optimizer(trainer.optimizer, loaded["optimizer"])
        self._fix_dense_optimizer(trainer, hyper)
        if meta["tables"] is not None:
            _agree(self._load_tables, trainer, ckpt, meta["tables"])
        trainer.step = int(meta["step"])
        trainer.skipped_steps = int(meta["skipped_steps"])
        trainer.consecutive_skips = int(meta["consecutive_skips"])
        same_rng_layout = meta["rng"]["layout"] == {k: now[k] for k in RNG_LAYOUT_KEYS}
        if same_rng_layout:
            path = os.path.join(ckpt, fmt.RNG, f"rank{_rank():05d}.pt")
            state = _agree(lambda: torch.load(path, weights_only=True))
            _set_rng_state(state)
        _barrier()
        self.loaded, self.loaded_step = ckpt, trainer.step
        changed = {k: (meta["layout"][k], now[k]) for k in now if meta["layout"].get(k) != now[k]}
        trainer.metrics.line(
            f"checkpoint: resumed from {ckpt} at step {trainer.step} (consumed samples {meta['consumed_samples']}, "
            f"{time.perf_counter() - t0:.1f} s)"
            + (" resharded " + ", ".join(f"{k} {a}->{b}" for k, (a, b) in changed.items()) if changed else "")
        )
        for note in notes:
            trainer.metrics.line(f"checkpoint: {note}")
        if not same_rng_layout:
            trainer.metrics.line(
                "checkpoint: RNG states not restored (saved for another parallel layout); every generator keeps "
                f"its train.seed={trainer.cfg.train.seed} initialisation"
            )

    @staticmethod
    def _load_dense_optimizer(optimizer, state: dict) -> None:
        """megatron's optimizer load, with the torch-AdamW `step` kept out of the fully_reshardable path.

        `DistributedOptimizer.load_parameter_state_from_fully_reshardable` copies every state
        tensor of a parameter from the checkpoint's model-space tensors, `step` included, which
        that format does not store (KeyError: 'step'). The step comes from the param groups
        (loaded first); the parameter tensors are loaded with it set aside.
        """
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        opts = _dense_optimizers(optimizer)
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

    @staticmethod
    def _fix_dense_optimizer(trainer, hyper) -> None:
        """After megatron's load: one `step` tensor per parameter, hyperparameters from the config.

        The distributed optimizer's torch-optimizer load path gives every parameter the same
        `step` tensor; AdamW's in-place `step += 1` would then advance it once per parameter.
        """
        for opt, groups in zip(_dense_optimizers(trainer.optimizer), hyper):
            for state in opt.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].detach().clone()
            for group, want in zip(opt.param_groups, groups):
                diff = {k: (group[k], v) for k, v in want.items() if group[k] != v}
                if diff:
                    trainer.metrics.line("checkpoint: dense optimizer " + ", ".join(
                        f"{k} {a} -> {b}" for k, (a, b) in diff.items()) + " (the config's values are used)")
                group.update(want)

    @staticmethod
    def _load_tables(trainer, ckpt: str, index: dict) -> None:
        reader = TableReader(ckpt, index)
        for e in trainer.engines:
            lay = e.layout
            target = TableTarget(e.global_rows(), lay.col_start, lay.cols_local)
            steps = None
            for slot, layer in enumerate(lay.layer_ids):
                out, step = reader.read_layer(layer, target)
                for kind in ("weight", "exp_avg", "exp_avg_sq"):
                    e.set_rows(kind, out[kind], slot=slot)
                if steps is None:
                    steps = step
                elif not torch.equal(steps, step):
                    raise CheckpointError(
                        f"checkpoint {ckpt}: STEM layers {lay.layer_ids[0]} and {layer} have different per-row update "
                        "counts; they cannot share one engine"
                    )
            e.set_rows("step", steps)
