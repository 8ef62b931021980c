"""`make gpu-check`: everything a lent GPU should show, in one run of under 8 minutes.

    python benchmarks/gpu_check.py [--budget 480] [--write-docs]      (or python -m benchmarks.gpu_check)

Stages, each a child process of this same interpreter (`sys.executable`: no virtual environment
is assumed; the machine needs what `pip install -e '.[dev]'` installs, torch with CUDA, and
megatron-core) with its own timeout inside the overall budget:
1. `pytest -m gpu tests`: the CUDA model against the reference, the table engine on CUDA, bf16
   training against fp32 (tests/test_gpu.py); the host row store's stream ordering raced with
   slow kernels (tests/test_gpu_streams.py);
2. `benchmarks.bench_mlp --device cuda --dtype bf16`: STEM MLP vs dense MLP;
3. `benchmarks.bench_step`: STEM vs dense training step time and MFU at the 350M shape, layers
   reduced (the reduction is in its output);
4. `benchmarks.bench_offload --nproc 1`, only if that file exists.
Each stage's last JSON line (its figures) and exit status are collected; the run ends with one
JSON line: {"gpu_check": "ok" | "failed" | "no_cuda", ...}; the exit status is 1 if a stage failed.
Without CUDA it says so, prints that JSON line and exits 0. `--write-docs` lets the benchmarks
update their sections of docs/benchmarks.md (by default they only print).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def _run(argv: list[str], timeout: float) -> dict:
    """Run one stage; returns rc, seconds, its last JSON line and the tail of its output."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    # Own session: on a timeout the whole group goes (stages spawn rank processes holding the GPU).
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc, out = "timeout", out + f"\n(stopped after {timeout:.0f} s)"
    return {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "result": _last_json(out),
            "tail": out[-1500:] if rc != 0 else None}


def _pytest_counts(xml_path: Path) -> dict | None:
    """Passed / failed / skipped counts from pytest's junit XML (None if pytest wrote none)."""
    if not xml_path.exists():
        return None
    suite = ET.parse(xml_path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    reasons = sorted({s.get("message", "") for s in suite.iter("skipped")})
    return {"passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed": n["failures"] + n["errors"],
            "skipped": n["skipped"], "skip_reasons": reasons}


def _missing_modules() -> list[str]:
    missing = []
    for mod in ("megatron.core", "pytest", "stem_megatron"):
        try:
            __import__(mod)
        except Exception:  # noqa: BLE001 - any import failure means the stage cannot run
            missing.append(mod)
    return missing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=480, help="seconds for all stages together")
    ap.add_argument("--write-docs", action="store_true", help="let the benchmarks update docs/benchmarks.md")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing to check (run it where a GPU is lent)")
        print(json.dumps({"gpu_check": "no_cuda", "torch": torch.__version__}), flush=True)
        return 0
    device = torch.cuda.get_device_name()
    print(f"gpu-check on {device} ({torch.cuda.device_count()} GPU(s), torch {torch.__version__}), "
          f"budget {args.budget:.0f} s", flush=True)
    missing = _missing_modules()
    if missing:
        print(f"gpu-check: cannot run: {', '.join(missing)} not importable (run `make setup` first)")
        print(json.dumps({"gpu_check": "failed", "device": device, "missing": missing}), flush=True)
        return 1
    py, write = sys.executable, [] if args.write_docs else ["--no-write"]
    xml_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_{os.getpid()}.xml"
    stages = [  # (name, argv, share of the budget)
        ("gpu_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs",
                       f"--junitxml={xml_path}", "tests/test_gpu.py", "tests/test_gpu_streams.py"], 0.40),
        ("mlp_bf16", [py, "-m", "benchmarks.bench_mlp", "--device", "cuda", "--dtype", "bf16", *write], 0.12),
        ("step_350m", [py, "-m", "benchmarks.bench_step", "--timeout", "150", *write], 0.33),
    ]
    if (REPO / "benchmarks" / "bench_offload.py").exists():
        stages.append(("offload", [py, "-m", "benchmarks.bench_offload", "--nproc", "1", *write], 0.15))
    deadline = time.monotonic() + args.budget
    report = {}
    for i, (name, cmd, _share) in enumerate(stages):
        left = deadline - time.monotonic()
        # Later stages keep their shares: a stage may use its own share plus what earlier ones left.
        later = sum(s for _, _, s in stages[i + 1:])
        timeout = max(left - later * args.budget, 0)
        print(f"gpu-check: {name} (up to {timeout:.0f} s): {' '.join(cmd[1:])}", flush=True)
        if timeout < 5:
            report[name] = {"rc": "not_run", "reason": "the budget was spent"}
            continue
        report[name] = _run(cmd, timeout)
        if name == "gpu_tests":
            report[name]["result"] = _pytest_counts(xml_path)
            xml_path.unlink(missing_ok=True)
        status = "ok" if report[name]["rc"] == 0 else f"FAILED (rc {report[name]['rc']})"
        print(f"gpu-check: {name} {status} in {report[name]['seconds']} s", flush=True)
        if report[name]["tail"]:
            print(report[name]["tail"], flush=True)
    ok = all(r["rc"] == 0 for r in report.values())
    print(json.dumps({"gpu_check": "ok" if ok else "failed", "device": device, "torch": torch.__version__,
                      "budget_s": args.budget, "stages": report}, sort_keys=True), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
