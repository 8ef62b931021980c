"""`stem-train`: `python -m stem_megatron.cli.train --config X.yaml [section.key=value ...] [--dry-run]`.

Run under torchrun (see launch/torchrun.sh). `--dry-run` prints the resolved config, parameter
counts and FLOPs and exits without starting a process group or allocating the model.

Checkpoints (docs/checkpoints.md): with `checkpoint.save=DIR` the run saves every
`checkpoint.save_interval` steps, on SIGTERM/SIGUSR1 (after the current step) and at the end, and
a restarted run resumes from `DIR/latest` automatically; `--load CKPT` (a save directory or one
`step_*` directory in it) starts from CKPT when DIR holds no checkpoint yet.

Exit codes (one line on stderr, from rank 0; docs/training.md): 0 done (or stopped cleanly by
SIGTERM/SIGUSR1, after saving), 2 bad config or input (data, tokenizer, token ids, an unwritable
TensorBoard directory or --summary-json, a resumed step past train.train_steps), 3 non-finite
abort, 4 checkpoint error (missing, corrupt or incompatible; checkpoint.save not writable; a save
that failed, the previous checkpoint intact), 130 interrupted (SIGINT).
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


_RESUME = "the last checkpoint (if any) is intact; rerun the same command to resume"


def _errors():
    """(exception, exit code, prefix) of every failure a user can cause in a run; see stem_megatron.cli.run."""
    from stem_megatron.config import ConfigError
    from stem_megatron.data.datasets import DataError
    from stem_megatron.data.tokenizer import TokenizerError
    from stem_megatron.stem.exchange import StemIndexError
    from stem_megatron.training.checkpoint_format import CheckpointError
    from stem_megatron.training.trainer import NonFiniteAbort

    return ((ConfigError, 2, ""), (DataError, 2, ""), (TokenizerError, 2, "data.tokenizer: "),
            (StemIndexError, 2, ""), (NonFiniteAbort, 3, "aborted: "),
            (CheckpointError, 4, "checkpoint error: "))


def main(argv=None) -> int:
    from stem_megatron import cli

    args = parse_args(argv)
    cli.quiet_known_warnings()
    from stem_megatron.config import ConfigError

    # Config errors are found before the heavy imports that _errors() needs.
    return cli.run("stem-train", lambda: _main(args), errors=((ConfigError, 2, ""),), interrupted_note=_RESUME)


def _main(args) -> int:
    import warnings

    from stem_megatron import cli
    from stem_megatron.config import ConfigWarning, load_config
    from stem_megatron.flops import format_counts

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        cfg = load_config(args.config, args.overrides)
    for w in caught:  # one line each, from rank 0
        if issubclass(w.category, ConfigWarning):
            cli.say("stem-train", f"warning: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if args.load is not None:
        cfg.checkpoint.load = args.load
    if args.dry_run:
        print(cfg.to_yaml().rstrip())
        print()
        print(format_counts(cfg))
        world = args.world_size or int(os.environ.get("WORLD_SIZE", "0"))
        if world:
            from stem_megatron.memory import format_memory

            print(format_memory(cfg, world))  # a layout that does not fit `world` is a ConfigError: exit 2
        _dry_run_inputs(cfg)
        return 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.validate_world(world)  # the same ConfigError on every rank, before any process group
    return cli.run("stem-train", lambda: _train(cfg, args), errors=_errors(), interrupted_note=_RESUME)


def _dry_run_inputs(cfg) -> None:
    """The input checks training makes first, as warnings: a dry run also serves configs whose data
    is elsewhere (the paper configs' counts)."""
    from stem_megatron import cli
    from stem_megatron.model import TE_IMPORT_ERROR
    from stem_megatron.training.preflight import check_inputs

    try:
        check_inputs(cfg)
    except cli.UserError as e:
        print(f"stem-train: warning: {e} (a run would stop with exit code {e.code})", file=sys.stderr)
    if TE_IMPORT_ERROR and cfg.model.transformer_impl != "local":
        print(f"stem-train: warning: Transformer Engine does not import ({TE_IMPORT_ERROR})", file=sys.stderr)


def _train(cfg, args) -> int:
    import torch.distributed as dist

    from stem_megatron import cli
    from stem_megatron.model import TE_IMPORT_ERROR
    from stem_megatron.parallel import init_distributed
    from stem_megatron.training import preflight
    from stem_megatron.training.checkpoint import Checkpointer
    from stem_megatron.training.trainer import Trainer

    if TE_IMPORT_ERROR and cfg.model.transformer_impl == "auto":
        cli.say("stem-train", f"note: Transformer Engine is installed but does not import ({TE_IMPORT_ERROR}); "
                "model.transformer_impl=auto uses the local implementation")
    is_rank0 = cli.rank() == 0
    trainer = Trainer(cfg)
    trainer.checkpointer = Checkpointer(cfg.checkpoint)
    trainer._install_signal_handlers()  # before anything slow: a SIGTERM now must not kill the worker
    init_distributed()
    # Inputs and outputs are checked on every rank and agreed before anything is built.
    cli.agree(lambda: (preflight.check_inputs(cfg),
                       preflight.check_outputs(cfg, args.summary_json, is_rank0, preflight.default_log_dir(cfg))),
              errors=_errors())
    trainer.setup()
    _check_resume(trainer, cfg)
    if trainer.is_logger:
        os.makedirs(trainer.log_dir, exist_ok=True)
        with open(os.path.join(trainer.log_dir, "config.yaml"), "w") as f:
            f.write(cfg.to_yaml())
    summary = trainer.train()
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


def _check_resume(trainer, cfg) -> None:
    """A resumed checkpoint already past train.train_steps is a mismatch, not a finished run."""
    from stem_megatron.errors import EXIT_INPUT, UserError

    ck = trainer.checkpointer
    if ck.loaded is not None and trainer.step > cfg.train.train_steps:
        raise UserError(f"resumed {ck.loaded} at step {trainer.step}, past train.train_steps="
                        f"{cfg.train.train_steps}: nothing to train; raise train.train_steps or use another "
                        "checkpoint.save", EXIT_INPUT)


if __name__ == "__main__":
    sys.exit(main())
