"""`stem-preprocess`: the command line of `data_tools.preprocess` (what it writes, how bad records are
handled and its exit codes are documented there and in docs/data.md)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from data_tools.inputs import InputError, add_input_args
from data_tools.partition import parse_partition
from data_tools.preprocess import PROG, PreprocessOptions, format_summary, preprocess
from data_tools.preprocess import __doc__ as preprocess_doc
from data_tools.records import StrictError
from stem_megatron.data.tokenizer import TOKENIZER_KINDS, TokenizerError
from stem_megatron.errors import UserError
from stem_megatron.outputs import prepare_output


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=preprocess_doc.split("\n")[0].split(": ", 1)[1])
    p.add_argument("--output-prefix", required=True, metavar="P", help="writes P_{key}_document.bin/.idx")
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="PATH",
        help="tokenizer.json, *.tiktoken, *.model, or a directory with vocab.json + merges.txt",
    )
    p.add_argument("--tokenizer-type", choices=TOKENIZER_KINDS, help="override detection from the path")
    p.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        metavar="KEY",
        help="JSONL keys to tokenize, one output per key (default: text)",
    )
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    p.add_argument(
        "--strict", action="store_true", help="fail on the first bad record instead of skipping it"
    )
    add_input_args(p)
    p.add_argument("--batch-size", type=int, default=256, help="records per worker task (default 256)")
    p.add_argument(
        "--max-warnings", type=int, default=20, help="skipped records listed one by one (default 20)"
    )
    p.add_argument(
        "--partition",
        metavar="I/N",
        help="only partition I (0-based) of N, split by file and byte range; stem-merge joins them",
    )
    p.add_argument("--stats-json", metavar="PATH", help="also write the summary as JSON to PATH")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through preprocess()'s cleanup of partial files


def check_output_prefix(prefix: str) -> None:
    """ValueError (a bad argument) for a prefix that cannot name output files."""
    if not prefix or prefix.endswith(("/", os.sep)) or os.path.isdir(prefix):
        raise ValueError(
            f"--output-prefix {prefix!r} names a directory; a prefix names files: give DIR/NAME "
            f"to write DIR/NAME_text_document.bin/.idx"
        )
    parent = os.path.dirname(os.path.abspath(prefix))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--output-prefix {prefix}: {parent} is a file, not a directory")
    try:  # a probe file, not permission bits: root ignores those, not a read-only mount
        prepare_output(prefix, kind="file", overwrite=True, flag="--output-prefix")
    except UserError as err:
        raise ValueError(str(err)) from None


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    from stem_megatron import cli

    args = build_parser().parse_args(argv)
    cli.quiet_known_warnings()
    return cli.run(PROG, lambda: _main(args), errors=((InputError, 1, "error: "), (TokenizerError, 1, "error: "),
                                                      (StrictError, 1, "error: "), (OSError, 1, "error: ")),
                   interrupted_note="no output written (partial files removed)")


def _main(args) -> int:
    cores = available_cores()
    if args.workers > cores:  # more processes than cores only adds interpreters and memory
        print(f"{PROG}: note: --workers {args.workers} capped at {cores}, the cores available", file=sys.stderr)
        args.workers = cores
    try:
        check_output_prefix(args.output_prefix)
        opts = PreprocessOptions(
            inputs=args.input,
            output_prefix=args.output_prefix,
            tokenizer=args.tokenizer,
            tokenizer_type=args.tokenizer_type,
            json_keys=args.json_keys,
            workers=args.workers,
            append_eod=args.append_eod,
            strict=args.strict,
            input_format=args.input_format,
            text_split=args.text_split,
            batch_size=args.batch_size,
            progress=not args.quiet,
            max_warnings=args.max_warnings,
            partition=None if args.partition is None else parse_partition(args.partition),
        )
    except ValueError as err:  # InputError is a ValueError
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        summary = preprocess(opts)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_summary(summary))
    if args.stats_json:
        with open(args.stats_json, "w") as f:
            json.dump(summary.to_dict(), f, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
