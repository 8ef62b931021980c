"""Tokenize batches of records: the work each preprocessing worker does.

`Encoder.encode_batch` turns a list of `Record`s into one `EncodedBatch`: per output key, the
token ids of the kept documents concatenated (in record order) with their lengths, plus the
skipped records. Results depend only on the batch, so any number of workers, consuming
batches in order, produces the same bytes.

In a worker process the encoder lives in a module global set once by `init_worker` (one
tokenizer per worker); this module imports no torch/megatron so workers start quickly.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

import numpy as np

from data_tools.inputs import Record
from data_tools.records import Skip, parse_record
from stem_megatron.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer


@dataclass
class EncodedBatch:
    tokens: dict[str, np.ndarray]  # key -> ids of every kept document, concatenated
    lengths: dict[str, np.ndarray]  # key -> int64 length of each kept document
    skips: list[Skip] = field(default_factory=list)
    num_records: int = 0
    num_bytes: int = 0


class Encoder:
    """Records -> token ids for the output keys, with an EOD id after each document if asked."""

    def __init__(self, tokenizer: Tokenizer, json_keys: list[str], append_eod: bool, dtype: type) -> None:
        if append_eod and tokenizer.eod is None:
            raise TokenizerError(
                f"tokenizer {tokenizer.path} has no end-of-document token; cannot append one"
            )
        self.tokenizer = tokenizer
        self.json_keys = list(json_keys)
        self.append_eod = append_eod
        self.dtype = dtype

    def output_keys(self, formats: set[str]) -> list[str]:
        """Keys that get an output file: the JSON keys, or `text` for plain-text inputs."""
        return self.json_keys if "jsonl" in formats else ["text"]

    def encode_batch(self, records: list[Record]) -> EncodedBatch:
        ids: dict[str, list[list[int]]] = {}
        skips: list[Skip] = []
        for record in records:
            texts = parse_record(record, self.json_keys)
            if isinstance(texts, Skip):
                skips.append(texts)
                continue
            encoded = {key: self.tokenizer.encode(text) for key, text in texts.items()}
            for key, doc in encoded.items():
                if self.append_eod:
                    doc.append(self.tokenizer.eod)
                ids.setdefault(key, []).append(doc)
        tokens, lengths = {}, {}
        for key, docs in ids.items():
            flat = np.concatenate([np.asarray(doc, dtype=np.int64) for doc in docs])
            outside = flat[(flat < 0) | (flat >= self.tokenizer.vocab_size)]
            if outside.size:
                raise TokenizerError(
                    f"tokenizer {self.tokenizer.path} produced id {int(outside[0])} outside its "
                    f"vocabulary of {self.tokenizer.vocab_size}"
                )
            tokens[key] = flat.astype(self.dtype)
            lengths[key] = np.array([len(doc) for doc in docs], dtype=np.int64)
        return EncodedBatch(tokens, lengths, skips, len(records), sum(len(r.data) for r in records))


_WORKER_ENCODER: Encoder | None = None


def init_worker(
    tokenizer_path: str, tokenizer_kind: str, json_keys: list[str], append_eod: bool, dtype
) -> None:
    """Process-pool initializer: load this worker's own tokenizer once.

    A Ctrl-C reaches every process of the terminal's group: workers ignore it and leave the one
    message and the clean-up to the main process, which then stops the pool.
    """
    global _WORKER_ENCODER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_ENCODER = Encoder(load_tokenizer(tokenizer_path, tokenizer_kind), json_keys, append_eod, dtype)


def encode_in_worker(records: list[Record]) -> EncodedBatch:
    assert _WORKER_ENCODER is not None, "init_worker did not run in this process"
    return _WORKER_ENCODER.encode_batch(records)
