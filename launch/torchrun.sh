#!/usr/bin/env bash
# Launch stem_megatron training (or any module) on this node through torchrun, configured by environment.
#
#   launch/torchrun.sh CONFIG [dotted.override=value ...]   workers run: python -m stem_megatron.cli.train --config CONFIG ...
#   launch/torchrun.sh -m MODULE [ARG ...]                 workers run: python -m MODULE ARG ...
#                                                          (e.g. -m stem_megatron.cli.eval ppl ...: stem-eval)
#
# Either way: the workers' exit code (not torchrun's 1), and a worker's one-line error stays one line.
# Single node by default (--standalone rendezvous on a free localhost port); set NNODES,
# NODE_RANK, MASTER_ADDR, MASTER_PORT for multi-node (static rendezvous, see docs/launch.md).
# launch/slurm.sbatch runs this same script once per node under srun.
#
# Signals sent to this script (or its process group: a terminal's Ctrl-C): SIGUSR1 and SIGTERM go
# straight to the trainer processes (they checkpoint and exit 0, so the run exits 0); SIGINT too
# (they stop without saving, exit 130); SIGHUP, SIGQUIT go to torchrun, which stops the workers.
# Details and the reasons: docs/launch.md, "Preemption".
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE    workers on this node [GPUs visible: CUDA_VISIBLE_DEVICES, else nvidia-smi -L; 2 on CPU]
#   NNODES            number of nodes [1]
#   NODE_RANK         rank of this node [SLURM_NODEID if set, else 0]
#   MASTER_ADDR       address of node 0 [required when NNODES>1; 127.0.0.1 when only MASTER_PORT is set]
#   MASTER_PORT       TCPStore port on node 0 [29500 when NNODES>1 or MASTER_ADDR is set]
#   PYTHON            interpreter [<repo>/.venv/bin/python if present, else python3]
#   OMP_NUM_THREADS   threads per worker [cores on this node / NPROC_PER_NODE, at least 1]
#   SIGNALS           signals torchrun catches and forwards to its workers [SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1]
#   SHUTDOWN_TIMEOUT  seconds torchrun waits for workers after forwarding a signal, then SIGKILL [240]
#   LOG_DIR           if set, stdout+stderr are also appended to $LOG_DIR/node$NODE_RANK.log
#   STEM_ENTRY_MODULE module the workers run with CONFIG [stem_megatron.cli.train]; for tests and custom entry points
#   DRY_RUN=1         print the command (one shell-quoted line) and exit 0 without running it
set -euo pipefail

