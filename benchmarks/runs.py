"""Run `stem_megatron.cli.train` through launch/torchrun.sh and read back its summary JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(config: str, overrides: list[str], nproc: int = 2, timeout: float = 3600) -> dict:
    """Train `config` with `overrides` on `nproc` local processes; returns rank 0's summary dict."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = os.path.join(tmp, "summary.json")
        cmd = [str(ROOT / "launch" / "torchrun.sh"), config, f"--summary-json={summary}", *overrides]
        env = dict(os.environ, NPROC_PER_NODE=str(nproc), PYTHON=sys.executable)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(summary):
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise RuntimeError(f"training {config} {overrides} failed (exit {proc.returncode}):\n{tail}")
        with open(summary) as f:
            return json.load(f)
