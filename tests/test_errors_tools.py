"""Failures a user can cause with stem-preprocess, stem-reshard and stem-export: one line, the
documented exit code, nothing overwritten or left behind (issue 10, items 6, 8-13)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.tiny_tokenizers import make_tiktoken, write_tiktoken

from stem_megatron.cli import preprocess

REPO = Path(__file__).resolve().parents[1]
GOOD = b'{"text": "a good document"}\n'


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiktoken(str(tmp_path_factory.mktemp("tok")))


def _pre(tmp_path, tok, *extra, src=None, prefix=None):
    if src is None:
        src = tmp_path / "in.jsonl"
        src.write_bytes(GOOD)
    return preprocess.main(["--input", str(src), "--output-prefix", str(prefix or tmp_path / "out" / "p"),
                            "--tokenizer", str(tok), "--quiet", *extra])


def _one_line(capsys, prog):
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: "), err
    return lines[0]


# ------------------------------------------------------------------ 9. zero documents
@pytest.mark.parametrize("content", [b"", b'{"text": ""}\n{"title": "no text"}\n'])
def test_preprocess_zero_documents_is_an_error_and_writes_nothing(tmp_path, tok, capsys, content):
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    assert _pre(tmp_path, tok, src=src) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("stem-preprocess: error: no documents for key 'text'")
    assert "nothing written" in err and "Traceback" not in err
    assert list((tmp_path / "out").iterdir()) == []


# ------------------------------------------------------------------ 10. workers capped
def test_preprocess_workers_capped_at_the_cores(tmp_path, tok, capsys):
    assert _pre(tmp_path, tok, "--workers", "1000") == 0
    cores = preprocess.available_cores()
    assert f"stem-preprocess: note: --workers 1000 capped at {cores}" in capsys.readouterr().err


# ------------------------------------------------------------------ 11. errors name the cause
def test_preprocess_output_prefix_errors_name_the_cause(tmp_path, tok, capsys):
    assert _pre(tmp_path, tok, prefix=f"{tmp_path}/data/") == 2
    line = _one_line(capsys, "stem-preprocess")
    assert "names a directory; a prefix names files" in line and "Errno" not in line
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert _pre(tmp_path, tok, prefix=blocker / "p") == 2
    line = _one_line(capsys, "stem-preprocess")
    assert f"{blocker} is a file, not a directory" in line and "Errno" not in line


def test_preprocess_wrong_kind_tokenizer_does_not_echo_the_file(tmp_path, capsys):
    wrong = tmp_path / "vocab.tiktoken"
    wrong.write_text("x" * 4_000_000 + "\n")  # one 4 MB line, not "base64 rank" pairs
    assert _pre(tmp_path, wrong) == 1
    line = _one_line(capsys, "stem-preprocess")
    assert f"cannot load {wrong} as a tiktoken tokenizer" in line and len(line) < 500


# ------------------------------------------------------------------ 6. Ctrl-C in stem-preprocess
def test_preprocess_ctrl_c_is_one_line_and_removes_partial_files(tmp_path, tok):
    big = tmp_path / "big.jsonl"
    big.write_bytes((json.dumps({"text": "the theory of everything " * 40}) + "\n").encode() * 40_000)
    prefix = tmp_path / "out"
    partial = Path(f"{prefix}_text_document.bin.partial")
    proc = subprocess.Popen([sys.executable, "-m", "stem_megatron.cli.preprocess", "--input", str(big), "--output-prefix",
                             str(prefix), "--tokenizer", tok, "--quiet", "--workers", "2"], env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (partial.exists() and partial.stat().st_size > 0):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group, pool workers too
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130
    assert err.splitlines() == ["stem-preprocess: interrupted (SIGINT); no output written (partial files removed)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]


# ------------------------------------------------------------------ checkpoints for 12 and 13
def _save(rank, world_size, root, tokenizer):
    from stem_megatron.config import CheckpointConfig
    from stem_megatron.testing.models import TokenDataset, tiny_config
    from stem_megatron.training.checkpoint import Checkpointer
    from stem_megatron.training.trainer import Trainer

    cfg = tiny_config(vocab_size=270, num_layers=2, stem_layers=[1], global_batch_size=2, micro_batch_size=2)
    cfg.data.tokenizer = tokenizer
    trainer = Trainer(cfg)
    trainer.checkpointer = Checkpointer(CheckpointConfig(save=root))
    trainer.setup(datasets=(TokenDataset(cfg.model.vocab_size, cfg.model.seq_length, 8, seed=3), None))
    trainer.train_step()
    trainer.checkpointer.save(trainer)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    from stem_megatron.testing.distributed import run_distributed

    root = tmp_path_factory.mktemp("ckpt") / "save"
    run_distributed(_save, world_size=1, args=(str(root), tok), timeout=300)
    return root


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in Path(path).rglob("*"))


# ------------------------------------------------------------------ 12. stem-reshard
def test_reshard_never_replaces_a_checkpoint_silently(ckpt, tmp_path, capsys):
    from stem_megatron.cli.reshard import main

    before = _tree(ckpt)
    link = tmp_path / "link"
    link.symlink_to(ckpt)  # the same save directory under another name
    assert main(["--input", str(ckpt), "--output", str(link), "--world-size", "1"]) == 2
    assert "is the input" in _one_line(capsys, "stem-reshard")
    assert _tree(ckpt) == before  # RNG states and all

    out = tmp_path / "out"
    assert main(["--input", str(ckpt), "--output", str(out), "--world-size", "1"]) == 0
    capsys.readouterr()
    published = _tree(out)
    assert main(["--input", str(ckpt), "--output", str(out), "--world-size", "1"]) == 2
    line = _one_line(capsys, "stem-reshard")
    assert "exists and is not empty (it already holds step_00000001)" in line and "--overwrite" in line
    assert main(["--input", str(ckpt), "--output", str(out), "--world-size", "1", "--overwrite"]) == 0
    assert _tree(out) == published

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert main(["--input", str(ckpt), "--output", str(other), "--world-size", "1", *extra]) == 2
        assert "--output" in _one_line(capsys, "stem-reshard")
    assert _tree(other) == ["notes.txt"]


@pytest.mark.parametrize("tool", ["stem-reshard", "stem-export"])
def test_file_outputs_are_one_line_from_both_tools(ckpt, tmp_path, capsys, tool):
    from stem_megatron.cli import export, reshard

    blocker = tmp_path / "a_file"
    blocker.write_text("keep")
    for out in (blocker, blocker / "sub"):
        if tool == "stem-reshard":
            rc = reshard.main(["--input", str(ckpt), "--output", str(out), "--world-size", "1"])
        else:
            rc = export.main(["--checkpoint", str(ckpt), "--output", str(out)])
        assert rc == 2
        line = _one_line(capsys, tool)
        assert str(blocker) in line and "Errno" not in line
    assert blocker.read_text() == "keep"


def test_reshard_ctrl_c_is_one_line_and_publishes_nothing(ckpt, tmp_path, capsys, monkeypatch):
    from stem_megatron import reshard
    from stem_megatron.cli import reshard as reshard_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # where a Ctrl-C lands during the long part: writing the tables

    monkeypatch.setattr(reshard, "write_tables", interrupted)
    out = tmp_path / "out"
    assert reshard_cli.main(["--input", str(ckpt), "--output", str(out), "--world-size", "1"]) == 130
    assert _one_line(capsys, "stem-reshard").startswith("stem-reshard: interrupted (SIGINT)")
    assert not out.exists()  # no .tmp- directory left either, nor the output directory this run created


# ------------------------------------------------------------------ 13. stem-export checks first
@pytest.mark.parametrize("case", ["missing", "bigger vocabulary", "other vocabulary"])
def test_export_checks_the_tokenizer_before_loading(ckpt, tmp_path, capsys, monkeypatch, case):
    from stem_megatron import export
    from stem_megatron.cli import export as export_cli

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded the checkpoint before checking the arguments")

    monkeypatch.setattr(export, "load_dense_tensors", no_loading)
    tokenizer, fragment = {
        "missing": (str(tmp_path / "absent.tiktoken"), "not found"),
        "bigger vocabulary": (write_tiktoken(str(tmp_path / "b" / "big.tiktoken"), [], extra_ranks=400),
                              "has 657 tokens; the checkpoint has a vocabulary of 270"),
        "other vocabulary": (write_tiktoken(str(tmp_path / "s" / "small.tiktoken"), [b"th"]),
                             "has 258 tokens; the checkpoint was trained with a tokenizer of 270"),
    }[case]
    out = tmp_path / "out"
    assert export_cli.main(["--checkpoint", str(ckpt), "--output", str(out), "--tokenizer", tokenizer]) == 2
    assert fragment in _one_line(capsys, "stem-export")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".tmp", "out"))) == []


def test_export_failure_and_ctrl_c_remove_the_temporary_directory(ckpt, tmp_path, capsys, monkeypatch):
    from stem_megatron.cli import export

    for exc, code in ((OSError(28, "No space left on device", "model.safetensors"), 2), (KeyboardInterrupt(), 130)):
        def fail(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr("safetensors.torch.save_file", fail)
        assert export.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "out")]) == code
        _one_line(capsys, "stem-export")
        assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_export_prints_no_third_party_warnings(ckpt, tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "stem_megatron.cli.export", "--checkpoint", str(ckpt), "--output", str(out)],
                       capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert (out / "model.safetensors").exists()
