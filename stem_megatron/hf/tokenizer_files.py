"""Hugging Face tokenizer files (`tokenizer.json` + `tokenizer_config.json`) for every tokenizer kind.

`write_hf_tokenizer(path, kind, out_dir)` writes files that `transformers.AutoTokenizer` loads
(as `PreTrainedTokenizerFast`) and that give the same ids as `stem_megatron.data.tokenizer`:
- `huggingface`: the tokenizer.json itself;
- `gpt2`: vocab.json + merges.txt as the byte-level BPE the project builds from them;
- `tiktoken`: a rank file becomes a byte-level BPE: the GPT-2 (r50k) split pattern, the merges
  recovered from the ranks (a token of rank r is what BPE with the ranks below r makes of its
  bytes, always two pieces), whole pre-tokens that are in the vocabulary kept as one token (as
  tiktoken does), and `<|endoftext|>` after the last rank;
- `sentencepiece`: the model's pieces and scores as a `tokenizers` BPE or Unigram model with
  byte fallback, its normalizer (precompiled character map), dummy prefix and whitespace rules.
Built with the `tokenizers` library only; transformers is not needed to write them.
Returns the special ids for config.json (`bos_token_id`, `eos_token_id`, `pad_token_id`).
"""

from __future__ import annotations

import json
import os

from stem_megatron.data.tokenizer import EOD_TOKEN, TokenizerError, load_tokenizer


def _byte_chars() -> dict[int, str]:
    """Byte-level BPE's byte -> printable character table (bytes that print stay themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _split_by_ranks(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """BPE of `token` using only merges of rank < `below` (lowest rank first, as tiktoken)."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, at = below, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], below)
            if r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


def tiktoken_to_tokenizers(path: str):
    """A `tokenizers.Tokenizer` equal to the project's TiktokenTokenizer on the rank file `path`."""
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    ranks = load_tiktoken_bpe(path)
    chars = _byte_chars()

    def text(b: bytes) -> str:
        return "".join(chars[x] for x in b)

    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not 0..{len(ranks) - 1}; cannot write a tokenizer.json")
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _split_by_ranks(token, ranks, rank)
        if len(parts) != 2:
            raise TokenizerError(f"{path}: token of rank {rank} is not a merge of two lower-ranked tokens")
        merges.append((text(parts[0]), text(parts[1])))
    vocab = {text(t): r for t, r in ranks.items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r50k_pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOD_TOKEN])  # id len(ranks), as TiktokenTokenizer
    return tok


def sentencepiece_to_tokenizers(path: str):
    """A `tokenizers.Tokenizer` built from a SentencePiece model's pieces, scores and normalizer spec."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    unk = sp.unk_id()
    if trainer.model_type == 1:  # UNIGRAM
        model = models.Unigram(pieces, unk_id=unk, byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == 2:  # BPE: a piece is made by merging two pieces; higher score merges first
        vocab = {p: i for i, (p, _) in enumerate(pieces)}
        merges = []
        for i, (piece, score) in enumerate(pieces):
            if proto.pieces[i].type != 1 or len(piece) < 2:  # NORMAL pieces only
                continue
            for cut in range(1, len(piece)):
                a, b = piece[:cut], piece[cut:]
                if a in vocab and b in vocab:
                    merges.append((-score, i, vocab[a], vocab[b], a, b))
        merges.sort()
        model = models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges],
                           unk_token=sp.id_to_piece(unk) if unk >= 0 else None,
                           byte_fallback=trainer.byte_fallback, fuse_unk=True)
    else:
        raise TokenizerError(f"{path}: SentencePiece model type {trainer.model_type} (only BPE and Unigram convert)")
    tok = Tokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(" {2,}", " ")]
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    prepend = "always" if norm.add_dummy_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend,
                                                 split=trainer.split_by_whitespace)
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        *([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []),
    ])
    specials = [p.piece for p in proto.pieces if p.type in (2, 3)]  # UNKNOWN, CONTROL
    tok.add_special_tokens([AddedToken(p, normalized=False, special=True) for p in specials])
    return tok


def hf_tokenizers_object(path: str, kind: str):
    """The `tokenizers.Tokenizer` of any supported tokenizer, and the project's own Tokenizer."""
    project = load_tokenizer(path, kind)
    try:
        if kind in ("huggingface", "gpt2"):
            return project._tok, project
        if kind == "tiktoken":
            return tiktoken_to_tokenizers(path), project
        return sentencepiece_to_tokenizers(path), project
    except TokenizerError:
        raise
    except Exception as err:  # tokenizers / protobuf raise anything
        raise TokenizerError(f"cannot write a tokenizer.json for {path} ({kind}): {err}") from err


def write_hf_tokenizer(path: str, kind: str, out_dir: str, max_length: int | None = None) -> dict:
    """Write tokenizer.json + tokenizer_config.json into `out_dir`; returns config.json's special ids."""
    tok, project = hf_tokenizers_object(path, kind)
    tok.encode_special_tokens = False  # AutoTokenizer's convention; the project encodes spellings as text
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    eos = None if project.eod is None else tok.id_to_token(project.eod)
    pad = None if project.pad < 0 else tok.id_to_token(project.pad)
    unk = None
    if kind == "sentencepiece":
        sp = project._sp
        unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": unk,
        "bos_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length or 1_000_000_000,
        "stem_tokenizer_kind": kind,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return {"bos_token_id": None, "eos_token_id": project.eod,
            "pad_token_id": None if project.pad < 0 else project.pad}
