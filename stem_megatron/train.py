"""Entry point: `python -m stem_megatron.train --config X.yaml [section.key=value ...] [--dry-run]`.

Run under torchrun (see launch/torchrun.sh). `--dry-run` prints the resolved config, parameter
counts and FLOPs and exits without starting a process group or allocating the model.

Checkpoints (docs/checkpoints.md): with `checkpoint.save=DIR` the run saves every
`checkpoint.save_interval` steps, on SIGTERM/SIGUSR1 (after the current step) and at the end, and
a restarted run resumes from `DIR/latest` automatically; `--load CKPT` (a save directory or one
`step_*` directory in it) starts from CKPT when DIR holds no checkpoint yet.

Exit codes: 0 done (or stopped cleanly by SIGTERM/SIGUSR1, after saving), 2 bad config,
3 non-finite abort, 4 checkpoint missing, corrupt or incompatible (nothing was loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="stem-train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config and counts, then exit")
    ap.add_argument("--world-size", type=int, default=None,
                    help="with --dry-run: also print per-rank memory for this many ranks (default $WORLD_SIZE)")
    ap.add_argument("--summary-json", help="rank 0 writes the run summary here")
    ap.add_argument("--load", metavar="CKPT",
                    help="checkpoint to start from when checkpoint.save holds none (sets checkpoint.load)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    return ap.parse_args(argv)


def _fmt(x, spec=".4f"):
    return "n/a" if x is None else format(x, spec)


def _human_summary(summary: dict, cfg) -> str:
    lines = [
        f"done: {summary['steps']} steps",
        f"  train loss      {_fmt(summary['first_loss'])} -> {_fmt(summary['last_loss'])}",
        f"  validation loss {_fmt(summary['first_val_loss'])} -> {_fmt(summary['last_val_loss'])}",
        f"  throughput      {_fmt(summary['tokens_per_s'], ',.0f')} tokens/s, {_fmt(summary['step_time_s'], '.3f')} s/step",
        f"  tensorboard     {summary['tensorboard']}   (tensorboard --logdir {summary['tensorboard']})",
    ]
    if cfg.checkpoint.save:
        lines.append(f"  checkpoints     {cfg.checkpoint.save}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from stem_megatron.config import ConfigError, load_config
    from stem_megatron.flops import format_counts

    try:
        cfg = load_config(args.config, args.overrides)
        if args.load is not None:
            cfg.checkpoint.load = args.load
    except (ConfigError, FileNotFoundError) as e:
        print(f"stem-train: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(cfg.to_yaml().rstrip())
        print()
        print(format_counts(cfg))
        world = args.world_size or int(os.environ.get("WORLD_SIZE", "0"))
        if world:
            from stem_megatron.memory import format_memory

            try:
                print(format_memory(cfg, world))
            except ConfigError as e:
                print(f"stem-train: {e}", file=sys.stderr)
                return 2
        return 0

    import warnings

    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    import torch.distributed as dist

    from stem_megatron.training.checkpoint import Checkpointer, CheckpointError
    from stem_megatron.training.trainer import NonFiniteAbort, Trainer

    trainer = Trainer(cfg)
    trainer.checkpointer = Checkpointer(cfg.checkpoint)
    is_rank0 = os.environ.get("RANK", "0") == "0"
    try:
        trainer.setup()
        if trainer.is_logger:
            os.makedirs(trainer.log_dir, exist_ok=True)
            with open(os.path.join(trainer.log_dir, "config.yaml"), "w") as f:
                f.write(cfg.to_yaml())
        summary = trainer.train()
    except ConfigError as e:
        print(f"stem-train: {e}", file=sys.stderr)
        return 2
    except NonFiniteAbort as e:
        print(f"stem-train: aborted: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:  # raised identically on every rank: one line, from rank 0
        if is_rank0:
            print(f"stem-train: checkpoint error: {e}", file=sys.stderr, flush=True)
        return 4
    if trainer.is_logger:
        if summary["stopped_by"]:
            saved = trainer.checkpointer.last_saved_step == trainer.step and cfg.checkpoint.save
            print(f"stem-train: stopped by {summary['stopped_by']} after step {trainer.step}; "
                  + (f"checkpoint saved in {cfg.checkpoint.save}, rerun the same command to resume" if saved
                     else "no checkpoint (checkpoint.save is not set)"), flush=True)
        print(_human_summary(summary, cfg), flush=True)
        print("summary: " + json.dumps(summary), flush=True)
        if args.summary_json:
            with open(args.summary_json, "w") as f:
                json.dump(summary, f, indent=2)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
