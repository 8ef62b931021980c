"""`stem-reshard`: rewrite a STEM checkpoint for another parallel layout, offline, in one CPU process.

    stem-reshard --input runs/a/checkpoints --output runs/b/checkpoints --world-size 16 \\
        parallel.tensor_model_parallel_size=2 parallel.pipeline_model_parallel_size=2 stem.shard_size=4

The target layout is the checkpoint's own config with `parallel.*` / `stem.shard_size`
overrides, at `--world-size` ranks; it is validated like a training run would validate it.
What is rewritten:
- STEM tables and their optimizer state: re-partitioned into one file per (TP rank, shard rank)
  of the target layout, rows round-robin over the target shard size, columns by target TP rank,
  so that every target rank reads exactly one file per table tensor;
- the recorded config and layout;
- RNG states: kept when the target layout equals the source, dropped otherwise (a run at another
  layout cannot continue the per-rank streams; the trainer reports it).
Dense weights and dense optimizer state are stored layout-independently (torch_dist with global
offsets; the distributed optimizer as `fully_reshardable`), so their files are copied as they
are; what could stop a target from loading them (vocabulary padding that depends on TP, a switch
between the plain and the distributed optimizer, fp32 <-> bf16) is checked here first.
Output: `OUTPUT/step_N` and `OUTPUT/latest`, written under a temporary name, fsynced and verified by
a manifest, published as the trainer publishes (checkpoint_format.seal_and_publish). The output
must be a new or empty directory, and never the input (symlinks resolved); with `--overwrite` it may
be a save directory, whose checkpoint of the same step is replaced.
Exit codes: 0 written, 2 bad arguments or layout (an output that is the input, not empty, a file
or not writable), 4 checkpoint missing/corrupt/incompatible or a write that failed, 130 Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import time

import torch

from stem_megatron.outputs import prepare_output, staged


def target_config(saved, overrides: list[str]):
    """The saved config with layout overrides applied (ConfigError on a bad key, value or rule)."""
    from stem_megatron.config import ConfigError, ExperimentConfig, apply_overrides

    for text in overrides:
        key = text.partition("=")[0].strip()
        if not (key.startswith("parallel.") or key == "stem.shard_size"):
            raise ConfigError(f"{key}: stem-reshard changes the layout only (parallel.*, stem.shard_size)")
    return ExperimentConfig.from_dict(apply_overrides(saved.to_dict(), overrides))


def _copy_dense(src: str, dst: str) -> list[str]:
    """Copy every file of `src` except the ones rewritten for the target layout; returns their names."""
    from stem_megatron.training import checkpoint_format as fmt

    skip_dirs = (fmt.TABLES + os.sep, fmt.RNG + os.sep)
    copied = []
    for name in fmt.list_files(src):
        if name.startswith(skip_dirs) or name in (fmt.META, fmt.CONFIG):
            continue
        os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
        shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
        copied.append(name)
    return copied


def write_tables(reader, out_dir: str, tp: int, shard: int) -> list[dict]:
    """One table file per (TP rank, shard rank) of the target layout; returns the index entries."""
    from stem_megatron.stem.ownership import RowOwnership
    from stem_megatron.stem.table_io import LazyTensor, TableTarget, write_table_file
    from stem_megatron.training import checkpoint_format as fmt

    vocab, ffn = reader.vocab_size, reader.ffn_hidden_size
    cols = ffn // tp
    os.makedirs(os.path.join(out_dir, fmt.TABLES), exist_ok=True)
    entries = []
    for t in range(tp):
        for g in range(shard):
            rows = RowOwnership(vocab, shard).owned_ids(g)  # the target shard rank's rows, padding dropped
            target = TableTarget(rows, t * cols, cols)
            tensors = [("rows", rows)]
            for layer in reader.layers:
                for kind in ("weight", "exp_avg", "exp_avg_sq"):
                    tensors.append((f"layers.{layer}.{kind}", LazyTensor(
                        (rows.numel(), cols), torch.float32,
                        lambda layer=layer, kind=kind, target=target: reader.read_layer(layer, target, (kind,))[0][kind])))
                tensors.append((f"layers.{layer}.step", LazyTensor(
                    (rows.numel(),), torch.int64,
                    lambda layer=layer, target=target: reader.read_layer(layer, target, ())[1])))
            meta = dict(vocab_size=vocab, ffn_hidden_size=ffn, col_start=t * cols, cols=cols,
                        shard_rank=g, shard_size=shard, tp_rank=t, tp_size=tp)
            rel = os.path.join(fmt.TABLES, f"tp{t:03d}_shard{g:05d}.safetensors")
            write_table_file(os.path.join(out_dir, rel), tensors, meta)
            entries.append({"path": rel, "layers": list(reader.layers), **meta})
    return entries


def check_output(input_path: str, src: str, output_root: str, step_name: str, overwrite: bool) -> None:
    """UserError / ConfigError (exit 2) unless `output_root` may receive `step_name`: not the input,
    nor inside it or inside the save directory holding it (symlinks resolved), a directory (or
    absent) that can be written in and is empty but for a killed run's leftovers; with `overwrite`,
    a save directory whose same step is replaced."""
    from stem_megatron.config import ConfigError
    from stem_megatron.training import checkpoint_format as fmt

    save_dir = os.path.dirname(src) if fmt.step_of(os.path.basename(src)) is not None else None
    prepare_output(output_root, inputs=[input_path, src, save_dir], kind="root", overwrite=True,
                   leftovers=fmt.STALE_PREFIXES)
    out = os.path.realpath(output_root)
    if not os.path.isdir(out):
        return  # output does not exist yet
    entries = [n for n in os.listdir(out) if not n.startswith(fmt.STALE_PREFIXES)]
    if not entries:
        return
    if not overwrite:
        held = " (it already holds " + step_name + ")" if step_name in entries else ""
        raise ConfigError(f"--output {output_root} exists and is not empty{held}; give an empty or new "
                          "directory, or --overwrite to replace that step")
    others = [n for n in entries if n != fmt.LATEST and fmt.step_of(n) is None]
    if others:
        raise ConfigError(f"--output {output_root} holds {others[0]!r}, which is not a checkpoint; "
                          "--overwrite only replaces checkpoints of a save directory")


def reshard(input_path: str, output_root: str, world_size: int, overrides: list[str],
            overwrite: bool = False) -> tuple[str, dict, dict]:
    """Write the resharded checkpoint; returns (its directory, source layout, target layout)."""
    from stem_megatron.training import checkpoint_format as fmt
    from stem_megatron.training.checkpoint_format import CheckpointError
    from stem_megatron.training.checkpoint_meta import (
        check_compatible,
        layout_of,
        read_meta,
        saved_config,
        weights_only,
    )

    src = fmt.resolve(input_path)
    if src is None:
        raise CheckpointError(f"{input_path}: no checkpoint there")
    meta, saved = read_meta(src), saved_config(src)
    name = fmt.step_dir_name(meta["step"])
    check_output(input_path, src, output_root, name, overwrite)  # before the long verify: arguments first
    if weights_only(meta):
        raise CheckpointError(f"checkpoint {src} is weights-only (stem-import): it has no optimizer state to "
                              "reshard, and stem-train --load reads it at any layout as it is")
    cfg = target_config(saved, overrides)
    layout = layout_of(cfg, world_size)  # validates the world (ConfigError)
    fmt.verify(src)
    for note in check_compatible(cfg, meta, saved, src, meta["bf16"]):
        print(f"stem-reshard: note: {note}")
    if os.path.isdir(output_root):
        fmt.clean_stale(output_root)
    with staged(os.path.join(output_root, fmt.TMP_PREFIX + name)) as tmp:  # removed on any failure
        return _write(src, tmp, output_root, name, meta, cfg, layout)


def _write(src: str, tmp: str, output_root: str, name: str, meta: dict, cfg, layout: dict) -> tuple[str, dict, dict]:
    """Fill `tmp` with the target layout's checkpoint and publish it as `output_root/name`."""
    from stem_megatron.stem.table_io import TableReader
    from stem_megatron.training import checkpoint_format as fmt
    from stem_megatron.training.checkpoint_meta import RNG_LAYOUT_KEYS

    _copy_dense(src, tmp)
    new_meta = dict(meta)
    if meta["tables"] is not None:
        reader = TableReader(src, meta["tables"])
        new_meta["tables"] = dict(meta["tables"], files=write_tables(reader, tmp, layout["tp"], layout["shard_size"]))
    if meta["rng"]["layout"] == {k: layout[k] for k in RNG_LAYOUT_KEYS}:
        shutil.copytree(os.path.join(src, fmt.RNG), os.path.join(tmp, fmt.RNG))
    else:  # per-rank streams of another layout cannot continue; the trainer reports it on load
        new_meta["rng"] = {"layout": None, "files": []}
    new_meta["layout"] = layout
    new_meta["padded_vocab_size"] = cfg.model.padded_vocab_size(layout["tp"])
    new_meta["resharded_from"] = {"path": os.path.abspath(src), "layout": meta["layout"],
                                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(os.path.join(tmp, fmt.CONFIG), "w") as f:
        f.write(cfg.to_yaml())
    fmt.write_json_atomic(os.path.join(tmp, fmt.META), new_meta)
    # Every file (describe_files) and directory fsynced, as the trainer's saves, before `latest` moves.
    files = fmt.describe_files(tmp, fmt.list_files(tmp))
    return fmt.seal_and_publish(tmp, output_root, name, meta["step"], files), meta["layout"], layout
