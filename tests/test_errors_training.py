"""Failures a user can cause in a training run, through `launch/torchrun.sh` with 2 processes.

Each case asserts what the user sees: the documented exit code from the launcher (not torchrun's
1), stderr holding exactly the one message (so: printed once, no traceback, no ChildFailedError
block, no third-party warnings), and an end before the first training step. The runs that would
otherwise train for long ask for many steps, so a check that comes too late shows as a timeout.
One tiny dataset (a few hundred documents of a tiny tiktoken vocabulary) serves every case.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures.tiny_tokenizers import corpus, make_tiktoken, write_tiktoken

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "torchrun.sh"
TIMEOUT = 240  # a hang or a full run of LONG steps; a failing start-up on a loaded 2-core box takes < 60 s
LONG = 100_000
RESUME = "the last checkpoint (if any) is intact; rerun the same command to resume"

CONFIG = """\
model:
  num_layers: 2
  hidden_size: 32
  num_attention_heads: 2
  ffn_hidden_size: 64
  vocab_size: 270
  seq_length: 16
  make_vocab_size_divisible_by: 16
  transformer_impl: local
stem:
  layers: [1]
train:
  micro_batch_size: 1
  global_batch_size: 2
  train_steps: 2
  eval_interval: 0
  precision: fp32
data:
  data_path: [{data}]
  tokenizer: {tokenizer}
  split: "90,10,0"
logging:
  log_interval: 1
"""


def _preprocess(src, prefix, tokenizer):
    from data_tools.preprocess import PreprocessOptions, preprocess

    preprocess(PreprocessOptions(inputs=[str(src)], output_prefix=str(prefix), tokenizer=tokenizer,
                                 append_eod=True, progress=False), log=open(os.devnull, "w"))
    return f"{prefix}_text_document"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """tiny.yaml over a good dataset, plus a dataset of ids past the vocabulary and an empty one."""
    import json

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    d = tmp_path_factory.mktemp("errors")
    tokenizer = make_tiktoken(str(d))
    src = d / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": line}) + "\n" for line in corpus(100)))
    good = _preprocess(src, d / "good", tokenizer)
    big = write_tiktoken(str(d / "big" / "big.tiktoken"), [], extra_ranks=400)  # eod id 656
    bad_ids = _preprocess(src, d / "bad_ids", big)
    empty = str(d / "empty_text_document")  # what stem-preprocess wrote for an empty input before
    builder = IndexedDatasetBuilder(empty + ".bin", dtype=np.uint16)
    builder.finalize(empty + ".idx")
    (d / "tiny.yaml").write_text(CONFIG.format(data=good, tokenizer=tokenizer))
    return {"dir": d, "config": str(d / "tiny.yaml"), "bad_ids": bad_ids, "empty": empty, "tokenizer": tokenizer}


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PET_", "TORCHELASTIC_", "SLURM_")) and k not in ("NPROC_PER_NODE", "LOG_DIR")}
    env.update(PYTHON=sys.executable, NPROC_PER_NODE="2", OMP_NUM_THREADS="1", **extra)
    return env


def launch(work, *overrides, env=None):
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(LAUNCHER), work["config"], *overrides], capture_output=True, text=True,
                       env=_env(**(env or {})), cwd=work["dir"], timeout=TIMEOUT)
    return p, time.monotonic() - t0


def assert_one_line(p, code, *fragments, first_step=1):
    """Exit `code`; stderr is exactly one line holding every fragment; step `first_step` never ran."""
    lines = p.stderr.splitlines()
    assert p.returncode == code, (p.returncode, p.stderr[-3000:])
    assert len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith("stem-train: ") and all(f in lines[0] for f in fragments), lines[0]
    assert f"] step {first_step}/" not in p.stdout
    return lines[0]


# ------------------------------------------------------------------ 1. outputs checked at start-up
def test_unwritable_checkpoint_save_fails_before_step_1_with_exit_4(work):
    blocker = work["dir"] / "a_file"
    blocker.write_text("")
    p, _ = launch(work, f"checkpoint.save={blocker}/ckpt", f"train.train_steps={LONG}")
    assert_one_line(p, 4, f"checkpoint.save={blocker}/ckpt is not writable", "is a file, not a directory")


# A test-only fault: rank 0 cannot create step 3's temporary directory (a full disk), the other
# rank is left waiting in the save's first collective. Loaded through Python's sitecustomize hook.
FAIL_SAVE = """\
import os
if os.environ.get("RANK") == "0":
    _makedirs = os.makedirs
    def makedirs(name, *args, **kwargs):
        if os.path.basename(os.fspath(name)) == ".tmp-step_00000003":
            raise OSError(28, "No space left on device", os.fspath(name))
        return _makedirs(name, *args, **kwargs)
    os.makedirs = makedirs
