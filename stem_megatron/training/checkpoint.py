"""Save and resume a `Trainer`: the orchestration of one checkpoint save and one load.

    trainer.checkpointer = Checkpointer(cfg.checkpoint)
    trainer.setup()               # ends with checkpointer.resume(trainer)
    trainer.train()               # maybe_save() after each step, save() on SIGTERM/SIGUSR1 and at the end

What a checkpoint holds (directory layout and publishing: checkpoint_format.py):
- dense model weights and the dense optimizer state through megatron's dist_checkpointing, at any
  TP/PP/VPP/DP (checkpoint_dense.py);
- STEM tables and RowSparseAdamW state: one file per writing rank, rows by global id
  (stem/table_io.py); any layout reads the rows and columns it owns;
- step, consumed samples, skipped-step counters, the layouts, versions, the resolved config and a
  copy of the tokenizer (checkpoint_meta.py); the LR schedules are pure functions of the step; the
  data position is step x global batch;
- RNG states of every rank (checkpoint_rng.py; restored when the parallel layout is the same).

Resume order: the latest checkpoint in `checkpoint.save` if there is one (a restarted job
continues), else `checkpoint.load` (`--load`), else a fresh start. Every rank verifies a share of
the manifest (size, sha256) before anything is read. Every failure, on any rank, is agreed
across ranks (checkpoint_collective.py) and raised as the same one-line `CheckpointError` on all
of them; a save that fails anywhere publishes nothing.
"""

from __future__ import annotations

import os
import time

import torch

from stem_megatron.config import CheckpointConfig
from stem_megatron.stem.table_io import (
    KINDS,
    TableReader,
    TableTarget,
    engine_file_tensors,
    merge_engine_files,
    write_table_file,
)
from stem_megatron.training import checkpoint_dense as dense
from stem_megatron.training import checkpoint_format as fmt
from stem_megatron.training import checkpoint_rng as rng
from stem_megatron.training.checkpoint_collective import agree, all_gather, barrier, broadcast, rank, world
from stem_megatron.training.checkpoint_format import CheckpointError
from stem_megatron.training.checkpoint_meta import (
    RNG_LAYOUT_KEYS,
    check_compatible,
    layout_of,
    read_meta,
    saved_config,
    weights_only,
    write_meta,
)

__all__ = ["CheckpointError", "Checkpointer"]


