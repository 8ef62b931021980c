"""Step time with host tables over step time with device tables (`stem.offload: host` / `device`).

    python -m benchmarks.bench_offload [--steps 6] [--nproc 2] [--repeats 1] [--engine-steps 3] [--data-dir data/sample]

Part 1, the table engine at a realistic step (what offload changes, without the dense model, whose
50,257-way output layer makes a 524,288-token trainer step minutes long on 2 cores): 2 gloo ranks
(shard group 2), the GPT-2 vocabulary, 2 STEM layers x 128 columns, 524,288 tokens a step as 64
micro-batches of 4,096 tokens per rank from the sample corpus (read in order, repeated), prefetch
depth 2; per micro-batch lookup, `gather` of both layers, a backward with a fixed random upstream
gradient, the fold; per step the reduce and RowSparseAdamW. Device tables vs host tables with a
10% cache (`lookahead`), updates streamed through the device in chunks (`host_update: device`)
and on the host (`host`), taking turns within each step; the host tables' metered device peak is
reported next to the bound.

Part 2, the trainer:
two configs train on the sample corpus through launch/torchrun.sh, each with device tables and
with host tables (device row cache of `stem.cache_fraction` 10% of each engine's rows, the
`lookahead` policy, prefetch depth 2), alternating so machine noise hits both:
- `tiny_stem` as shipped;
- `stem_350m_all` reduced: the 350M shape (hidden 960, ffn 2816, 15 heads) with 2 layers, both
  STEM, the GPT-2 vocabulary of the sample corpus, sequences of 512, 4 sequences per step.
Step time is the trainer's own figure over all steps but the first. On a CPU the "device" is the
host, so the ratio measures the cache bookkeeping, the worker-thread gathers and the
write-through, not PCIe transfers; on a GPU the target is <= 1.05 with prefetch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import machine, print_json_line, write_section
from benchmarks.runs import train

ENGINE_MB_TOKENS, ENGINE_MBS, ENGINE_LAYERS, ENGINE_COLS, ENGINE_DEPTH = 4096, 64, 2, 128, 2
ENGINE_MODES = {"device": dict(offload="device"),
                "host, update streamed": dict(offload="host", host_update="device"),
                "host, update on host": dict(offload="host", host_update="host")}


def _engine_steps(rank, world_size, ids, steps, vocab):
    """Per-mode step seconds (all steps but the first) and counters of the table engine, one rank."""
    import torch.distributed as dist

    from stem_megatron.stem.device_budget import device_bound_bytes, inflight_microbatches
    from stem_megatron.stem.engine import StemTableEngine
    from stem_megatron.stem.optimizer import RowSparseAdamW
    from stem_megatron.stem.ownership import RowOwnership

    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()  # a GPU machine runs one NCCL rank on its GPU (engine_case)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    rows_local = RowOwnership(vocab, world_size).rows_local
    cache = -(-rows_local // 10)
    engines, times, update_s = {}, {}, {}
    for name, kw in ENGINE_MODES.items():
        extra = dict(cache_rows=cache, cache_policy="lookahead") if kw["offload"] == "host" else {}
        e = StemTableEngine(vocab, list(range(ENGINE_LAYERS)), ENGINE_COLS, shard_group=dist.group.WORLD,
                            init_std=0.02, device=device, **kw, **extra)
        engines[name] = (e, RowSparseAdamW([e]))
        times[name], update_s[name] = [], []
    g = torch.Generator().manual_seed(rank)
    up = torch.randn(ENGINE_MB_TOKENS, ENGINE_COLS, generator=g).to(device)
    per_step = ENGINE_MBS * ENGINE_MB_TOKENS
    for s in range(steps):
        base = (s * world_size + rank) * per_step
        mbs = [ids[base + j * ENGINE_MB_TOKENS:][:ENGINE_MB_TOKENS].view(1, -1) for j in range(ENGINE_MBS)]
        for name, (e, opt) in engines.items():  # the modes take turns within a step: machine noise hits all
            dist.barrier()
            t0 = time.perf_counter()
            e.announce(mbs)
            handles = [e.prefetch(b) for b in mbs[:ENGINE_DEPTH]]
            for i in range(ENGINE_MBS):
                lk = handles[i].wait()
                if i + ENGINE_DEPTH < ENGINE_MBS:
                    handles.append(e.prefetch(mbs[i + ENGINE_DEPTH]))
                e.fold_before(lk)
                sum((lk.gather(slot)[0] * up).sum() for slot in range(ENGINE_LAYERS)).backward()
            e.reduce_grads()
            t1 = time.perf_counter()
            opt.step(lr=1e-3)
            opt.zero_grad()
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if s:
                times[name].append(t2 - t0)
                update_s[name].append(t2 - t1)
    out = {}
    for name, (e, _) in engines.items():
        row = {"step_s": statistics.median(times[name]), "update_s": statistics.median(update_s[name])}
        if e.offload == "host":
            st = e.offload_stats()
            bound = device_bound_bytes(
                cache_rows=cache, rows_local=rows_local, vocab_size=vocab, layers=ENGINE_LAYERS, cols=ENGINE_COLS,
                compute_bytes=4, shard_size=world_size, tokens_per_microbatch=ENGINE_MB_TOKENS,
                inflight=inflight_microbatches(ENGINE_DEPTH, ENGINE_MBS, 1), prefetch_depth=ENGINE_DEPTH)
            row.update(token_hit_rate=st["hit_weight"] / st["req_weight"], device_peak_bytes=st["device_peak_bytes"],
                       device_bound_bytes=bound.total, touched_rows=int(e.stats["reduce_rows_touched"]),
                       rows_local=rows_local, cache_rows=cache)
        row["table_device_bytes"] = rows_local * ENGINE_LAYERS * ENGINE_COLS * 12
        out[name] = row
    return out


def engine_case(steps: int, data_dir: str = "data/sample") -> dict:
    """Part 1 (module docstring): {mode: figures} of rank 0. On a GPU machine: one NCCL rank on the GPU
    (shard group 1), so the host <-> device copies are real."""
    from pathlib import Path

    from benchmarks.bench_cache import load_ids
    from stem_megatron.testing.distributed import run_distributed

    corpus = load_ids(Path(data_dir))
    need = steps * 2 * ENGINE_MBS * ENGINE_MB_TOKENS
    ids = corpus.repeat(-(-need // corpus.numel()))[:need]
    cuda = torch.cuda.is_available()
    return run_distributed(_engine_steps, world_size=1 if cuda else 2, args=(ids, steps, 50257), timeout=3600,
                           backend="nccl" if cuda else "gloo")[0]

CONFIGS = {
    "tiny_stem": ("configs/tiny_stem.yaml", []),
    "stem_350m_2layers": ("configs/stem_350m_all.yaml", [
        "model.num_layers=2", "model.vocab_size=50257", "model.seq_length=512",
        "train.micro_batch_size=1", "train.global_batch_size=4", "train.precision=auto",
        "data.split=98,2,0", "parallel.use_distributed_optimizer=false", "parallel.overlap_grad_reduce=false",
    ]),
}


def data_overrides(data_dir: str) -> list[str]:
    """Both configs read the sample corpus from `data_dir` (`make sample-data`'s layout; gpu-check's carried copy)."""
    return [f"data.data_path=[{data_dir}/sample_text_document]", f"data.tokenizer={data_dir}/gpt2.tiktoken"]


HOST = ["stem.offload=host", "stem.cache_policy=lookahead", "stem.prefetch_depth=2", "stem.cache_fraction=0.1"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="part 2: trainer steps; 0 skips it")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--data-dir", default="data/sample", help="the sample corpus (default data/sample)")
    ap.add_argument("--engine-steps", type=int, default=3, help="part 1: steps (the first is not timed); 0 skips it")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    engine = engine_case(args.engine_steps, args.data_dir) if args.engine_steps else {}
    common = [f"train.train_steps={args.steps}", "train.warmup_steps=1", "train.eval_interval=0",
              "checkpoint.save=null", f"logging.log_interval={args.steps}", *data_overrides(args.data_dir)]
    results: dict = {}
    for name, (config, overrides) in CONFIGS.items() if args.steps else ():
        runs = {"device": [], "host": []}
        for _ in range(args.repeats):
            for mode in runs:
                extra = HOST if mode == "host" else ["stem.offload=device"]
                r = train(config, common + overrides + extra + [f"logging.run_name=bench_offload_{name}_{mode}"],
                          args.nproc)
                runs[mode].append(r["step_time_s"])
        med = {m: statistics.median(ts) for m, ts in runs.items()}
        results[name] = {"device_step_s": round(med["device"], 4), "host_step_s": round(med["host"], 4),
                         "host_over_device": round(med["host"] / med["device"], 3)}
    lines = [
        "## Host tables: step time vs device tables (`make bench-offload`)",
        "",
        f"Command: `python -m benchmarks.bench_offload --steps {args.steps} --nproc {args.nproc} --repeats {args.repeats} "
        f"--engine-steps {args.engine_steps}`  ",
        f"Machine: {machine()}.",
        "",
    ]
    if engine:
        dev = engine["device"]["step_s"]
        h = engine["host, update streamed"]
        lines += [
            f"**Table engine at {'262,144 tokens a step on one GPU' if torch.cuda.is_available() else '524,288 tokens a step'}** "
            f"({'1 NCCL rank' if torch.cuda.is_available() else '2 gloo ranks'} x 64 micro-batches of 4,096 tokens, GPT-2 "
            f"vocabulary, {ENGINE_LAYERS} layers x {ENGINE_COLS} columns, prefetch depth 2, fp32; host "
            f"tables: {h['cache_rows']:,}-row cache = 10% of {h['rows_local']:,} local rows, lookahead; "
            f"{h['touched_rows']:,} rows touched per step on rank 0 = {100 * h['touched_rows'] / h['rows_local']:.0f}% of "
            f"its rows; median of {args.engine_steps - 1} steps after the first, rank 0):",
            "",
            "| tables | s / step | of which update s | host / device | token hit | device peak / bound (bytes) "
            "| peak / device-table bytes |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in engine.items():
            peak = (f"{r['device_peak_bytes']:,} / {r['device_bound_bytes']:,} | "
                    f"{r['device_peak_bytes'] / r['table_device_bytes']:.3f}") if "device_peak_bytes" in r else "- | 1"
            hit = f"{r['token_hit_rate']:.3f}" if "token_hit_rate" in r else "-"
            lines.append(f"| {name} | {r['step_s']:.3f} | {r['update_s']:.3f} | **{r['step_s'] / dev:.3f}** | {hit} | {peak} |")
        lines += ["", "The bound is the worst case (every token a distinct row owned here). On a CPU the device is the "
                  "host: both update places run the same kernels on the same memory, so the differences between the "
                  "rows are the shared machine's noise (the modes take turns within each step).", ""]
    lines += [
        "**Trainer** (small steps):",
        "",
        f"Machine: {machine()}; {args.nproc} processes; sample corpus; host tables: 10% cache, lookahead, "
        "prefetch depth 2; steps after the first. On a CPU the device is the host: the ratio is the cost of the "
        "cache bookkeeping, worker gathers, host folds and chunked reduce/update, not of PCIe copies.",
        "",
        "| config | device tables s/step | host tables s/step | host / device |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['device_step_s']:.3f} | {r['host_step_s']:.3f} | **{r['host_over_device']:.3f}** |")
    lines += ["", "GPU (target <= 1.05 with prefetch): not measured yet (no GPU was available to this run)."]
    if not args.no_write:
        write_section("bench_offload", "\n".join(lines))
    print("\n".join(lines))
    print_json_line({"benchmark": "offload", **results, "engine_524k": engine, "nproc": args.nproc,
                     "machine": machine()})


if __name__ == "__main__":
    main()
