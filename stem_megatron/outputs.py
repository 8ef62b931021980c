"""Every output a command writes: checked before any work, written under a temporary name, published by rename.

    prepare_output(args.output, inputs=[args.model], kind="dir")     # up front: UserError, one line
    ...the long work...
    with atomic_dir(args.output) as tmp:                              # a directory, whole or not at all
        write files into tmp

Kinds of output (`kind`), by where their temporary lives and what is renamed:
- "file": one file (`tokenizer.json`, a dataset's `.bin`), written as `.tmp-NAME` beside it and
  renamed over it (`atomic_file`);
- "dir": a directory made whole (an export, a niah report), written as `.tmp-NAME` beside it and
  renamed to it (`atomic_dir`); it must not exist or be empty;
- "root": a directory written into (a checkpoint save directory: `.tmp-step_N` inside it, renamed
  to `step_N` by training/checkpoint_format.publish; an analysis directory). Names starting with
  one of `leftovers` (what a killed run of the same writer leaves, e.g. checkpoint_format's
  `.tmp-`) do not count as contents.

`prepare_output` refuses, with one line and the caller's exit code (default 2, a bad argument):
the input itself or a path inside an input directory (symlinks resolved, hard links too), a
directory where a file goes and the reverse, a path under a regular file, an existing output
without `overwrite` (None: the command has no --overwrite flag), and a place it cannot write in.
Writability is tested by creating and removing a file there, never by permission bits: root
ignores those, while a read-only mount or an immutable directory stops root too.

`staged(tmp)` is the one temporary: a stale `tmp` (a run killed with SIGKILL cannot clean up) is
removed first, the directories it needs are created, and on any failure, Ctrl-C included, it and
the directories it created are removed. Two runs writing the same output at once are not
supported (the second removes the first's temporary as stale).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from stem_megatron.errors import EXIT_INPUT, UserError

TMP_PREFIX = ".tmp-"
KINDS = ("file", "dir", "root")


def temporary_path(output: str) -> str:
    """Where `output` ("file" or "dir") is written before its rename: `.tmp-NAME` beside it."""
    parent, name = os.path.split(os.path.abspath(output))
    return os.path.join(parent, TMP_PREFIX + name)


def prepare_output(output: str | None, *, inputs: Iterable[str | None] = (), kind: str = "dir",
                   overwrite: bool | None = None, flag: str = "--output", code: int = EXIT_INPUT,
                   leftovers: tuple[str, ...] = ()) -> None:
    """Raise UserError(code) unless `output` can be written without harm (see the module docstring).

    `output` None (an optional output not asked for) is nothing to check. Checks only: creates
    nothing but a probe file it removes at once.
    """
    if output is None:
        return
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
    if not output:
        raise UserError(f"{flag}: empty path", code)
    _refuse_inputs(output, [p for p in inputs if p], flag, code)
    out = os.path.abspath(output)
    if os.path.lexists(out):
        if kind == "file":
            if os.path.isdir(out):
                raise UserError(f"{flag} {output} is a directory; give the path of the file to write", code)
            if not overwrite:
                raise UserError(f"{flag} {output} exists" + _replace_hint(overwrite), code)
        else:
            if not os.path.isdir(out):
                raise UserError(f"{flag} {output} is a file; give a directory", code)
            contents = [n for n in os.listdir(out) if not (leftovers and n.startswith(leftovers))]
            if contents and not overwrite:
                raise UserError(f"{flag} {output} exists and is not empty" + _replace_hint(overwrite), code)
    probe = os.path.dirname(out)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{flag} {output}: {probe} is a file, not a directory", code)
    # where the temporary is created: beside a file or a whole directory, inside a root
    where = out if kind == "root" and os.path.isdir(out) else probe
    _probe_writable(where, output, flag, code)


def _replace_hint(overwrite: bool | None) -> str:
    return "; give a new path" if overwrite is None else "; give a new path, or --overwrite to replace it"


def _refuse_inputs(output: str, inputs: list[str], flag: str, code: int) -> None:
    out = os.path.realpath(output)
    for given in inputs:
        src = os.path.realpath(given)
        same = out == src or (os.path.exists(out) and os.path.exists(src) and os.path.samefile(out, src))
        if same:
            raise UserError(f"{flag} {output} is the input {given}; write to another path", code)
        if out.startswith(src.rstrip(os.sep) + os.sep):
            raise UserError(f"{flag} {output} is inside the input {given}; write to another path", code)


def _probe_writable(directory: str, output: str, flag: str, code: int) -> None:
    try:
        fd, path = tempfile.mkstemp(prefix=TMP_PREFIX + "probe-", dir=directory)
        os.close(fd)
        os.remove(path)
    except OSError as e:
        raise UserError(f"{flag} {output}: cannot write in {directory} ({e.strerror or e})", code) from None


@contextmanager
def staged(tmp: str, *, directory: bool = True) -> Iterator[str]:
    """Yield `tmp` fresh: a directory (or, `directory=False`, a path for one file) that the caller
    fills and publishes by a rename inside the block. On any failure, Ctrl-C included, `tmp` and
    the parent directories this created are removed; after a rename there is nothing to remove."""
    _remove(tmp)  # a killed run's
    parent = os.path.dirname(os.path.abspath(tmp))
    created = []
    while not os.path.lexists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    try:
        if directory:
            os.makedirs(tmp)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(tmp)), exist_ok=True)
        yield tmp
    except BaseException:
        _remove(tmp)
        for d in created:  # deepest first; one holding anything else stays
            try:
                os.rmdir(d)
            except OSError:
                break
        raise


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextmanager
def atomic_dir(output: str) -> Iterator[str]:
    """Yield a fresh temporary directory beside `output`; rename it to `output` when the block ends.

    `output` must not exist or be an empty directory (`prepare_output(kind="dir")` checks it
    before the work). On any failure `output` is untouched and the temporary is removed.
    """
    with staged(temporary_path(output)) as tmp:
        yield tmp
        if os.path.isdir(output):
            os.rmdir(output)  # empty: a non-empty one fails here rather than being replaced
        os.rename(tmp, output)


@contextmanager
def atomic_file(output: str) -> Iterator[str]:
    """Yield a temporary path beside `output` to write one file to; it replaces `output` when the
    block ends (readers see the old file or the new one, never a part)."""
    with staged(temporary_path(output), directory=False) as tmp:
        yield tmp
        os.replace(tmp, output)
