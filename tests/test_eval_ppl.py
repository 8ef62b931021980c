"""stem-eval ppl: a TP=2 checkpoint, the same checkpoint at TP=1 / DP=2 and at PP=2 (torchrun-style,
gloo), in one process, and its export give the same loss (fp32, 1e-5); bits per byte equals a hand
computation; the sliding window scores every token exactly once; bad input is one line + exit code.
"""

import json
import math
import os

import pytest
import torch

from stem_megatron.testing.distributed import run_distributed

TEXTS = [
    "The theory of everything: at the end of the day, the answer is in the other theorem.",
    "Unicode: naïve café, Ω ≈ 3.14, 日本語 — bytes are not characters.",
    "short",
    "A longer document on the integral of the matrix, the vector and the proof; " * 3,
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: tiny models, shared cores


def _eval_args(model, data, *extra):
    from stem_megatron.cli.eval import parse_args

    return parse_args(["ppl", "--model", model, "--input", data, "--batch-size", "3", "--stride", "5",
                       "--no-progress", *extra])


def _train_save_and_score(rank, world_size, root, tokenizer, data):
    from fixtures.tiny_export import tiny_export_config
    from megatron.core import parallel_state

    from stem_megatron.cli.eval import run_ppl
    from stem_megatron.config import CheckpointConfig
    from stem_megatron.testing.models import TokenDataset, reference_model
    from stem_megatron.training.checkpoint import Checkpointer
    from stem_megatron.training.trainer import Trainer

    cfg = tiny_export_config(seq_length=16)
    cfg.parallel.tensor_model_parallel_size = 2
    cfg.data.tokenizer = tokenizer
    cfg.logging.tensorboard_dir = os.path.join(root, "tensorboard")  # not ./runs
    cfg.train.lr, cfg.train.warmup_steps, cfg.stem.lr = 3e-3, 1, 1e-2
    trainer = Trainer(cfg)
    trainer.checkpointer = Checkpointer(CheckpointConfig(save=os.path.join(root, "ckpt")))
    trainer.setup(datasets=(TokenDataset(64, 16, 270, seed=3), None))
    trainer.load_full_weights(reference_model(cfg, seed=0).state_dict())
    trainer.train_step()  # trained weights and tables, not the reference's
    trainer.checkpointer.save(trainer)
    trainer.metrics.close()
    parallel_state.destroy_model_parallel()
    import warnings

    from stem_megatron.config import ConfigWarning

    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        for name, overrides in (("tp2", ["parallel.tensor_model_parallel_size=2"]), ("tp1_dp2", []),
                                ("pp2", ["parallel.pipeline_model_parallel_size=2"])):
            out[name] = run_ppl(_eval_args(os.path.join(root, "ckpt"), data, *overrides))
    out["config_warnings"] = [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]
    return out


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    from fixtures.tiny_tokenizers import make_tiktoken

    root = tmp_path_factory.mktemp("ppl")
    tokenizer = make_tiktoken(str(root))
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = run_distributed(_train_save_and_score, world_size=2, args=(str(root), tokenizer, str(data)),
                          timeout=400)
    return root, str(data), out


def test_checkpoint_at_tp2_tp1_in_one_process_and_export_agree(scored):
    from stem_megatron.cli.eval import run_ppl
    from stem_megatron.cli.export import main as export_main

    root, data, out = scored
    tp2, tp1, pp2 = out[0]["tp2"], out[0]["tp1_dp2"], out[0]["pp2"]
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert drop(out[1]["tp2"]) == drop(tp2)  # every rank reports the same result
    assert tp2["layout"] == {"world_size": 2, "tp": 2, "pp": 1, "dp": 1}
    assert tp1["layout"] == {"world_size": 2, "tp": 1, "pp": 1, "dp": 2}
    assert pp2["layout"] == {"world_size": 2, "tp": 1, "pp": 2, "dp": 1}
    alone = run_ppl(_eval_args(str(root / "ckpt"), data))  # no torchrun: one process, TP=1
    assert export_main(["--checkpoint", str(root / "ckpt"), "--output", str(root / "hf")]) == 0
    exported = run_ppl(_eval_args(str(root / "hf"), data, "--device", "cpu"))
    assert exported["kind"] == "export" and alone["kind"] == "checkpoint"
    for other in (tp1, pp2, alone, exported):
        assert other["tokens"] == tp2["tokens"] and other["bytes"] == tp2["bytes"]
        assert abs(other["loss"] - tp2["loss"]) <= 1e-5 * tp2["loss"], (other, tp2)
        assert abs(other["bits_per_byte"] - tp2["bits_per_byte"]) <= 1e-5 * tp2["bits_per_byte"]
    # the counts: every text token + one EOD per document; the bytes are the documents' UTF-8
    from stem_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(root / "hf" / "tiny.tiktoken"))
    assert tp2["tokens"] == sum(len(tok.encode(t)) + 1 for t in TEXTS)
    assert tp2["bytes"] == sum(len(t.encode("utf-8")) for t in TEXTS)
    assert tp2["windows"] > len(TEXTS)  # documents longer than 16 tokens took several windows
    assert tp2["loss"] > 0 and math.isclose(tp2["ppl"], math.exp(tp2["loss"]))


