"""`make gpu-check` where there is no GPU: it says so, prints its one JSON line, and exits 0; its
staging on a bare node (install from the wheelhouse, carried data, why a stage cannot run).

CUDA is hidden from the child, so this checks the no-GPU path on every machine. The whole bare-node
run (an empty Python 3.12 venv plus a real wheelhouse, no network) is in test_wheelhouse.py (slow).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stem_megatron.testing.distributed import CPU_ONLY_ENV

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    env = dict(os.environ, **CPU_ONLY_ENV)
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--work-dir", str(tmp_path)],
                       cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert any(line.startswith("gpu-check: no CUDA device") for line in lines), r.stdout
    last = json.loads(lines[-1])
    assert last["gpu_check"] == "no_cuda" and last["imports"]["ok"] is True, r.stdout
    assert all(s["rc"] == "not_run" and s["reason"].startswith("no CUDA device") for s in last["stages"].values())


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


# --- staging on a bare node: wheelhouse install, carried data, reasons (no GPU, no network needed) ---

def _tiny_wheel(folder: Path, name: str = "stemtinydep", version: str = "1.0") -> Path:
    """A real (pure-Python) wheel pip can install: one module plus its dist-info."""
    import base64
    import hashlib
    import zipfile

    files = {f"{name}/__init__.py": b"VALUE = 7\n",
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}\n"
                     for p, d in files.items()) + f"{name}-{version}.dist-info/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for p, d in files.items():
            zf.writestr(p, d)
        zf.writestr(f"{name}-{version}.dist-info/RECORD", record)
    return path


def _tiny_wheelhouse(root: Path, python: str | None = None) -> Path:
    """A wheelhouse in make wheelhouse's format: one tiny wheel and a two-file 'sample corpus'."""
    import hashlib

    from launch.wheelhouse_files import SAMPLE_TARBALL, pack_sample, write_manifest

    sample = root / "sample_src"
    sample.mkdir(parents=True)
    (sample / "gpt2.tiktoken").write_bytes(b"IQ== 0\n")
    (sample / "sample_text_document.bin").write_bytes(bytes(range(16)))
    files = {n: hashlib.sha256((sample / n).read_bytes()).hexdigest() for n in ("gpt2.tiktoken", "sample_text_document.bin")}
    (sample / "MANIFEST.json").write_text(json.dumps({"version": 1, "files": files}))
    wh = root / "wheelhouse"
    wh.mkdir()
    wheel = _tiny_wheel(wh)
    members = pack_sample(sample, wh / SAMPLE_TARBALL)
    python = python or f"{sys.version_info[0]}.{sys.version_info[1]}"
    write_manifest(wh, {"target": {"python": python}, "provided_by_image": ["torch"], "project": wheel.name,
                        "wheels": {"stemtinydep": {"version": "1.0", "file": wheel.name}},
                        "sample_data": {"file": SAMPLE_TARBALL, "members": members}})
    return wh


def test_plan_environment_uses_the_interpreter_the_wheelhouse_or_says_why_not(tmp_path):
    from benchmarks.gpu_check import plan_environment

    assert plan_environment([], tmp_path) == {"source": "interpreter"}
    assert plan_environment(["pytest"], tmp_path) == {"source": "interpreter", "missing": ["pytest"]}
    none = plan_environment(["megatron.core", "yaml"], tmp_path / "wheelhouse")
    assert none["source"] is None and "megatron.core, yaml not importable" in none["reason"]
    assert str(tmp_path / "wheelhouse") in none["reason"] and "make wheelhouse" in none["reason"]
    wh = _tiny_wheelhouse(tmp_path)
    assert plan_environment(["megatron.core"], wh) == {"source": "wheelhouse", "missing": ["megatron.core"]}


def test_install_from_wheelhouse_is_offline_private_and_reused(tmp_path, monkeypatch):
    from benchmarks.gpu_check import install_from_wheelhouse, offline_pip_env

    wh = _tiny_wheelhouse(tmp_path)
    # This machine's pip settings (and worse) must not be read: an index that refuses connections
    # and find-links that do not exist would make pip fail if it used them.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    monkeypatch.setenv("PIP_NO_DEPS", "0")
    env = offline_pip_env()
    assert not {k for k in env if k.startswith("PIP_")} - {"PIP_CONFIG_FILE", "PIP_NO_INDEX", "PIP_DISABLE_PIP_VERSION_CHECK"}
    assert env["PIP_CONFIG_FILE"] == os.devnull and env["PIP_NO_INDEX"] == "1"
    work = tmp_path / "work"
    work.mkdir()
    first = install_from_wheelhouse(wh, work)
    site = Path(first["site"])
    assert first["reused"] is False and site.parent == work and site.name.startswith(f"site-py{sys.version_info[0]}")
    assert (site / "stemtinydep" / "__init__.py").read_text() == "VALUE = 7\n"
    r = subprocess.run([sys.executable, "-c", "import stemtinydep; print(stemtinydep.VALUE)"],
                       env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True, text=True)
    assert r.stdout.strip() == "7", r.stderr
    assert install_from_wheelhouse(wh, work)["reused"] is True


