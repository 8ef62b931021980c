"""`make wheelhouse`: one folder with everything an offline node that has CUDA PyTorch needs.

    python -m launch.wheelhouse build [--out wheelhouse] [--sample data/sample]   # make wheelhouse
    python -m launch.wheelhouse verify [--out wheelhouse]                         # offline check
    python -m launch.wheelhouse lock                                              # make wheelhouse-lock

Target: CPython 3.12 on manylinux x86_64 (glibc 2.28 or newer). The folder holds
- the wheels pinned in launch/wheelhouse.lock (name, version and sha256 of one file each):
  megatron-core 0.19.2 and the closure of the project's install_requires, plus pytest for
  `make gpu-check`'s test stage;
- the project's own wheel, built from this tree (fixed timestamps: same tree, same bytes);
- sample-data.tar.gz: data/sample as `make sample-data` leaves it (preprocessed .bin/.idx,
  the GPT-2 tokenizer, its MANIFEST.json);
- MANIFEST.json (every file's sha256 and size) and SHA256SUMS (`sha256sum -c SHA256SUMS`).

Left out: what a CUDA PyTorch image already has, torch, numpy and triton and everything torch
itself requires (nvidia-* CUDA libraries, sympy, networkx, jinja2, filelock, fsspec,
typing-extensions, setuptools...). The lock's `# provided-by-image:` line names them; `build`
and `verify` check that every requirement of every wheel (markers evaluated for the target) is
met by a wheel in the folder or by that list.

`lock` (maintainers, with network) resolves the set again with pip's resolver for the target
platform (`pip install --dry-run --report`; torch's metadata is read, never its wheel) and
rewrites the lock; `build` downloads only what the lock pins (`--require-hashes`), so two builds
from one commit give the same folder. Exit status: 0 ok, 1 a failed download, check or size.
"""

from __future__ import annotations

import argparse
import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from launch.wheelhouse_files import (
    MANIFEST,
    SAMPLE_TARBALL,
    SOURCE_DATE_EPOCH,
    WheelhouseError,
    check_sample_dir,
    pack_sample,
    read_manifest,
    sha256_file,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "launch" / "wheelhouse.lock"
MAX_BYTES = 60 * 2**20

TARGET_PYTHON = "3.12"
# pip matches --platform tags exactly: every manylinux x86_64 tag up to glibc 2.28 (RHEL 8, Ubuntu 20.04+).
TARGET_PLATFORMS = (
    [f"manylinux_2_{n}_x86_64" for n in range(28, 4, -1)]
    + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
)
TARGET_MARKERS = {
    "python_version": "3.12", "python_full_version": "3.12.0", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "os_name": "posix", "sys_platform": "linux",
    "platform_system": "Linux", "platform_machine": "x86_64", "extra": "",
}
# What the project adds to its install_requires on the node: the megatron-core line under test
# and pytest for gpu-check's `pytest -m gpu` stage.
PINS = ("megatron-core==0.19.2", "pytest>=8")
# A CUDA PyTorch image has these and everything they require (found in the resolution).
IMAGE_ROOTS = ("torch", "numpy", "triton")
IMAGE_PREFIXES = ("nvidia-", "cuda-")  # CUDA runtime wheels: torch's, whatever the version
PROJECT = "stem-megatron"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(filename: str) -> tuple[str, str]:
    """(canonical distribution name, version) of a wheel file name."""
    parts = filename[:-len(".whl")].split("-")
    if not filename.endswith(".whl") or len(parts) < 5:
        raise WheelhouseError(f"{filename}: not a wheel file name")
    return canonical(parts[0]), parts[1]


def target_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", TARGET_PYTHON, "--implementation", "cp",
            "--abi", "cp" + TARGET_PYTHON.replace(".", "")]
    for plat in TARGET_PLATFORMS:
        args += ["--platform", plat]
    return args


def _pip(args: list[str], what: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines()
                 if ln.strip() and not ln.lstrip().startswith("WARNING")]
        raise WheelhouseError(f"{what} failed (pip exit {proc.returncode}): {lines[-1] if lines else 'no output'}")


