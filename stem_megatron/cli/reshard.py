"""`stem-reshard`: the command line of `stem_megatron.reshard` (what it writes and its exit codes are
documented there and in docs/checkpoints.md).

Only argparse and `stem_megatron.cli` are imported before `main` runs: torch and megatron-core
(seconds) are imported under `cli.run`, so a Ctrl-C while the command starts ends with one line and
exit 130.
"""

from __future__ import annotations

import argparse
import sys
import time

from stem_megatron import cli

PROG = "stem-reshard"


def main(argv=None) -> int:
    return cli.run(PROG, lambda: _main(argv))  # start-up (parsing, imports) under cli.run too: see above


def _main(argv) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description="`stem-reshard`: rewrite a STEM checkpoint for another "
                                                        "parallel layout, offline, in one CPU process.")
    ap.add_argument("--input", required=True, help="a checkpoint directory, or a save directory (uses latest)")
    ap.add_argument("--output", required=True,
                    help="save directory to write step_N and latest into (new or empty)")
    ap.add_argument("--world-size", type=int, required=True, help="number of ranks of the target run")
    ap.add_argument("--overwrite", action="store_true",
                    help="--output may be a save directory already; its checkpoint of the same step is replaced")
    ap.add_argument("overrides", nargs="*", help="target layout: parallel.*=..., stem.shard_size=...")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cli.quiet_known_warnings()
    from stem_megatron.config import ConfigError
    from stem_megatron.reshard import reshard
    from stem_megatron.stem.table_io import TableFormatError
    from stem_megatron.training.checkpoint_format import CheckpointError

    def body() -> int:
        out, before, after = reshard(args.input, args.output, args.world_size, args.overrides, args.overwrite)
        changes = ", ".join(f"{k} {before.get(k)}->{v}" for k, v in after.items() if before.get(k) != v) or "no change"
        print(f"stem-reshard: wrote {out} ({changes}; {time.perf_counter() - t0:.1f} s)")
        return 0

    return cli.run(PROG, body, errors=(
        (ConfigError, 2, ""), (CheckpointError, 4, "checkpoint error: "), (TableFormatError, 4, "checkpoint error: "),
        (OSError, 4, "cannot write the output: ")),
        interrupted_note="nothing published (the partial output was removed)")


if __name__ == "__main__":
    sys.exit(main())
