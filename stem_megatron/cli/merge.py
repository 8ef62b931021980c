"""`stem-merge`: the command line of `data_tools.merge` (documented there and in docs/data.md)."""

from __future__ import annotations

import argparse
import sys

from data_tools.merge import PROG, MergeError, merge
from data_tools.merge import __doc__ as merge_doc
from stem_megatron import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=merge_doc.split("\n")[0].split(": ", 1)[1])
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PREFIX",
        help="dataset prefixes (PREFIX.bin + PREFIX.idx), concatenated in the order given",
    )
    p.add_argument("--output-prefix", required=True, metavar="P", help="writes P.bin and P.idx")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.quiet_known_warnings()

    def body() -> int:
        documents, tokens = merge(args.input, args.output_prefix)
        print(
            f"wrote {args.output_prefix}.{{bin,idx}}: {documents:,} documents, {tokens:,} tokens "
            f"from {len(args.input)} inputs"
        )
        return 0

    return cli.run(PROG, body, errors=((MergeError, 1, "error: "), (OSError, 1, "error: ")))


if __name__ == "__main__":
    sys.exit(main())