"""


@pytest.fixture(scope="module")
def failed_save(work):
    hook = work["dir"] / "fail_save"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_SAVE)
    save = work["dir"] / "ckpt_failed"
    p, _ = launch(work, f"checkpoint.save={save}", "checkpoint.save_interval=1", "train.train_steps=4",
                  env={"PYTHONPATH": str(hook)})
    return p, save


def test_save_failing_mid_run_exits_4_on_every_rank_previous_checkpoint_intact(failed_save):
    p, save = failed_save
    lines = p.stderr.splitlines()
    assert p.returncode == 4, p.stderr[-3000:]
    assert len(lines) == 1 and "saving step 3" in lines[0] and "No space left on device" in lines[0], p.stderr
    assert "Traceback" not in p.stderr and "[Errno" not in lines[0]
    assert (save / "latest").read_text().strip() == "step_00000002"
    assert sorted(n for n in os.listdir(save) if n.startswith("step_")) == ["step_00000001", "step_00000002"]
    from stem_megatron.training import checkpoint_format as fmt

    fmt.verify(str(save / "step_00000002"))  # complete and uncorrupted


# ------------------------------------------------------------------ 5. resume past train.train_steps
def test_resume_past_train_steps_is_stated_in_one_line(work, failed_save):
    _, save = failed_save
    p, _ = launch(work, f"checkpoint.save={save}", "train.train_steps=1")
    assert_one_line(p, 2, "at step 2, past train.train_steps=1")
    assert "done:" not in p.stdout


# ------------------------------------------------------------------ 2. runtime input errors: exit 2, once
# "empty dataset" and "vocab too small" take the same start-up path as "missing prefix" (checked on
# every rank, agreed before anything is built): in the slow set, to keep the default suite short.
@pytest.mark.parametrize("case", ["missing prefix", pytest.param("empty dataset", marks=pytest.mark.slow),
                                  pytest.param("vocab too small", marks=pytest.mark.slow), "bad token ids",
                                  "parallel layout"])
def test_input_errors_are_one_line_exit_2_on_every_rank(work, case):
    overrides, fragments = {
        "missing prefix": ([f"data.data_path=[{work['dir']}/nope]"], ["no indexed dataset at", "nope"]),
        "empty dataset": ([f"data.data_path=[{work['empty']}]"], ["holds no tokens (0 documents)"]),
        "vocab too small": (["model.vocab_size=100"], ["model.vocab_size=100 is smaller than the vocabulary"]),
        "bad token ids": ([f"data.data_path=[{work['bad_ids']}]"],
                          ["token id 656", "outside the vocabulary [0, 270)"]),
        "parallel layout": (["parallel.tensor_model_parallel_size=4", "model.num_attention_heads=4"],
                            ["world_size=2: must be divisible by tensor x pipeline x context"]),
    }[case]
    p, _ = launch(work, f"train.train_steps={LONG}", *overrides)
    # Bad ids are found in the batch of the step that would use them: that step never runs.
    step = re.search(r"\(step (\d+)\)", p.stderr)
    assert_one_line(p, 2, *fragments, first_step=int(step.group(1)) if step and case == "bad token ids" else 1)


# ------------------------------------------------------------------ 6. Ctrl-C
def _children(pid):
    """Pids whose parent is `pid` (from /proc: no pgrep needed)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid):
    """Running, not a zombie (torchrun's workers are reaped by torchrun, torchrun by the launcher)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# Where a Ctrl-C lands: a terminal sends SIGINT to the launcher's process group (launcher, its stderr
# filter, and torchrun before the fix); someone may also signal torchrun alone, every worker, or one.
CTRL_C_TARGETS = ["terminal", "one worker", pytest.param("torchrun", marks=pytest.mark.slow),
                  pytest.param("every worker", marks=pytest.mark.slow),
                  pytest.param("launcher", marks=pytest.mark.slow)]


@pytest.mark.parametrize("target", CTRL_C_TARGETS)
def test_ctrl_c_ends_training_with_one_line_and_no_traceback(work, tmp_path, target):
    """Every rank stops after the same step without saving; the launcher prints only the trainer's
    line and exits 130; no process, launcher state or partial checkpoint is left behind."""
    save = tmp_path / "ckpt"
    proc = subprocess.Popen(["bash", str(LAUNCHER), work["config"], f"train.train_steps={LONG}",
                             f"checkpoint.save={save}", "checkpoint.save_interval=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(TMPDIR=str(tmp_path)), cwd=work["dir"], start_new_session=True)
    workers, left = [], []
    try:
        out = []
        for line in proc.stdout:
            out.append(line)
            if "] step 3/" in line:
                break
        torchrun = [p for p in _children(proc.pid) if b"torch.distributed.run" in Path(f"/proc/{p}/cmdline").read_bytes()]
        workers = torchrun + _children(torchrun[0])
        assert len(workers) == 3, workers
        if target == "terminal":
            os.killpg(proc.pid, signal.SIGINT)
        elif target == "launcher":
            proc.send_signal(signal.SIGINT)
        elif target == "torchrun":
            os.kill(torchrun[0], signal.SIGINT)
        else:
            for pid in workers[1:] if target == "every worker" else workers[2:]:
                os.kill(pid, signal.SIGINT)
        rest, err = proc.communicate(timeout=TIMEOUT)
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in workers if _alive(pid)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in workers:  # torchrun and the workers live in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
    stdout = "".join(out) + rest
    assert proc.returncode == 130, err[-3000:]
    assert err.splitlines() == [f"stem-train: interrupted (SIGINT); {RESUME}"], err[-3000:]
    assert "Traceback" not in stdout and "without saving" in stdout, stdout[-3000:]
    stopped = int(re.search(r"stopping after step (\d+)", stdout).group(1))
    assert not left, "torchrun or a worker outlived the launcher"
    assert not list(tmp_path.glob("torchrun-sh.*")), "launcher state left behind"
    from stem_megatron.training import checkpoint_format as fmt

    assert not [p.name for p in save.iterdir() if p.name.startswith(fmt.TMP_PREFIX)]  # no save was cut short
    latest = fmt.resolve(str(save))
    fmt.verify(latest)  # the last checkpoint saved before Ctrl-C is whole
    assert latest.endswith(f"step_{stopped // 2 * 2:08d}")  # and none was added for the Ctrl-C


# ------------------------------------------------------------------ 7. a broken Transformer Engine
def test_broken_transformer_engine_is_reported_once(work):
    fake = work["dir"] / "broken_te"
    (fake / "transformer_engine").mkdir(parents=True)
    (fake / "transformer_engine" / "__init__.py").write_text(
        'raise ImportError("libtransformer_engine.so: cannot open shared object file")\n')
    p, _ = launch(work, "model.transformer_impl=auto", env={"PYTHONPATH": str(fake)})
    assert_one_line(p, 2, "Transformer Engine is installed but does not import", "libtransformer_engine.so")


# ------------------------------------------------------------------ 3 and 8. the launcher's stderr filter
AWK = REPO / "launch" / "torchrun_stderr.awk"
CHILD_FAILED = """\
W1201 15:00:22.263000 5524 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 6132 closing signal SIGTERM
E1201 15:00:22.330000 5524 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: {code}) local_rank: 0
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
stem_megatron.cli.train FAILED
------------------------------------------------------------
Failures:
[1]:
  exitcode  : -15 (pid: 6132)  (SIGTERM)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : {code} (pid: 6131)