def test_an_altered_or_foreign_wheelhouse_is_refused_with_one_line(tmp_path):
    from benchmarks.gpu_check import install_from_wheelhouse
    from launch.wheelhouse_files import WheelhouseError

    wh = _tiny_wheelhouse(tmp_path / "other", python="2.7")
    with pytest.raises(WheelhouseError, match=r"is for CPython 2\.7; this is Python"):
        install_from_wheelhouse(wh, tmp_path)
    wh = _tiny_wheelhouse(tmp_path / "a")
    (wh / "stray.whl").write_bytes(b"x")
    with pytest.raises(WheelhouseError, match="files not in MANIFEST.json: stray.whl"):
        install_from_wheelhouse(wh, tmp_path)
    (wh / "stray.whl").unlink()
    wheel = next(wh.glob("*.whl"))
    wheel.write_bytes(wheel.read_bytes() + b"\0")
    with pytest.raises(WheelhouseError, match=f"{wheel.name}: sha256 .* the wheelhouse was altered"):
        install_from_wheelhouse(wh, tmp_path)
    assert not list(tmp_path.glob("site-py*")), "nothing may be installed from an altered wheelhouse"


def test_the_sample_corpus_comes_from_the_wheelhouse_checked(tmp_path):
    from benchmarks.gpu_check import find_sample

    wh = _tiny_wheelhouse(tmp_path)
    work = tmp_path / "work"
    data = find_sample(wh, work, None)
    assert data == {"sample": str(work / "sample"), "source": "wheelhouse"}
    assert (work / "sample" / "sample_text_document.bin").read_bytes() == bytes(range(16))
    (work / "sample" / "gpt2.tiktoken").write_bytes(b"changed")  # a damaged copy is unpacked again
    assert find_sample(wh, work, None)["sample"] == str(work / "sample")
    assert (work / "sample" / "gpt2.tiktoken").read_bytes() == b"IQ== 0\n"
    assert find_sample(wh, work, tmp_path / "sample_src")["source"] == "--data-dir"
    tarball = wh / "sample-data.tar.gz"
    tarball.write_bytes(tarball.read_bytes()[:-1] + b"\1")
    bad = find_sample(wh, work, None)
    assert bad["sample"] is None and "sample-data.tar.gz: sha256" in bad["reason"]


def test_each_stage_that_cannot_run_says_why(tmp_path):
    from benchmarks.gpu_check import plan_stages

    xml = tmp_path / "r.xml"
    ready = plan_stages("py", None, "/s", None, True, [], xml)
    assert [(n, why) for n, _, _, why in ready] == [("gpu_tests", None), ("mlp_bf16", None), ("step_350m", None),
                                                     ("offload", None)]
    offload_argv = ready[-1][1]
    assert offload_argv[offload_argv.index("--data-dir") + 1] == "/s"  # the carried corpus, not data/sample
    lacking = {n: why for n, _, _, why in plan_stages("py", None, None, "no corpus here", False, [], xml)}
    assert "pytest is not importable" in lacking["gpu_tests"] and lacking["mlp_bf16"] is None
    assert lacking["offload"] == "needs the sample corpus: no corpus here"
    no_cuda = {n: why for n, _, _, why in plan_stages("py", "no CUDA device", None, "no corpus", True, [], xml)}
    assert all(why.startswith("no CUDA device") for why in no_cuda.values())
    assert no_cuda["offload"] == "no CUDA device; also needs the sample corpus: no corpus"


def test_without_torch_the_import_check_says_the_node_must_bring_it(monkeypatch):
    import importlib.util

    from benchmarks import gpu_check

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    r = gpu_check.check_imports()
    assert r["ok"] is False and r["reason"].startswith("torch is not importable by ")
    assert "the wheelhouse leaves it out" in r["reason"]


def test_stages_run_offline_with_the_checkout_then_the_private_site_first(tmp_path):
    from benchmarks.gpu_check import stage_env

    env = stage_env(tmp_path / "site")
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [str(REPO), str(tmp_path / "site")]
    assert env["HF_HUB_OFFLINE"] == "1" and env["PIP_NO_INDEX"] == "1" and env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] == "1"
