"""Benchmark of the STEM table exchange on real text: bytes vs the naive per-token exchange, the
unique-token fraction (the limit), owner load, exchange time on gloo, deterministic-mode cost.

    make sample-data                       # first: data/sample/train.jsonl + data/sample/gpt2.tiktoken
    python -m benchmarks.bench_exchange    # writes its section of docs/benchmarks.md, ends with a JSON line

The sample corpus is tokenized with GPT-2 BPE into one stream (EOD between documents); rank r of
W gets its own contiguous T tokens per step, as [T / 1024, 1024] ids. Tables: the GPT-2
vocabulary (50257), L=2 STEM layers, F=64 columns (bytes and ratios are what matter; they scale
with L x F), bf16 rows on the wire as on a GPU, shard group = all W ranks.

Figures per (W, T), summed over the ranks: `bytes/naive` = (sent + received) / naive per-token
(sent + received); `limit` = unique ids / tokens (what perfect dedup can reach); `vs limit` their
ratio (target <= 1.1); owner load = max / mean rows served (target <= 1.15); times are medians
over repetitions, of the slowest rank, on gloo over loopback.

Legend: T tokens per rank, W ranks (= G), U unique ids, L layers, F columns.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.common import machine, print_json_line, write_section
from stem_megatron.stem.engine import StemTableEngine
from stem_megatron.testing.distributed import run_distributed

SEQ = 1024
LAYERS = [0, 1]
COMMAND = "python -m benchmarks.bench_exchange"
ID_PROTOCOLS = ("alltoall", "allgather")


def load_token_stream(data_dir: Path, n_tokens: int) -> tuple[torch.Tensor, int]:
    """The first n_tokens of train.jsonl's `text` fields tokenized with gpt2.tiktoken, EOD-separated."""
    from stem_megatron.data.tokenizer import load_tokenizer

    jsonl, tok_path = data_dir / "train.jsonl", data_dir / "gpt2.tiktoken"
    for p in (jsonl, tok_path):
        if not p.exists():
            raise SystemExit(f"{p} not found: run `make sample-data` first (or pass --data-dir)")
    tok = load_tokenizer(tok_path)
    ids: list[int] = []
    with open(jsonl) as f:
        for line in f:
            ids.extend(tok.encode(json.loads(line)["text"]))
            ids.append(tok.eod)
            if len(ids) >= n_tokens:
                return torch.tensor(ids[:n_tokens], dtype=torch.int64), tok.vocab_size
    raise SystemExit(f"{jsonl} has only {len(ids)} tokens, {n_tokens} needed")


def _timed(fns: dict, reps: int) -> dict:
    """Median seconds of each fn() over reps, of the slowest rank; the fns alternate within a rep
    so that load from other processes hits them alike (barrier before each run)."""
    times: dict = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times[name].append(t.item())
    return {name: statistics.median(ts) for name, ts in times.items()}


def _backward_and_reduce(engine, ids_BS, g_NF):
    """Two micro-batches: lookup, gather backward of every slot; then one reduce_grads."""
    for _ in range(2):
        lk = engine.lookup(ids_BS)
        for s in range(len(LAYERS)):
            lk.gather(s).view(g_NF.shape).backward(g_NF)
    engine.reduce_grads()


def _measure(engines, ids_BS, ffn, reps, world_size) -> dict:
    row = {"world": world_size, "tokens_per_rank": ids_BS.numel()}
    with torch.no_grad():
        lookups = {f"lookup_s_{p}": (lambda e=engines[(p, False)]: e.lookup(ids_BS)) for p in ID_PROTOCOLS}
        row.update(_timed(lookups, reps))
        lk = engines[("alltoall", False)].lookup(ids_BS)
    st = lk.stats
    totals = torch.tensor(
        [st["bytes_sent"] + st["bytes_received"], st["naive_bytes"], st["n_unique"], st["n_tokens"]],
        dtype=torch.float64,
    )
    dist.all_reduce(totals)
    traffic, naive, n_unique, n_tokens = totals.tolist()
    row.update(
        bytes_per_rank=traffic / world_size,
        naive_bytes_per_rank=naive / world_size,
        bytes_ratio=traffic / naive,
        unique_fraction=n_unique / n_tokens,
        owner_max_over_mean=st["rows_per_owner_max"] / st["rows_per_owner_mean"],
    )
    g_NF = torch.randn(ids_BS.numel(), ffn, dtype=torch.bfloat16)
    backward = {
        f"backward_reduce_s_{'det' if det else 'fast'}": (
            lambda e=engines[("alltoall", det)]: _backward_and_reduce(e, ids_BS, g_NF)
        )
        for det in (False, True)
    }
    row.update(_timed(backward, reps))
    return row