def _requirements():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip always carries a copy
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def wheel_requires(path: str | os.PathLike) -> list[str]:
    """Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(path) as zf:
        meta = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if len(meta) != 1:
            raise WheelhouseError(f"{path}: {len(meta)} .dist-info/METADATA files")
        msg = email.parser.Parser().parsestr(zf.read(meta[0]).decode("utf-8"))
    return msg.get_all("Requires-Dist") or []


def closure_problems(wheels: dict[str, tuple[str, list[str]]], provided: set[str]) -> list[str]:
    """Requirements (for the target, no extras) that neither a wheel in `wheels` nor `provided` meets.

    wheels: {canonical name: (version, Requires-Dist lines)}.
    """
    Requirement = _requirements()
    problems = []
    for name, (version, requires) in sorted(wheels.items()):
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(dict(TARGET_MARKERS)):
                continue
            dep = canonical(req.name)
            if dep in provided:
                continue
            if dep not in wheels:
                problems.append(f"{name} {version} needs {line}: not in the wheelhouse, not provided by the image")
            elif not req.specifier.contains(wheels[dep][0], prereleases=True):
                problems.append(f"{name} {version} needs {line}: the wheelhouse has {dep} {wheels[dep][0]}")
    return problems


def read_lock(path: Path = LOCK) -> tuple[list[str], set[str]]:
    """(requirement lines for pip -r, provided-by-image names) of the lock."""
    if not path.is_file():
        raise WheelhouseError(f"{path}: no lock; run `make wheelhouse-lock` on a machine with network")
    provided = set()
    for line in path.read_text().splitlines():
        if line.startswith("# provided-by-image:"):
            provided |= {canonical(n) for n in line.split(":", 1)[1].split()}
    if not provided:
        raise WheelhouseError(f"{path}: no '# provided-by-image:' line")
    return path.read_text().splitlines(), provided


def build_project_wheel(dest: Path) -> Path:
    """The project's wheel from a clean copy of its sources (no stale build/ leaks in), fixed timestamps."""
    with tempfile.TemporaryDirectory(prefix="stem-wheel-src-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("setup.py", "pyproject.toml"):
            shutil.copy2(REPO / name, src / name)
        for pkg in ("stem_megatron", "data_tools"):
            shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        out = Path(tmp) / "out"
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(SOURCE_DATE_EPOCH))
        _pip(["wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(src)],
             "building the project wheel", env)
        (wheel,) = out.glob("*.whl")
        return Path(shutil.copy2(wheel, dest / wheel.name))


def build(out: Path, sample: Path, lock: Path = LOCK, log=print) -> dict:
    """Write the wheelhouse to `out` (replaced whole at the end: never half-written). Returns its manifest."""
    lines, provided = read_lock(lock)
    check_sample_dir(sample)  # a corpus `make sample-data` finished, not a partial one
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        manifest = _fill(partial, lines, provided, sample, lock, log)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # the old folder, if any, stays as it was
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return manifest


def _fill(partial: Path, lines: list[str], provided: set[str], sample: Path, lock: Path, log) -> dict:
    """Download, build, pack and check into `partial`; returns the checked manifest."""
    log(f"wheelhouse: downloading the {sum(1 for ln in lines if '==' in ln)} wheels pinned in "
        f"{lock.relative_to(REPO) if lock.is_relative_to(REPO) else lock} (CPython {TARGET_PYTHON}, manylinux x86_64)")
    _pip(["download", "--no-deps", "--require-hashes", "--quiet", *target_args(), "-d", str(partial), "-r", str(lock)],
         "pip download of the locked wheels")
    project = build_project_wheel(partial)
    log(f"wheelhouse: built {project.name} from {REPO}")
    members = pack_sample(sample, partial / SAMPLE_TARBALL)
    log(f"wheelhouse: packed {sample} ({len(members)} files) as {SAMPLE_TARBALL}")
    wheels = {}
    for path in sorted(partial.glob("*.whl")):
        name, version = wheel_name(path.name)
        if name in wheels:
            raise WheelhouseError(f"two wheels of {name}: {wheels[name][0]} and {version}")
        wheels[name] = (version, wheel_requires(path))
    problems = closure_problems(wheels, provided)
    if problems:
        raise WheelhouseError(f"the wheelhouse is not closed: {problems[0]} ({len(problems)} problems)")
    manifest = {
        "target": {"python": TARGET_PYTHON, "implementation": "cp", "platforms": TARGET_PLATFORMS},
        "lock_sha256": sha256_file(lock),
        "provided_by_image": sorted(provided),
        "project": project.name,
        "wheels": {n: {"version": v, "file": next(p.name for p in partial.glob("*.whl") if wheel_name(p.name)[0] == n)}
                   for n, (v, _) in sorted(wheels.items())},
        "sample_data": {"file": SAMPLE_TARBALL, "members": members},
    }
    write_manifest(partial, manifest)
    manifest = read_manifest(partial)
    size = sum(f["bytes"] for f in manifest["files"].values()) + (partial / MANIFEST).stat().st_size
    if size > MAX_BYTES:
        raise WheelhouseError(f"the wheelhouse is {size / 2**20:.1f} MiB, over its {MAX_BYTES / 2**20:.0f} MiB limit")
    return manifest


def print_contents(out: Path, manifest: dict, log=print) -> None:
    files = manifest["files"]
    for name in sorted(files, key=lambda n: -files[n]["bytes"]):
        log(f"  {files[name]['bytes'] / 2**20:7.2f} MiB  {name}")
    size = sum(f["bytes"] for f in files.values()) + (out / MANIFEST).stat().st_size
    log(f"wheelhouse: {out}: {len(manifest['wheels'])} wheels + {SAMPLE_TARBALL}, {size / 2**20:.1f} MiB "
        f"({size} bytes); left out (the CUDA PyTorch image has them): {', '.join(manifest['provided_by_image'])}")


def verify(out: Path, log=print) -> dict:
    """Offline: every file's sha256, nothing extra, and every requirement met (by a wheel or the image)."""
    manifest = read_manifest(out)
    wheels = {}
    for name, entry in manifest["wheels"].items():
        wheels[name] = (entry["version"], wheel_requires(out / entry["file"]))
    problems = closure_problems(wheels, set(manifest["provided_by_image"]))
    if problems:
        raise WheelhouseError(f"{out}: not closed: {problems[0]} ({len(problems)} problems)")
    log(f"wheelhouse: {out} verified offline: {len(manifest['files'])} files match MANIFEST.json, "
        f"{len(wheels)} wheels closed over the image's {len(manifest['provided_by_image'])} packages")
    return manifest


def lock(path: Path = LOCK, log=print) -> None:
    """Resolve the set again for the target (network) and rewrite the lock."""
    with tempfile.TemporaryDirectory(prefix="stem-wheelhouse-lock-") as tmp:
        tmp = Path(tmp)
        project = build_project_wheel(tmp)
        report = tmp / "report.json"
        log(f"wheelhouse-lock: resolving {project.name} + {', '.join(PINS)} for CPython {TARGET_PYTHON} "
            "manylinux x86_64 (pip reads torch's metadata, not its wheel)")
        _pip(["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), *target_args(),
              str(project), *PINS], "resolving the wheelhouse")
        Requirement = _requirements()
        resolved = {}  # canonical name -> (version, [dependency names for the target])
        for item in json.loads(report.read_text())["install"]:
            meta = item["metadata"]
            deps = []
            for line in meta.get("requires_dist") or []:
                req = Requirement(line)
                if req.marker is None or req.marker.evaluate(dict(TARGET_MARKERS)):
                    deps.append(canonical(req.name))
            resolved[canonical(meta["name"])] = (meta["version"], deps)
        provided, todo = set(), [n for n in IMAGE_ROOTS if n in resolved]
        while todo:
            name = todo.pop()
            if name not in provided:
                provided.add(name)
                todo += [d for d in resolved.get(name, ("", []))[1] if d in resolved]
        provided |= {n for n in resolved if n.startswith(IMAGE_PREFIXES)}
        provided |= set(IMAGE_ROOTS)
        keep = sorted(n for n in resolved if n not in provided and n != PROJECT)
        dl = tmp / "dl"
        _pip(["download", "--no-deps", "--quiet", *target_args(), "-d", str(dl),
              *[f"{n}=={resolved[n][0]}" for n in keep]], "pip download for the lock")
        files = {wheel_name(p.name)[0]: p for p in dl.glob("*.whl")}
        missing = [n for n in keep if n not in files]
        if missing:
            raise WheelhouseError(f"no wheel downloaded for {', '.join(missing)}")
        text = [
            "# launch/wheelhouse.lock: the wheels `make wheelhouse` downloads for CPython 3.12 on manylinux x86_64,",
            "# one file each, pinned by sha256. Rewritten by `make wheelhouse-lock` (python -m launch.wheelhouse lock):",
            f"# pip's resolution of the project's install_requires + {' + '.join(PINS)} for that target.",
            "# Left out: what a CUDA PyTorch image has (torch, numpy, triton and all that torch requires):",
            "# provided-by-image: " + " ".join(sorted(provided)),
        ]
        for n in keep:
            text += [f"# {files[n].name}", f"{n}=={resolved[n][0]} \\", f"    --hash=sha256:{sha256_file(files[n])}"]
        path.write_text("\n".join(text) + "\n")
    log(f"wheelhouse-lock: wrote {path}: {len(keep)} wheels; left out {len(provided)} the image provides")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="wheelhouse", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=("build", "verify", "lock"))
    ap.add_argument("--out", type=Path, default=REPO / "wheelhouse", help="the wheelhouse folder (default ./wheelhouse)")
    ap.add_argument("--sample", type=Path, default=REPO / "data" / "sample",
                    help="the sample corpus to carry (default data/sample, from `make sample-data`)")
    ap.add_argument("--lock", type=Path, default=LOCK)
    args = ap.parse_args(argv)
    out = args.out.resolve()
    try:
        if args.command == "lock":
            lock(args.lock)
        elif args.command == "verify":
            verify(out)
        else:
            print_contents(out, build(out, args.sample.resolve(), args.lock.resolve()))
            verify(out)
    except WheelhouseError as err:
        print(f"wheelhouse: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("wheelhouse: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
