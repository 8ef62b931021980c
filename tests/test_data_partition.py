"""stem-preprocess --partition I/N + stem-merge: N partitions merged are the bytes of one run."""

import gzip
import json
import random
import warnings

import numpy as np
import pytest
from fixtures.tiny_tokenizers import DOCUMENTS, make_tiktoken

from data_tools import merge
from data_tools.inputs import InputError, iter_records, resolve_inputs
from data_tools.partition import iter_partition_records, parse_partition
from stem_megatron.cli import merge as merge_cli
from stem_megatron.cli import preprocess as preprocess_cli

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


def _paragraph_text(rng: random.Random, n: int) -> str:
    """Paragraphs separated by runs of blank and whitespace-only lines, CRLF and long lines mixed in."""
    parts = []
    for i in range(n):
        lines = [rng.choice(DOCUMENTS).replace("\n", " ") * rng.randint(1, 6) for _ in range(rng.randint(1, 4))]
        eol = "\r\n" if i % 5 == 0 else "\n"
        parts.append(eol.join(lines) + eol)
        parts.append(rng.choice(["\n", "\n\n", "  \n", "\t\n\n \n"]))
    return "".join(parts)


def _jsonl_text(rng: random.Random, n: int) -> str:
    lines = []
    for i in range(n):
        lines.append(json.dumps({"text": rng.choice(DOCUMENTS) * rng.randint(1, 8), "i": i}))
        if i % 7 == 3:
            lines.append("   ")  # blank lines are not records
        if i % 11 == 5:
            lines.append('{"text": 3}')  # a bad record: skipped, still in input order
    return "\n".join(lines)  # no final newline


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Plain and gzip JSONL and text files; the first plain files start with a BOM."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(7)
    (root / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + _jsonl_text(rng, 60).encode())
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.write(_jsonl_text(rng, 25))
    (root / "c.txt").write_bytes(b"\xef\xbb\xbf\n" + _paragraph_text(rng, 30).encode())
    with gzip.open(root / "d.txt.gz", "wt") as f:
        f.write(_paragraph_text(rng, 10))
    (root / "e.jsonl").write_text("")  # an empty file
    (root / "f.txt").write_text("one paragraph\nno trailing newline")
    (root / "g.jsonl").write_text(_jsonl_text(rng, 40) + "\n")
    return root


@pytest.mark.parametrize("text_split", ["file", "blank-lines"])
def test_every_record_in_exactly_one_partition_in_order(corpus, text_split):
    files = resolve_inputs([str(corpus)])
    whole = list(iter_records(files, text_split))
    assert len(whole) > 100
    for count in range(1, 40):
        parts = [list(iter_partition_records(files, text_split, i, count)) for i in range(count)]
        assert [r for part in parts for r in part] == whole, f"N={count}"
    nonempty = sum(bool(list(iter_partition_records(files, text_split, i, 7))) for i in range(7))
    assert nonempty >= 4  # the plain files really are split by byte range


def _preprocess(corpus, prefix, tokenizer, text_split, partition=None):
    args = ["--input", str(corpus), "--output-prefix", str(prefix), "--tokenizer", tokenizer]
    args += ["--append-eod", "--text-split", text_split, "--quiet"]
    if partition:
        args += ["--partition", partition]
    assert preprocess_cli.main(args) == 0


@pytest.mark.parametrize("text_split", ["file", "blank-lines"])
def test_partitions_merged_are_byte_identical_to_one_run(tmp_path, corpus, text_split):
    tokenizer = make_tiktoken(str(tmp_path))
    _preprocess(corpus, tmp_path / "one", tokenizer, text_split)
    expected = {ext: (tmp_path / f"one_text_document.{ext}").read_bytes() for ext in ("bin", "idx")}
    for count in (1, 2, 3, 7):
        prefixes = []
        for i in range(count):
            _preprocess(corpus, tmp_path / f"n{count}" / f"p{i}", tokenizer, text_split, f"{i}/{count}")
            prefixes.append(str(tmp_path / f"n{count}" / f"p{i}_text_document"))
        out = tmp_path / f"merged{count}"
        assert merge_cli.main(["--input", *prefixes, "--output-prefix", str(out)]) == 0
        for ext in ("bin", "idx"):
            assert (tmp_path / f"merged{count}.{ext}").read_bytes() == expected[ext], f"N={count} .{ext}"


def _dataset(prefix, docs, dtype=np.uint16):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.array(doc, dtype=dtype), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_merge_matches_megatron_add_index(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    prefixes = []
    for i, n in enumerate([5, 0, 13, 1]):  # an empty dataset among them
        docs = [rng.integers(0, 60000, rng.integers(1, 50)).tolist() for _ in range(n)]
        prefixes.append(_dataset(tmp_path / f"in{i}", docs))
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for p in prefixes:
        builder.add_index(p)
    builder.finalize(str(tmp_path / "ref.idx"))
    monkeypatch.setattr(merge, "_CHUNK", 4)  # several chunks per section and per .bin copy
    assert merge.merge(prefixes, str(tmp_path / "out")) == (19, sum(
        int(np.fromfile(f"{p}.bin", dtype=np.uint16).size) for p in prefixes
    ))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"out.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes()


def test_bad_input_is_one_line(tmp_path, capsys, corpus):
    a = _dataset(tmp_path / "a", [[1, 2]])
    b = _dataset(tmp_path / "b", [[1, 2]], dtype=np.int32)
    cases = [
        ([a, str(tmp_path / "missing")], "input dataset not found"),
        ([a, b], "different token dtypes"),
    ]
    for inputs, message in cases:
        assert merge_cli.main(["--input", *inputs, "--output-prefix", str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not list(tmp_path.glob("o.*"))
    for bad in ("3/3", "1", "-1/2", "0/0"):
        with pytest.raises(InputError):
            parse_partition(bad)
    args = ["--input", str(corpus), "--output-prefix", str(tmp_path / "x"), "--tokenizer", "t", "--partition", "2/2"]
    assert preprocess_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--partition 2/2" in err and err.count("\n") == 1


def test_preprocess_sbatch_dry_run(tmp_path):
    import os
    import subprocess

    env = dict(os.environ, INPUT="corpus/", OUTPUT=str(tmp_path / "c"), TOKENIZER="t.tiktoken", PARTS="3",
               DRY_RUN="1", EXTRA="--append-eod")
    script = os.path.join(os.path.dirname(__file__), "..", "launch", "preprocess.sbatch")

    def run(**extra):
        out = subprocess.run(["bash", script], env=dict(env, **extra), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "--array=0-2 --export=ALL,STAGE=partition" in run()
    part = run(STAGE="partition", SLURM_ARRAY_TASK_ID="1")
    assert f"--output-prefix {tmp_path}/c.parts/part1 " in part and "--partition 1/3 --quiet --append-eod" in part
    merge_cmd = run(STAGE="merge")
    assert "stem_megatron.cli.merge --input " + " ".join(f"{tmp_path}/c.parts/part{i}_text_document" for i in range(3)) in merge_cmd
    assert f"--output-prefix {tmp_path}/c_text_document" in merge_cmd
    bad = subprocess.run(["bash", script], env=dict(env, PARTS="0"), capture_output=True, text=True)
    assert bad.returncode == 2 and "PARTS must be a positive integer" in bad.stderr
