"""Deterministic, layout-independent micro-batches for one data-parallel rank.

Step k's global batch is the dataset samples [k * G, (k + 1) * G) (G = global batch size, wrapping
over the dataset), so any (TP, PP, DP) layout and any micro-batch split sees the same data per
step, and the data position of a resumed run is just `step * G`. Micro-batch j of DP rank r holds
samples base + (j * dp + r) * m ... + m - 1 (m = micro-batch size), as megatron's pretraining
sampler orders them. Every pipeline stage and TP rank of a DP rank reads the same samples (ids are
cheap; STEM layers on every stage need them).
"""

from __future__ import annotations

import torch

KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack items into [b, s] tensors; `attention_mask` (bool [b, 1, s, s], True = masked) too when
    the dataset makes one (`data.reset_attention_mask`: no attention across documents)."""
    out = {}
    for key in KEYS + (("attention_mask",) if "attention_mask" in items[0] else ()):
        out[key] = torch.stack([torch.as_tensor(it[key]) for it in items])
    out["tokens"] = out["tokens"].long()
    out["labels"] = out["labels"].long()
    out["position_ids"] = out["position_ids"].long()
    out["loss_mask"] = out["loss_mask"].float()
    return out


class StepBatches:
    def __init__(self, dataset, *, micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global batch {global_batch_size} is not a multiple of micro batch {micro_batch_size} x dp {dp_size}"
            )
        self.dataset = dataset
        self.m, self.g, self.dp_rank, self.dp = micro_batch_size, global_batch_size, dp_rank, dp_size
        self.num_micro_batches = global_batch_size // (micro_batch_size * dp_size)

    def __call__(self, step: int, device: torch.device | None = None) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of step `step`."""
        n = len(self.dataset)
        base = step * self.g
        out = []
        for j in range(self.num_micro_batches):
            start = base + (j * self.dp + self.dp_rank) * self.m
            batch = collate([self.dataset[(start + i) % n] for i in range(self.m)])
            if device is not None:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            out.append(batch)
        return out
