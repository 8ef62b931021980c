"""Evaluation documents as token ids, built the way training data is built.

    docs = read_documents(["valid.jsonl"], tokenizer, json_key="text", max_docs=100)

Inputs, by what the path is:
- an indexed dataset prefix (`PREFIX.bin` + `PREFIX.idx`, stem-preprocess's output): each stored
  document as is (stem-preprocess `--append-eod` already ended it with the EOD token);
- `*.jsonl`: one document per line, the text under `json_key`, encoded and ended with the EOD
  token (what stem-preprocess `--append-eod` stores, and what the demo trains on);
- any other file: UTF-8 text, the whole file one document, ended with the EOD token.

Every document is scored given an EOD token as its first context token, as in training, where
the previous document's EOD precedes it: so every text token and the final EOD are scored.
`Document.bytes` is the length of the UTF-8 text of the scored tokens (the EOD token has no text
and contributes 0 bytes); with EOD context that is the document's text in UTF-8. A tokenizer
without an EOD token gets neither: its first token is context only, and its bytes do not count.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


class InputError(ValueError):
    """An evaluation input is missing, unreadable or empty; one-line message."""


@dataclass
class Document:
    ids: list[int]  # context token first (EOD when the tokenizer has one), then the scored tokens
    bytes: int  # UTF-8 bytes of the scored tokens' text


def _text_bytes(tokenizer, ids: list[int]) -> int:
    eod = tokenizer.eod
    return len(tokenizer.decode([i for i in ids if i != eod]).encode("utf-8"))


def make_document(tokenizer, ids: list[int]) -> Document:
    """A document of stored ids (already EOD-terminated when the tokenizer has EOD)."""
    if tokenizer.eod is not None:
        return Document([tokenizer.eod, *ids], _text_bytes(tokenizer, ids))
    return Document(list(ids), _text_bytes(tokenizer, ids) - _text_bytes(tokenizer, ids[:1]))


def text_document(tokenizer, text: str) -> Document:
    """A document of raw text: encoded, with the EOD token appended (when the tokenizer has one)."""
    ids = tokenizer.encode(text)
    return make_document(tokenizer, ids + ([tokenizer.eod] if tokenizer.eod is not None else []))


def _indexed(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    for i in range(len(ds)):
        yield [int(x) for x in ds[i]]


def _jsonl(path: str, key: str):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(record, dict) or key not in record:
                raise InputError(f"{path}:{n}: no {key!r} field (choose it with --json-key)")
            yield str(record[key])


def read_documents(paths: list[str], tokenizer, json_key: str = "text", max_docs: int | None = None) -> list[Document]:
    """Documents of every input in order, at most `max_docs`; InputError if none has a token to score."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs: list[Document] = []
    for path in paths:
        if max_docs is not None and len(docs) >= max_docs:
            break
        if IndexedDataset.exists(path):
            items = (make_document(tokenizer, ids) for ids in _indexed(path))
        elif not os.path.isfile(path):
            raise InputError(f"--input {path}: no such file (nor an indexed dataset {path}.bin + .idx)")
        elif path.endswith(".jsonl"):
            items = (text_document(tokenizer, text) for text in _jsonl(path, json_key))
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError as e:
                raise InputError(f"--input {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            items = iter([text_document(tokenizer, text)] if text.strip() else [])
        for doc in items:
            if len(doc.ids) > 1:  # a document needs a token after its context token
                docs.append(doc)
            if max_docs is not None and len(docs) >= max_docs:
                break
    if not docs:
        raise InputError(f"--input {' '.join(paths)}: no document with a token to score")
    return docs