def _worker(rank, world_size, chunks, vocab, ffn, reps):
    torch.manual_seed(rank)
    engines = {
        (proto, det): StemTableEngine(
            vocab_size=vocab,
            layer_ids=LAYERS,
            ffn_hidden_size=ffn,
            shard_group=dist.group.WORLD,
            init_std=None,
            compute_dtype=torch.bfloat16,
            deterministic=det,
            id_exchange=proto,
        )
        for proto in ID_PROTOCOLS
        for det in (False, True)
    }
    return [_measure(engines, ids_all[rank].view(-1, SEQ), ffn, reps, world_size) for ids_all in chunks]


def _markdown(rows: list[dict], args) -> str:
    lines = [
        "## STEM table exchange (`bench_exchange`)",
        "",
        f"Command: `{args.command}` (data: `{args.data_dir}/train.jsonl` as made by `make sample-data`, "
        f"GPT-2 BPE). Machine: {machine()}.",
        f"Tables: vocab 50257, L={len(LAYERS)}, F={args.ffn}, bf16 rows on the wire; shard group = all ranks "
        f"(gloo, loopback); medians of {args.reps} runs, slowest rank. Times come from a 2-core machine shared "
        "with other jobs (4 ranks on 2 cores at W=4): compare them within a row, not across rows or machines.",
        "",
        "| ranks | tokens/rank | bytes/naive | unique frac (limit) | vs limit | owner max/mean | "
        "lookup ms (a2a ids) | lookup ms (allgather ids) | bwd+reduce ms | bwd+reduce ms det | det cost |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['world']} | {r['tokens_per_rank']} | {r['bytes_ratio']:.3f} | {r['unique_fraction']:.3f} | "
            f"{r['bytes_ratio'] / r['unique_fraction']:.3f} | {r['owner_max_over_mean']:.3f} | "
            f"{1e3 * r['lookup_s_alltoall']:.1f} | {1e3 * r['lookup_s_allgather']:.1f} | "
            f"{1e3 * r['backward_reduce_s_fast']:.1f} | {1e3 * r['backward_reduce_s_det']:.1f} | "
            f"{r['backward_reduce_s_det'] / r['backward_reduce_s_fast']:.2f}x |"
        )
    lines += [
        "",
        "bytes/naive: (sent + received) over the per-token exchange of the same rows (id out, row back "
        "per token), summed over ranks; the C1 count vector is included in ours, not in naive. "
        "bwd+reduce: 2 micro-batches of gather backward for both layers + one reduce_grads.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="data/sample", type=Path)
    p.add_argument("--tokens-per-rank", default=[4096, 16384, 65536], type=int, nargs="+")
    p.add_argument("--world-sizes", default=[2, 4], type=int, nargs="+")
    p.add_argument("--ffn", default=64, type=int)
    p.add_argument("--reps", default=9, type=int)
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = p.parse_args(argv)
    args.command = " ".join([COMMAND, *(sys.argv[1:] if argv is None else argv)])
    for t in args.tokens_per_rank:
        if t % SEQ:
            raise SystemExit(f"--tokens-per-rank {t} must be a multiple of {SEQ}")
    stream, vocab = load_token_stream(args.data_dir, max(args.world_sizes) * max(args.tokens_per_rank))
    rows = []
    for w in args.world_sizes:
        chunks = [[stream[r * t : (r + 1) * t] for r in range(w)] for t in args.tokens_per_rank]
        rows += run_distributed(_worker, w, args=(chunks, vocab, args.ffn, args.reps), timeout=1200)[0]
    md = _markdown(rows, args)
    print(md)
    if not args.no_write:
        write_section("bench_exchange", md)
    at16 = [r for r in rows if r["tokens_per_rank"] == 16384]
    print_json_line(
        {
            "bench": "exchange",
            "max_bytes_vs_limit": max(r["bytes_ratio"] / r["unique_fraction"] for r in rows),
            "max_owner_max_over_mean": max(r["owner_max_over_mean"] for r in rows),
            "unique_fraction_16k": at16[0]["unique_fraction"] if at16 else None,
            "bytes_ratio_16k": at16[0]["bytes_ratio"] if at16 else None,
            "rows": rows,
        }
    )


if __name__ == "__main__":
    main()
