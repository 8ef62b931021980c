"""The wheelhouse's files, offline: its MANIFEST.json, sha256 checks, and the sample-corpus tarball.

Standard library only: a bare GPU node (benchmarks/gpu_check.py) reads and checks a wheelhouse
before anything from it is installed. The builder is launch/wheelhouse.py.

MANIFEST.json lists every file of the wheelhouse with its sha256 and size (`files`), the wheels by
distribution (`wheels`), the sample tarball (`sample_data`) and what was left out for the CUDA
PyTorch image to provide (`provided_by_image`). SHA256SUMS holds the same digests for `sha256sum -c`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

MANIFEST = "MANIFEST.json"
SHA256SUMS = "SHA256SUMS"
SAMPLE_TARBALL = "sample-data.tar.gz"
SAMPLE_ROOT = "sample"  # the tarball's one top-level folder
FORMAT = 1
# Every timestamp inside the tarball and the project wheel: same inputs, same bytes.
SOURCE_DATE_EPOCH = 315532800  # 1980-01-01, the earliest a zip (wheel) can hold


class WheelhouseError(RuntimeError):
    """A wheelhouse or its sample corpus is missing, incomplete or altered; one-line message."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(wheelhouse: str | os.PathLike) -> dict:
    """The wheelhouse's MANIFEST.json, after checking every file it lists (sha256) and that nothing else is there."""
    root = Path(wheelhouse)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise WheelhouseError(f"{root}: no {MANIFEST} (not a wheelhouse made by `make wheelhouse`)") from None
    except (OSError, ValueError) as err:
        raise WheelhouseError(f"{root / MANIFEST}: unreadable ({err})") from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise WheelhouseError(f"{root / MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT}")
    listed = set(manifest["files"]) | {MANIFEST}
    extra = sorted(p.name for p in root.iterdir() if p.name not in listed)
    if extra:
        raise WheelhouseError(f"{root}: files not in {MANIFEST}: {', '.join(extra)}")
    for name, entry in sorted(manifest["files"].items()):
        path = root / name
        if not path.is_file():
            raise WheelhouseError(f"{root}: {name} is listed in {MANIFEST} but missing")
        got = sha256_file(path)
        if got != entry["sha256"]:
            raise WheelhouseError(f"{path}: sha256 {got}, {MANIFEST} says {entry['sha256']}; the wheelhouse was altered")
    return manifest


def manifest_digest(wheelhouse: str | os.PathLike) -> str:
    """sha256 of MANIFEST.json: names one wheelhouse (its files' digests are inside)."""
    return sha256_file(Path(wheelhouse) / MANIFEST)


def pack_sample(sample_dir: str | os.PathLike, out_path: str | os.PathLike) -> dict:
    """Write `sample_dir`'s files (flat, as `make sample-data` leaves them) as a reproducible .tar.gz.

    Sorted members, fixed timestamps and owners, gzip without a name or time: same files, same
    bytes. Returns {member name: sha256}.
    """
    src = Path(sample_dir)
    names = sorted(p.name for p in src.iterdir() if p.is_file())
    if "MANIFEST.json" not in names:
        raise WheelhouseError(f"{src}: no MANIFEST.json; build it with `make sample-data`")
    members = {}
    with open(out_path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in names:
            data = (src / name).read_bytes()
            info = tarfile.TarInfo(f"{SAMPLE_ROOT}/{name}")
            info.size, info.mtime, info.mode = len(data), SOURCE_DATE_EPOCH, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
            members[name] = hashlib.sha256(data).hexdigest()
    return members


def check_sample_dir(sample_dir: str | os.PathLike) -> dict:
    """The sample corpus's own MANIFEST.json, after checking every file it lists (as `make sample-data` wrote it)."""
    root = Path(sample_dir)
    try:
        manifest = json.loads((root / "MANIFEST.json").read_text())
    except (OSError, ValueError) as err:
        raise WheelhouseError(f"{root}: no readable MANIFEST.json ({err.__class__.__name__})") from None
    files = manifest.get("files") or {}
    if not files:
        raise WheelhouseError(f"{root}/MANIFEST.json lists no files")
    for name, digest in sorted(files.items()):
        path = root / name
        if not path.is_file() or sha256_file(path) != digest:
            raise WheelhouseError(f"{path}: missing or not the file its MANIFEST.json names")
    return manifest


def unpack_sample(wheelhouse: str | os.PathLike, manifest: dict, dest: str | os.PathLike) -> Path:
    """Unpack the wheelhouse's sample tarball to `dest` (reused when already there and intact).

    `manifest` is read_manifest's (so the tarball's sha256 was checked). Returns `dest`, whose
    files pass check_sample_dir. Unpacks into `dest`.partial first: never a half-written corpus.
    """
    dest = Path(dest)
    entry = manifest.get("sample_data")
    if not entry:
        raise WheelhouseError(f"{wheelhouse}: this wheelhouse carries no sample corpus")
    try:
        check_sample_dir(dest)
        return dest
    except WheelhouseError:
        pass
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tarfile.open(Path(wheelhouse) / entry["file"], "r:gz") as tar:
        for member in tar.getmembers():
            top, _, name = member.name.partition("/")
            if top != SAMPLE_ROOT or not member.isfile() or "/" in name or name in ("", ".", ".."):
                raise WheelhouseError(f"{entry['file']}: unexpected member {member.name!r}")
            (partial / name).write_bytes(tar.extractfile(member).read())
    check_sample_dir(partial)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(partial, dest)
    return dest


def write_manifest(wheelhouse: str | os.PathLike, manifest: dict) -> None:
    """Add `files` (sha256 and size of everything in the folder) and write MANIFEST.json and SHA256SUMS."""
    root = Path(wheelhouse)
    names = sorted(p.name for p in root.iterdir() if p.name not in (MANIFEST, SHA256SUMS))
    files = {n: {"sha256": sha256_file(root / n), "bytes": (root / n).stat().st_size} for n in names}
    (root / SHA256SUMS).write_text("".join(f"{files[n]['sha256']}  {n}\n" for n in names))
    files[SHA256SUMS] = {"sha256": sha256_file(root / SHA256SUMS), "bytes": (root / SHA256SUMS).stat().st_size}
    manifest = dict(manifest, format=FORMAT, files=files, total_bytes=sum(f["bytes"] for f in files.values()))
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
