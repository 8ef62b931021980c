"""The inference and analysis commands' bad inputs (issue 20), each through the installed console
script as a user runs it: the documented exit code, exactly one line on stderr, no traceback,
nothing left behind (the command runs in an empty directory that stays empty), the inputs intact.

One tiny STEM export (tests/fixtures/tiny_export.py, 24 positions) serves every case; a `latest`
that names a missing step needs no real checkpoint.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONTEXT = 24


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import warnings

    from fixtures.tiny_export import write_export
    from fixtures.tiny_tokenizers import make_tiktoken, write_tiktoken

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = tmp_path_factory.mktemp("inputs")
    tok = make_tiktoken(str(root))  # 270 ids
    write_export(str(root / "export"), tok, seq_length=CONTEXT)
    write_tiktoken(str(root / "other" / "small.tiktoken"), [b"th"])  # 258 ids: another vocabulary
    (root / "ckpt").mkdir()
    (root / "ckpt" / "latest").write_text("step_00000007\n")  # names a step that is not there
    (root / "bad_utf8.jsonl").write_bytes(b'{"text": "the end"}\n{"text": "caf\xe9"}\n')
    (root / "bad_utf8.txt").write_bytes(b"the end\nof \xff the\n")
    good = {"text": "the end of the in an at on"}
    (root / "good.jsonl").write_text(json.dumps(good) + "\n")
    (root / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                              ({"text": 5}, good, {"text": " \t "}, {"text": None})))
    builder = IndexedDatasetBuilder(str(root / "far_ids.bin"), dtype=np.int32)
    builder.add_document(torch.tensor([5, 6, 300, 7]), [4])  # 300: past the tokenizer's 270 ids
    builder.finalize(str(root / "far_ids.idx"))
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": "the end of the in an at " * 3}) + "\n"
                                               for _ in range(20)))
    return root


def _run(inputs, tmp_path, prog, *args):
    """(exit code, stderr) of `prog args` in an empty directory; checks the common contract."""
    before = _digest(inputs)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    p = subprocess.run([str(BIN / prog), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert "Traceback" not in p.stderr, p.stderr
    assert list(cwd.iterdir()) == [], "left behind: " + str(list(cwd.iterdir()))
    assert _digest(inputs) == before, "an input changed"
    return p.returncode, p.stderr


def _one_line(inputs, tmp_path, code, words, prog, *args):
    rc, err = _run(inputs, tmp_path, prog, *args)
    assert rc == code and err.count("\n") == 1 and err.startswith(prog), (rc, err)
    for w in words:
        assert w in err, err
    return err


def _no_device():
    """Devices this machine does not have (on a GPU machine: one CUDA index past its count)."""
    bad = ["tpu"]
    if torch.cuda.is_available():
        bad.append(f"cuda:{torch.cuda.device_count()}")
    else:
        bad += ["cuda", "cuda:7"]
    return bad


def test_stem_eval_input_cases(inputs, tmp_path_factory):
    export = inputs / "export"
    cases = [  # (exit code, words in the line, argv)
        (2, ["bad_utf8.jsonl:2: invalid UTF-8"], ["ppl", "--model", export, "--input", inputs / "bad_utf8.jsonl"]),
        (4, ["latest", "step_00000007", "does not exist"], ["ppl", "--model", inputs / "ckpt", "--input",
                                                          inputs / "good.jsonl"]),
        (2, ["token id 300", "270"], ["ppl", "--model", export, "--input", inputs / "far_ids"]),
        (2, ["--stride", "must be >= 1, got 0"], ["ppl", "--model", export, "--input", "x", "--stride", "0"]),
        (2, ["--seq-length", "must be >= 1, got 0"], ["ppl", "--model", export, "--input", "x", "--seq-length", "0"]),
        (2, ["--lengths", "empty list"], ["niah", "--model", export, "--output", "o", "--lengths", ""]),
    ]
    for code, words, argv in cases:
        _one_line(inputs, tmp_path_factory.mktemp("eval"), code, words, "stem-eval", *argv)


def test_stem_eval_skips_what_stem_preprocess_skips(inputs, tmp_path, capsys):
    """{"text": 5}, null and whitespace-only records are skipped (and counted), not scored as "5";
    what remains scores as the file of the good record alone (in-process: the same command)."""
    from stem_megatron.cli.eval import main

    p = subprocess.run([str(BIN / "stem-eval"), "ppl", "--model", str(inputs / "export"), "--input",
                        str(inputs / "mixed.jsonl"), "--no-progress", "--device", "cpu"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == 0, p.stderr
    mixed = json.loads(p.stdout.strip().splitlines()[-1])
    assert mixed["skipped_records"] == {"non-string value": 2, "empty document": 1}
    assert p.stderr.count("\n") == 1 and "skipped 3 records that stem-preprocess also skips" in p.stderr
    assert main(["ppl", "--model", str(inputs / "export"), "--input", str(inputs / "good.jsonl"), "--no-progress",
                 "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    good = json.loads(out.strip().splitlines()[-1])
    assert err == "" and good["skipped_records"] == {}
    assert (mixed["tokens"], mixed["bytes"], mixed["loss"]) == (good["tokens"], good["bytes"], good["loss"])
    # --device goes through the same primitive as stem-generate's (tested there through the script)
    assert main(["ppl", "--model", str(inputs / "export"), "--input", str(inputs / "good.jsonl"),
                 "--device", _no_device()[0]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"stem-eval ppl: --device {_no_device()[0]}"), err


def test_stem_generate_input_cases(inputs, tmp_path_factory):
    export = inputs / "export"
    base = ["--model", export, "--prompt", "the end", "--max-new-tokens", "2"]
    cases = [
        (2, ["bad_utf8.txt:2: invalid UTF-8"], ["--model", export, "--prompt-file", inputs / "bad_utf8.txt",
                                               "--max-new-tokens", "2"]),
        (4, ["latest", "does not exist"], ["--model", inputs / "ckpt", "--prompt", "x", "--max-new-tokens", "2"]),
        (2, ["--temperature", "finite"], [*base, "--temperature", "nan"]),
        (2, ["--seed", "2**64-1"], [*base, "--seed", str(2**64)]),
    ] + [(2, [f"--device {d}"], [*base, "--device", d]) for d in _no_device()]
    for code, words, argv in cases:
        _one_line(inputs, tmp_path_factory.mktemp("gen"), code, words, "stem-generate", *argv)


def test_stem_edit_input_cases(inputs, tmp_path_factory):
    export = inputs / "export"
    base = ["--model", export, "--prompt", "the end of the", "--source", "end", "--mode", "auto"]
    cases = [
        (2, ["--max-new-tokens 100000", "exceeds the model's context of 24"],
         [*base, "--target", "in", "--max-new-tokens", "100000"]),
        (2, ["--target", "empty or blank"], [*base, "--target", ""]),
        (2, ["--tokenizer", "258 tokens", "270"], [*base, "--target", "in", "--tokenizer",
                                                  inputs / "other" / "small.tiktoken"]),
        (2, ["exceeds the model's context of 24"], ["--model", export, "--prompt", "the end of " * 12,
                                                     "--source", "end", "--target", "in", "--mode", "auto",
                                                     "--max-new-tokens", "0"]),
    ]
    for code, words, argv in cases:
        _one_line(inputs, tmp_path_factory.mktemp("edit"), code, words, "stem-edit", *argv)


def test_stem_analyze_input_cases(inputs, tmp_path_factory):
    export = inputs / "export"
    base = ["--model", export, "--corpus", inputs / "corpus.jsonl", "--output", "out"]
    cases = [
        (4, ["latest", "does not exist"], ["--model", inputs / "ckpt", "--corpus", inputs / "corpus.jsonl",
                                           "--output", "out"]),
        (2, ["--window", "must be >= 1, got 0"], [*base, "--dense", export, "--window", "0"]),
        (2, ["--dense", "is a STEM model"], [*base, "--dense", export]),
        (2, ["--tokenizer", "258 tokens", "270"], [*base, "--tokenizer", inputs / "other" / "small.tiktoken"]),
    ]
    for code, words, argv in cases:
        _one_line(inputs, tmp_path_factory.mktemp("analyze"), code, words, "stem-analyze", *argv)


def test_the_argument_types_refuse_what_a_default_would_hide():
    import argparse

    from stem_megatron.cli import args as a

    bad = [(a.positive_int, "0"), (a.positive_int, "-3"), (a.positive_int, "1.5"), (a.nonneg_float, "nan"),
           (a.nonneg_float, "inf"), (a.nonneg_float, "-0.1"), (a.unit_interval, "0"), (a.unit_interval, "1.01"),
           (a.seed, "-1"), (a.seed, str(2**64)), (a.int_list(a.positive_int), ""), (a.int_list(a.positive_int), " , "),
           (a.int_list(a.positive_int), "64,,128"), (a.float_list(a.fraction), "0.5,1.5"), (a.nonblank, " \t")]
    for parse, text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    assert (a.seed(str(2**64 - 1)), a.seed("0")) == (2**64 - 1, 0)
    assert a.int_list(a.positive_int)(" 64, 128") == [64, 128] and a.float_list(a.fraction)("0,1") == [0.0, 1.0]
    assert (a.nonneg_float("0"), a.unit_interval("1"), a.int_in(1, 4)("4")) == (0.0, 1.0, 4)


def test_parse_device_names_what_is_missing():
    from stem_megatron.cli.inputs import parse_device
    from stem_megatron.errors import UserError

    assert parse_device("cpu") == "cpu" and parse_device(None) in ("cpu", "cuda")
    for name in [*_no_device(), "meta", "cuda:x"]:
        with pytest.raises(UserError) as e:
            parse_device(name)
        assert e.value.code == 2 and str(e.value).startswith(f"--device {name}: ")
