"""STEM MLP vs dense SwiGLU MLP: forward+backward time at the same shapes, beside the FLOP ratio.

    python -m benchmarks.bench_mlp [--shapes 1b 350m] [--tokens 8192] [--reps 3] [--device D] [--dtype T]

Both are the project's real megatron-core modules at TP=1 (megatron's `MLP` with SwiGLU, and
`StemMLP` reading rows through a `StemLookup`, whose gather and fp32 row-gradient sum are timed
with it; the table exchange is measured by bench_exchange). Token ids follow a Zipf(1.1) law over
the vocabulary, like BPE text, so the number of unique rows is realistic; weights are random at
megatron's init scale. Each variant is timed `--reps` times after one warm-up, alternating the two
so machine noise hits both; the reported figure is the median. FLOP ratio (matmuls only):
STEM 4*h*F / dense 6*h*F = 2/3. By default bf16 on a GPU, fp32 on CPU (`--device`, `--dtype`
choose; `make gpu-check` runs it with `--device cuda --dtype bf16`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.common import machine, print_json_line, write_section

SHAPES = {"1b": dict(hidden=2048, ffn=8192, vocab=128256), "350m": dict(hidden=960, ffn=2816, vocab=32000)}


def _init():
    import torch.distributed as dist

    from stem_megatron import compat

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        from stem_megatron.testing.distributed import find_free_port

        os.environ.setdefault("MASTER_PORT", str(find_free_port()))
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl", rank=0, world_size=1)
    compat.apply()
    from megatron.core import parallel_state, tensor_parallel

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(0)


def _modules(hidden, ffn, dtype, device):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from stem_megatron.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
    from stem_megatron.model import _stem_mlp_spec, transformer_config

    cfg = ExperimentConfig(
        model=ModelConfig(num_layers=1, hidden_size=hidden, num_attention_heads=8, ffn_hidden_size=ffn,
                          vocab_size=1024, seq_length=1024, transformer_impl="local"),
        train=TrainConfig(micro_batch_size=1, global_batch_size=1, train_steps=1,
                          precision="bf16" if dtype == torch.bfloat16 else "fp32"),
        data=DataConfig(mock=True),
    )
    tcfg = transformer_config(cfg)
    dense = build_module(get_gpt_layer_local_spec().submodules.mlp, config=tcfg, ffn_hidden_size=ffn)
    stem = build_module(_stem_mlp_spec(use_te=False), config=tcfg)
    stem.set_layer_number(1)
    return dense.to(device, dtype), stem.to(device, dtype)


def _zipf_ids(n, vocab, gen):
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    probs = ranks.pow(-1.1)
    perm = torch.randperm(vocab, generator=gen)  # frequent ids scattered over the vocabulary
    return perm[torch.multinomial(probs / probs.sum(), n, replacement=True, generator=gen)]


def _time(fn, sync):
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def bench_shape(name, tokens, reps, device, dtype):
    from stem_megatron.stem.engine import StemLookup
    from stem_megatron.stem.microbatch import StemContext

    sh = SHAPES[name]
    h, f, v = sh["hidden"], sh["ffn"], sh["vocab"]
    b = 8 if tokens % 8 == 0 else 1
    s = tokens // b
    gen = torch.Generator().manual_seed(0)
    dense, stem = _modules(h, f, dtype, device)
    x_sbh = torch.randn(s, b, h, generator=gen).to(device, dtype)
    ids_bs = _zipf_ids(tokens, v, gen).view(b, s).to(device)
    uniq_U, inv_bs = torch.unique(ids_bs, return_inverse=True)
    rows_U1F = (torch.randn(uniq_U.numel(), 1, f, generator=gen) * (2.0 / (v + f)) ** 0.5).to(device, dtype)
    grad_sbh = torch.randn(s, b, h, generator=gen).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run_dense():
        x = x_sbh.detach().requires_grad_()
        out, _ = dense(x)
        out.backward(grad_sbh)

    def run_stem():
        x = x_sbh.detach().requires_grad_()
        rows = rows_U1F.detach().requires_grad_()
        stem.rows.use(StemContext(lookup=StemLookup(rows, inv_bs, uniq_U, {}, False), slot_of_layer={0: 0}))
        out, _ = stem(x)
        out.backward(grad_sbh)

    run_dense(), run_stem()  # warm-up
    td, ts = [], []
    for _ in range(reps):
        td.append(_time(run_dense, sync))
        ts.append(_time(run_stem, sync))
    t_dense, t_stem = statistics.median(td), statistics.median(ts)
    return {
        "shape": name, "hidden": h, "ffn": f, "tokens": tokens, "unique_ids": int(uniq_U.numel()),
        "dense_ms": 1000 * t_dense, "stem_ms": 1000 * t_stem, "time_ratio": t_stem / t_dense,
        "flop_ratio": 4 / 6,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["1b", "350m"], choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=8 * 1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if available")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on cuda, else fp32")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device on this machine")
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if on_gpu else "cpu")
    dt = args.dtype if args.dtype != "auto" else ("bf16" if on_gpu else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dt]
    _init()
    results = [bench_shape(n, args.tokens, args.reps, device, dtype) for n in args.shapes]
    lines = [
        "## STEM MLP vs dense SwiGLU MLP (forward + backward)",
        "",
        f"Command: `python -m benchmarks.bench_mlp --tokens {args.tokens} --reps {args.reps} --device {device.type} "
        f"--dtype {dt}`  ",
        f"Machine: {machine()}, {dt}, TP=1, megatron-core local modules; median of {args.reps} alternating runs.",
        "",
        "| shape | hidden | ffn | tokens | unique ids | dense ms | STEM ms | time ratio | FLOP ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['shape']} | {r['hidden']} | {r['ffn']} | {r['tokens']} | {r['unique_ids']} | {r['dense_ms']:.1f} | "
            f"{r['stem_ms']:.1f} | {r['time_ratio']:.3f} | {r['flop_ratio']:.3f} |"
        )
    lines += ["", "Target: time ratio <= 0.72 (the FLOP limit is 2/3); STEM time includes the row gather and "
              "its fp32 per-row gradient sum."]
    if not args.no_write:
        write_section(f"mlp-{'gpu' if on_gpu else 'cpu'}", "\n".join(lines))
    print("\n".join(lines))
    print_json_line({"benchmark": "mlp", "device": "gpu" if on_gpu else "cpu", "dtype": dt, "results": results})


if __name__ == "__main__":
    main()
