"""`make wheelhouse`: the lock, the closure check, the reproducible sample tarball; and (slow) the whole
bare-node path: a real wheelhouse plus an empty Python 3.12 venv, `make gpu-check` with no network.

The slow test needs a Python 3.12 interpreter with torch (`STEM_PY312`, default ./.venv312/bin/python);
only torch and what torch requires are lent to the empty venv (symlinked, like a CUDA PyTorch image),
never megatron-core or the project. It needs the package registry once, to build the wheelhouse.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch import wheelhouse
from launch.wheelhouse_files import pack_sample

REPO = Path(__file__).resolve().parents[1]


def test_the_lock_pins_megatron_core_0_19_2_with_hashes_and_leaves_the_image_out():
    lines, provided = wheelhouse.read_lock()
    pins = [ln.split()[0] for ln in lines if "==" in ln and not ln.startswith("#")]
    hashes = [ln for ln in lines if ln.strip().startswith("--hash=sha256:")]
    assert "megatron-core==0.19.2" in pins and len(hashes) == len(pins)
    names = {wheelhouse.canonical(p.split("==")[0]) for p in pins}
    assert {"torch", "numpy", "triton", "typing-extensions", "sympy"} <= provided
    assert not names & provided, "a wheel the image provides is pinned too"
    assert {"pyyaml", "tensorboard", "psutil", "tokenizers", "tiktoken", "sentencepiece", "safetensors", "pytest"} <= names


def test_closure_problems_name_each_unmet_requirement():
    wheels = {
        "app": ("1.0", ["lib>=2", "torch>=2.4", "winonly; sys_platform == 'win32'", "docs; extra == 'doc'",
                        "newer>=3; python_version >= '3.12'", "older; python_version < '3.12'"]),
        "lib": ("2.5", []),
        "newer": ("2.0", []),
    }
    assert wheelhouse.closure_problems(wheels, {"torch"}) == ["app 1.0 needs newer>=3; python_version >= '3.12': "
                                                              "the wheelhouse has newer 2.0"]
    wheels["newer"] = ("3.1", [])
    assert wheelhouse.closure_problems(wheels, {"torch"}) == []
    assert wheelhouse.closure_problems(wheels, set()) == [
        "app 1.0 needs torch>=2.4: not in the wheelhouse, not provided by the image"]
    assert wheelhouse.wheel_name("Megatron_Core-0.19.2-cp312-cp312-manylinux_2_28_x86_64.whl") == ("megatron-core",
                                                                                                 "0.19.2")


def test_the_sample_tarball_is_the_same_bytes_from_the_same_files(tmp_path):
    src = tmp_path / "sample"
    src.mkdir()
    (src / "MANIFEST.json").write_text("{}")
    (src / "b.bin").write_bytes(b"\x00\x01")
    members = pack_sample(src, tmp_path / "one.tar.gz")
    os.utime(src / "b.bin", (1, 1))  # other timestamps, same content
    assert pack_sample(src, tmp_path / "two.tar.gz") == members
    assert (tmp_path / "one.tar.gz").read_bytes() == (tmp_path / "two.tar.gz").read_bytes()
    assert members["b.bin"] == hashlib.sha256(b"\x00\x01").hexdigest()


# --- the bare node, on a CPU ---

# Lists the files of torch, numpy and everything torch requires in an environment: what a CUDA
# PyTorch image has. Run by the Python 3.12 interpreter that has torch.
_IMAGE_FILES = r"""
import importlib.metadata as md, json, re
from packaging.requirements import Requirement
canon = lambda n: re.sub(r"[-_.]+", "-", n).lower()
dists = {canon(d.metadata["Name"]): d for d in md.distributions()}
todo, seen = [("torch", ""), ("numpy", "")], set()
while todo:  # (distribution, extra asked of it): torch asks cuda-toolkit for [cudart, ...]
    n, extra = todo.pop()
    if (n, extra) in seen or n not in dists:
        continue
    seen.add((n, extra))
    for line in dists[n].requires or []:
        r = Requirement(line)
        if r.marker is None or r.marker.evaluate({"extra": extra}):
            todo += [(canon(r.name), e) for e in ["", *r.extras]]
