"""`stem-train-tokenizer`: the command line of `data_tools.train_tokenizer` (documented there and in
docs/data.md)."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from data_tools.inputs import InputError, add_input_args, resolve_inputs
from data_tools.records import StrictError
from data_tools.train_tokenizer import MAX_VOCAB, MIN_VOCAB, PROG, _texts, save_tokenizer, train_bpe
from stem_megatron import cli
from stem_megatron.data.tokenizer import EOD_TOKEN
from stem_megatron.errors import EXIT_INPUT, UserError
from stem_megatron.outputs import prepare_output

MAX_MIN_FREQUENCY = 2**63 - 1  # the trainer's counts are unsigned 64-bit


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Train a byte-level BPE tokenizer and write tokenizer.json."
    )
    p.add_argument(
        "--vocab-size", type=int, required=True,
        help=f"entries, special token included ({MIN_VOCAB} .. {MAX_VOCAB:,})",
    )
    p.add_argument("--output", required=True, metavar="PATH", help="the tokenizer.json to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument(
        "--json-keys", nargs="+", default=["text"], metavar="KEY", help="JSONL keys to read (default: text)"
    )
    p.add_argument("--min-frequency", type=int, default=2, help="least count for a merge, >= 0 (default 2)")
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
    if not MIN_VOCAB <= args.vocab_size <= MAX_VOCAB:
        raise UserError(f"error: --vocab-size must be in [{MIN_VOCAB}, {MAX_VOCAB:,}], got {args.vocab_size:,}",
                        EXIT_INPUT)
    if not 0 <= args.min_frequency <= MAX_MIN_FREQUENCY:
        raise UserError(f"error: --min-frequency must be in [0, 2^63), got {args.min_frequency}", EXIT_INPUT)
    files = resolve_inputs(args.input, args.input_format)  # fail on a bad path before training starts
    # the files themselves: a tokenizer.json beside the corpus, in a directory given as input, is fine
    prepare_output(args.output, inputs=[f.path for f in files], kind="file", overwrite=args.overwrite)
    skipped: Counter = Counter()
    used = Counter()
    texts = _texts(
        args.input, args.json_keys, args.input_format, args.text_split, args.strict, skipped, sys.stderr, used
    )
    tok = train_bpe(texts, args.vocab_size, args.min_frequency, show_progress=sys.stderr.isatty())
    detail = ", ".join(f"{reason} {n:,}" for reason, n in sorted(skipped.items()))
    if not used["records"]:  # a tokenizer of bytes only, from nothing: not what was asked for
        raise UserError(f"error: no usable records in the input (skipped {sum(skipped.values()):,}"
                        + (f": {detail}" if detail else "") + "); nothing written", 1)
    save_tokenizer(tok, args.output)
    print(
        f"wrote {args.output}: vocab {tok.get_vocab_size():,}, {EOD_TOKEN} = {tok.token_to_id(EOD_TOKEN)}; "
        f"skipped {sum(skipped.values()):,} records" + (f" ({detail})" if detail else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
