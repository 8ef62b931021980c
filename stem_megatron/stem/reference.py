"""Single-process reference for the sharded engine: a full replicated table, plain autograd, and a
dense-with-masks formulation of the row-sparse AdamW. Tests (ours and the full-model ones) compare
the engine against it; it shares no exchange, reduction or optimizer code with the engine.

Legend: V vocab, L layers, F columns (full ffn or a TP slice), N tokens.
"""

from __future__ import annotations

import torch

from stem_megatron.stem.table_init import default_init_std, reference_full_table


class ReferenceTable:
    """The full [V, L, F] fp32 table as an autograd leaf, with lazy per-row AdamW state."""

    def __init__(self, vocab_size, layer_ids, ffn_hidden_size, init_std=0.02, seed=1234):
        std = default_init_std(vocab_size, ffn_hidden_size) if init_std is None else init_std
        self.table_VLF = reference_full_table(vocab_size, list(layer_ids), ffn_hidden_size, std, seed)
        self.table_VLF.requires_grad_(True)
        self.exp_avg = torch.zeros_like(self.table_VLF)
        self.exp_avg_sq = torch.zeros_like(self.table_VLF)
        self.step_V = torch.zeros(vocab_size, dtype=torch.int64)

    def rows(self, ids: torch.Tensor, col_start: int = 0, col_end: int | None = None) -> torch.Tensor:
        """[*ids.shape, L, cols] rows of `ids` by plain indexing."""
        return self.table_VLF[ids][..., col_start:col_end]

    @torch.no_grad()
    def adamw_step(self, lr, touched_V, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, grad_scale=1.0):
        """Lazy AdamW on rows where `touched_V` (bool [V]); untouched rows and their state unchanged."""
        b1, b2 = betas
        w, g = self.table_VLF, self.table_VLF.grad * grad_scale
        mask = touched_V.view(-1, 1, 1)
        self.step_V += touched_V.long()
        steps = self.step_V.clamp(min=1).double()
        bc1 = (1 - b1**steps).view(-1, 1, 1)
        bc2 = (1 - b2**steps).view(-1, 1, 1)
        m = torch.where(mask, b1 * self.exp_avg + (1 - b1) * g, self.exp_avg)
        v = torch.where(mask, b2 * self.exp_avg_sq + (1 - b2) * g * g, self.exp_avg_sq)
        decayed = w * (1 - lr * weight_decay)
        update = (lr / bc1) * m.double() / ((v.double() / bc2).sqrt() + eps)
        w.copy_(torch.where(mask, decayed - update.float(), w))
        self.exp_avg.copy_(m)
        self.exp_avg_sq.copy_(v)
        w.grad = None


def toy_micro_batches(step: int, dp_rank: int, vocab_size: int) -> list[torch.Tensor]:
    """Three micro-batches of ids for (step, data-parallel rank): shapes and ids differ across
    ranks, frequent ids repeat, the last id of the vocabulary always occurs, and dp rank 1 gets
    an empty micro-batch. Every rank can rebuild every other rank's batches (for references)."""
    gen = torch.Generator().manual_seed(7919 * step + 104729 * dp_rank + 1)
    out = []
    for mb, shape in enumerate([(2, 5 + dp_rank), (3 + dp_rank,), (1, 2, 4)]):
        if mb == 1 and dp_rank == 1:
            shape = (0,)
        n = int(torch.Size(shape).numel())
        common = torch.randint(0, 6, (n,), generator=gen)
        rare = torch.randint(0, vocab_size, (n,), generator=gen)
        ids = torch.where(torch.rand(n, generator=gen) < 0.5, common, rare)
        if n:
            ids[-1] = vocab_size - 1
        out.append(ids.view(shape))
    return out


def toy_weights(n_slots: int, ffn_hidden_size: int) -> torch.Tensor:
    """Fixed [L, F] vectors of the toy loss."""
    return torch.randn(n_slots, ffn_hidden_size, generator=torch.Generator().manual_seed(99))


def toy_loss(slot_rows, w_LF: torch.Tensor) -> torch.Tensor:
    """sum over slots s and tokens of (rows_s . w_s)^2; `slot_rows(s)` gives [..., F] rows of slot s."""
    return sum(((slot_rows(s) * w_LF[s]).sum(-1) ** 2).sum() for s in range(w_LF.shape[0]))
