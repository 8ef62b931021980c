"""The on-disk layout of STEM checkpoints: names, the manifest, the `latest` pointer, publishing.

    {save}/latest                  "step_00001200\\n", replaced atomically, written after the rename
    {save}/step_00001200/          one complete checkpoint (never modified after its rename)
        manifest.json              size + sha256 of every other file; written last, before the rename
        stem_checkpoint.json       step, data position, layouts, table index, versions
        config.yaml                the resolved experiment config
        metadata.json common.pt .metadata __*_*.distcp    megatron dist_checkpointing (torch_dist;
                                   megatron-core 0.19 writes no common.pt)
        tables/rank*.safetensors   STEM tables + RowSparseAdamW state (stem/table_io.py)
        rng/rank*.pt               RNG states per rank
        tokenizer/                 a copy of data.tokenizer, when the config names one
    {save}/.tmp-step_00001300/     a save in progress (deleted by the next save)
    {save}/.replaced-step_00001200/  a checkpoint being replaced by a new save of the same step

A checkpoint is written into `.tmp-<name>`, every file and directory is fsynced, its manifest is
written, the directory is renamed to `<name>` (atomic on POSIX file systems), then `latest` is
replaced (`seal_and_publish`; the trainer and `stem-reshard` both publish through it). A run
killed at any point leaves `latest` naming a complete, verified checkpoint; `latest` is the
authority for "the newest checkpoint" (without one, the highest step directory is, see `resolve`).
A save of a step that already has a directory (a run that went back to an earlier checkpoint)
moves the old one aside to `.replaced-<name>` and deletes it only once the new one is in place:
until then `latest` resolves to it. Loading checks every manifest entry (size, then sha256) before
reading anything; a mismatch is a `CheckpointError` naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

from stem_megatron import outputs

STEP_PREFIX = "step_"
LATEST = "latest"
MANIFEST = "manifest.json"
META = "stem_checkpoint.json"
CONFIG = "config.yaml"
TABLES = "tables"
RNG = "rng"
TOKENIZER = "tokenizer"
TMP_PREFIX = outputs.TMP_PREFIX  # the temporary-name rule every output shares
TRASH_PREFIX = ".deleting-"
REPLACED_PREFIX = ".replaced-"
STALE_PREFIXES = (TMP_PREFIX, TRASH_PREFIX, REPLACED_PREFIX)  # what interrupted saves leave in a save directory
FORMAT = "stem-checkpoint"
VERSION = 1
_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d+)$")
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible; the message is one line."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def step_of(name: str) -> int | None:
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file, fsync and rename (readers see old or new)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def list_files(ckpt_dir: str) -> list[str]:
    """Relative paths of every file under `ckpt_dir` except the manifest, sorted."""
    out = []
    for base, dirs, files in os.walk(ckpt_dir):
        dirs.sort()
        for name in files:
            rel = os.path.relpath(os.path.join(base, name), ckpt_dir)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def sha256_file(path: str, sync: bool = False) -> str:
    """Hex sha256 of a file; `sync` also flushes it to stable storage (before a publish)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def describe_files(ckpt_dir: str, names: list[str]) -> dict[str, dict]:
    """{name: {"size", "sha256"}} for the given relative paths, each file fsynced."""
    return {n: {"size": os.path.getsize(os.path.join(ckpt_dir, n)),
                "sha256": sha256_file(os.path.join(ckpt_dir, n), sync=True)} for n in names}


def fsync_dirs(root: str) -> None:
    """fsync every directory under `root` (their entries), deepest first."""
    for base, _, _ in sorted(os.walk(root), key=lambda w: -w[0].count(os.sep)):
        fsync_dir(base)


