"""World-wide agreement for checkpoint saves and loads: every rank ends a step with the same outcome.

Every checkpoint collective spans the world group: all ranks write, hash and verify a share. A
rank-local failure (a full disk, a damaged file) must not leave the other ranks waiting in the
next collective: `agree` runs a rank-local piece of work on every rank and raises the first
failing rank's error, as one line, on all of them.
"""

from __future__ import annotations

import torch.distributed as dist

from stem_megatron.stem.table_io import TableFormatError
from stem_megatron.training.checkpoint_format import CheckpointError


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _group():
    return dist.group.WORLD


def agree(fn, *args, **kwargs):
    """Run fn on every rank; if any rank raised, raise the first rank's error on all of them."""
    err, out = None, None
    try:
        out = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any rank's failure must reach every rank
        if isinstance(e, CheckpointError | TableFormatError):
            err = f"{e}"
        elif isinstance(e, OSError) and e.strerror:  # "PATH: No space left on device", not "[Errno 28] ..."
            err = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
        else:
            err = f"{type(e).__name__}: {e}"
    if dist.is_initialized():
        errs = [None] * world()
        dist.all_gather_object(errs, err, group=_group())
        err = next((e for e in errs if e), None)
    if err:
        raise CheckpointError(err.replace("\n", " "))
    return out


def all_gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj, group=_group())
    return out


def broadcast(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_group())
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=_group())
