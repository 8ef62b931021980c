"""A directory that appears complete or not at all: written as `.tmp-NAME` beside it, renamed when done.

    with atomic_dir(output) as tmp:
        write files into tmp

Used by stem-export / stem-edit --persist (export.write_export) and stem-eval niah
(niah.write_outputs). Checkpoints have their own publish step with fsyncs and a manifest
(training/checkpoint_format.py).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def atomic_dir(output: str) -> Iterator[str]:
    """Yield a fresh temporary directory beside `output`; rename it to `output` when the block ends.

    `output` must not exist or be an empty directory (the caller checks it first, to fail before any
    work). On any failure, Ctrl-C included, the temporary directory is removed and `output` is untouched.
    """
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(os.path.abspath(output))}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run that was killed (SIGKILL) mid-write
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(output):
            os.rmdir(output)  # empty: a non-empty one fails here rather than being replaced
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
