"""`make gpu-check`: everything a lent GPU should show, in one run of under 8 minutes, on a bare node too.

    python benchmarks/gpu_check.py [--budget 480] [--write-docs] [--wheelhouse wheelhouse]
                                   [--work-dir .gpu_check] [--data-dir DIR]

Before any stage (the interpreter is `sys.executable`; no virtual environment is assumed):
1. Environment. If megatron-core or another module the stages import (REQUIRED) is missing and
   a wheelhouse (`make wheelhouse`, docs/launch.md) is there, its sha256s are checked and all its
   wheels are installed with `pip install --no-index --no-deps --target <work-dir>/site-...`
   (pip's configuration files and PIP_* variables are ignored: nothing is fetched), then that
   folder goes on PYTHONPATH after the checkout. A second run reuses it.
2. Imports, with the stages' module path: REQUIRED, then stem_megatron.model (versions reported).
3. Data: the sample corpus carried in the wheelhouse, unpacked to <work-dir>/sample and checked
   against its MANIFEST.json; else data/sample if `make sample-data` made it; `--data-dir` overrides.
   Nothing is downloaded: the stages also run with HF_HUB_OFFLINE / PIP_NO_INDEX set.
Then the stages, each a child process with its own timeout inside the overall budget:
1. `pytest -m gpu tests`: the CUDA model against the reference, the table engine on CUDA, bf16
   training against fp32 (tests/test_gpu.py); the host row store's stream ordering raced with
   slow kernels (tests/test_gpu_streams.py);
2. `benchmarks.bench_mlp --device cuda --dtype bf16`: STEM MLP vs dense MLP;
3. `benchmarks.bench_step`: STEM vs dense training step time and MFU at the 350M shape, layers
   reduced (the reduction is in its output);
4. `benchmarks.bench_offload --nproc 1` on the carried sample corpus.
A stage that cannot run (no CUDA, no pytest, no sample corpus) is `{"rc": "not_run", "reason": ...}`.
The run ends with one JSON line: {"gpu_check": "ok" | "failed" | "no_cuda", "environment",
"imports", "data", "stages", ...}. Exit status 1 if the environment or a stage failed. Without
CUDA it gets through 1-3, says so, prints that line and exits 0. `--write-docs` lets the
benchmarks update their sections of docs/benchmarks.md (by default they only print).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/gpu_check.py`: the checkout's packages (launch/) first
    sys.path.insert(0, str(REPO))

from launch.wheelhouse_files import (  # noqa: E402 - after the path above
    MANIFEST,
    WheelhouseError,
    check_sample_dir,
    manifest_digest,
    read_manifest,
    unpack_sample,
)

# What the stages import, by module -> distribution (torch and numpy are the node's own).
REQUIRED = {
    "megatron.core": "megatron-core", "yaml": "pyyaml", "tensorboard": "tensorboard", "psutil": "psutil",
    "tokenizers": "tokenizers", "tiktoken": "tiktoken", "sentencepiece": "sentencepiece",
    "safetensors": "safetensors", "pytest": "pytest",
}
# Set for every stage: a library that would reach for the network fails instead; and pytest loads
# no plugins from the node's image (they may not suit the wheelhouse's pytest; the tests need none).
STAGE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PIP_NO_INDEX": "1",
             "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


def _last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def stage_env(site: Path | None) -> dict:
    """The stages' environment: the checkout first on PYTHONPATH, then the private site (if any), offline."""
    paths = [str(REPO), str(site) if site else None, os.environ.get("PYTHONPATH")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)), PYTHONUNBUFFERED="1", **STAGE_ENV)


