"""`stem-export`: the command line of `stem_megatron.export` (what it writes and its exit codes are
documented there and in docs/checkpoints.md).

Only argparse and `stem_megatron.cli` are imported before `main` runs: torch and the export library
(seconds) are imported under `cli.run`, so a Ctrl-C while the command starts ends with one line and
exit 130.
"""

from __future__ import annotations

import argparse
import sys

from stem_megatron import cli

PROG = "stem-export"


def main(argv=None) -> int:
    return cli.run(PROG, lambda: _main(argv))  # start-up (parsing, imports) under cli.run too: see above


def _main(argv) -> int:
    ap = argparse.ArgumentParser(
        prog=PROG, description="`stem-export`: a STEM checkpoint (any layout) to a Hugging Face style directory, on CPU.")
    ap.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a save directory (uses latest)")
    ap.add_argument("--output", required=True, help="directory to create (must not exist or be empty)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights dtype [float32]")
    ap.add_argument("--tokenizer", help="tokenizer file/directory to ship instead of the checkpoint's copy")
    args = ap.parse_args(argv)
    cli.quiet_known_warnings()
    from stem_megatron.data.tokenizer import TokenizerError
    from stem_megatron.export import ExportArgumentError, export
    from stem_megatron.stem.table_io import TableFormatError
    from stem_megatron.training.checkpoint_format import CheckpointError

    def body() -> int:
        ckpt = export(args.checkpoint, args.output, args.dtype, args.tokenizer)
        print(f"stem-export: wrote {args.output} from {ckpt}")
        return 0

    return cli.run(PROG, body, errors=(
        (ExportArgumentError, 2, ""), (TokenizerError, 2, "--tokenizer: "),
        (CheckpointError, 4, "checkpoint error: "), (TableFormatError, 4, "checkpoint error: "),
        (KeyError, 4, "checkpoint error: "), (OSError, 2, "cannot write the output: ")),
        interrupted_note="nothing written (the temporary directory was removed)")


if __name__ == "__main__":
    sys.exit(main())
