"""Mean loss, perplexity and bits per byte of a model on documents (`stem-eval ppl`).

    result = evaluate(ReferenceScorer(model), docs, seq_length=256, stride=128, batch_size=8)
    # {"loss": ..., "ppl": ..., "bits_per_byte": ..., "tokens": ..., "bytes": ..., ...}

Documents (documents.py) are cut into sliding windows (windows.py: every token scored exactly
once, at least seq - stride tokens of context after a document's first window), packed into
batches of `batch_size` windows padded to `seq_length` (padding comes after the real tokens, so
the causal model's outputs for real tokens do not see it, and it is never scored), and summed:

    loss          = sum of -ln p(token) over scored tokens / scored tokens           (nats)
    ppl           = exp(loss)
    bits_per_byte = sum of -ln p(token) / ln 2 / bytes of the scored tokens' UTF-8 text

A scorer turns this process's batches into (loss sum, scored tokens) summed over all processes:
`ReferenceScorer` runs a plain-PyTorch model in one process; `megatron_scorer.MegatronScorer` a
checkpoint at any parallel layout under torchrun (each data-parallel rank takes every dp-th batch).

Legend: b windows in a batch, s sequence length.
"""

from __future__ import annotations

import math
import sys
import time

import torch

from stem_megatron.inference.documents import Document
from stem_megatron.inference.windows import Window, document_windows


def make_batch(docs: list[Document], windows: list[Window], seq: int, b: int, pad_id: int) -> dict[str, torch.Tensor]:
    """tokens / labels / loss_mask / position_ids [b, seq] for up to b `windows`; rows past them are padding.

    Every batch has the same shape: pipeline stages exchange activations of a fixed size.
    """
    tokens_bs = torch.full((b, seq), pad_id, dtype=torch.long)
    labels_bs = torch.full((b, seq), pad_id, dtype=torch.long)
    mask_bs = torch.zeros(b, seq)
    for i, w in enumerate(windows):
        ids = docs[w.doc].ids
        n = w.length
        tokens_bs[i, :n] = torch.tensor(ids[w.start:w.end])
        labels_bs[i, :n] = torch.tensor(ids[w.start + 1:w.end + 1])
        mask_bs[i, w.first_scored - w.start - 1:n] = 1.0  # label i is target start + 1 + i
    return {"tokens": tokens_bs, "labels": labels_bs, "loss_mask": mask_bs,
            "position_ids": torch.arange(seq).expand(b, seq).contiguous()}


class ReferenceScorer:
    """One process, a plain-PyTorch model with `loss(ids, labels)` (ReferenceStemLM)."""

    dp_rank, dp_size, is_reporter = 0, 1, True

    def __init__(self, model, device: torch.device | str = "cpu"):
        self.model, self.device = model, torch.device(device)

    @torch.no_grad()
    def score(self, batches: list[dict]) -> tuple[float, float]:
        loss_sum, tokens = 0.0, 0.0
        for batch in batches:
            scored_s = batch["loss_mask"].any(0).nonzero()
            if not len(scored_s):
                continue
            n = int(scored_s.max()) + 1  # trailing padding columns: a causal model's outputs before them are the same
            mask_bs = batch["loss_mask"][:, :n].to(self.device)
            losses_bs = self.model.loss(batch["tokens"][:, :n].to(self.device), batch["labels"][:, :n].to(self.device))
            loss_sum += (losses_bs.double() * mask_bs).sum().item()
            tokens += mask_bs.sum().item()
        return loss_sum, tokens


class Progress:
    """`label: done/total unit` on stderr, redrawn at most every 0.5 s; silent when disabled."""

    def __init__(self, label: str, total: int, unit: str, enabled: bool = True):
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.done, self.t0, self.last = 0, time.perf_counter(), 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last > 0.5 or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            print(f"\r{self.label}: {self.done}/{self.total} {self.unit} ({rate:.1f}/s)", end="", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr, flush=True)


def evaluate(scorer, docs: list[Document], *, seq_length: int, stride: int, batch_size: int,
             pad_id: int = 0, schedule_batches: int = 4, progress: bool = True) -> dict:
    """The summary dict of `scorer` on `docs` (identical on every process)."""
    windows = [w for d, doc in enumerate(docs) for w in document_windows(d, len(doc.ids), seq_length, stride)]
    groups = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    # Every data-parallel rank runs the same number of batches (STEM exchanges are collective):
    # rank r takes groups r, r + dp, ...; the short ranks get all-padding batches.
    per_rank = -(-len(groups) // scorer.dp_size)
    mine = [groups[i] if i < len(groups) else [] for i in range(scorer.dp_rank, per_rank * scorer.dp_size, scorer.dp_size)]
    bar = Progress("stem-eval ppl", len(windows), "windows", enabled=progress and scorer.is_reporter)
    t0 = time.perf_counter()
    loss_sum, tokens = 0.0, 0.0
    for i in range(0, len(mine), schedule_batches):
        chunk = mine[i:i + schedule_batches]
        s, n = scorer.score([make_batch(docs, ws, seq_length, batch_size, pad_id) for ws in chunk])
        loss_sum, tokens = loss_sum + s, tokens + n
        bar.update(min(len(windows) - bar.done, sum(len(g) for g in chunk) * scorer.dp_size))
    bar.close()
    expected = sum(len(d.ids) - 1 for d in docs)
    if round(tokens) != expected:
        raise RuntimeError(f"scored {tokens} tokens, the documents have {expected} targets")
    n_bytes = sum(d.bytes for d in docs)
    loss = loss_sum / tokens
    return {
        "loss": loss, "ppl": math.exp(loss), "bits_per_byte": loss_sum / math.log(2) / n_bytes if n_bytes else None,
        "tokens": int(expected), "bytes": n_bytes, "documents": len(docs), "windows": len(windows),
        "seq_length": seq_length, "stride": stride, "seconds": round(time.perf_counter() - t0, 3),
    }