def _run(argv: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run one stage; returns rc, seconds, its last JSON line and the tail of its output."""
    env = env if env is not None else stage_env(None)
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


def missing_modules(modules=REQUIRED) -> list[str]:
    """The modules of `modules` this interpreter (with the current sys.path) cannot find."""
    importlib.invalidate_caches()
    missing = []
    for mod in modules:
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):  # a parent package is missing or broken
            found = False
        if not found:
            missing.append(mod)
    return missing


def plan_environment(missing: list[str], wheelhouse: Path) -> dict:
    """Where the stages' packages come from: the interpreter as it is, the wheelhouse, or nowhere (with why)."""
    if not missing:
        return {"source": "interpreter"}
    if (wheelhouse / MANIFEST).is_file():
        return {"source": "wheelhouse", "missing": missing}
    if missing == ["pytest"]:  # only the test stage needs it; that stage says so
        return {"source": "interpreter", "missing": missing}
    return {"source": None, "missing": missing,
            "reason": f"{', '.join(missing)} not importable and no wheelhouse at {wheelhouse} (`make setup`, or "
                      "`make wheelhouse` on a machine with network and copy the folder here; docs/launch.md)"}


def offline_pip_env() -> dict:
    """pip with no configuration file and no PIP_* variable of this machine (no index, no find-links) and no index."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def site_dir(work_dir: Path, wheelhouse: Path) -> Path:
    """One private folder per interpreter version and wheelhouse (named by its MANIFEST.json's sha256)."""
    return work_dir / f"site-py{sys.version_info[0]}{sys.version_info[1]}-{manifest_digest(wheelhouse)[:12]}"


def install_from_wheelhouse(wheelhouse: Path, work_dir: Path) -> dict:
    """Check the wheelhouse and install all its wheels into a private folder, offline; reused when done before.

    Raises WheelhouseError (one line) when the wheelhouse is altered, built for another Python, or pip fails.
    """
    manifest = read_manifest(wheelhouse)
    want = manifest["target"]["python"]
    have = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if want != have:
        raise WheelhouseError(f"the wheelhouse at {wheelhouse} is for CPython {want}; this is Python {have} "
                              f"({sys.executable})")
    site = site_dir(work_dir, wheelhouse)
    done = site / ".installed-from"
    report = {"source": "wheelhouse", "wheelhouse": str(wheelhouse), "site": str(site),
              "wheels": len(manifest["wheels"])}
    if done.is_file() and done.read_text() == manifest_digest(wheelhouse):
        return dict(report, reused=True, install_s=0.0)
    t0 = time.monotonic()
    partial = site.with_name(site.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # --no-deps: with --target pip would otherwise want torch too (the node has it; the wheelhouse
    # does not). The build checked that the wheels plus the image's packages meet every requirement.
    wheels = [str(wheelhouse / entry["file"]) for entry in manifest["wheels"].values()]
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse), "--no-deps",
           "--no-cache-dir", "--quiet", "--target", str(partial), *wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=offline_pip_env())
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise WheelhouseError(f"pip install from {wheelhouse} failed (exit {proc.returncode}): "
                              f"{lines[-1] if lines else 'no output'}")
    for old in work_dir.glob("site-py*"):  # an earlier wheelhouse's install
        if old != partial:
            shutil.rmtree(old, ignore_errors=True)
    os.replace(partial, site)
    done.write_text(manifest_digest(wheelhouse))
    return dict(report, reused=False, install_s=round(time.monotonic() - t0, 1))


def find_sample(wheelhouse: Path, work_dir: Path, data_dir: Path | None) -> dict:
    """The sample corpus the stages read: `--data-dir`, the wheelhouse's (unpacked), or data/sample; or why none."""
    try:
        if data_dir is not None:
            check_sample_dir(data_dir)
            return {"sample": str(data_dir), "source": "--data-dir"}
        if (wheelhouse / MANIFEST).is_file():
            manifest = read_manifest(wheelhouse)
            if manifest.get("sample_data"):
                return {"sample": str(unpack_sample(wheelhouse, manifest, work_dir / "sample")), "source": "wheelhouse"}
        local = REPO / "data" / "sample"
        if (local / "MANIFEST.json").is_file():
            check_sample_dir(local)
            return {"sample": str(local), "source": "data/sample"}
    except WheelhouseError as err:
        return {"sample": None, "reason": str(err)}
    return {"sample": None, "reason": f"no sample corpus: no wheelhouse at {wheelhouse} and no {local} "
                                      "(`make sample-data` needs network; carry it with `make wheelhouse`)"}


def plan_stages(py: str, cuda_reason: str | None, sample: str | None, sample_reason: str | None,
                have_pytest: bool, write: list[str], xml_path: Path) -> list[tuple[str, list[str], float, str | None]]:
    """(name, argv, share of the budget, reason it cannot run or None) for each stage."""
    stages = [
        ("gpu_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs",
                       f"--junitxml={xml_path}", "tests/test_gpu.py", "tests/test_gpu_streams.py"], 0.40,
         None if have_pytest else "pytest is not importable (it is in the wheelhouse and `make setup`)"),
        ("mlp_bf16", [py, "-m", "benchmarks.bench_mlp", "--device", "cuda", "--dtype", "bf16", *write], 0.12, None),
        ("step_350m", [py, "-m", "benchmarks.bench_step", "--timeout", "150", *write], 0.33, None),
        ("offload", [py, "-m", "benchmarks.bench_offload", "--nproc", "1", "--data-dir", str(sample), *write], 0.15,
         None if sample else f"needs the sample corpus: {sample_reason}"),
    ]
    if cuda_reason:  # every stage measures on the GPU; a stage's own reason is kept after it
        stages = [(n, a, s, f"{cuda_reason}; also {why}" if why else cuda_reason) for n, a, s, why in stages]
    return stages


