"""Tiny models, reference weights and a megatron-schedule driver shared by tests and benchmarks.

`reference_model(cfg, seed)` builds the plain-PyTorch reference with deterministic random weights;
`forward_backward(chunks, cfg, batches)` runs megatron's pipeline schedule (no pipelining, 1F1B or
interleaved, whichever the layout selects) over micro-batches and returns the mean loss on the last
stage; `pipeline_logits` collects full-vocabulary logits. Both move each micro-batch to the model's
device (batches are made on the CPU; the model is on CUDA when the ranks have GPUs).
"""

from __future__ import annotations

import functools

import torch

from stem_megatron.config import (
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    ParallelConfig,
    StemConfig,
    TrainConfig,
)
from stem_megatron.reference import ReferenceConfig, ReferenceStemLM


def tiny_config(
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    sp: bool = False,
    stem_layers: list[int] | None = (1, 2),
    num_layers: int = 4,
    vocab_size: int = 256,
    seq_length: int = 16,
    micro_batch_size: int = 2,
    global_batch_size: int = 8,
    tie_embeddings: bool = True,
    recompute: str | None = None,
    shard_size: int | None = None,
    deterministic: bool = False,
) -> ExperimentConfig:
    recompute_kw = {}
    if recompute == "full":
        recompute_kw = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        recompute_kw = dict(recompute_granularity="selective")
    return ExperimentConfig(
        model=ModelConfig(
            num_layers=num_layers, hidden_size=64, num_attention_heads=4, num_query_groups=2,
            ffn_hidden_size=128, vocab_size=vocab_size, seq_length=seq_length,
            tie_embeddings=tie_embeddings, rotary_base=10000.0, make_vocab_size_divisible_by=64,
            transformer_impl="local",
        ),
        parallel=ParallelConfig(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp, sequence_parallel=sp,
        ),
        stem=StemConfig(layers=list(stem_layers) if stem_layers else None, shard_size=shard_size,
                        deterministic=deterministic),
        train=TrainConfig(micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                          train_steps=10, precision="fp32", **recompute_kw),
        data=DataConfig(mock=True),
    )


def reference_config(cfg: ExperimentConfig) -> ReferenceConfig:
    m = cfg.model
    return ReferenceConfig(
        vocab_size=m.padded_vocab_size(cfg.parallel.tensor_model_parallel_size),
        table_vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        head_dim=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        stem_layers=cfg.stem.stem_layer_indices(m.num_layers),
        rotary_base=m.rotary_base,
        rope_scaling_factor=m.rope_scaling_factor,
        norm_epsilon=m.norm_epsilon,
        tie_embeddings=m.tie_embeddings,
    )


def reference_model(cfg: ExperimentConfig, seed: int = 0) -> ReferenceStemLM:
    """The reference with deterministic, non-trivial random weights (same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    ref = ReferenceStemLM(reference_config(cfg))
    with torch.no_grad():
        for name, p in sorted(ref.named_parameters()):
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed" in name or "stem_table" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return ref


def make_batches(cfg: ExperimentConfig, num_microbatches: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of token ids with repeats (a small id range) and labels = next token."""
    gen = torch.Generator().manual_seed(seed)
    b, s = cfg.train.micro_batch_size, cfg.model.seq_length
    out = []
    for _ in range(num_microbatches):
        ids = torch.randint(0, min(cfg.model.vocab_size, 40), (b, s + 1), generator=gen)
        out.append({
            "tokens": ids[:, :-1].contiguous(),
            "labels": ids[:, 1:].contiguous(),
            "loss_mask": torch.ones(b, s),
            "position_ids": torch.arange(s).expand(b, s).contiguous(),
        })
    return out


class TokenDataset:
    """Fixed random token sequences in megatron GPTDataset's item format (tests' in-memory data)."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq + 1), generator=gen)
        self.seq = seq

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"tokens": ids[:-1], "labels": ids[1:], "loss_mask": torch.ones(self.seq),
                "position_ids": torch.arange(self.seq)}


def on_model_device(batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """`batch` moved to the device of `model`'s parameters (a CUDA model needs CUDA ids and masks)."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def _loss_func(loss_mask, output_tensor):
    losses = output_tensor.float()
    loss_sum = (losses * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def _forward_step(data_iterator, model):
    batch = on_model_device(next(data_iterator), model)
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return out, functools.partial(_loss_func, batch["loss_mask"])


def forward_backward(chunks, cfg: ExperimentConfig, batches, forward_only: bool = False):
    """One step's forward(+backward) over `batches` with megatron's schedule for this layout.

    Returns the token-mean loss on the last pipeline stage (None elsewhere). Gradients are left in
    the DDP buffers (`param.main_grad`) and the STEM engines' pending lookups.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    n = len(batches)
    iters = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    reduced = fb(
        forward_step_func=_forward_step,
        data_iterator=iters,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=n,
        seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        forward_only=forward_only,
    )
    if not reduced:
        return None
    total = torch.stack([r["loss"] for r in reduced]).sum(0)
    return (total[0] / total[1]).item()


def _logits_step(data_iterator, model):
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    batch = on_model_device(next(data_iterator), model)
    out = model(batch["tokens"], batch["position_ids"], None)

    def collect(output_tensor, non_loss_data=True):
        return gather_from_tensor_model_parallel_region(output_tensor).detach()

    return out, collect


def pipeline_logits(chunks, cfg: ExperimentConfig, batches) -> list[torch.Tensor] | None:
    """Full-vocabulary logits [b, s, V_padded] per micro-batch on the last stage (None elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    iters = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    with torch.no_grad():
        out = fb(
            forward_step_func=_logits_step,
            data_iterator=iters,
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(batches),
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.train.micro_batch_size,
            forward_only=True,
            collect_non_loss_data=True,
        )
    return out or None
