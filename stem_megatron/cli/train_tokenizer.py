"""`stem-train-tokenizer`: the command line of `data_tools.train_tokenizer` (documented there and in
docs/data.md)."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from data_tools.inputs import InputError, add_input_args, resolve_inputs
from data_tools.records import StrictError
from data_tools.train_tokenizer import MIN_VOCAB, PROG, _texts, save_tokenizer, train_bpe
from stem_megatron import cli
from stem_megatron.data.tokenizer import EOD_TOKEN
from stem_megatron.errors import EXIT_INPUT, UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Train a byte-level BPE tokenizer and write tokenizer.json."
    )
    p.add_argument(
        "--vocab-size", type=int, required=True, help=f"entries, special token included (>= {MIN_VOCAB})"
    )
    p.add_argument("--output", required=True, metavar="PATH", help="the tokenizer.json to write")
    p.add_argument(
        "--json-keys", nargs="+", default=["text"], metavar="KEY", help="JSONL keys to read (default: text)"
    )
    p.add_argument("--min-frequency", type=int, default=2, help="least count for a merge (default 2)")
    add_input_args(p)
    p.add_argument(
        "--strict", action="store_true", help="fail on the first bad record instead of skipping it"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.quiet_known_warnings()
    return cli.run(PROG, lambda: _train(args), errors=(
        (InputError, 1, "error: "), (StrictError, 1, "error: "), (OSError, 1, "error: ")))


def _train(args) -> int:
    if args.vocab_size < MIN_VOCAB:
        raise UserError(f"error: --vocab-size must be at least {MIN_VOCAB}, got {args.vocab_size}", EXIT_INPUT)
    skipped: Counter = Counter()
    resolve_inputs(args.input, args.input_format)  # fail on a bad path before training starts
    texts = _texts(
        args.input, args.json_keys, args.input_format, args.text_split, args.strict, skipped, sys.stderr
    )
    tok = train_bpe(texts, args.vocab_size, args.min_frequency, show_progress=sys.stderr.isatty())
    save_tokenizer(tok, args.output)
    detail = ", ".join(f"{reason} {n:,}" for reason, n in sorted(skipped.items()))
    print(
        f"wrote {args.output}: vocab {tok.get_vocab_size():,}, {EOD_TOKEN} = {tok.token_to_id(EOD_TOKEN)}; "
        f"skipped {sum(skipped.values()):,} records" + (f" ({detail})" if detail else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