def check_imports() -> dict:
    """Import what the stages import, here (sys.path is the stages' PYTHONPATH): ok, versions, or the error."""
    import importlib.metadata as md

    if importlib.util.find_spec("torch") is None:
        return {"ok": False, "reason": f"torch is not importable by {sys.executable}: the node brings PyTorch "
                                       "(with CUDA); the wheelhouse leaves it out"}
    from stem_megatron import cli

    cli.quiet_known_warnings()  # megatron-core's "Apex is not installed" and the like, as the trainer does
    t0 = time.monotonic()
    try:
        for mod in [*REQUIRED, "stem_megatron.model"]:  # the last builds on megatron.core: the project's own path
            importlib.import_module(mod)
    except Exception as err:  # noqa: BLE001 - any failure to import means no stage can run
        return {"ok": False, "reason": f"import {mod}: {type(err).__name__}: {err}".splitlines()[0]}
    versions = {}
    for dist in ("torch", "megatron-core", "stem_megatron", "numpy"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    versions["megatron.core from"] = sys.modules["megatron.core"].__file__
    return {"ok": True, "seconds": round(time.monotonic() - t0, 1), "versions": versions}


def prepare(args) -> tuple[dict, dict, dict, Path | None]:
    """Environment, imports and data for the stages: (environment, imports, data, private site or None)."""
    wheelhouse, work_dir = args.wheelhouse.resolve(), args.work_dir.resolve()
    environment = plan_environment(missing_modules(), wheelhouse)
    site = None
    if environment["source"] == "wheelhouse":
        print(f"gpu-check: {', '.join(environment['missing'])} not importable: installing the wheelhouse {wheelhouse} "
              f"into a private folder, offline", flush=True)
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            environment.update(install_from_wheelhouse(wheelhouse, work_dir))
            site = Path(environment["site"])
            sys.path.insert(1, str(site))  # after the checkout, like PYTHONPATH for the stages
            environment["still_missing"] = missing_modules()
        except WheelhouseError as err:
            environment.update(source=None, reason=str(err))
    imports = check_imports() if environment["source"] is not None else \
        {"ok": False, "reason": "not tried: " + environment["reason"]}
    data = find_sample(wheelhouse, work_dir, args.data_dir.resolve() if args.data_dir else None)
    return environment, imports, data, site


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=480, help="seconds for all stages together")
    ap.add_argument("--write-docs", action="store_true", help="let the benchmarks update docs/benchmarks.md")
    ap.add_argument("--wheelhouse", type=Path, default=REPO / "wheelhouse", help="default ./wheelhouse")
    ap.add_argument("--work-dir", type=Path, default=REPO / ".gpu_check",
                    help="private folder for the installed wheels and the unpacked corpus (default ./.gpu_check)")
    ap.add_argument("--data-dir", type=Path, default=None, help="the sample corpus (default: the wheelhouse's)")
    args = ap.parse_args(argv)
    environment, imports, data, site = prepare(args)
    if environment["source"] is None or not imports["ok"]:
        reason = environment.get("reason") or imports.get("reason")
        print(f"gpu-check: cannot run: {reason}", flush=True)
        print(json.dumps({"gpu_check": "failed", "python": sys.version.split()[0], "environment": environment,
                          "imports": imports, "data": data}, sort_keys=True), flush=True)
        return 1
    versions = imports["versions"]
    print(f"gpu-check: imports ok with Python {sys.version.split()[0]}: torch {versions['torch']}, megatron-core "
          f"{versions['megatron-core']} ({versions['megatron.core from']})", flush=True)
    print(f"gpu-check: sample corpus: {data['sample'] or data['reason']}", flush=True)
    import torch

    cuda_reason = None if torch.cuda.is_available() else f"no CUDA device (torch {torch.__version__} sees none)"
    py, write = sys.executable, [] if args.write_docs else ["--no-write"]
    xml_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_{os.getpid()}.xml"
    stages = plan_stages(py, cuda_reason, data["sample"], data.get("reason"),
                         "pytest" not in missing_modules(["pytest"]), write, xml_path)
    summary = {"python": sys.version.split()[0], "torch": torch.__version__, "environment": environment,
               "imports": imports, "data": data}
    if cuda_reason:
        print("gpu-check: no CUDA device on this machine; the environment is ready, the GPU stages cannot run "
              "(run it where a GPU is lent)", flush=True)
        stages_report = {n: {"rc": "not_run", "reason": why} for n, _, _, why in stages}
        print(json.dumps({"gpu_check": "no_cuda", **summary, "stages": stages_report}, sort_keys=True), flush=True)
        return 0
    device = torch.cuda.get_device_name()
    print(f"gpu-check on {device} ({torch.cuda.device_count()} GPU(s), torch {torch.__version__}), "
          f"budget {args.budget:.0f} s", flush=True)
    env = stage_env(site)
    deadline = time.monotonic() + args.budget
    report = {}
    for i, (name, cmd, _share, why) in enumerate(stages):
        if why:
            report[name] = {"rc": "not_run", "reason": why}
            print(f"gpu-check: {name} cannot run: {why}", flush=True)
            continue
        left = deadline - time.monotonic()
        # Later stages keep their shares: a stage may use its own share plus what earlier ones left.
        later = sum(s for _, _, s, w in stages[i + 1:] if not w)
        timeout = max(left - later * args.budget, 0)
        print(f"gpu-check: {name} (up to {timeout:.0f} s): {' '.join(cmd[1:])}", flush=True)
        if timeout < 5:
            report[name] = {"rc": "not_run", "reason": "the budget was spent"}
            continue
        report[name] = _run(cmd, timeout, env)
        if name == "gpu_tests":
            report[name]["result"] = _pytest_counts(xml_path)
            xml_path.unlink(missing_ok=True)
        status = "ok" if report[name]["rc"] == 0 else f"FAILED (rc {report[name]['rc']})"
        print(f"gpu-check: {name} {status} in {report[name]['seconds']} s", flush=True)
        if report[name]["tail"]:
            print(report[name]["tail"], flush=True)
    ok = all(r["rc"] == 0 for r in report.values())
    print(json.dumps({"gpu_check": "ok" if ok else "failed", "device": device, **summary, "budget_s": args.budget,
                      "stages": report}, sort_keys=True), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
