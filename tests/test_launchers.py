"""launch/torchrun.sh and launch/slurm.sbatch: the exact commands their DRY_RUN prints, usage
errors, and real signal delivery from the launcher (and the sbatch trap) to torchrun's workers."""

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
SLURM_SBATCH = REPO / "launch" / "slurm.sbatch"
SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"

# Variables the launchers read; cleared so the host's environment cannot leak into a case.
_LAUNCH_VARS = {
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NPROC_PER_NODE",
    "PYTHON",
    "LOG_DIR",
    "DRY_RUN",
    "OMP_NUM_THREADS",
    "SIGNALS",
    "SHUTDOWN_TIMEOUT",
    "STEM_ENTRY_MODULE",
    "SCONTROL",
    "CUDA_VISIBLE_DEVICES",
    "PYTHONPATH",
}


def _env(**overrides):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCH_VARS and not k.startswith(("SLURM_", "PET_", "TORCHELASTIC_"))
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def _run(script, *args, cwd=None, **env):
    return subprocess.run(
        ["bash", str(script), *map(str, args)],
        env=_env(**env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _parse(line):
    """Split a printed command into (leading VAR=value env, argv)."""
    words = shlex.split(line)
    env = {}
    while words and "=" in words[0] and words[0].split("=", 1)[0].isidentifier():
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


def _torchrun(line):
    """(env, python, torchrun flags as an ordered list, entry module, entry args) of one command."""
    env, argv = _parse(line)
    assert argv[1:3] == ["-m", "torch.distributed.run"], argv
    entry_at = argv.index("-m", 3)
    return env, argv[0], argv[3:entry_at], argv[entry_at + 1], argv[entry_at + 2 :]


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("train:\n  train_steps: 2\n")
    return path


def _fake_tool(directory, name, body):
    path = directory / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


# --------------------------------------------------------------------------- torchrun.sh dry runs


def test_single_node_is_standalone(config):
    r = _run(
        TORCHRUN_SH, config, "train.lr=3e-4", "x=a b", DRY_RUN=1, NPROC_PER_NODE=2, PYTHON=sys.executable
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1
    env, python, flags, module, args = _torchrun(lines[0])
    assert env == {"OMP_NUM_THREADS": env["OMP_NUM_THREADS"], "PYTHONPATH": str(REPO)}
    assert int(env["OMP_NUM_THREADS"]) >= 1
    assert python == sys.executable
    assert flags == [
        "--standalone",
        "--nproc-per-node=2",
        f"--signals-to-handle={SIGNALS}",
        "--shutdown-timeout=240",
    ]
    assert module == "stem_megatron.cli.train"
    assert args == ["--config", str(config), "train.lr=3e-4", "x=a b"]


def test_any_module_runs_with_its_own_arguments():
    r = _run(TORCHRUN_SH, "-m", "stem_megatron.cli.eval", "ppl", "--model", "m p",
             "parallel.tensor_model_parallel_size=2", DRY_RUN=1, NPROC_PER_NODE=2)
    assert r.returncode == 0, r.stderr
    _, _, flags, module, args = _torchrun(r.stdout)
    assert flags[0] == "--standalone" and module == "stem_megatron.cli.eval"
    assert args == ["ppl", "--model", "m p", "parallel.tensor_model_parallel_size=2"]  # no --config


def test_single_node_with_fixed_port_uses_localhost(config):
    r = _run(TORCHRUN_SH, config, DRY_RUN=1, NPROC_PER_NODE=1, MASTER_PORT=29555)
    assert r.returncode == 0, r.stderr
    _, _, flags, _, _ = _torchrun(r.stdout)
    assert flags[:4] == ["--nnodes=1", "--node-rank=0", "--master-addr=127.0.0.1", "--master-port=29555"]
    assert "--standalone" not in flags


def test_two_nodes_static_rendezvous(config):
    r = _run(
        TORCHRUN_SH,
        config,
        "train.train_steps=20",
        DRY_RUN=1,
        NNODES=2,
        NODE_RANK=1,
        MASTER_ADDR="10.0.0.1",
        MASTER_PORT=29555,
        NPROC_PER_NODE=4,
        OMP_NUM_THREADS=3,
        SHUTDOWN_TIMEOUT=100,
        STEM_ENTRY_MODULE="my.entry",
    )
    assert r.returncode == 0, r.stderr
    env, _, flags, module, args = _torchrun(r.stdout)
    assert env["OMP_NUM_THREADS"] == "3"
    assert flags == [
        "--nnodes=2",
        "--node-rank=1",
        "--master-addr=10.0.0.1",
        "--master-port=29555",
        "--nproc-per-node=4",
        f"--signals-to-handle={SIGNALS}",
        "--shutdown-timeout=100",
    ]
    assert module == "my.entry"
    assert args == ["--config", str(config), "train.train_steps=20"]


def test_node_rank_defaults_to_slurm_nodeid(config):
    r = _run(TORCHRUN_SH, config, DRY_RUN=1, NNODES=3, MASTER_ADDR="h0", SLURM_NODEID=2, NPROC_PER_NODE=1)
    _, _, flags, _, _ = _torchrun(r.stdout)
    assert flags[:4] == ["--nnodes=3", "--node-rank=2", "--master-addr=h0", "--master-port=29500"]


def test_default_python_is_the_repo_venv(config):
    r = _run(TORCHRUN_SH, config, DRY_RUN=1, NPROC_PER_NODE=1)
    venv = REPO / ".venv" / "bin" / "python"
    assert _parse(r.stdout)[1][0] == (str(venv) if os.access(venv, os.X_OK) else "python3")


@pytest.mark.parametrize(
    ("extra_env", "smi_gpus", "expected"),
    [
        ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 8, 3),  # the visible devices win over nvidia-smi
        ({}, 4, 4),  # nvidia-smi -L
        ({}, None, 2),  # no GPU: 2 CPU workers
        ({"CUDA_VISIBLE_DEVICES": ""}, 8, 2),  # GPUs hidden
    ],
)
def test_nproc_per_node_default(config, tmp_path, extra_env, smi_gpus, expected):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if smi_gpus is not None:
        lines = "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(smi_gpus))
        _fake_tool(bin_dir, "nvidia-smi", lines)
    path = f"{bin_dir}:/usr/bin:/bin"  # no other nvidia-smi
    r = _run(TORCHRUN_SH, config, DRY_RUN=1, PATH=path, **extra_env)
    assert r.returncode == 0, r.stderr
    _, _, flags, _, _ = _torchrun(r.stdout)
    assert f"--nproc-per-node={expected}" in flags


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "missing CONFIG"),
        (["missing.yaml"], {}, "config file not found: missing.yaml"),
        (["--config"], {}, "must be the CONFIG file"),
        (["{config}"], {"NNODES": 2}, "MASTER_ADDR must be set"),
        (["{config}"], {"NNODES": 2, "NODE_RANK": 2, "MASTER_ADDR": "h"}, "NODE_RANK=2 must be < NNODES=2"),
        (["{config}"], {"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE must be"),
        (["-m"], {}, "-m needs a module name"),
        (["-m", "--input"], {}, "-m needs a module name"),
    ],
)
def test_torchrun_sh_usage_errors(config, args, env, message):
    r = _run(TORCHRUN_SH, *(a.format(config=config) for a in args), DRY_RUN=1, **env)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("torchrun.sh: error: ")
    assert message in r.stderr


