"""`stem-train` end to end (one CPU process, mock data, a tiny tiktoken tokenizer):

- SIGTERM (and SIGUSR1) mid-run: the step finishes, a checkpoint is written, the process exits 0
  with a message; the same command resumes and ends with exactly the uninterrupted run's loss,
  and every step's logged loss (TensorBoard's float32 scalar) equals the uninterrupted run's;
- a damaged checkpoint given with `--load`: exit code 4, one line naming the file, nothing saved.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stem_megatron.testing.distributed import CPU_ONLY_ENV, find_free_port

REPO = Path(__file__).resolve().parents[1]
STEPS = 12

CONFIG = """\
model:
  num_layers: 4
  hidden_size: 64
  num_attention_heads: 4
  num_query_groups: 2
  ffn_hidden_size: 128
  vocab_size: 270
  seq_length: 32
  make_vocab_size_divisible_by: 64
  transformer_impl: local
stem:
  layers: [1, 2]
  deterministic: true
train:
  micro_batch_size: 2
  global_batch_size: 4
  train_steps: {steps}
  lr: 3.0e-3
  warmup_steps: 2
  eval_interval: 0
  precision: fp32
data:
  mock: true
  tokenizer: {tokenizer}
logging:
  log_interval: 1
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from fixtures.tiny_tokenizers import make_tiktoken

    d = tmp_path_factory.mktemp("cli")
    tokenizer = make_tiktoken(str(d))
    (d / "tiny.yaml").write_text(CONFIG.format(steps=STEPS, tokenizer=tokenizer))
    return d


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))}
    env.update(PYTHONPATH=str(REPO), MASTER_PORT=str(find_free_port()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(CPU_ONLY_ENV)  # the CLI's CPU behaviour (gloo, fp32, bitwise resume), also on GPU machines
    return env


def _cmd(*args):
    return [sys.executable, "-m", "stem_megatron.cli.train", "--config", "tiny.yaml", *map(str, args)]


def _train(workdir, *args):
    return subprocess.run(_cmd(*args), cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)


def _logged_losses(log_dir):
    """{step: train/loss} from every TensorBoard event file in `log_dir` (float32 values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def _summary(stdout):
    line = next(x for x in stdout.splitlines() if x.startswith("summary: "))
    return json.loads(line[len("summary: "):])


def _train_and_signal(workdir, sig, after_step, *args):
    """Run until the log line of `after_step`, send `sig` to the run's whole process group (as
    `timeout` or a `kill -TERM -PGID` does: every helper process gets it too); return
    (returncode, stdout, stderr)."""
    proc = subprocess.Popen(_cmd(*args), cwd=workdir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if f"] step {after_step}/{STEPS} " in line:
                os.killpg(proc.pid, getattr(signal, sig))
                break
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(lines) + out, err


@pytest.fixture(scope="module")
def reference(workdir):
    r = _train(workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    return _summary(r.stdout)


def _stop(workdir, sig):
    save = workdir / f"ckpt_{sig}"
    rc, out, err = _train_and_signal(workdir, sig, 2, f"checkpoint.save={save}")
    return save, rc, out, err


@pytest.fixture(scope="module")
def sigterm_run(workdir):
    return _stop(workdir, "SIGTERM")


def _check_stop_and_resume(workdir, reference, sig, stopped_run):
    from stem_megatron.training import checkpoint_format as fmt

    save, rc, out, err = stopped_run
    assert rc == 0, err[-3000:]
    stopped = _summary(out)
    step = stopped["steps"]
    assert stopped["stopped_by"] == sig and 2 <= step < STEPS, stopped
    assert f"received {sig}: stopping after step {step}" in out
    assert f"stem-train: stopped by {sig} after step {step}; checkpoint saved in {save}" in out
    assert fmt.read_latest(str(save)) == str(save / fmt.step_dir_name(step))
    fmt.verify(fmt.read_latest(str(save)))

    r = _train(workdir, f"checkpoint.save={save}")  # the same command: resumes from the save directory
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoint: resumed from {save / fmt.step_dir_name(step)} at step {step}" in r.stdout
    resumed = _summary(r.stdout)
    assert resumed["steps"] == STEPS and resumed["stopped_by"] is None
    assert resumed["last_loss"] == reference["last_loss"], (resumed["last_loss"], reference["last_loss"])
    # Every step: the stopped run logged 1..step, the resumed one step+1..STEPS, into the same directory.
    ref_losses = _logged_losses(reference["tensorboard"] if os.path.isabs(reference["tensorboard"])
                                else workdir / reference["tensorboard"])
    losses = _logged_losses(save / "tensorboard")
    assert sorted(ref_losses) == sorted(losses) == list(range(1, STEPS + 1)), (sorted(ref_losses), sorted(losses))
    for s in range(1, STEPS + 1):
        assert losses[s] == ref_losses[s], f"step {s}: {losses[s]!r} after the stop/resume, {ref_losses[s]!r} uninterrupted"
    assert fmt.read_latest(str(save)) == str(save / fmt.step_dir_name(STEPS))


def test_sigterm_saves_exits_zero_and_resumes_exactly(workdir, reference, sigterm_run):
    _check_stop_and_resume(workdir, reference, "SIGTERM", sigterm_run)


@pytest.mark.slow
def test_sigusr1_saves_exits_zero_and_resumes_exactly(workdir, reference):
    _check_stop_and_resume(workdir, reference, "SIGUSR1", _stop(workdir, "SIGUSR1"))


def test_damaged_checkpoint_exits_4_with_one_line(workdir, sigterm_run):
    from stem_megatron.training import checkpoint_format as fmt

    bad = workdir / "bad"
    shutil.copytree(fmt.read_latest(str(sigterm_run[0])), bad)
    victim = bad / "__0_0.distcp"
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size - 1000)
    fresh = workdir / "fresh"
    r = _train(workdir, "--load", bad, f"checkpoint.save={fresh}")
    assert r.returncode == 4, (r.returncode, r.stderr[-3000:])
    ours = [x for x in r.stderr.splitlines() if x.startswith("stem-train:")]
    assert ours == [f"stem-train: checkpoint error: checkpoint {bad}: __0_0.distcp is {size - 1000} bytes, "
                    f"the manifest says {size} (truncated)"], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not (fresh / "latest").exists() and "step 1/" not in r.stdout