def split_by_size(sizes: dict[str, int], parts: int) -> list[list[str]]:
    """Greedy balanced split of files over `parts` workers (largest first to the least loaded)."""
    load = [0] * parts
    out: list[list[str]] = [[] for _ in range(parts)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        i = load.index(min(load))
        out[i].append(name)
        load[i] += sizes[name]
    return out


def write_manifest(ckpt_dir: str, step: int, files: dict[str, dict]) -> None:
    write_json_atomic(os.path.join(ckpt_dir, MANIFEST), {"format": FORMAT, "version": VERSION, "step": step, "files": files})


def read_manifest(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"checkpoint {ckpt_dir}: no {MANIFEST} (an interrupted save, or not a STEM checkpoint)"
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
        for name, entry in files.items():
            if not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
                raise ValueError(f"bad entry for {name}")
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {MANIFEST} is unreadable ({e})") from None
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {ckpt_dir}: format version {manifest.get('version')}, this code reads {VERSION}")
    return manifest


def check_file(ckpt_dir: str, name: str, entry: dict) -> str | None:
    """None if the file matches its manifest entry, else a one-line description of the problem."""
    path = os.path.join(ckpt_dir, name)
    if not os.path.isfile(path):
        return f"checkpoint {ckpt_dir}: {name} is missing"
    size = os.path.getsize(path)
    if size != entry["size"]:
        what = "truncated" if size < entry["size"] else "longer than written"
        return f"checkpoint {ckpt_dir}: {name} is {size} bytes, the manifest says {entry['size']} ({what})"
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        return (f"checkpoint {ckpt_dir}: {name} has sha256 {digest[:16]}..., the manifest says "
                f"{entry['sha256'][:16]}... (corrupt)")
    return None


def verify(ckpt_dir: str, names: list[str] | None = None) -> dict:
    """Check the manifest and the listed files (all when None); raise CheckpointError at the first bad one."""
    manifest = read_manifest(ckpt_dir)
    files = manifest["files"]
    for name in sorted(files) if names is None else names:
        problem = check_file(ckpt_dir, name, files[name])
        if problem:
            raise CheckpointError(problem)
    return manifest


def read_latest(root: str) -> str | None:
    """The checkpoint directory `root/latest` names, or None when there is no pointer.

    While a save of the same step is replacing that checkpoint, it is `.replaced-<name>` (a save
    killed between its two renames leaves it there; the next save's `clean_stale` moves it back).
    """
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    if step_of(name) is None:
        raise CheckpointError(f"{path}: names {name!r}, not a {STEP_PREFIX}N directory")
    for target in (os.path.join(root, name), os.path.join(root, REPLACED_PREFIX + name)):
        if os.path.isdir(target):
            return target
    raise CheckpointError(f"{path}: names {name}, which does not exist")


def resolve(path: str) -> str | None:
    """A checkpoint directory from a save root or a checkpoint directory itself.

    A save root resolves through `latest`; without a pointer (a run killed between its first
    rename and the pointer update, or a pointer deleted by hand) to its highest step directory:
    step directories only ever appear complete, by the rename. None when there is no checkpoint.
    """
    if not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, MANIFEST)) or os.path.isfile(os.path.join(path, META)):
        return path
    latest = read_latest(path)
    if latest is not None:
        return latest
    steps = sorted((s, n) for n in os.listdir(path) if (s := step_of(n)) is not None)
    return os.path.join(path, steps[-1][1]) if steps else None


def remove_tree(path: str) -> None:
    """Delete a directory so that a crash midway never leaves something that looks like a checkpoint."""
    if not os.path.exists(path):
        return
    parent, name = os.path.split(os.path.abspath(path))
    if not name.startswith((TMP_PREFIX, TRASH_PREFIX, REPLACED_PREFIX)):
        trash = os.path.join(parent, TRASH_PREFIX + name)
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(path, trash)
        path = trash
    shutil.rmtree(path)


def clean_stale(root: str) -> list[str]:
    """Remove leftovers of interrupted saves and deletions; returns their names.

    A `.replaced-<name>` whose replacement never arrived (the save died between its renames) is
    moved back to `<name>`, not removed: `latest` may name it.
    """
    stale = []
    for name in sorted(os.listdir(root)):
        if name.startswith(REPLACED_PREFIX):
            original = os.path.join(root, name[len(REPLACED_PREFIX):])
            if not os.path.exists(original):
                os.rename(os.path.join(root, name), original)
                fsync_dir(root)
                continue
        elif not name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        stale.append(name)
    return stale


def publish(tmp_dir: str, root: str, name: str) -> str:
    """Rename a complete `tmp_dir` to `root/name` and point `latest` at it; returns the final path.

    An existing `root/name` (a checkpoint of this step from before a rewind, which `latest` may
    name) is moved aside first and deleted only after the new one is in place and named.
    """
    final = os.path.join(root, name)
    replaced = None
    if os.path.exists(final):
        replaced = os.path.join(root, REPLACED_PREFIX + name)
        remove_tree(replaced)  # a leftover of an earlier replacement of this step
        os.rename(final, replaced)
    os.rename(tmp_dir, final)
    fsync_dir(root)
    write_text_atomic(os.path.join(root, LATEST), name + "\n")
    if replaced is not None:
        remove_tree(replaced)
    return final


def seal_and_publish(tmp_dir: str, root: str, name: str, step: int, files: dict[str, dict]) -> str:
    """Publish a fully written `tmp_dir`: fsync its directories, write its manifest, `publish`.

    `files` is the manifest table of every file (`describe_files`, which fsyncs each file). The
    one path by which the trainer and `stem-reshard` make a checkpoint visible.
    """
    fsync_dirs(tmp_dir)
    write_manifest(tmp_dir, step, files)
    return publish(tmp_dir, root, name)


def prune(root: str, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` checkpoints (never the one `latest` names)."""
    latest = read_latest(root)
    keep = os.path.basename(latest) if latest else None
    steps = sorted((s, n) for n in os.listdir(root) if (s := step_of(n)) is not None)
    doomed = [n for _, n in steps[:-keep_last] if n != keep] if len(steps) > keep_last else []
    for name in doomed:
        remove_tree(os.path.join(root, name))
    return doomed