USAGE="usage: launch/torchrun.sh CONFIG [dotted.override=value ...] | -m MODULE [ARG ...]"
die() {
    echo "torchrun.sh: error: $*" >&2
    exit 2
}
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
# Shell-quote one word for copy-paste: bare when safe, else in single quotes.
shquote() {
    if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

[[ $# -ge 1 ]] || die "missing CONFIG; $USAGE"
if [[ $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
# What each worker runs after `python`: the trainer on CONFIG, or any module with its arguments.
if [[ $1 == -m ]]; then
    [[ $# -ge 2 && -n $2 && $2 != -* ]] || die "-m needs a module name; $USAGE"
    ENTRY=(-m "$2")
    shift 2
else
    CONFIG=$1
    shift
    [[ $CONFIG != -* ]] || die "first argument must be the CONFIG file or -m MODULE, got option '$CONFIG'; $USAGE"
    [[ -f $CONFIG ]] || die "config file not found: $CONFIG"
    ENTRY=(-m "${STEM_ENTRY_MODULE:-stem_megatron.cli.train}" --config "$CONFIG")
fi

# Interpreter: the repo's virtual environment when there is one.
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $REPO_DIR/.venv/bin/python ]]; then
        PYTHON=$REPO_DIR/.venv/bin/python
    else
        PYTHON=python3
    fi
fi

# Workers per node: one per visible GPU, else 2 CPU (gloo) workers.
count_gpus() {
    if [[ -n ${CUDA_VISIBLE_DEVICES+x} ]]; then
        local -a ids
        IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}
if [[ -z ${NPROC_PER_NODE:-} ]]; then
    NPROC_PER_NODE=$(count_gpus)
    [[ $NPROC_PER_NODE -gt 0 ]] || NPROC_PER_NODE=2
fi

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
for var in NPROC_PER_NODE NNODES NODE_RANK; do
    is_uint "${!var}" || die "$var must be a non-negative integer, got '${!var}'"
done
[[ $NPROC_PER_NODE -ge 1 && $NNODES -ge 1 ]] || die "NPROC_PER_NODE and NNODES must be >= 1"
[[ $NODE_RANK -lt $NNODES ]] || die "NODE_RANK=$NODE_RANK must be < NNODES=$NNODES"

# Rendezvous. One node with no MASTER_* given: --standalone (c10d store on a free port, so
# concurrent single-node runs on one host never collide). Otherwise static rendezvous:
# node_rank fixes the global ranks (node r holds ranks r*NPROC_PER_NODE ...), no elastic
# membership, node 0 hosts the TCPStore at MASTER_ADDR:MASTER_PORT.
if [[ $NNODES -eq 1 && -z ${MASTER_ADDR:-} && -z ${MASTER_PORT:-} ]]; then
    RDZV=(--standalone)
else
    if [[ -z ${MASTER_ADDR:-} ]]; then
        [[ $NNODES -eq 1 ]] || die "MASTER_ADDR must be set when NNODES=$NNODES > 1"
        MASTER_ADDR=127.0.0.1
    fi
    MASTER_PORT=${MASTER_PORT:-29500}
    if ! is_uint "$MASTER_PORT" || [[ $MASTER_PORT -lt 1 || $MASTER_PORT -gt 65535 ]]; then
        die "MASTER_PORT must be a port number, got '$MASTER_PORT'"
    fi
    RDZV=(--nnodes="$NNODES" --node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT")
fi

if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    OMP_NUM_THREADS=$(($(nproc 2>/dev/null || echo 1) / NPROC_PER_NODE))
    [[ $OMP_NUM_THREADS -ge 1 ]] || OMP_NUM_THREADS=1
fi
# The package is used from the checkout, not installed: make `-m stem_megatron.cli.train` importable.
PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS PYTHONPATH
# Every rank says a failure's one line and torchrun_stderr.awk passes it once (stem_megatron.cli.say):
# not part of the DRY_RUN line, whose command runs without that filter.
export STEM_ALL_RANKS_SAY=1

# Signals torchrun itself handles: on one of these it sends the same signal to every worker's
# process group, waits SHUTDOWN_TIMEOUT s, SIGKILLs stragglers and exits 1. Its default list lacks
# SIGUSR1, and an unhandled SIGUSR1 would kill torchrun and orphan the workers (they run in their
# own sessions), so it is added in case something signals torchrun directly.
SIGNALS=${SIGNALS:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-240}
is_uint "$SHUTDOWN_TIMEOUT" || die "SHUTDOWN_TIMEOUT must be a non-negative integer, got '$SHUTDOWN_TIMEOUT'"

CMD=("$PYTHON" -m torch.distributed.run
    "${RDZV[@]}"
    --nproc-per-node="$NPROC_PER_NODE"
    --signals-to-handle="$SIGNALS"
    --shutdown-timeout="$SHUTDOWN_TIMEOUT"
    "${ENTRY[@]}" "$@")

if [[ ${DRY_RUN:-0} != 0 ]]; then
    line="OMP_NUM_THREADS=$(shquote "$OMP_NUM_THREADS") PYTHONPATH=$(shquote "$PYTHONPATH")"
    for word in "${CMD[@]}"; do line+=" $(shquote "$word")"; done
    echo "$line"
    [[ -z ${LOG_DIR:-} ]] || echo "# output also appended to $LOG_DIR/node$NODE_RANK.log" >&2
    exit 0
fi

if [[ -n ${LOG_DIR:-} ]]; then
    mkdir -p "$LOG_DIR"
    # tee ignores the job signals so it outlives torchrun's shutdown and never breaks the pipe.
    exec > >(trap '' INT TERM HUP QUIT USR1 USR2 && exec tee -a "$LOG_DIR/node$NODE_RANK.log") 2>&1
fi

# Signal routing (see docs/launch.md, "Preemption"). SLURM delivers step signals to this process
# only (proctrack/cgroup signals the direct children of slurmstepd), so it must pass them on:
#   SIGUSR1, SIGTERM  -> straight to the workers (torchrun's children). The trainer checkpoints and
#                        exits 0, torchrun sees a clean exit and exits 0. Routed through torchrun
#                        instead, torchrun would exit 1 even after a clean checkpoint.
#   SIGINT            -> straight to the workers, once each, silently: the trainer stops after the
#                        step without saving and rank 0 prints the one documented line; exit 130.
#   SIGHUP, SIGQUIT   -> to torchrun, which stops its workers (SIGKILL after SHUTDOWN_TIMEOUT).
# torchrun runs in a session of its own, so a signal to this script's process group (a terminal's
# Ctrl-C) reaches it only through these routes. Otherwise a Ctrl-C reached torchrun twice (from the
# terminal and from here), and its second SignalException, raised inside its shutdown, ended in a
# traceback and a second shutdown that sent SIGTERM (the save path) to the workers.
# A signal that finds no worker running (still in rendezvous) stops torchrun: nothing to save.
# shellcheck disable=SC2317  # called from the traps below
children_of() {
    if command -v pgrep >/dev/null 2>&1; then
        pgrep -P "$1" || true
    else
        local stat line rest
        for stat in /proc/[0-9]*/stat; do
            read -r line <"$stat" 2>/dev/null || continue
            rest=${line##*) }
            rest=${rest#* }
            [[ ${rest%% *} == "$1" ]] && basename "$(dirname "$stat")"
        done
    fi
}
# shellcheck disable=SC2317  # called from the traps below
to_workers() {
    local -a pids=()
    [[ -z $TORCHRUN_PID ]] || mapfile -t pids < <(children_of "$TORCHRUN_PID")
    if [[ ${#pids[@]} -gt 0 ]]; then
        [[ $1 == INT ]] || echo "torchrun.sh: SIG$1 -> workers ${pids[*]}" >&2
        kill -s "$1" "${pids[@]}" 2>/dev/null || true
    else
        if [[ $1 == INT ]]; then  # no worker to say it: the one line comes from here
            echo "torchrun.sh: interrupted (SIGINT) before the workers started" >&2
        else
            echo "torchrun.sh: SIG$1 with no worker running -> SIGTERM to torchrun" >&2
        fi
        [[ -z $TORCHRUN_PID ]] || kill -s TERM "$TORCHRUN_PID" 2>/dev/null || true
    fi
}
# shellcheck disable=SC2317  # called from the traps below
to_torchrun() {
    echo "torchrun.sh: SIG$1 -> torchrun" >&2
    kill -s "$1" "$TORCHRUN_PID" 2>/dev/null || true
}
# shellcheck disable=SC2317  # called from the traps below
on_int() {
    INTERRUPTED=1
    to_workers INT
}
TORCHRUN_PID=
INTERRUPTED=0
trap 'to_workers USR1' USR1
trap 'to_workers TERM' TERM
trap 'on_int' INT
trap 'to_torchrun HUP' HUP
trap 'to_torchrun QUIT' QUIT

# torchrun's stderr (its workers' too: they inherit it) goes through launch/torchrun_stderr.awk,
# which passes every line on except, when the run failed, torchrun's own closing report: the
# ChildFailedError traceback and summary, its "closing signal"/"failed (exitcode" log lines, and
# the SignalException traceback after a signal it was sent. It keeps the report when no worker
# said why it stopped (an exit code other than 2, 3, 4, 130), and writes the root-cause worker's
# exit code to a file, so that this script exits with the workers' code, not torchrun's 1.
STATE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/torchrun-sh.XXXXXX")
trap 'rm -rf "$STATE_DIR"' EXIT
mkfifo "$STATE_DIR/stderr"
# The filter ignores job signals, like tee above, so it relays the workers' last words.
(trap '' INT TERM HUP QUIT USR1 USR2 && exec awk -v code_file="$STATE_DIR/code" \
    -f "$REPO_DIR/launch/torchrun_stderr.awk" <"$STATE_DIR/stderr" >&2) &
FILTER_PID=$!

# torchrun in a new session (see the signal routing above), exec'd in place: $! is torchrun.
# setsid() fails only for a process group leader, which a background job of a script is not.
NEW_SESSION='import os, sys
try:
    os.setsid()
except OSError:
    pass
os.execvp(sys.argv[1], sys.argv[1:])'
"$PYTHON" -c "$NEW_SESSION" "${CMD[@]}" 2>"$STATE_DIR/stderr" &
TORCHRUN_PID=$!
# `wait` returns early (status > 128) whenever a trapped signal arrives; keep waiting until
# torchrun itself has exited, then exit with its status.
while :; do
    rc=0
    wait "$TORCHRUN_PID" || rc=$?
    kill -0 "$TORCHRUN_PID" 2>/dev/null || break
done
while :; do
    wait "$FILTER_PID" 2>/dev/null && break
    kill -0 "$FILTER_PID" 2>/dev/null || break
done
# torchrun exits 1 whatever its workers' codes were: report the first failing worker's code
# (2 input/config, 3 non-finite, 4 checkpoint, 130 interrupted; 130 also when torchrun itself was
# sent SIGINT and passed it on), or 130 after a Ctrl-C.
if [[ $rc -ne 0 ]]; then
    worker_rc=$(cat "$STATE_DIR/code" 2>/dev/null || true)
    if [[ $worker_rc =~ ^[0-9]+$ && $worker_rc -gt 1 && $worker_rc -lt 256 ]]; then
        rc=$worker_rc
    elif [[ $INTERRUPTED -eq 1 ]]; then
        rc=130
    fi
fi
exit "$rc"
