"""Evaluation documents as token ids, built the way training data is built.

    docs = read_documents(["valid.jsonl"], tokenizer, texts_of, max_docs=100)

Inputs, by what the path is:
- an indexed dataset prefix (`PREFIX.bin` + `PREFIX.idx`, stem-preprocess's output): each stored
  document as is (stem-preprocess `--append-eod` already ended it with the EOD token);
- any other file: the texts `texts_of(path)` yields (stem-eval: one per JSONL line, the text under
  --json-key, or a whole text file; the records stem-preprocess skips are skipped), each encoded
  and ended with the EOD token (what stem-preprocess `--append-eod` stores, what the demo trains on).

Every document is scored given an EOD token as its first context token, as in training, where
the previous document's EOD precedes it: so every text token and the final EOD are scored.
`Document.bytes` is the length of the UTF-8 text of the scored tokens (the EOD token has no text
and contributes 0 bytes); with EOD context that is the document's text in UTF-8. A tokenizer
without an EOD token gets neither: its first token is context only, and its bytes do not count.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
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


def is_indexed(prefix: str) -> bool:
    """PREFIX.bin + PREFIX.idx exist (megatron's IndexedDataset.exists, without importing megatron
    for the plain files most evaluations read)."""
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


def _indexed(prefix: str, vocab: int):
    """The stored documents of an indexed dataset; InputError at the first id the tokenizer does not
    have (a dataset preprocessed with another tokenizer: its ids would index the wrong rows)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    for i in range(len(ds)):
        ids = ds[i]
        if len(ids) and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
            raise InputError(f"--input {prefix}: document {i} holds token id {bad}, outside the tokenizer's "
                             f"{vocab} ids [0, {vocab - 1}] (preprocessed with another tokenizer?)")
        yield [int(x) for x in ids]


def read_documents(paths: list[str], tokenizer, texts_of: Callable[[str], Iterable[str]],
                   max_docs: int | None = None) -> list[Document]:
    """Documents of every input in order, at most `max_docs`; InputError if none has a token to score.

    An indexed dataset prefix is read here; any other path's texts come from `texts_of(path)` (the
    command's reader, which decides what a bad record is: stem_megatron.cli.inputs.read_texts).
    """
    docs: list[Document] = []
    for path in paths:
        if max_docs is not None and len(docs) >= max_docs:
            break
        if is_indexed(path):
            items = (make_document(tokenizer, ids) for ids in _indexed(path, tokenizer.vocab_size))
        elif not os.path.isfile(path):
            raise InputError(f"--input {path}: no such file (nor an indexed dataset {path}.bin + .idx)")
        else:
            items = (text_document(tokenizer, text) for text in texts_of(path))
        for doc in items:
            if len(doc.ids) > 1:  # a document needs a token after its context token
                docs.append(doc)
            if max_docs is not None and len(docs) >= max_docs:
                break
    if not docs:
        raise InputError(f"--input {' '.join(paths)}: no document with a token to score")
    return docs
