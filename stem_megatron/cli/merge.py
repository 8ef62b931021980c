"""`stem-merge`: the command line of `data_tools.merge` (documented there and in docs/data.md).

Only argparse and `stem_megatron.cli` are imported before `main` runs: megatron-core (seconds) is
imported under `cli.run`, so a Ctrl-C while the command starts ends with one line and exit 130.
"""

from __future__ import annotations

import argparse
import sys

from stem_megatron import cli

PROG = "stem-merge"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="concatenate Megatron indexed datasets into one, "
                                                       "in the order given")
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PREFIX",
        help="dataset prefixes (PREFIX.bin + PREFIX.idx), concatenated in the order given",
    )
    p.add_argument("--output-prefix", required=True, metavar="P", help="writes P.bin and P.idx")
    p.add_argument("--overwrite", action="store_true", help="replace an existing P.bin / P.idx")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.run(PROG, lambda: _main(argv))  # start-up (parsing, imports) under cli.run too: see above


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cli.quiet_known_warnings()
    from stem_megatron.outputs import prepare_output

    inputs = [p + ext for p in args.input for ext in (".bin", ".idx")]
    for ext in (".bin", ".idx"):  # exit 2 before megatron-core is even imported
        prepare_output(args.output_prefix + ext, inputs=inputs, kind="file", overwrite=args.overwrite,
                       flag="--output-prefix")
    from data_tools import merge as merge_lib

    def body() -> int:
        documents, tokens = merge_lib.merge(args.input, args.output_prefix)
        print(
            f"wrote {args.output_prefix}.{{bin,idx}}: {documents:,} documents, {tokens:,} tokens "
            f"from {len(args.input)} inputs"
        )
        return 0

    return cli.run(PROG, body, errors=((merge_lib.MergeError, 1, "error: "), (OSError, 1, "error: ")),
                   interrupted_note="nothing written (partial files removed)")


if __name__ == "__main__":
    sys.exit(main())