def test_a_layout_override_is_not_reported_as_given_twice(scored):
    """The layout defaults stem-eval applies are not the user's overrides: a `parallel.*` override
    given once must not warn (it did, on every rank)."""
    _, _, out = scored
    assert [r["config_warnings"] for r in out] == [[], []]


def test_bits_per_byte_is_the_hand_computation(tmp_path):
    from fixtures.tiny_export import write_export
    from fixtures.tiny_tokenizers import make_tiktoken

    from stem_megatron.inference.documents import read_documents
    from stem_megatron.inference.loading import load_model
    from stem_megatron.inference.perplexity import ReferenceScorer, evaluate

    text = "héllo, wörld"  # 12 characters, 14 UTF-8 bytes
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
    export = write_export(str(tmp_path / "m"), make_tiktoken(str(tmp_path)), seq_length=64)
    loaded = load_model(export)
    tok, model = loaded.tokenizer, loaded.model
    docs = read_documents([str(tmp_path / "doc.txt")], tok, lambda path: [open(path, encoding="utf-8").read()])
    got = evaluate(ReferenceScorer(model), docs, seq_length=64, stride=32, batch_size=2, progress=False)
    # by hand: EOD as context, then every token of the text and the appended EOD
    ids = [tok.eod, *tok.encode(text), tok.eod]
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)
    nats = -sum(logp[i, t].item() for i, t in enumerate(ids[1:]))
    assert got["bytes"] == 14 and got["tokens"] == len(ids) - 1
    assert got["bits_per_byte"] == pytest.approx(nats / math.log(2) / 14, rel=1e-6)
    assert got["loss"] == pytest.approx(nats / (len(ids) - 1), rel=1e-6)