============================================================
"""


@pytest.mark.parametrize("code, dropped", [(2, True), (3, True), (4, True), (1, False), (-9, False)])
def test_launcher_filter_drops_torchrun_report_only_when_the_worker_explained(tmp_path, code, dropped):
    worker = "stem-train: something the user can fix\n[rank1]: Traceback (most recent call last):\n"
    code_file = tmp_path / "code"
    out = subprocess.run(["awk", "-v", f"code_file={code_file}", "-f", str(AWK)], capture_output=True, text=True,
                         input=worker + CHILD_FAILED.format(code=code), check=True).stdout
    assert code_file.read_text().strip() == str(code)
    assert out.startswith(worker)
    assert (out == worker) == dropped
    if not dropped:
        assert "ChildFailedError" in out and "closing signal" in out


def test_launcher_filter_passes_other_tracebacks_through(tmp_path):
    """A traceback that is not torchrun's report (a library's, mid-run) is printed, whatever follows."""
    text = "Traceback (most recent call last):\n" + "".join(f"  line {i}\n" for i in range(500)) + "[12:00:00] ok\n"
    out = subprocess.run(["awk", "-v", f"code_file={tmp_path / 'code'}", "-f", str(AWK)], capture_output=True,
                         text=True, input=text, check=True).stdout
    assert out == text and not (tmp_path / "code").exists()
