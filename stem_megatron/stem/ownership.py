"""Which shard rank holds which table row: the one home of the row-ownership arithmetic.

The rows of a [vocab, ...] STEM table are dealt round-robin over a shard group of G ranks:

    owner(id) = id % G        local(id) = id // G        global row = local * G + shard rank

The vocabulary is padded up to a multiple of G so that every shard rank holds the same number of
rows (`rows_local`); global rows >= vocab_size are padding (never looked up, never saved). A
rank's real rows are a prefix of its local rows, since global ids increase with the local index.
The engine (storage, exchange), table files, checkpoints, `stem-reshard` and the reference
converter all go through this module.

Legend: V vocabulary rows, R rows_local of one shard rank, N ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def owner(ids_N: torch.Tensor, shard_size: int) -> torch.Tensor:
    """Shard rank owning each id."""
    return ids_N % shard_size


def local_row(ids_N: torch.Tensor, shard_size: int) -> torch.Tensor:
    """Each id's row index on its owner."""
    return ids_N // shard_size


@dataclass(frozen=True)
class RowOwnership:
    """Round-robin row ownership of a `vocab_size`-row table over `shard_size` ranks."""

    vocab_size: int
    shard_size: int

    def __post_init__(self):
        if self.vocab_size <= 0 or self.shard_size <= 0:
            raise ValueError(f"vocab_size {self.vocab_size} and shard_size {self.shard_size} must be positive")

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to a multiple of shard_size."""
        return -(-self.vocab_size // self.shard_size) * self.shard_size

    @property
    def rows_local(self) -> int:
        """Rows every shard rank holds, padding included."""
        return self.padded_vocab_size // self.shard_size

    def owner(self, ids_N: torch.Tensor) -> torch.Tensor:
        return owner(ids_N, self.shard_size)

    def local_row(self, ids_N: torch.Tensor) -> torch.Tensor:
        return local_row(ids_N, self.shard_size)

    def global_rows(self, shard_rank: int, device=None) -> torch.Tensor:
        """int64 [R]: the global id of each local row of `shard_rank` (ids >= vocab_size are padding)."""
        self._check_rank(shard_rank)
        return torch.arange(self.rows_local, device=device) * self.shard_size + shard_rank

    def num_owned(self, shard_rank: int) -> int:
        """Real (non-padding) rows of `shard_rank`: the first num_owned of its local rows."""
        self._check_rank(shard_rank)
        return len(range(shard_rank, self.vocab_size, self.shard_size))

    def owned_ids(self, shard_rank: int, device=None) -> torch.Tensor:
        """int64 [num_owned]: the global ids `shard_rank` holds, padding dropped, increasing."""
        return self.global_rows(shard_rank, device)[: self.num_owned(shard_rank)]

    def take_owned(self, full_V: torch.Tensor, shard_rank: int) -> torch.Tensor:
        """The rows of a full [V, ...] tensor that `shard_rank` holds, in local order: [R, ...], padding zero."""
        if full_V.shape[0] != self.vocab_size:
            raise ValueError(f"expected {self.vocab_size} rows, got {full_V.shape[0]}")
        out_R = full_V.new_zeros(self.rows_local, *full_V.shape[1:])
        n = self.num_owned(shard_rank)
        out_R[:n] = full_V[self.owned_ids(shard_rank, full_V.device)]
        return out_R

    def _check_rank(self, shard_rank: int) -> None:
        if not 0 <= shard_rank < self.shard_size:
            raise ValueError(f"shard rank {shard_rank} is outside [0, {self.shard_size})")
