"""Every rank's RNG states in a checkpoint (python, numpy, torch, megatron's CUDA-RNG tracker, CUDA).

One file per rank, `rng/rankNNNNN.pt`. They are restored only at the layout they were saved at
(checkpoint_meta.RNG_LAYOUT_KEYS): at another layout the per-rank streams cannot continue.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from stem_megatron.training import checkpoint_format as fmt


def rng_path(ckpt_dir: str, rank: int) -> str:
    return os.path.join(ckpt_dir, fmt.RNG, f"rank{rank:05d}.pt")


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_rng(ckpt_dir: str, rank: int) -> None:
    os.makedirs(os.path.join(ckpt_dir, fmt.RNG), exist_ok=True)
    with open(rng_path(ckpt_dir, rank), "wb") as f:
        torch.save(rng_state(), f)
        f.flush()
        os.fsync(f.fileno())


def read_rng(ckpt_dir: str, rank: int) -> dict:
    return torch.load(rng_path(ckpt_dir, rank), weights_only=True)
