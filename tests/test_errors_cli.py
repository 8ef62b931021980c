"""Every `stem-*` command that reports through cli.run ends a Ctrl-C with exit 130 and one line on
stderr, no traceback: each tool's work function is replaced by one that raises KeyboardInterrupt
(what SIGINT raises), so no model or data is needed."""

import pytest

from stem_megatron import config
from stem_megatron.cli import analyze as analyze_cli
from stem_megatron.cli import edit as edit_cli
from stem_megatron.cli import eval as eval_cli
from stem_megatron.cli import generate, merge, sample_data, train_tokenizer
from stem_megatron.cli import import_hf as hf_import


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


CASES = [  # (prog, module, work function replaced: in module, or a dotted path, argv)
    ("stem-edit", edit_cli, "run",
     ["--model", "m", "--prompt", "p", "--source", "s", "--target", "t", "--mode", "auto"]),
    ("stem-analyze", analyze_cli, "run", ["--model", "m", "--corpus", "c.jsonl", "--output", "o"]),
    ("stem-eval ppl", eval_cli, "run_ppl", ["ppl", "--model", "m", "--input", "d.jsonl"]),
    ("stem-eval niah", eval_cli, "run_niah", ["niah", "--model", "m", "--output", "o"]),
    ("stem-generate", generate, "_generate", ["--model", "m", "--prompt", "p", "--max-new-tokens", "1"]),
    ("stem-import", hf_import, "stem_megatron.hf_import.import_hf", ["--hf", "h", "--config", "c.yaml", "--output", "o"]),
    ("stem-merge", merge, "data_tools.merge.merge", ["--input", "a", "--output-prefix", "o"]),
    ("stem-train-tokenizer", train_tokenizer, "resolve_inputs", ["--input", "c", "--vocab-size", "300", "--output", "o"]),
    ("stem-sample-data", sample_data, "build_sample", []),
]


@pytest.mark.parametrize("prog,module,name,argv", CASES, ids=[c[0] for c in CASES])
def test_ctrl_c_is_one_line_and_exit_130(prog, module, name, argv, monkeypatch, capsys):
    if "." in name:  # a library function the command imports when it runs
        monkeypatch.setattr(name, _interrupt)
    else:
        monkeypatch.setattr(module, name, _interrupt)
    monkeypatch.setattr(config, "load_config", lambda *a, **k: None)  # stem-import reads its config first
    assert module.main(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: interrupted (SIGINT)"), err
