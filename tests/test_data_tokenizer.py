"""The tokenizer interface over all four kinds, detection and errors, and stem-train-tokenizer."""

import json
import os
import pickle
import shutil

import pytest
from fixtures.tiny_tokenizers import DOCUMENTS, make_tokenizers, write_tiktoken

from stem_megatron.cli import train_tokenizer
from stem_megatron.data.tokenizer import EOD_TOKEN, NO_PAD, TokenizerError, detect_kind, load_tokenizer

KINDS = ("huggingface", "tiktoken", "sentencepiece", "gpt2")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return make_tokenizers(str(tmp_path_factory.mktemp("tokenizers")))


@pytest.mark.parametrize("kind", KINDS)
def test_detected_kind_round_trip_and_special_ids(paths, kind):
    assert detect_kind(paths[kind]) == kind
    tok = load_tokenizer(paths[kind])
    assert tok.kind == kind
    assert tok.eod is not None and 0 <= tok.eod < tok.vocab_size
    assert tok.pad == NO_PAD
    for doc in DOCUMENTS:
        ids = tok.encode(doc)
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == doc
        assert tok.eod not in ids  # "<|endoftext|>" / "</s>" inside a document stay plain text
    if kind != "sentencepiece":  # sentencepiece renders its control pieces as ""
        assert tok.decode(tok.encode("end") + [tok.eod]) == "end" + EOD_TOKEN
    assert tok.unique_identifiers["kind"] == kind
    json.dumps(tok.unique_identifiers)  # goes into megatron's cache description


@pytest.mark.parametrize("kind", KINDS)
def test_pickles_as_path_and_kind(paths, kind):
    tok = load_tokenizer(paths[kind])
    again = pickle.loads(pickle.dumps(tok))
    assert type(again) is type(tok) and again.path == tok.path and again.eod == tok.eod
    assert again.encode(DOCUMENTS[3]) == tok.encode(DOCUMENTS[3])


def test_gpt2_layout_tiktoken_gets_eod_50256(tmp_path):
    path = write_tiktoken(str(tmp_path / "gpt2like.tiktoken"), merges=[], extra_ranks=50256 - 256)
    tok = load_tokenizer(path)
    assert (tok.vocab_size, tok.eod) == (50257, 50256)
    assert tok.decode([tok.eod]) == EOD_TOKEN


def test_kind_override_for_unusual_names(paths, tmp_path):
    renamed = tmp_path / "ranks.txt"
    shutil.copy(paths["tiktoken"], renamed)
    with pytest.raises(TokenizerError, match="cannot tell the tokenizer kind"):
        load_tokenizer(renamed)
    assert load_tokenizer(renamed, "tiktoken").encode("the") == load_tokenizer(paths["tiktoken"]).encode(
        "the"
    )


def test_directory_with_tokenizer_json_is_huggingface(paths):
    assert detect_kind(os.path.dirname(paths["huggingface"])) == "huggingface"


@pytest.mark.parametrize(
    "name, content, kind, message",
    [
        ("missing.json", None, None, "tokenizer not found"),
        ("tokenizer.json", b"{not json", None, "cannot load .* as a huggingface tokenizer"),
        ("broken.model", b"\x00\x01garbage", None, "cannot load .* as a sentencepiece tokenizer"),
        ("broken.tiktoken", b"not base64 at all\n", None, "cannot load .* as a tiktoken tokenizer"),
        ("empty.tiktoken", b"", None, "no BPE ranks"),
        ("x.json", b"{}", "wordpiece", "unknown tokenizer kind"),
    ],
)
def test_bad_tokenizer_files_give_one_line_errors(tmp_path, name, content, kind, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TokenizerError, match=message) as err:
        load_tokenizer(path, kind)
    assert "\n" not in str(err.value)


def test_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor vocab.json"):
        load_tokenizer(tmp_path)


def test_train_tokenizer_cli(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": doc}) for doc in DOCUMENTS * 20] + ["{broken"]
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "tok" / "tokenizer.json"
    assert train_tokenizer.main(["--input", str(corpus), "--vocab-size", "300", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"{corpus}:{len(lines)}: invalid JSON" in captured.err
    assert "skipped 1 records (invalid JSON 1)" in captured.out
    tok = load_tokenizer(out)
    assert tok.vocab_size == 300 and tok.eod == 0
    assert all(tok.decode(tok.encode(doc)) == doc for doc in DOCUMENTS)
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer.json"]  # no temporary left


def test_train_tokenizer_cli_errors(tmp_path, capsys):
    out = tmp_path / "tokenizer.json"
    assert (
        train_tokenizer.main(
            ["--input", str(tmp_path / "nope.jsonl"), "--vocab-size", "300", "--output", str(out)]
        )
        == 1
    )
    assert capsys.readouterr().err.strip().startswith("stem-train-tokenizer: error: input not found")
    assert train_tokenizer.main(["--input", str(tmp_path), "--vocab-size", "100", "--output", str(out)]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    assert (
        train_tokenizer.main(["--input", str(bad), "--vocab-size", "300", "--output", str(out), "--strict"])
        == 1
    )
    assert f"{bad}:2: missing key" in capsys.readouterr().err
    assert not out.exists()
