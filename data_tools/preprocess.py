"""`stem-preprocess`: tokenize JSONL / plain text into Megatron indexed datasets.

    stem-preprocess --input corpus/ --output-prefix data/my --tokenizer gpt2.tiktoken \\
        --append-eod --workers 4

writes `data/my_text_document.bin/.idx` (one pair per `--json-keys` key), readable by
megatron-core's `IndexedDataset` and Megatron-LM. Records stream through a pool of `--workers`
processes (one tokenizer each) in bounded batches and are written in input order, so the
output is the same bytes for any worker count and memory does not grow with the corpus (only
the per-document index, 8 bytes a document, is held until the end).

Bad records (see `data_tools.records`) are skipped, counted by reason and reported with file
and line; `--strict` stops at the first. Output goes to `.partial` files committed at the end
(`data_tools.writer`), so an interrupted or failed run leaves no complete-looking pair.
Exit status: 0 on success, 1 on an error (one line on stderr; no documents at all is one), 2 on
bad arguments (an --output-prefix that names a directory or lies under a file), 130 on Ctrl-C.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field

from data_tools.encode import EncodedBatch, Encoder, encode_in_worker, init_worker
from data_tools.inputs import InputError, Record, iter_records, resolve_inputs
from data_tools.partition import iter_partition_records
from data_tools.progress import Progress
from data_tools.records import Skip, StrictError
from stem_megatron.data.tokenizer import TokenizerError, load_tokenizer

PROG = "stem-preprocess"
_BATCH_BYTES = 4 << 20  # a batch closes at this many input bytes even if it has fewer records


@dataclass(kw_only=True)
class PreprocessOptions:
    """What to tokenize, with what, and where to write it (the CLI flags, one field each)."""

    inputs: list[str]  # files or directories
    output_prefix: str  # writes {prefix}_{key}_document.bin/.idx
    tokenizer: str  # tokenizer.json, *.tiktoken, *.model, or a vocab.json + merges.txt directory
    tokenizer_type: str | None = None  # overrides detection from the path
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    workers: int = 1
    append_eod: bool = False
    strict: bool = False  # the first skipped record is an error
    input_format: str | None = None  # jsonl | text; None = from the file suffix
    text_split: str = "file"  # plain text: one document per file, or per blank-line-separated block
    batch_size: int = 256  # records per worker task
    progress: bool = True
    max_warnings: int = 20  # skipped records reported one by one; the rest are only counted
    partition: tuple[int, int] | None = None  # (I, N): only partition I of N (data_tools.partition)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise ValueError(f"json_keys must be non-empty and distinct, got {self.json_keys}")


@dataclass
class PreprocessSummary:
    outputs: dict[str, str]  # key -> path prefix of the written .bin/.idx
    documents: dict[str, int]
    tokens: dict[str, int]
    dtype: str
    records: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        total = sum(self.tokens.values())
        return {
            "outputs": self.outputs,
            "documents": self.documents,
            "tokens": self.tokens,
            "total_tokens": total,
            "dtype": self.dtype,
            "records": self.records,
            "skipped": dict(self.skipped),
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(total / self.seconds, 1) if self.seconds > 0 else None,
        }


def _batches(records: Iterable[Record], batch_size: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    size = 0
    for record in records:
        batch.append(record)
        size += len(record.data)
        if len(batch) >= batch_size or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encoded(
    batches: Iterable[list[Record]], encoder: Encoder, opts: PreprocessOptions
) -> Iterator[EncodedBatch]:
    """Encoded batches in input order, in this process or on a pool with a bounded backlog."""
    if opts.workers == 1:
        for batch in batches:
            yield encoder.encode_batch(batch)
        return
    initargs = (
        encoder.tokenizer.path,
        encoder.tokenizer.kind,
        encoder.json_keys,
        encoder.append_eod,
        encoder.dtype,
    )
    with ProcessPoolExecutor(
        opts.workers, mp_context=mp.get_context("spawn"), initializer=init_worker, initargs=initargs
    ) as pool:
        pending: deque = deque()
        try:
            for batch in batches:
                pending.append(_submit_sigint_blocked(pool, encode_in_worker, batch))
                if len(pending) >= 2 * opts.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _submit_sigint_blocked(pool: ProcessPoolExecutor, fn, arg):
    """`pool.submit` with SIGINT blocked in this thread.

    The executor spawns its workers inside `submit`. A worker inherits the blocked mask (it survives
    fork and exec), so a Ctrl-C sent to the process group while the worker's interpreter is still
    importing cannot kill it with a traceback; `init_worker` then ignores SIGINT for good. Here, a
    Ctrl-C that arrives meanwhile stays pending and is delivered when the mask is restored.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return pool.submit(fn, arg)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def preprocess(opts: PreprocessOptions, log=None) -> PreprocessSummary:
    """Tokenize `opts.inputs` into indexed datasets; raises InputError, TokenizerError or StrictError.

    Inputs and the tokenizer are checked before anything is written.
    """
    log = log or sys.stderr
    files = resolve_inputs(opts.inputs, opts.input_format)
    formats = {f.format for f in files}
    if "text" in formats and opts.json_keys != ["text"]:
        raise InputError(
            "plain-text inputs only give the 'text' key; --json-keys applies to JSONL inputs alone"
        )
    tokenizer = load_tokenizer(opts.tokenizer, opts.tokenizer_type)
    if opts.append_eod and tokenizer.eod is None:
        raise TokenizerError(f"tokenizer {opts.tokenizer} has no end-of-document token; cannot --append-eod")

    from data_tools.writer import IndexedOutput, output_path, token_dtype  # imports megatron: not in workers

    dtype = token_dtype(tokenizer.vocab_size)
    encoder = Encoder(tokenizer, opts.json_keys, opts.append_eod, dtype)
    keys = encoder.output_keys(formats)
    out_dir = os.path.dirname(os.path.abspath(opts.output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    total_bytes = None if any(f.gzipped for f in files) else sum(os.path.getsize(f.path) for f in files)
    progress = Progress(PROG, total_bytes, enabled=opts.progress, stream=log)
    summary = PreprocessSummary({}, {}, {}, dtype.__name__)
    outputs: dict[str, IndexedOutput] = {}
    committed = False
    start = time.monotonic()
    try:
        for key in keys:
            outputs[key] = IndexedOutput(output_path(opts.output_prefix, key), dtype)
        if opts.partition is None:
            records = iter_records(files, opts.text_split)
        else:
            records = iter_partition_records(files, opts.text_split, *opts.partition)
        # closing(): on an error the worker pool stops here, not whenever the generator is collected
        with closing(_encoded(_batches(records, opts.batch_size), encoder, opts)) as batches:
            for batch in batches:
                _record_skips(batch.skips, summary, opts, log)
                for key, out in outputs.items():
                    if key in batch.tokens:
                        out.add_documents(batch.tokens[key], batch.lengths[key])
                summary.records += batch.num_records
                first = batch.lengths.get(keys[0])
                progress.update(
                    0 if first is None else len(first),
                    sum(int(t.size) for t in batch.tokens.values()),
                    batch.num_bytes,
                )
        empty = [key for key, out in outputs.items() if out.num_documents == 0]
        # An empty pair would only fail later, in training. One partition of a split input may be
        # empty (a small input, many partitions): stem-merge refuses a merge without documents.
        if empty and opts.partition is None:
            skipped = sum(summary.skipped.values())
            raise InputError(
                f"no documents for key {empty[0]!r}: {_count(summary.records, 'record')} read, "
                f"{skipped:,} skipped" + (f" ({_skip_detail(summary)})" if skipped else "")
                + "; nothing written"
            )
        for out in outputs.values():
            out.commit()
        committed = True
    finally:
        progress.close()
        if not committed:
            for out in outputs.values():
                out.abort()
    summary.seconds = time.monotonic() - start
    for key, out in outputs.items():
        summary.outputs[key] = out.path
        summary.documents[key] = out.num_documents
        summary.tokens[key] = out.num_tokens
    return summary


def _record_skips(skips: list[Skip], summary: PreprocessSummary, opts: PreprocessOptions, log) -> None:
    for skip in skips:
        if opts.strict:
            raise StrictError(f"{skip.message()} [--strict]")
        summary.skipped[skip.reason] += 1
        reported = sum(summary.skipped.values())
        if reported <= opts.max_warnings:
            clear = "\r\x1b[K" if _is_tty(log) else ""  # over a progress line being redrawn
            log.write(f"{clear}{PROG}: skipped {skip.message()}\n")
        if reported == opts.max_warnings:
            log.write(f"{PROG}: further skipped records are counted, not listed\n")


def _is_tty(stream) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _skip_detail(summary: PreprocessSummary) -> str:
    return ", ".join(f"{reason} {n:,}" for reason, n in sorted(summary.skipped.items()))


def format_summary(summary: PreprocessSummary) -> str:
    lines = []
    for key, path in summary.outputs.items():
        lines.append(
            f"wrote {path}.{{bin,idx}}: {_count(summary.documents[key], 'document')}, "
            f"{_count(summary.tokens[key], 'token')} ({summary.dtype})"
        )
    d = summary.to_dict()
    rate = f", {d['tokens_per_s']:,.0f} tokens/s" if d["tokens_per_s"] else ""
    skipped = sum(summary.skipped.values())
    detail = _skip_detail(summary)
    lines.append(
        f"{_count(summary.records, 'record')} in {summary.seconds:.1f} s{rate}; skipped {skipped:,}"
        + (f" ({detail})" if detail else "")
    )
    return "\n".join(lines)
