"""stem-preprocess on bad input: skipped records reported with file:line, --strict, bad paths, killed runs."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from fixtures.tiny_tokenizers import make_tiktoken

from stem_megatron.cli import preprocess

with warnings.catch_warnings():  # megatron.core warns about missing TE/apex on import
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

REPO = Path(__file__).resolve().parents[1]

# (line content, reason the summary counts it under)
BAD_LINES = [
    (b'{"text": "unterminated', "invalid JSON"),
    (b'["a", "list"]', "invalid JSON"),
    (b'{"title": "no text key"}', "missing key"),
    (b'{"text": 42}', "non-string value"),
    (b'{"text": null}', "non-string value"),
    (b'{"text": "bad byte \xff here"}', "invalid UTF-8"),
    (b'{"text": "lone surrogate \\ud800"}', "invalid UTF-8"),
    (b'{"text": ""}', "empty document"),
    (b'{"text": "   \\n "}', "empty document"),
]
GOOD = b'{"text": "a good document"}'


@pytest.fixture(scope="module")
def tiktoken_path(tmp_path_factory):
    return make_tiktoken(str(tmp_path_factory.mktemp("tok")))


def outputs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".bin" in p.name or ".idx" in p.name)


def test_every_bad_record_is_reported_with_file_and_line(tmp_path, tiktoken_path, capsys):
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"\n".join([GOOD, *(line for line, _ in BAD_LINES), b"", GOOD]) + b"\n")
    prefix = tmp_path / "out"
    assert (
        preprocess.main(
            ["--input", str(src), "--output-prefix", str(prefix), "--tokenizer", tiktoken_path, "--quiet"]
        )
        == 0
    )
    out, err = capsys.readouterr()
    for line_no, (_, reason) in enumerate(BAD_LINES, start=2):
        assert f"{src}:{line_no}: {reason} (" in err
    assert f"{src}:{len(BAD_LINES) + 2}:" not in err  # a blank line is not a record
    assert (
        "skipped 9 (empty document 2, invalid JSON 2, invalid UTF-8 2, missing key 1, non-string value 2)"
        in out
    )
    assert len(IndexedDataset(f"{prefix}_text_document")) == 2


@pytest.mark.parametrize("line, reason", BAD_LINES, ids=[f"{r}-{i}" for i, (_, r) in enumerate(BAD_LINES)])
def test_strict_fails_on_the_first_bad_record_and_writes_nothing(
    tmp_path, tiktoken_path, capsys, line, reason
):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join([GOOD] * 300 + [line] + [GOOD]) + b"\n")
    out_dir = tmp_path / "out"
    rc = preprocess.main(
        [
            "--input",
            str(src),
            "--output-prefix",
            str(out_dir / "p"),
            "--tokenizer",
            tiktoken_path,
            "--strict",
            "--quiet",
            "--batch-size",
            "64",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith(f"stem-preprocess: error: {src}:301: {reason}")
    assert outputs(out_dir) == []  # partial files removed, nothing renamed into place


def test_text_input_invalid_utf8_names_the_line(tmp_path, tiktoken_path, capsys):
    src = tmp_path / "paras.txt"
    src.write_bytes(b"good paragraph\n\nsecond\nbad \xc3\x28 line\n\nthird\n")
    rc = preprocess.main(
        [
            "--input",
            str(src),
            "--output-prefix",
            str(tmp_path / "o"),
            "--tokenizer",
            tiktoken_path,
            "--text-split",
            "blank-lines",
            "--quiet",
            "--strict",
        ]
    )
    assert rc == 1
    assert f"{src}:4: invalid UTF-8 (byte 0xc3 at column 5)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-input", "input not found"),
        ("missing-tokenizer", "tokenizer not found"),
        ("corrupt-tokenizer", "cannot load"),
        ("unknown-suffix", "cannot tell the format"),
        ("keys-on-text", "plain-text inputs only give the 'text' key"),
    ],
)
def test_bad_paths_fail_in_one_line_and_write_nothing(tmp_path, tiktoken_path, capsys, case, message):
    good = tmp_path / "in.jsonl"
    good.write_bytes(GOOD + b"\n")
    args = {"input": str(good), "tokenizer": tiktoken_path, "extra": []}
    if case == "missing-input":
        args["input"] = str(tmp_path / "absent.jsonl")
    elif case == "missing-tokenizer":
        args["tokenizer"] = str(tmp_path / "absent.tiktoken")
    elif case == "corrupt-tokenizer":
        (tmp_path / "bad.model").write_bytes(b"garbage")
        args["tokenizer"] = str(tmp_path / "bad.model")
    elif case == "unknown-suffix":
        (tmp_path / "in.csv").write_text("a,b\n")
        args["input"] = str(tmp_path / "in.csv")
    else:
        (tmp_path / "in.txt").write_text("plain")
        args["input"] = str(tmp_path / "in.txt")
        args["extra"] = ["--json-keys", "title"]
    out_dir = tmp_path / "out"
    rc = preprocess.main(
        [
            "--input",
            args["input"],
            "--output-prefix",
            str(out_dir / "p"),
            "--tokenizer",
            args["tokenizer"],
            *args["extra"],
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and message in err
    assert not out_dir.exists()


def _start(src: Path, prefix: Path, tokenizer: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-m",
        "stem_megatron.cli.preprocess",
        "--input",
        str(src),
        "--output-prefix",
        str(prefix),
        "--tokenizer",
        tokenizer,
        "--quiet",
    ]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_writing(proc: subprocess.Popen, partial: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not (partial.exists() and partial.stat().st_size > 0):
        assert proc.poll() is None, f"preprocess exited early: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "preprocess never started writing"
        time.sleep(0.02)


def test_killed_run_leaves_no_complete_looking_output(tmp_path, tiktoken_path):
    prefix = tmp_path / "out"
    final = Path(f"{prefix}_text_document")
    small = tmp_path / "small.jsonl"
    small.write_bytes(GOOD + b"\n")
    assert (
        preprocess.main(
            ["--input", str(small), "--output-prefix", str(prefix), "--tokenizer", tiktoken_path, "--quiet"]
        )
        == 0
    )
    previous = [Path(f"{final}{ext}").read_bytes() for ext in (".bin", ".idx")]

    big = tmp_path / "big.jsonl"
    line = json.dumps({"text": "the theory of everything " * 40}).encode() + b"\n"
    big.write_bytes(line * 40_000)  # ~40 MB: takes far longer to tokenize than it takes to kill
    partial = Path(f"{final}.bin.partial")

    proc = _start(big, prefix, tiktoken_path)
    _wait_for_writing(proc, partial)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # The earlier complete pair is untouched; the killed run left only .partial files behind.
    assert [Path(f"{final}{ext}").read_bytes() for ext in (".bin", ".idx")] == previous
    assert len(IndexedDataset(str(final))) == 1
    assert partial.exists() and not Path(f"{final}.idx.partial").exists()

    for leftover in (f"{final}.bin", f"{final}.idx", partial):
        os.remove(leftover)
    proc = _start(big, prefix, tiktoken_path)
    _wait_for_writing(proc, partial)
    proc.send_signal(signal.SIGTERM)  # a polite stop also removes its partial files
    assert proc.wait(timeout=30) != 0
    assert not IndexedDataset.exists(str(final))
    assert outputs(tmp_path) == []


def test_strict_with_workers_stops_at_the_first_bad_record(tmp_path, tiktoken_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join([GOOD] * 300 + [b"{broken", GOOD, b"{also broken"]) + b"\n")
    out_dir = tmp_path / "out"
    rc = preprocess.main(
        [
            "--input",
            str(src),
            "--output-prefix",
            str(out_dir / "p"),
            "--tokenizer",
            tiktoken_path,
            "--strict",
            "--quiet",
            "--workers",
            "2",
            "--batch-size",
            "16",
        ]
    )
    assert rc == 1
    assert capsys.readouterr().err.startswith(f"stem-preprocess: error: {src}:301: invalid JSON")
    assert outputs(out_dir) == []
