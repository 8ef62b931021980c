"""`stem-sample-data`: the command line of `data_tools.sample_corpus` (documented there and in
docs/data.md)."""

from __future__ import annotations

import argparse
import os
import sys

from data_tools.fetch import FetchError
from data_tools.records import StrictError
from data_tools.sample_corpus import PROG, build_sample
from stem_megatron import cli
from stem_megatron.errors import EXIT_INPUT, UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Fetch and prepare the sample corpus (Wikipedia + GPT-2 BPE)."
    )
    p.add_argument("--output-dir", default=os.path.join("data", "sample"), help="default: data/sample")
    p.add_argument(
        "--valid-fraction", type=float, default=0.02, help="share of articles held out (default 0.02)"
    )
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes for preprocessing (default 1)")
    p.add_argument("--force", action="store_true", help="rebuild even if the output is complete")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.quiet_known_warnings()
    return cli.run(PROG, lambda: _sample(args), errors=(
        (FetchError, 1, "error: "), (StrictError, 1, "error: "), (ValueError, 1, "error: "), (OSError, 1, "error: ")))


def _sample(args) -> int:
    if not 0.0 <= args.valid_fraction < 1.0:
        raise UserError(f"error: --valid-fraction must be in [0, 1), got {args.valid_fraction}", EXIT_INPUT)
    manifest = build_sample(args.output_dir, args.valid_fraction, args.force, args.workers)
    if manifest is None:
        print(f"{args.output_dir} is up to date (MANIFEST.json); --force rebuilds it")
        return 0
    a, t = manifest["articles"], manifest["tokens"]
    print(
        f"wrote {args.output_dir}: train {a['train']:,} articles / {t['train']:,} tokens, "
        f"valid {a['valid']:,} articles / {t['valid']:,} tokens (GPT-2 BPE, EOD appended)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