keep = {n for n, _ in seen}
tops = {str(dists[n].locate_file(f.parts[0])) for n in keep for f in dists[n].files or [] if f.parts[0] != ".."}
print(json.dumps({"dists": sorted(keep), "paths": sorted(tops)}))
"""

# sitecustomize for every Python process of the run: an internet socket connection raises and is logged.
_NO_NETWORK = r"""
import os, socket
_connect = socket.socket.connect
def _refuse(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        with open(os.environ["NETWORK_ATTEMPTS_LOG"], "a") as f:
            f.write(f"{os.getpid()} {address!r}\n")
        raise OSError(f"network access in an offline test: {address!r}")
    return _connect(self, address)
socket.socket.connect = _refuse
socket.socket.connect_ex = lambda self, address: _refuse(self, address)
"""


def _no_network_prefix() -> tuple[list[str], str]:
    """A command prefix that runs without a network namespace's interfaces (unshare), if this machine allows it."""
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        if shutil.which("unshare") and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix, " ".join(prefix)
    return [], "no unshare here: socket guard and pip settings only"


@pytest.mark.slow
def test_an_empty_python312_venv_with_the_wheelhouse_gets_to_no_cuda_offline(tmp_path):
    py312 = os.environ.get("STEM_PY312", str(REPO / ".venv312" / "bin" / "python"))
    assert Path(py312).is_file(), f"needs a Python 3.12 with torch: set STEM_PY312 (no {py312})"
    # 1. The wheelhouse, as `make wheelhouse` makes it (this is the only step that may use the network).
    wh = tmp_path / "wheelhouse"
    r = subprocess.run(["make", "-s", "wheelhouse", f"WHEELHOUSE={wh}", f"VENV={sys.prefix}"], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    size = sum(p.stat().st_size for p in wh.iterdir())
    assert size < 60 * 2**20 and "megatron_core-0.19.2-cp312" in r.stdout, r.stdout
    # 2. An empty venv of the same 3.12, lent only torch and torch's own requirements (a CUDA PyTorch image).
    base = subprocess.run([py312, "-c", "import sys; print(sys._base_executable)"], capture_output=True,
                          text=True, check=True).stdout.strip()
    venv = tmp_path / "venv"
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
    image = json.loads(subprocess.run([py312, "-c", _IMAGE_FILES], capture_output=True, text=True, check=True).stdout)
    assert "torch" in image["dists"] and not [d for d in image["dists"] if "megatron" in d or "stem" in d]
    lent = tmp_path / "torch_image"
    lent.mkdir()
    for path in image["paths"]:
        (lent / Path(path).name).symlink_to(path)
    (site,) = venv.glob("lib/python3.12/site-packages")
    (site / "torch_image.pth").write_text(f"{lent}\n")
    probe = ("import importlib.util as u, torch, sys; "
             "print(sys.version_info[:2], [m for m in ('megatron', 'stem_megatron', 'yaml', 'pytest', 'tiktoken') "
             "if u.find_spec(m)])")
    r = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert r.stdout.strip() == "(3, 12) []", r.stdout + r.stderr  # torch only: nothing of ours is there
    # 3. `make gpu-check` with no network: no interfaces (unshare), a socket guard in every Python
    #    process, and none of this machine's pip settings (its find-links and file:// indexes).
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(_NO_NETWORK)
    attempts = tmp_path / "network_attempts.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(PYTHONPATH=str(guard), NETWORK_ATTEMPTS_LOG=str(attempts), CUDA_VISIBLE_DEVICES="",
               PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", HOME=str(tmp_path))
    prefix, how = _no_network_prefix()
    work = tmp_path / "work"
    r = subprocess.run([*prefix, "make", "-s", "gpu-check", f"VENV={venv}",
                        f"ARGS=--wheelhouse {wh} --work-dir {work}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    print(f"offline by: {how}; socket guard; PIP_CONFIG_FILE={os.devnull} PIP_NO_INDEX=1\n{r.stdout}{r.stderr}")
    assert r.returncode == 0, r.stdout + r.stderr
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["gpu_check"] == "no_cuda" and last["python"].startswith("3.12"), last
    env_report, imports = last["environment"], last["imports"]
    assert env_report["source"] == "wheelhouse" and env_report["reused"] is False, env_report
    assert "megatron.core" in env_report["missing"] and env_report["still_missing"] == [], env_report
    assert imports["ok"] and imports["versions"]["megatron-core"] == "0.19.2", imports
    assert imports["versions"]["megatron.core from"].startswith(str(work)), imports
    assert last["data"] == {"sample": str(work / "sample"), "source": "wheelhouse"}, last["data"]
    assert all(s["rc"] == "not_run" and s["reason"].startswith("no CUDA device") for s in last["stages"].values())
    assert not attempts.exists(), attempts.read_text()


def test_a_failed_build_leaves_the_previous_wheelhouse_and_no_partial_folder(tmp_path, monkeypatch):
    out = tmp_path / "wheelhouse"
    out.mkdir()
    (out / "MANIFEST.json").write_text("previous")
    sample = tmp_path / "sample"
    sample.mkdir()
    (sample / "x.bin").write_bytes(b"x")
    (sample / "MANIFEST.json").write_text(json.dumps({"files": {"x.bin": hashlib.sha256(b"x").hexdigest()}}))

    def broken(partial, *args):
        (partial / "half.whl").write_bytes(b"half")
        raise wheelhouse.WheelhouseError("pip download of the locked wheels failed (pip exit 1): no network")

    monkeypatch.setattr(wheelhouse, "_fill", broken)
    with pytest.raises(wheelhouse.WheelhouseError, match="no network"):
        wheelhouse.build(out, sample)
    assert (out / "MANIFEST.json").read_text() == "previous" and not (tmp_path / "wheelhouse.partial").exists()
    (sample / "x.bin").write_bytes(b"y")  # a corpus that is not what its MANIFEST.json says is refused first
    with pytest.raises(wheelhouse.WheelhouseError, match="x.bin: missing or not the file"):
        wheelhouse.build(out, sample)