# --------------------------------------------------------------------------- slurm.sbatch dry runs


def _slurm_env(tmp_path, **extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _fake_tool(
        bin_dir,
        "scontrol",
        '[ "$1 $2 $3" = "show hostnames gpu-[007-008]" ] || exit 1\necho gpu-007\necho gpu-008\n',
    )
    env = dict(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID=123456,
        SLURM_NNODES=2,
        SLURM_JOB_NODELIST="gpu-[007-008]",
        SLURM_NODEID=0,
        SLURM_SUBMIT_DIR=tmp_path,
        SLURM_GPUS_ON_NODE=8,
        NODE_RANK=5,
        DRY_RUN=1,
    )
    env.update(extra)
    return env


def test_sbatch_dry_run_two_nodes(config, tmp_path):
    r = _run(SLURM_SBATCH, config, "train.lr=3e-4", **_slurm_env(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 5
    port = str(20000 + 123456 % 10000)
    env, argv = _parse(lines[0])
    assert env == {
        "NNODES": "2",
        "MASTER_ADDR": "gpu-007",
        "MASTER_PORT": port,
        "LOG_DIR": f"{tmp_path}/logs/slurm-123456",
        "NPROC_PER_NODE": "8",
    }
    assert argv == [
        "srun",
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        str(TORCHRUN_SH),
        str(config),
        "train.lr=3e-4",
    ]
    for node, host in enumerate(["gpu-007", "gpu-008"]):
        assert lines[1 + 2 * node] == f"# node {node} ({host}):"
        _, _, flags, module, args = _torchrun(lines[2 + 2 * node])
        # NODE_RANK=5 from the submitting shell must not leak: each node takes its SLURM_NODEID.
        assert flags == [
            "--nnodes=2",
            f"--node-rank={node}",
            "--master-addr=gpu-007",
            f"--master-port={port}",
            "--nproc-per-node=8",
            f"--signals-to-handle={SIGNALS}",
            "--shutdown-timeout=240",
        ]
        assert (module, args) == ("stem_megatron.cli.train", ["--config", str(config), "train.lr=3e-4"])


def test_sbatch_overrides_and_nodelist_fallback(config, tmp_path):
    env = _slurm_env(
        tmp_path,
        SCONTROL=tmp_path / "no-scontrol",
        SLURM_JOB_NODELIST="gpu[003-004,9]",
        SLURM_CPUS_PER_TASK=32,
    )
    r = _run(SLURM_SBATCH, config, **env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "--cpus-per-task=32" in _parse(lines[0])[1]
    assert lines[1] == "# node 0 (gpu003):" and lines[3] == "# node 1 (?):"
    assert "--master-addr=gpu003" in _torchrun(lines[4])[2]

    r = _run(SLURM_SBATCH, config, **_slurm_env(tmp_path, MASTER_ADDR="10.1.2.3", MASTER_PORT=29600))
    flags = _torchrun(r.stdout.splitlines()[4])[2]
    assert flags[:4] == ["--nnodes=2", "--node-rank=1", "--master-addr=10.1.2.3", "--master-port=29600"]


@pytest.mark.parametrize(
    ("args", "drop", "message"),
    [
        ([], (), "missing CONFIG"),
        (["missing.yaml"], (), "config file not found: missing.yaml"),
        (["{config}"], ("SLURM_JOB_ID",), "SLURM_JOB_ID is not set"),
    ],
)
def test_sbatch_usage_errors(config, tmp_path, args, drop, message):
    env = _slurm_env(tmp_path)
    for key in drop:
        del env[key]
    r = _run(SLURM_SBATCH, *(a.format(config=config) for a in args), **env)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("slurm.sbatch: error: ")
    assert message in r.stderr


# --------------------------------------------------------------------------- real signal delivery

_WORKER = '''\
"""Stand-in trainer: on SIGUSR1/SIGTERM write a marker naming the signal and exit 0. On SIGINT
append "SIGINT " to the marker (each one: a Ctrl-C must arrive once), 1 s later rank 0 prints one
line and every rank exits 130, as the trainer does."""
import os, signal, sys, time

out, rank = sys.argv[sys.argv.index("--config") + 1] + ".d", os.environ["RANK"]
interrupted = []

def _stop(signum, frame):
    if interrupted:  # as the trainer: stopping on SIGINT already; torchrun's SIGTERM to the ranks
        return       # still running once another has exited 130 changes nothing
    with open(os.path.join(out, f"marker_{rank}"), "w") as f:
        f.write(signal.Signals(signum).name)
    sys.exit(0)

def _interrupt(signum, frame):
    with open(os.path.join(out, f"marker_{rank}"), "a") as f:
        f.write("SIGINT ")
    interrupted.append(time.monotonic())

signal.signal(signal.SIGUSR1, _stop)
signal.signal(signal.SIGTERM, _stop)
signal.signal(signal.SIGINT, _interrupt)
with open(os.path.join(out, f"ready_{rank}"), "w") as f:
    f.write(str(os.getpid()))
deadline = time.monotonic() + 60  # never outlive a broken test
while time.monotonic() < deadline:
    if interrupted and time.monotonic() > interrupted[0] + 1:
        if rank == "0":
            print("stand-in: interrupted (SIGINT)", file=sys.stderr, flush=True)
        sys.exit(130)
    time.sleep(0.05)
sys.exit(3)
'''


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def worker(tmp_path, config):
    """(env for a real launch of the stand-in worker, its output dir)."""
    (tmp_path / "stem_sigworker.py").write_text(_WORKER)
    out = Path(f"{config}.d")
    out.mkdir()
    env = dict(
        STEM_ENTRY_MODULE="stem_sigworker",
        PYTHONPATH=tmp_path,
        NPROC_PER_NODE=2,
        PYTHON=sys.executable,
        OMP_NUM_THREADS=1,
        SHUTDOWN_TIMEOUT=10,
    )
    return env, out


def _launch_and_signal(argv, env, out, signals, nprocs=2, group=False, stderr=subprocess.STDOUT):
    """Start argv, wait until every worker is up, send `signals` to the launcher process (or its
    process group, as a terminal does) in turn (each is (signal, pause after)), and return (exit
    status, markers by rank, output)."""
    proc = subprocess.Popen(
        argv,
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )
    ready = [out / f"ready_{r}" for r in range(nprocs)]
    try:
        deadline = time.monotonic() + 30
        while not all(p.exists() and p.read_text() for p in ready):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.05)
        for sig, pause in signals:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            time.sleep(pause)
        output, errors = proc.communicate(timeout=20)
        if stderr is subprocess.PIPE:
            output = (output, errors)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in ready:  # workers live in their own sessions: end any survivor by its pid
            if p.exists() and p.read_text():
                try:
                    os.kill(int(p.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    markers = {r: (out / f"marker_{r}").read_text() for r in range(nprocs) if (out / f"marker_{r}").exists()}
    return proc.returncode, markers, output


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_launcher_forwards_signal_to_every_worker(worker, config, sig):
    env, out = worker
    rc, markers, output = _launch_and_signal(["bash", str(TORCHRUN_SH), str(config)], env, out, [(sig, 0)])
    assert markers == {0: sig.name, 1: sig.name}, output
    assert rc == 0, output  # workers exited 0 after their checkpoint, so torchrun does too


@pytest.mark.parametrize("group", [True, False], ids=["terminal", "launcher"])
def test_ctrl_c_reaches_every_worker_once_and_only_their_line_shows(worker, config, group):
    """A terminal's Ctrl-C signals the launcher's whole process group: torchrun must not get it too
    (it would forward a second SIGINT, then SIGTERM, and end in its SignalException traceback)."""
    env, out = worker
    rc, markers, (stdout, stderr) = _launch_and_signal(["bash", str(TORCHRUN_SH), str(config)], env, out,
                                                       [(signal.SIGINT, 0)], group=group, stderr=subprocess.PIPE)
    assert markers == {0: "SIGINT ", 1: "SIGINT "}, (stdout, stderr)
    assert stderr.splitlines() == ["stand-in: interrupted (SIGINT)"], stderr
    assert rc == 130


def test_ctrl_c_to_torchrun_alone_is_passed_on_and_exits_130(worker, config):
    env, out = worker
    proc = subprocess.Popen(["bash", str(TORCHRUN_SH), str(config)], env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not all((out / f"ready_{r}").exists() for r in range(2)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.kill(_parent(out / "ready_0"), signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert {r: (out / f"marker_{r}").read_text() for r in range(2)} == {0: "SIGINT ", 1: "SIGINT "}
    assert stderr.splitlines() == ["stand-in: interrupted (SIGINT)"], stderr
    assert proc.returncode == 130


def _parent(ready_file):
    """torchrun's pid: the parent of the worker whose pid is in `ready_file`."""
    for _ in range(100):
        text = ready_file.read_text()
        if text:
            break
        time.sleep(0.05)
    stat = Path(f"/proc/{int(text)}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


_FAILER = '''\
"""Stand-in command: every rank fails with exit 2 (a bad input), rank 0 says why in one line."""
import os, sys

if os.environ["RANK"] == "0":
    print(f"stand-in: {sys.argv[1]}: no such file", file=sys.stderr, flush=True)
sys.exit(2)
'''


def test_any_module_under_the_launcher_keeps_its_one_line_and_exit_code(tmp_path):
    """`-m MODULE`: the same filter and exit code as training, for stem-eval and any other command."""
    (tmp_path / "stem_failer.py").write_text(_FAILER)
    r = subprocess.run(["bash", str(TORCHRUN_SH), "-m", "stem_failer", "nope.jsonl"], capture_output=True,
                       text=True, timeout=120, env=_env(PYTHONPATH=tmp_path, NPROC_PER_NODE=2, PYTHON=sys.executable,
                                                        OMP_NUM_THREADS=1, TMPDIR=tmp_path))
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == ["stand-in: nope.jsonl: no such file"], r.stderr
    assert not list(tmp_path.glob("torchrun-sh.*"))  # no launcher state left


def test_sbatch_trap_forwards_usr1_through_srun(worker, config, tmp_path):
    """SIGUSR1 to the batch shell (--signal=B:USR1) goes through srun to the launcher and on to every
    worker; SIGTERM to the batch shell is not forwarded (srun would turn it into SIGKILL)."""
    env, out = worker
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun stand-in: run the command as the single task of node 0, in srun's own process, so a
    # signal sent to "srun" reaches the launcher as SLURM's forwarding would.
    _fake_tool(bin_dir, "srun", 'while [[ $1 == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n')
    _fake_tool(bin_dir, "scontrol", "echo localhost\n")
    env.update(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID=77,
        SLURM_NNODES=1,
        SLURM_JOB_NODELIST="localhost",
        SLURM_SUBMIT_DIR=tmp_path,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=_free_port(),
    )
    rc, markers, output = _launch_and_signal(
        ["bash", str(SLURM_SBATCH), str(config)],
        env,
        out,
        [(signal.SIGTERM, 0.5), (signal.SIGUSR1, 0)],
    )
    assert "SIGTERM; SLURM signals each node's launcher itself" in output
    assert markers == {0: "SIGUSR1", 1: "SIGUSR1"}, output
    assert rc == 0, output
    log = (tmp_path / "logs" / "slurm-77" / "node0.log").read_text()
    assert "torchrun.sh: SIGUSR1 -> workers" in log


_LATE_RANK0 = '''\
"""Stand-in command through stem_megatron.cli.run: the same bad input on every rank; rank 0 is slow
to get there, so torchrun stops it (SIGTERM) as soon as rank 1 has exited."""
import os, sys, time

from stem_megatron import cli


def body():
    if os.environ["RANK"] == "0":
        time.sleep(20)
    raise cli.UserError(f"{sys.argv[1]}: no such file")


sys.exit(cli.run("stem-standin", body))
'''


def test_a_failure_line_survives_rank_0_stopped_by_torchrun(tmp_path):
    """A rank-0-only line was lost when another rank failed first (exit 2, empty stderr): under the
    launcher every rank says it and the filter passes it once."""
    (tmp_path / "stem_late.py").write_text(_LATE_RANK0)
    r = subprocess.run(["bash", str(TORCHRUN_SH), "-m", "stem_late", "nope.jsonl"], capture_output=True,
                       text=True, timeout=120,
                       env=_env(PYTHONPATH=f"{tmp_path}:{REPO}", NPROC_PER_NODE=2, PYTHON=sys.executable,
                                OMP_NUM_THREADS=1, TMPDIR=tmp_path))
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == ["stem-standin: nope.jsonl: no such file"], r.stderr
