"""`stem-train-tokenizer`: train a byte-level BPE (Hugging Face `tokenizers`) and write tokenizer.json.

    stem-train-tokenizer --input corpus/ --vocab-size 32000 --output data/tok/tokenizer.json

Same inputs as `stem-preprocess` (JSONL with `--json-keys`, plain text), streamed; bad records
are skipped and counted the same way (`--strict` fails on the first). The tokenizer is GPT-2
style: byte-level pre-tokenization with the GPT-2 split pattern, no normalization, so every
string round-trips exactly; `<|endoftext|>` is its end-of-document token (id 0). The file is
written to a temporary name and renamed, so a failed run leaves no tokenizer.json.
Exit status: 0 done, 1 an error (one line on stderr), 2 bad arguments, 130 Ctrl-C (one line).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator

from data_tools.inputs import InputError, add_input_args, iter_records, resolve_inputs
from data_tools.records import Skip, StrictError, parse_record
from stem_megatron import cli
from stem_megatron.cli import EXIT_INPUT, UserError
from stem_megatron.data.tokenizer import EOD_TOKEN

PROG = "stem-train-tokenizer"
MIN_VOCAB = 257  # 256 byte symbols + <|endoftext|>


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False):
    """A byte-level BPE `tokenizers.Tokenizer` of (at most) `vocab_size` entries, `<|endoftext|>` = id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise ValueError(
            f"vocab size must be at least {MIN_VOCAB} (256 bytes + {EOD_TOKEN}), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, path: str) -> None:
    """Write tokenizer.json atomically (temporary file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".partial"
    try:
        tok.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _texts(
    paths: list[str],
    json_keys: list[str],
    input_format: str | None,
    text_split: str,
    strict: bool,
    skipped: Counter,
    log,
) -> Iterator[str]:
    files = resolve_inputs(paths, input_format)
    for record in iter_records(files, text_split):
        texts = parse_record(record, json_keys)
        if isinstance(texts, Skip):
            if strict:
                raise StrictError(f"{texts.message()} [--strict]")
            skipped[texts.reason] += 1
            if sum(skipped.values()) <= 20:
                log.write(f"{PROG}: skipped {texts.message()}\n")
            continue
        yield from texts.values()


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
