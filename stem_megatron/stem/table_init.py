"""Layout-independent initialisation of STEM tables.

Element (layer, row, col) of a table is a pure function of (seed, global layer id, global row,
global column): a counter-based hash (SplitMix64) gives two 32-bit uniforms and a Box-Muller
transform turns them into one standard normal. A rank therefore generates only its own rows and
its own tensor-parallel columns, never a full V x F table, and the full table is bitwise the same
for every shard-group size G and TP size (and on CPU and GPU up to the last ulp of log/cos).

Legend: R rows (global ids of the rows being generated), C columns, L layers.
"""

from __future__ import annotations

import math

import torch

_M64 = (1 << 64) - 1


def _s64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    c &= _M64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _s64(0x9E3779B97F4A7C15)
_MUL1 = _s64(0xBF58476D1CE4E5B9)
_MUL2 = _s64(0x94D049BB133111EB)
_LOW32 = (1 << 32) - 1


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (multiplication wraps mod 2**64)."""
    x = (x ^ _shr(x, 30)) * _MUL1
    x = (x ^ _shr(x, 27)) * _MUL2
    return x ^ _shr(x, 31)


def _scalar_key(*parts: int) -> int:
    """Fold integers into one 64-bit key with the same mixer, in Python integers."""
    key = 0
    for p in parts:
        z = (key + (p & _M64) * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) & _M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        key = z ^ (z >> 31)
    return _s64(key)


def standard_normal_rows(
    seed: int, layer_id: int, rows_R: torch.Tensor, col_start: int, col_end: int
) -> torch.Tensor:
    """fp32 [R, col_end - col_start] standard normals for global rows `rows_R` of layer `layer_id`."""
    device = rows_R.device
    base = _scalar_key(seed, layer_id)
    row_key_R = _mix64(rows_R.to(torch.int64) * _GOLDEN + base)
    cols_C = torch.arange(col_start, col_end, dtype=torch.int64, device=device)
    bits_RC = _mix64(row_key_R[:, None] + (cols_C[None, :] + 1) * _GOLDEN)
    hi_RC = _shr(bits_RC, 32).to(torch.float64)
    lo_RC = (bits_RC & _LOW32).to(torch.float64)
    u1_RC = (hi_RC + 0.5) * 2.0**-32  # (0, 1): log is finite
    u2_RC = lo_RC * 2.0**-32
    z_RC = torch.sqrt(-2.0 * torch.log(u1_RC)) * torch.cos((2.0 * math.pi) * u2_RC)
    return z_RC.to(torch.float32)


def default_init_std(vocab_size: int, ffn_hidden_size: int) -> float:
    """Xavier-normal over the (vocab, ffn) table, as the STEM paper's code: sqrt(2 / (V + F))."""
    return math.sqrt(2.0 / (vocab_size + ffn_hidden_size))


@torch.no_grad()
def fill_table_rows(
    out_RLC: torch.Tensor,
    rows_R: torch.Tensor,
    layer_ids: list[int],
    col_start: int,
    std: float,
    seed: int,
    vocab_size: int,
    chunk_rows: int = 4096,
) -> torch.Tensor:
    """Write std * N(0,1) into `out_RLC` for global rows `rows_R`; rows >= vocab_size (padding) are 0."""
    n_rows, n_layers, n_cols = out_RLC.shape
    for start in range(0, n_rows, chunk_rows):
        rows_r = rows_R[start : start + chunk_rows]
        for slot, layer_id in enumerate(layer_ids):
            z_rC = standard_normal_rows(seed, layer_id, rows_r, col_start, col_start + n_cols)
            z_rC.mul_(std)
            z_rC[rows_r >= vocab_size] = 0.0
            out_RLC[start : start + chunk_rows, slot].copy_(z_rC)
    return out_RLC


def reference_full_table(
    vocab_size: int, layer_ids: list[int], ffn_hidden_size: int, std: float, seed: int
) -> torch.Tensor:
    """fp32 [V, L, F] full table (tests and tiny tools only: it materialises V x F)."""
    rows_R = torch.arange(vocab_size, dtype=torch.int64)
    out = torch.empty(vocab_size, len(layer_ids), ffn_hidden_size, dtype=torch.float32)
    return fill_table_rows(out, rows_R, layer_ids, 0, std, seed, vocab_size)