@pytest.mark.parametrize("seq", [1, 4, 7, 16])
def test_sliding_window_scores_every_token_once(seq):
    from stem_megatron.inference.documents import Document
    from stem_megatron.inference.perplexity import make_batch
    from stem_megatron.inference.windows import document_windows

    docs = [Document(list(range(100, 100 + n)), 0) for n in (2, 3, seq, seq + 1, 2 * seq + 3, 41)]
    for stride in sorted({1, max(1, seq // 2), seq}):
        for d, doc in enumerate(docs):
            n = len(doc.ids)
            windows = document_windows(d, n, seq, stride)
            batch = make_batch(docs, windows, seq, len(windows) + 1, pad_id=0)  # + an all-padding row
            scored = []
            for i, w in enumerate(windows):
                assert 1 <= w.length <= seq and w.start >= 0 and w.end <= n - 1
                assert batch["tokens"][i, :w.length].tolist() == doc.ids[w.start:w.end]
                for j in batch["loss_mask"][i].nonzero().flatten().tolist():
                    target = w.start + 1 + j
                    assert batch["labels"][i, j].item() == doc.ids[target]
                    assert target - w.start >= min(target, seq - stride + 1)  # context after the first window
                    scored.append(target)
            assert sorted(scored) == list(range(1, n)), (seq, stride, n)
            assert batch["loss_mask"][-1].sum() == 0


def test_bad_input_is_one_line_and_an_exit_code(scored, tmp_path, capsys):
    from stem_megatron.cli.eval import main

    root, data, _ = scored
    cases = [
        (["ppl", "--model", str(tmp_path / "nothing"), "--input", data], 4, "no such file or directory"),
        (["ppl", "--model", str(root / "hf"), "--input", str(tmp_path / "empty.jsonl")], 2, "no document"),
        (["ppl", "--model", str(root / "hf"), "--input", str(tmp_path / "missing.jsonl")], 2, "no such file"),
        (["ppl", "--model", str(root / "hf"), "--input", data, "--seq-length", "17"], 2, "model's context"),
    ]
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(root / "ckpt" / "step_00000001", damaged)
    with open(damaged / "stem_checkpoint.json", "a") as f:
        f.write(" ")
    cases += [
        (["ppl", "--model", str(damaged), "--input", data], 4, "manifest says"),
        (["ppl", "--model", str(root / "ckpt"), "--input", data, "parallel.tensor_model_parallel_size=2"], 2,
         "world_size"),
    ]
    (tmp_path / "empty.jsonl").write_text("\n")
    for argv, code, words in cases:
        assert main(argv) == code, argv
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and words in captured.err, captured.err


# ------------------------------------------------------------------ under the launcher (2 processes)
def _launch_eval(tmp_path, *argv):
    """`launch/torchrun.sh -m stem_megatron.cli.eval ppl ARGV` with 2 gloo workers."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PET_", "TORCHELASTIC_", "SLURM_")) and k not in ("NPROC_PER_NODE", "LOG_DIR")}
    env.update(PYTHON=sys.executable, NPROC_PER_NODE="2", OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    return subprocess.run(["bash", str(repo / "launch" / "torchrun.sh"), "-m", "stem_megatron.cli.eval",
                           "ppl", "--no-progress", *argv], capture_output=True, text=True, env=env, timeout=300)


def test_under_the_launcher_an_error_is_one_line_and_its_exit_code(scored, tmp_path):
    """What torchrun alone turns into its 45-59 line report and exit 1."""
    root, data, _ = scored
    p = _launch_eval(tmp_path, "--model", str(root / "ckpt"), "--input", str(tmp_path / "missing.jsonl"),
                     "parallel.tensor_model_parallel_size=2")
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stem-eval ppl: --input {tmp_path / 'missing.jsonl'}: no such file"), \
        p.stderr[-3000:]
    assert p.stdout == "" and _ours(tmp_path) == []  # nothing left behind


@pytest.mark.slow  # a full evaluation through the launcher; the in-process check above is in the default set
def test_under_the_launcher_a_layout_override_is_not_given_twice(scored, tmp_path):
    root, data, out = scored
    p = _launch_eval(tmp_path, "--model", str(root / "ckpt"), "--input", data, "--batch-size", "3", "--stride", "5",
                     "parallel.tensor_model_parallel_size=2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "given twice" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    result = json.loads(p.stdout.splitlines()[-1])
    assert result["layout"] == out[0]["tp2"]["layout"] and result["loss"] == pytest.approx(out[0]["tp2"]["loss"], rel=1e-6)
    assert _ours(tmp_path) == []


def _ours(tmp):
    """Temporary files of the launcher and stem-eval (not torchrun's own torchelastic_* log dirs)."""
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith(("torchrun-sh.", "stem-eval-")))