class Checkpointer:
    """Saves to `cfg.save`, resumes from it (or from `cfg.load`); see the module docstring."""

    def __init__(self, cfg: CheckpointConfig):
        self.cfg = cfg
        self.last_saved_step: int | None = None
        self.loaded: str | None = None
        self.loaded_step: int | None = None

    # ------------------------------------------------------------------ save
    def maybe_save(self, trainer) -> str | None:
        """Save when `save_interval` divides the step."""
        if self.cfg.save and self.cfg.save_interval and trainer.step % self.cfg.save_interval == 0:
            return self.save(trainer)
        return None

    def save(self, trainer, final: bool = False) -> str | None:
        """Write a checkpoint of the trainer's current state to `cfg.save`; returns its path (None: no save dir).

        Collective over the world. `final` only changes the log line. Every part is agreed: a
        failure on any rank (a full disk) raises the same CheckpointError on every rank, and no
        rank publishes.
        """
        root = self.cfg.save
        step = trainer.step
        if root is None or self.last_saved_step == step:
            return None
        name = fmt.step_dir_name(step)
        if self.loaded_step == step and self.loaded == os.path.join(root, name):
            self.last_saved_step = step  # resumed here and nothing changed since: it is on disk
            return self.loaded
        t0 = time.perf_counter()
        tmp = os.path.join(root, fmt.TMP_PREFIX + name)
        agree(self._prepare, root, tmp)
        agree(dense.save, trainer, tmp)
        table_entry = agree(self._write_tables, trainer, tmp)
        agree(rng.write_rng, tmp, rank())
        entries = [e for e in all_gather(table_entry) if e is not None]
        agree(lambda: write_meta(trainer, tmp, entries) if rank() == 0 else None)
        files = self._hash_files(tmp)
        final_dir = os.path.join(root, name)
        pruned = agree(self._publish, tmp, root, name, step, files)
        if rank() == 0:
            size = sum(e["size"] for e in files.values())
            trainer.metrics.line(
                f"checkpoint: saved step {step} to {final_dir} ({size / 2**20:.1f} MiB, {len(files)} files, "
                f"{time.perf_counter() - t0:.1f} s)" + (" [final]" if final else "")
                + (f"; removed {', '.join(pruned)}" if pruned else "")
            )
        self.last_saved_step = step
        return final_dir

    @staticmethod
    def _prepare(root: str, tmp: str) -> None:
        """Rank 0: the save directory, without leftovers of interrupted saves, and an empty `tmp`."""
        if rank() == 0:
            os.makedirs(root, exist_ok=True)
            fmt.clean_stale(root)
            os.makedirs(tmp)

    def _publish(self, tmp: str, root: str, name: str, step: int, files: dict) -> list[str]:
        """Rank 0: directory fsyncs, manifest, atomic rename, `latest`, pruning; returns pruned names."""
        if rank() != 0:
            return []
        fmt.seal_and_publish(tmp, root, name, step, files)
        return fmt.prune(root, self.cfg.keep_last)

    @staticmethod
    def _write_tables(trainer, tmp: str) -> dict | None:
        """Replica 0 of every shard group writes its rows of all its engines; returns the index entry."""
        engines = trainer.engines
        if not engines or engines[0].replica_rank != 0:
            return None
        parts = [engine_file_tensors(e, st) for e, st in zip(engines, trainer.table_optimizer.state)]
        tensors, meta = merge_engine_files(parts)
        rel = os.path.join(fmt.TABLES, f"rank{rank():05d}.safetensors")
        os.makedirs(os.path.join(tmp, fmt.TABLES), exist_ok=True)
        write_table_file(os.path.join(tmp, rel), tensors, meta)
        layers = sorted(i for e in engines for i in e.layout.layer_ids)
        return {"path": rel, "layers": layers, **meta}

    @staticmethod
    def _hash_files(ckpt_dir: str) -> dict[str, dict]:
        """Every rank hashes (and fsyncs) a size-balanced share of the files; all ranks get the full table."""
        names = broadcast(fmt.list_files(ckpt_dir) if rank() == 0 else None)
        sizes = {n: os.path.getsize(os.path.join(ckpt_dir, n)) for n in names} if rank() == 0 else None
        share = broadcast(fmt.split_by_size(sizes, world()) if rank() == 0 else None)[rank()]
        mine = agree(fmt.describe_files, ckpt_dir, share)
        return {k: v for part in all_gather(mine) for k, v in part.items()}

    # ------------------------------------------------------------------ load
    def resume(self, trainer) -> str | None:
        """Load the latest checkpoint of `cfg.save`, else `cfg.load`; None when starting fresh."""
        ckpt = None
        if self.cfg.save:
            ckpt = agree(fmt.resolve, self.cfg.save)
            if ckpt and self.cfg.load:
                trainer.metrics.line(f"checkpoint: {self.cfg.save} has a checkpoint; resuming from it, not from "
                                     f"checkpoint.load={self.cfg.load}")
        if ckpt is None and self.cfg.load:
            ckpt = agree(fmt.resolve, self.cfg.load)
            if ckpt is None:
                raise CheckpointError(f"checkpoint.load={self.cfg.load}: no checkpoint there")
        if ckpt is None:
            return None
        self.load(trainer, ckpt)
        return ckpt

    def _verify(self, ckpt: str) -> dict:
        manifest = agree(fmt.read_manifest, ckpt)
        sizes = {n: e["size"] for n, e in manifest["files"].items()}
        share = fmt.split_by_size(sizes, world())[rank()]
        agree(fmt.verify, ckpt, share)
        return manifest

    def load(self, trainer, ckpt: str) -> None:
        """Load checkpoint directory `ckpt` into the set-up trainer (any layout). Collective."""
        t0 = time.perf_counter()
        self._verify(ckpt)
        meta = agree(read_meta, ckpt)
        saved = agree(saved_config, ckpt)
        notes = agree(check_compatible, trainer.cfg, meta, saved, ckpt, bool(trainer.bf16))
        now = layout_of(trainer.cfg, trainer.info.world_size)
        if weights_only(meta):
            dense.load_weights_only(trainer, ckpt)
        else:
            dense.load(trainer, ckpt)
        if meta["tables"] is not None:
            kinds = ("weight",) if weights_only(meta) else KINDS
            agree(self._load_tables, trainer, ckpt, meta["tables"], kinds)
        trainer.step = int(meta["step"])
        trainer.skipped_steps = int(meta["skipped_steps"])
        trainer.consecutive_skips = int(meta["consecutive_skips"])
        same_rng_layout = meta["rng"]["layout"] == {k: now[k] for k in RNG_LAYOUT_KEYS}
        if same_rng_layout:
            rng.set_rng_state(agree(rng.read_rng, ckpt, rank()))
        barrier()
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
    def _load_tables(trainer, ckpt: str, index: dict, kinds=KINDS) -> None:
        """Table rows (and, with every kind, their AdamW moments and per-row steps) at this layout.

        A weights-only checkpoint (`stem-import`) has `weight` alone: the table optimizer keeps its
        fresh state (zero moments, step 0)."""
        reader = TableReader(ckpt, index)
        for e in trainer.engines:
            lay = e.layout
            target = TableTarget(e.global_rows(), lay.col_start, lay.cols_local)
            steps = None
            for slot, layer in enumerate(lay.layer_ids):
                out, step = reader.read_layer(layer, target, kinds=kinds)
                for kind in kinds:
                    e.set_rows(kind, out[kind], slot=slot)
                if steps is None:
                    steps = step
                elif not torch.equal(steps, step):
                    raise CheckpointError(
                        f"checkpoint {ckpt}: STEM layers {lay.layer_ids[0]} and {layer} have different per-row update "
                        "counts; they cannot share one engine"
                    )
            if kinds == KINDS:  # weights-only files carry no per-row steps: the fresh zeros stay
                e.set_rows("step", steps)
