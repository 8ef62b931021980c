"""Training step time and MFU, STEM vs dense, at the 350M shape with fewer layers (one GPU).

    python -m benchmarks.bench_step [--layers 8] [--seq-length 4096] [--micro-batches 4] [--steps 8]

The real trainer and model (`Trainer.train_step`: megatron schedule, DDP, bf16 optimizer, table
exchange, row-sparse AdamW) on one device, for `configs/dense_350m.yaml` and
`configs/stem_350m_third.yaml` with `model.num_layers` reduced from 32 to `--layers` (the
reduction is printed; the STEM layers follow `stem.ratio: one_third` at the reduced depth) so both
runs fit a few minutes. Each step is `--micro-batches` micro-batches of the config's micro-batch
size. Token ids are Zipf(1.1) over the 32000-id vocabulary, like BPE text, so the STEM lookups
see a realistic number of unique rows. Step time is the median over the steps after the first
two (warm-up); MFU = model FLOPs per token (stem_megatron.flops: tables are gathers, 0 FLOPs) x
tokens/s / the device's bf16 peak (`STEM_PEAK_TFLOPS` overrides; none on CPU). Each variant runs
in its own process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from benchmarks.bench_mlp import _zipf_ids
from benchmarks.common import machine, print_json_line, write_section
from stem_megatron.testing.distributed import run_distributed
from stem_megatron.testing.models import TokenDataset

CONFIGS = {"dense": "configs/dense_350m.yaml", "stem": "configs/stem_350m_third.yaml"}
FULL_LAYERS = 32


class ZipfTokens(TokenDataset):
    """TokenDataset with Zipf-distributed ids (realistic unique-token fractions for the exchange)."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.ids = _zipf_ids(n * (seq + 1), vocab, gen).view(n, seq + 1)
        self.seq = seq


def _measure(rank, world_size, path, overrides, steps):
    from stem_megatron.config import load_config
    from stem_megatron.training.trainer import Trainer

    cfg = load_config(path, overrides)
    trainer = Trainer(cfg)
    t = cfg.train
    trainer.setup(datasets=(ZipfTokens(t.global_batch_size, cfg.model.seq_length, cfg.model.vocab_size, 0), None))
    results = [trainer.train_step() for _ in range(steps)]
    steady = [r.seconds for r in results[2:]] or [r.seconds for r in results]
    step_s = statistics.median(steady)
    tokens_per_s = t.global_batch_size * cfg.model.seq_length / step_s
    on_gpu = trainer.device.type == "cuda"
    return {
        "step_time_s": step_s,
        "tokens_per_s": tokens_per_s,
        "mfu": trainer.flops_per_token * tokens_per_s / trainer.peak if trainer.peak else None,
        "flops_per_token": trainer.flops_per_token,
        "stem_layers": cfg.stem_layers,
        "losses": [r.loss for r in results],
        "skipped": sum(r.skipped for r in results),
        "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "precision": "bf16" if trainer.bf16 else "fp32",
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8, help=f"model.num_layers (the 350M shape has {FULL_LAYERS})")
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per variant")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    gbs = args.micro_batch_size * args.micro_batches
    tmp = tempfile.mkdtemp(prefix="bench_step_")
    overrides = [
        f"model.num_layers={args.layers}", f"model.seq_length={args.seq_length}",
        f"train.micro_batch_size={args.micro_batch_size}", f"train.global_batch_size={gbs}",
        f"train.train_steps={args.steps}", "train.warmup_steps=1", "train.eval_interval=0",
        "train.precision=auto", "data.mock=true", "checkpoint.save=null", f"logging.tensorboard_dir={tmp}",
        # One device: nothing to shard or overlap.
        "parallel.use_distributed_optimizer=false", "parallel.overlap_grad_reduce=false",
    ]
    backend = "nccl" if on_gpu else "gloo"
    out = {}
    for name, path in CONFIGS.items():
        out[name] = run_distributed(_measure, world_size=1, args=(path, overrides, args.steps), backend=backend,
                                    timeout=args.timeout)[0]
    ratio = out["stem"]["step_time_s"] / out["dense"]["step_time_s"]
    reduction = (f"model.num_layers reduced from {FULL_LAYERS} to {args.layers} to fit the time budget "
                 f"(STEM layers at the reduced depth: {out['stem']['stem_layers']})")
    lines = [
        "## Training step: STEM vs dense at the 350M shape (one device)",
        "",
        f"Command: `python -m benchmarks.bench_step --layers {args.layers} --seq-length {args.seq_length} "
        f"--micro-batch-size {args.micro_batch_size} --micro-batches {args.micro_batches} --steps {args.steps}`  ",
        f"Machine: {machine()}, {out['dense']['precision']}; {reduction}; {gbs} x {args.seq_length} tokens per step; "
        "median over the steps after the first two.",
        "",
        "| model | step s | tokens/s | MFU | model GFLOP/token | max memory GB |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in out.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no peak known)"
        mem = f"{r['max_memory_gb']:.1f}" if r["max_memory_gb"] is not None else "n/a"
        lines.append(f"| {name} | {r['step_time_s']:.3f} | {r['tokens_per_s']:,.0f} | {mfu} | "
                     f"{r['flops_per_token'] / 1e9:.2f} | {mem} |")
    lines += ["", f"STEM / dense step time: **{ratio:.3f}**"]
    if not args.no_write:
        write_section(f"step-{'gpu' if on_gpu else 'cpu'}", "\n".join(lines))
    print("\n".join(lines))
    print_json_line({"benchmark": "step_350m", "device": "gpu" if on_gpu else "cpu", "layers": args.layers,
                     "full_layers": FULL_LAYERS, "layer_reduction": reduction, "stem_over_dense_step_time": ratio,
                     "results": out})


if __name__ == "__main__":
    main()
