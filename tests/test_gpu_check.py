"""`make gpu-check` where there is no GPU: it says so, prints its one JSON line, and exits 0.

CUDA is hidden from the child, so this checks the no-GPU path on every machine.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from stem_megatron.testing.distributed import CPU_ONLY_ENV

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_without_cuda_says_so_and_exits_0():
    env = dict(os.environ, **CPU_ONLY_ENV)
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "no CUDA device" in lines[0], r.stdout
    assert json.loads(lines[-1])["gpu_check"] == "no_cuda", r.stdout


def test_gpu_check_reads_pytest_counts_and_json_lines(tmp_path):
    from benchmarks.gpu_check import _last_json, _pytest_counts

    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="6" failures="1" errors="0" skipped="2">'
                   '<testcase><skipped message="needs 2 GPUs"/></testcase></testsuite></testsuites>')
    assert _pytest_counts(xml) == {"passed": 3, "failed": 1, "skipped": 2, "skip_reasons": ["needs 2 GPUs"]}
    assert _pytest_counts(tmp_path / "none.xml") is None
    assert _last_json('table\n{"a": 1}\n{"b": 2}\ntrailing text\n') == {"b": 2}


def test_a_stage_past_its_timeout_is_stopped_with_its_children():
    from benchmarks.gpu_check import _run

    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
           "print('{\"partial\": 1}', flush=True); time.sleep(60)"
    r = _run([sys.executable, "-c", code], timeout=3)
    assert r["rc"] == "timeout" and r["result"] == {"partial": 1} and r["seconds"] < 30, r
