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

import os
from collections import Counter
from collections.abc import Iterable, Iterator

from data_tools.inputs import iter_records, resolve_inputs
from data_tools.records import Skip, StrictError, parse_record
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
