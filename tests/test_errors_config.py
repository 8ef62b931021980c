"""Config holes (issue 10, item 4) fail `stem-train --dry-run` with one line and exit 2; the dry
run also reports, as warnings, the input problems a run would stop on; start-up output checks."""

from pathlib import Path

import pytest

from stem_megatron.cli.train import main

CONFIG = """\
model: {num_layers: 2, hidden_size: 32, num_attention_heads: 2, ffn_hidden_size: 64, vocab_size: 270,
        seq_length: 16, transformer_impl: local}
train: {micro_batch_size: 1, global_batch_size: 2, train_steps: 2}
data: {data_path: [DATA], tokenizer: TOK}
"""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.replace("DATA", str(tmp_path / "nope")).replace("TOK", str(tmp_path / "tok.tiktoken")))
    return str(path)


def _dry(capsys, *argv):
    rc = main(["--config", *argv, "--dry-run"])
    return rc, capsys.readouterr()


@pytest.mark.parametrize("overrides, message", [
    (["train.lr=.inf"], "train.lr=Infinity: must be a finite number"),
    (["train.lr=1e400"], "train.lr=Infinity: must be a finite number"),
    (["model.norm_epsilon=.nan"], "model.norm_epsilon=NaN: must be a finite number"),
    (["train.clip_grad=.inf"], "train.clip_grad=Infinity: must be a finite number"),
    (["data.tokenizer=null"], "data.tokenizer=null: required with data.data_path"),
    (["model.hidden_size=30"], "model.hidden_size=30: gives an odd head dimension 15"),  # failed in RoPE
])
def test_config_holes_fail_the_dry_run_in_one_line(config, capsys, overrides, message):
    rc, out = _dry(capsys, config, *overrides)
    lines = out.err.splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"stem-train: {message}"), out.err


def test_duplicate_override_warns_naming_the_key(config, capsys):
    rc, out = _dry(capsys, config, "train.lr=1e-3", "train.lr=2e-3")
    assert rc == 0 and "lr: 0.002" in out.out  # the last one wins, as documented, but not silently
    assert ("stem-train: warning: train.lr: given twice on the command line (train.lr=1e-3, then train.lr=2e-3); "
            "the last one wins") in out.err.splitlines()


def test_invalid_utf8_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"model:\n  num_layers: 2 \xff\n")
    rc, out = _dry(capsys, str(path))
    assert rc == 2 and out.err == f"stem-train: {path}: not UTF-8 text (byte 0xff on line 2)\n"


def test_dry_run_warns_about_inputs_a_run_would_stop_on(config, capsys):
    rc, out = _dry(capsys, config)
    assert rc == 0  # the paper configs dry-run without their data
    assert "stem-train: warning: data.tokenizer: tokenizer not found" in out.err
    assert "a run would stop with exit code 2" in out.err


def test_start_up_output_checks(tmp_path):
    """checkpoint.save -> exit 4; the TensorBoard directory and --summary-json -> exit 2; all before step 1."""
    from stem_megatron.cli import UserError
    from stem_megatron.config import load_config
    from stem_megatron.training.preflight import check_outputs

    blocker = tmp_path / "file"
    blocker.write_text("")
    base = tmp_path / "c.yaml"
    base.write_text(CONFIG.replace("DATA", "x").replace("TOK", "y"))

    def fails(*overrides, summary=None):
        cfg = load_config(base, list(overrides))
        with pytest.raises(UserError) as e:
            check_outputs(cfg, summary, True, cfg.logging.tensorboard_dir or str(tmp_path / "tb"))
        return e.value

    e = fails(f"checkpoint.save={blocker}/ck")
    assert e.code == 4 and f"{blocker} is a file" in str(e)
    e = fails(f"logging.tensorboard_dir={blocker}")
    assert e.code == 2 and "logging.tensorboard_dir" in str(e)
    e = fails(summary=str(tmp_path))
    assert e.code == 2 and "is a directory" in str(e)
    e = fails(summary=str(blocker / "s.json"))
    assert e.code == 2 and "--summary-json" in str(e)
    ok = load_config(base, [f"checkpoint.save={tmp_path}/new/ck"])
    check_outputs(ok, str(tmp_path / "s.json"), True, str(tmp_path / "tb"))
    assert Path(tmp_path / "new" / "ck").is_dir() and list(Path(tmp_path / "new" / "ck").iterdir()) == []
