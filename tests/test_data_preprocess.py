"""stem-preprocess: round trips for every tokenizer kind and input form, dtypes, worker determinism."""

import gzip
import json
import random
import warnings

import numpy as np
import pytest
from fixtures.tiny_tokenizers import DOCUMENTS, make_tokenizers, write_tiktoken

from stem_megatron.cli import preprocess
from stem_megatron.data.tokenizer import load_tokenizer

with warnings.catch_warnings():  # megatron.core warns about missing TE/apex on import
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

KINDS = ("huggingface", "tiktoken", "sentencepiece", "gpt2")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return make_tokenizers(str(tmp_path_factory.mktemp("tokenizers")))


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def run(*args):
    assert preprocess.main([*map(str, args), "--quiet"]) == 0


def read_docs(prefix, tok, eod: bool):
    ds = IndexedDataset(str(prefix))
    docs = []
    for i in range(len(ds)):
        ids = ds[i].tolist()
        if eod:
            assert ids[-1] == tok.eod
            ids = ids[:-1]
        assert tok.eod not in ids
        docs.append(tok.decode(ids))
    return ds, docs


@pytest.mark.parametrize("eod", [False, True], ids=["no-eod", "eod"])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_every_tokenizer_kind(tmp_path, tokenizers, kind, eod):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCUMENTS])
    run(
        "--input",
        src,
        "--output-prefix",
        tmp_path / "out",
        "--tokenizer",
        tokenizers[kind],
        *(["--append-eod"] if eod else []),
    )
    tok = load_tokenizer(tokenizers[kind])
    ds, docs = read_docs(tmp_path / "out_text_document", tok, eod)
    assert docs == DOCUMENTS
    assert ds.index.dtype == np.uint16
    assert int(ds.sequence_lengths.sum()) == sum(len(tok.encode(d)) + eod for d in DOCUMENTS)


def test_multiple_keys_each_get_a_finalized_output(tmp_path, tokenizers):
    records = [{"title": f"Title {i}", "text": d} for i, d in enumerate(DOCUMENTS)]
    records.insert(2, {"text": "a record without a title is skipped for both keys"})
    src = write_jsonl(tmp_path / "docs.jsonl", records)
    run(
        "--input",
        src,
        "--output-prefix",
        tmp_path / "out",
        "--tokenizer",
        tokenizers["tiktoken"],
        "--json-keys",
        "title",
        "text",
        "--append-eod",
    )
    tok = load_tokenizer(tokenizers["tiktoken"])
    _, titles = read_docs(tmp_path / "out_title_document", tok, True)
    _, texts = read_docs(tmp_path / "out_text_document", tok, True)
    assert titles == [f"Title {i}" for i in range(len(DOCUMENTS))]
    assert texts == DOCUMENTS


def test_plain_text_files_gzip_and_directories(tmp_path, tokenizers):
    tok = load_tokenizer(tokenizers["huggingface"])
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text(DOCUMENTS[2])  # one document per file: exact content
    with gzip.open(corpus / "a.txt.gz", "wt") as f:
        f.write(DOCUMENTS[0])
    (corpus / "sub" / "c.txt").write_text(DOCUMENTS[3] + "\n")
    (corpus / "notes.md").write_text("ignored: not a known suffix")
    run("--input", corpus, "--output-prefix", tmp_path / "files", "--tokenizer", tokenizers["huggingface"])
    _, docs = read_docs(tmp_path / "files_text_document", tok, False)
    assert docs == [
        DOCUMENTS[0],
        DOCUMENTS[2],
        DOCUMENTS[3] + "\n",
    ]  # sorted walk: a.txt.gz, b.txt, sub/c.txt

    paragraphs = tmp_path / "paras.txt"
    paragraphs.write_text("\n\n" + "first para\nsecond line\n\n\n  \nsecond para\n\nthird para")
    run(
        "--input",
        paragraphs,
        "--output-prefix",
        tmp_path / "paras",
        "--tokenizer",
        tokenizers["huggingface"],
        "--text-split",
        "blank-lines",
    )
    _, docs = read_docs(tmp_path / "paras_text_document", tok, False)
    assert docs == ["first para\nsecond line", "second para", "third para"]

    with gzip.open(tmp_path / "docs.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    run(
        "--input",
        tmp_path / "docs.jsonl.gz",
        "--output-prefix",
        tmp_path / "gz",
        "--tokenizer",
        tokenizers["huggingface"],
    )
    assert read_docs(tmp_path / "gz_text_document", tok, False)[1] == DOCUMENTS


def test_large_vocabulary_writes_int32(tmp_path):
    tiktoken_path = write_tiktoken(str(tmp_path / "big.tiktoken"), merges=[b"th", b"the"], extra_ranks=65500)
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCUMENTS])
    run("--input", src, "--output-prefix", tmp_path / "out", "--tokenizer", tiktoken_path, "--append-eod")
    tok = load_tokenizer(tiktoken_path)
    assert tok.eod == 256 + 2 + 65500
    ds, docs = read_docs(tmp_path / "out_text_document", tok, True)
    assert ds.index.dtype == np.int32 and docs == DOCUMENTS


def test_workers_1_and_4_write_identical_bytes(tmp_path, tokenizers):
    rng = random.Random(0)
    lines = []
    for i in range(1500):
        if i % 97 == 5:
            lines.append("{not json")
        else:
            words = rng.choices(DOCUMENTS, k=rng.randint(1, 4))
            lines.append(json.dumps({"text": " ".join(words), "id": i}))
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(lines) + "\n")
    outputs = []
    for workers in (1, 4):
        prefix = tmp_path / f"w{workers}"
        run(
            "--input",
            src,
            "--output-prefix",
            prefix,
            "--tokenizer",
            tokenizers["huggingface"],
            "--append-eod",
            "--workers",
            workers,
            "--batch-size",
            16,
        )
        outputs.append(
            [(prefix.parent / f"{prefix.name}_text_document{ext}").read_bytes() for ext in (".bin", ".idx")]
        )
    assert outputs[0] == outputs[1]
    assert len(IndexedDataset(str(tmp_path / "w4_text_document"))) == 1500 - 16


def test_summary_and_stats_json(tmp_path, tokenizers, capsys):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCUMENTS] + [{"text": ""}])
    stats = tmp_path / "stats.json"
    assert (
        preprocess.main(
            [
                "--input",
                str(src),
                "--output-prefix",
                str(tmp_path / "o"),
                "--tokenizer",
                tokenizers["tiktoken"],
                "--stats-json",
                str(stats),
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert f"{len(DOCUMENTS):,} documents" in out
    assert "skipped 1 (empty document 1)" in out
    assert "tokens/s" in err  # the progress line
    figures = json.loads(stats.read_text())
    assert figures["documents"] == {"text": len(DOCUMENTS)} and figures["skipped"] == {"empty document": 1}
    assert figures["total_tokens"] == int(
        IndexedDataset(str(tmp_path / "o_text_document")).sequence_lengths.sum()
    )
