"""One tokenizer interface over the four file kinds the project reads.

    tok = load_tokenizer("data/sample/gpt2.tiktoken")      # kind detected from the path
    ids = tok.encode("Hello world")                         # list[int], no special tokens
    tok.decode(ids + [tok.eod])                             # 'Hello world<|endoftext|>'

Kinds (`kind=` overrides detection):
- `huggingface`: a Hugging Face `tokenizer.json` (or a directory holding one).
- `tiktoken`: a `*.tiktoken` BPE rank file, read with GPT-2 (r50k) rules: the GPT-2
  pre-tokenizer pattern and `<|endoftext|>` appended after the last rank (id 50256 for GPT-2).
- `sentencepiece`: a SentencePiece `*.model`; the end of document is its `eos` piece.
- `gpt2`: a directory holding GPT-2 style `vocab.json` + `merges.txt` (byte-level BPE).

Text that spells a special token (`<|endoftext|>` inside a document) is encoded as plain
text, never as the special id: only the data pipeline inserts end-of-document ids.

The attributes are what megatron-core's `GPTDataset` asks of a tokenizer: `eod`, `pad`
(-1 when the tokenizer has no pad token), `vocab_size` and `unique_identifiers` (part of the
dataset index cache key). A Tokenizer pickles as its (path, kind) and reloads on the other side.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path

TOKENIZER_KINDS = ("huggingface", "tiktoken", "sentencepiece", "gpt2")
EOD_TOKEN = "<|endoftext|>"
NO_PAD = -1  # megatron-core's own "no pad token" value

# Tried in order to find the end-of-document / pad token of a Hugging Face tokenizer.
_HF_EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>")
_HF_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>")


class TokenizerError(ValueError):
    """The tokenizer path is missing, of an unknown kind, or not loadable; one-line message."""


class Tokenizer(ABC):
    """Text <-> token ids, with the special ids a GPT dataset needs."""

    kind: str

    def __init__(self, path: str, vocab_size: int, eod: int | None, pad: int) -> None:
        self.path = path
        self.vocab_size = vocab_size
        self.eod = eod
        self.pad = pad

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special-token spellings encoded as plain text."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special ids are written out as their token text where they have one."""

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(
            [
                ("class", type(self).__name__),
                ("kind", self.kind),
                ("path", self.path),
                ("vocab_size", self.vocab_size),
                ("eod", self.eod),
                ("pad", self.pad),
            ]
        )

    def __reduce__(self):
        return load_tokenizer, (self.path, self.kind)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer`: from a tokenizer.json, or built from GPT-2 vocab.json + merges.txt."""

    def __init__(self, path: str, tok, kind: str) -> None:
        self.kind = kind
        self._tok = tok
        self._tok.encode_special_tokens = True  # "<|endoftext|>" in a document is text, not the EOD id
        eod = _first_token_id(tok, _HF_EOD_CANDIDATES)
        pad = _first_token_id(tok, _HF_PAD_CANDIDATES)
        super().__init__(
            path, tok.get_vocab_size(with_added_tokens=True), eod, NO_PAD if pad is None else pad
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE rank file with the GPT-2 pattern; `<|endoftext|>` gets the id after the last rank."""

    kind = "tiktoken"

    def __init__(self, path: str) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        from tiktoken_ext.openai_public import r50k_pat_str

        ranks = load_tiktoken_bpe(path)
        if not ranks:
            raise ValueError("no BPE ranks in the file")
        eod = max(ranks.values()) + 1
        self._enc = tiktoken.Encoding(
            name=Path(path).stem, pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOD_TOKEN: eod}
        )
        super().__init__(path, self._enc.n_vocab, eod, NO_PAD)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(list(ids))


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; its `eos` piece ends documents, its `pad` piece (if any) pads."""

    kind = "sentencepiece"

    def __init__(self, path: str) -> None:
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        eos, pad = self._sp.eos_id(), self._sp.pad_id()
        super().__init__(
            path, self._sp.get_piece_size(), eos if eos >= 0 else None, pad if pad >= 0 else NO_PAD
        )

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def detect_kind(path: str) -> str:
    """The tokenizer kind a path holds, from its name (or, for a directory, its files)."""
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return "huggingface"
        if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            return "gpt2"
        raise TokenizerError(
            f"tokenizer directory {path} holds neither tokenizer.json nor vocab.json + merges.txt"
        )
    if p.suffix == ".json":
        return "huggingface"
    if p.suffix == ".tiktoken":
        return "tiktoken"
    if p.suffix == ".model":
        return "sentencepiece"
    raise TokenizerError(
        f"cannot tell the tokenizer kind of {path} (expected tokenizer.json, *.tiktoken, *.model or a "
        f"vocab.json + merges.txt directory); name the kind ({', '.join(TOKENIZER_KINDS)})"
    )


def load_tokenizer(path: str | os.PathLike, kind: str | None = None) -> Tokenizer:
    """Load the tokenizer at `path`; `kind` (one of TOKENIZER_KINDS) overrides detection.

    Raises TokenizerError with a one-line message when the path is missing, the kind unknown,
    or the file does not load as that kind.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TokenizerError(f"tokenizer not found: {path}")
    if kind is None:
        kind = detect_kind(path)
    elif kind not in TOKENIZER_KINDS:
        raise TokenizerError(
            f"unknown tokenizer kind {kind!r} (expected one of {', '.join(TOKENIZER_KINDS)})"
        )
    try:
        if kind == "huggingface":
            return _load_huggingface(path)
        if kind == "gpt2":
            return _load_gpt2_bpe(path)
        if kind == "tiktoken":
            return TiktokenTokenizer(path)
        return SentencePieceTokenizer(path)
    except TokenizerError:
        raise
    except Exception as err:  # the libraries raise anything from OSError to Rust panics
        detail = " ".join(str(err).split()) or type(err).__name__
        if len(detail) > 160:  # parsers quote the offending line: a wrong file can be one 4 MB line
            detail = detail[:160] + "..."
        raise TokenizerError(f"cannot load {path} as a {kind} tokenizer: {detail}") from err


def _load_huggingface(path: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    return HuggingFaceTokenizer(path, HFTokenizer.from_file(file), "huggingface")


def _load_gpt2_bpe(path: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    for f in (vocab, merges):
        if not os.path.isfile(f):
            raise TokenizerError(f"GPT-2 BPE tokenizer directory {path} lacks {os.path.basename(f)}")
    tok = HFTokenizer(models.BPE.from_file(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id(EOD_TOKEN) is not None:
        tok.add_special_tokens([EOD_TOKEN])  # already in vocab.json: marks it special, keeps its id
    return HuggingFaceTokenizer(path, tok, "gpt2")


def _first_token_id(tok, candidates: tuple[str, ...]) -> int | None:
    for token in candidates:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return token_id
    return None
