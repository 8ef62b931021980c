"""`stem-train-tokenizer`: train a byte-level BPE (Hugging Face `tokenizers`) and write tokenizer.json.

    stem-train-tokenizer --input corpus/ --vocab-size 32000 --output data/tok/tokenizer.json

Same inputs as `stem-preprocess` (JSONL with `--json-keys`, plain text), streamed; bad records
are skipped and counted the same way (`--strict` fails on the first). The tokenizer is GPT-2
style: byte-level pre-tokenization with the GPT-2 split pattern, no normalization, so every
string round-trips exactly; `<|endoftext|>` is its end-of-document token (id 0). The output is
checked before reading anything (stem_megatron.outputs.prepare_output: never an input file, an
existing one only with `--overwrite`, a directory it can write in), written as `.tmp-NAME` beside
it and renamed, so a failed run leaves no tokenizer.json. Inputs without one usable record are an
error (a tokenizer of bytes alone is not what was asked for).
Exit status: 0 done, 1 an error (one line on stderr), 2 bad arguments (--vocab-size outside
[257, 2^24], --min-frequency < 0, the output), 130 Ctrl-C (one line).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

from data_tools.inputs import iter_records, resolve_inputs
from data_tools.records import Skip, StrictError, parse_record
from stem_megatron.data.tokenizer import EOD_TOKEN
from stem_megatron.outputs import atomic_file

PROG = "stem-train-tokenizer"
MIN_VOCAB = 257  # 256 byte symbols + <|endoftext|>
# The trainer reserves ~70 bytes per requested entry up front (10^9 entries: a 70 GB allocation that
# aborts the process); the largest vocabularies in use have ~256k entries.
MAX_VOCAB = 1 << 24


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False):
    """A byte-level BPE `tokenizers.Tokenizer` of (at most) `vocab_size` entries, `<|endoftext|>` = id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ValueError(
            f"vocab size must be in [{MIN_VOCAB} (256 bytes + {EOD_TOKEN}), {MAX_VOCAB}], got {vocab_size}"
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
    """Write tokenizer.json atomically (`.tmp-NAME` beside it, renamed; removed on failure)."""
    with atomic_file(path) as tmp:
        tok.save(tmp)


def _texts(
    paths: list[str],
    json_keys: list[str],
    input_format: str | None,
    text_split: str,
    strict: bool,
    skipped: Counter,
    log,
    used: Counter | None = None,
) -> Iterator[str]:
    """The texts of every usable record; skipped ones are counted in `skipped` by reason, usable
    ones in `used["records"]`."""
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
        if used is not None:
            used["records"] += 1
        yield from texts.values()
