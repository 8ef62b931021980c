"""Scale model of the STEM table exchange: bytes per rank, intra- and inter-node, up to 1,024 ranks.

    python -m benchmarks.scale_model --data-dir data/sample    # after `make sample-data`

Input: the sample corpus (`sample_text_document.bin`, GPT-2 BPE) as one id stream. Rank r's
micro-batch i is a window of T contiguous tokens at a seeded random offset (the corpus is
1.02M tokens: windows of different ranks may overlap at the largest sizes). A step has
`--micro-batches` micro-batches per rank. Variants: flat and hierarchical exchange, each with
micro-batch and step scope. The numbers come from `stem_megatron.stem.traffic_model`, which
runs the engine's own routing functions and counters for every rank (no formula of its own).

Check: 4 gloo ranks as 2 nodes x 2 run the engine on the same kind of windows (T = 4k, 16k):
their measured per-rank counters must equal the model's exactly, and the bytes counted at the
gloo calls themselves (`testing/wire_bytes.py`, independent of the counters; the run fails
otherwise), and their step times are reported (gloo on loopback: nodes are simulated, so times show the
cost of the extra phases, not the saving on a real network).

Writes docs/scale_model.png and its section of docs/benchmarks.md; ends with one JSON line.
Legend: P ranks per node, M nodes, W = M x P ranks, T tokens per rank per micro-batch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from benchmarks.common import machine, print_json_line, write_section
from stem_megatron.stem.hierarchical import NodeMap
from stem_megatron.stem.traffic_model import sampled_step_bytes, step_traffic_all
from stem_megatron.testing.distributed import run_distributed

COMMAND = "python -m benchmarks.scale_model"
VARIANTS = {  # name: (exchange, scope)
    "flat": ("flat", "microbatch"),
    "hierarchical": ("hierarchical", "microbatch"),
    "flat+step": ("flat", "step"),
    "hierarchical+step": ("hierarchical", "step"),
}
KEYS = ("sent_intra", "sent_inter", "recv_intra", "recv_inter")


def load_stream(data_dir: Path) -> torch.Tensor:
    path = data_dir / "sample_text_document.bin"
    if not path.exists():
        raise SystemExit(f"{path} not found: run `make sample-data` first (or pass --data-dir)")
    return torch.from_numpy(np.fromfile(path, dtype=np.uint16).astype(np.int64))


def windows(stream: torch.Tensor, ranks: int, micro_batches: int, tokens: int, seed: int) -> list[list[torch.Tensor]]:
    """[rank][micro-batch] windows of `tokens` ids at seeded offsets (the same for a rank at any W)."""
    out = []
    for r in range(ranks):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + r)
        starts = torch.randint(0, stream.numel() - tokens, (micro_batches,), generator=gen).tolist()
        out.append([stream[s : s + tokens] for s in starts])
    return out


def model_bytes(batches, nodes: int, ranks_per_node: int, sample: int, row_bytes: int, grad_row_bytes: int) -> dict:
    """Mean bytes sent per rank per step (lookups + reduce), intra / inter node, for every variant.

    `batches` holds the micro-batches of the first `sample` nodes' ranks (all ranks when
    nodes <= sample): traffic_model.sampled_step_bytes, exact over all nodes, an estimate from
    the sampled nodes otherwise (every node draws its windows the same way).
    """
    nm = NodeMap(nodes * ranks_per_node, ranks_per_node)
    sampled = list(range(min(nodes, sample)))
    out = {}
    for name, (exchange, scope) in VARIANTS.items():
        out[name] = sampled_step_bytes(batches, nm, sampled, row_bytes, grad_row_bytes, exchange, scope)
    return out


# ------------------------------------------------------------------------ gloo check at 2 x 2
def _gloo_worker(rank, world_size, batches, layers, ffn, reps):
    from stem_megatron.stem.engine import StemTableEngine
    from stem_megatron.testing.wire_bytes import WireBytes

    out = {}
    wire = WireBytes(node_of=lambda r: r // 2)  # the first rep's bytes at the gloo calls themselves
    for name, (exchange, scope) in VARIANTS.items():
        engine = StemTableEngine(
            vocab_size=50257, layer_ids=list(range(layers)), ffn_hidden_size=ffn, shard_group=dist.group.WORLD,
            compute_dtype=torch.bfloat16, exchange=exchange, ranks_per_node=2,
        )
        times = []
        for rep in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            mbs = batches[rank]
            with wire, wire.label((name, "lookup") if rep == 0 else None):
                handles = engine.prefetch_step(mbs) if scope == "step" else None
                stats = []
                for i, ids in enumerate(mbs):
                    lk = handles[i].wait() if handles else engine.lookup(ids)
                    sum(lk.gather(s).float().sum() for s in range(layers)).backward()
                    stats.append(lk.stats)
                with wire.label((name, "reduce") if rep == 0 else None):
                    engine.reduce_grads()
            times.append(time.perf_counter() - t0)
            engine.zero_grad()
        per_exchange = stats[:1] if scope == "step" else stats
        out[name] = {
            "lookup": {k: sum(s[f"bytes_{k}"] for s in per_exchange) for k in KEYS},
            "reduce": {k: engine.stats[f"reduce_bytes_{k}"] for k in KEYS},
            "seconds": times,
            "wire": {part: wire.totals[(name, part)] for part in ("lookup", "reduce")},
        }
    if wire.uncounted:
        raise RuntimeError(f"collectives WireBytes does not count: {wire.uncounted}")
    return out


def gloo_check(stream, tokens, micro_batches, layers, ffn, reps, seed) -> dict:
    """Measured counters at 4 ranks (2 x 2) == the model's == the bytes at the gloo calls, per rank
    and key; median step times."""
    batches = windows(stream, 4, micro_batches, tokens, seed)
    measured = run_distributed(_gloo_worker, world_size=4, args=(batches, layers, ffn, reps), timeout=900)
    nm = NodeMap(4, 2)
    row_bytes, grad_row_bytes = layers * ffn * 2, layers * ffn * 4
    result = {}
    for name, (exchange, scope) in VARIANTS.items():
        model = step_traffic_all(batches, nm, row_bytes, grad_row_bytes, exchange, scope)
        for r in range(4):
            for part in ("lookup", "reduce"):
                for k in KEYS:
                    got, want = measured[r][name][part][k], model[r][f"{part}_{k}"]
                    if got != want:
                        raise SystemExit(f"scale model != measured: {name} rank {r} {part} {k}: {want} vs {got}")
                    if got != measured[r][name]["wire"][part][k]:
                        raise SystemExit(f"measured != bytes at the gloo calls: {name} rank {r} {part} {k}: "
                                         f"{got} vs {measured[r][name]['wire'][part][k]}")
        step_s = [max(measured[r][name]["seconds"][i] for r in range(4)) for i in range(reps)]
        inter = sum(measured[r][name][p]["sent_inter"] for r in range(4) for p in ("lookup", "reduce")) / 4
        result[name] = {"ms": 1000 * statistics.median(step_s), "inter": inter}
    return result


# ------------------------------------------------------------------------ output
def plot(rows, path: Path, tokens_list, nodes_list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tokens_list), figsize=(5 * len(tokens_list), 4), sharey=False)
    for ax, t in zip(np.atleast_1d(axes), tokens_list):
        for name in VARIANTS:
            ys = [rows[(m, t)][name]["inter"] / 2**20 for m in nodes_list]
            ax.plot([m * 8 for m in nodes_list], ys, marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks (8 per node)")
        ax.set_ylabel("inter-node MiB sent per rank per step")
        ax.set_title(f"{t // 1024}k tokens per rank per micro-batch")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path("data/sample"))
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    p.add_argument("--ranks-per-node", type=int, default=8)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--micro-batches", type=int, default=4, help="per rank per step")
    p.add_argument("--layers", type=int, default=4, help="STEM layers of one chunk (row = layers x ffn bf16)")
    p.add_argument("--ffn", type=int, default=4096, help="ffn columns per TP rank")
    p.add_argument("--check-tokens", type=int, nargs="*", default=[4096, 16384])
    p.add_argument("--check-reps", type=int, default=3)
    p.add_argument("--sample-nodes", type=int, default=1, help="nodes simulated per size (all when fewer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-doc", action="store_true", help="do not write docs/")
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # small tensors: threads only contend on a shared machine
    stream = load_stream(args.data_dir)
    row_bytes, grad_row_bytes = args.layers * args.ffn * 2, args.layers * args.ffn * 4
    rows, t0 = {}, time.perf_counter()
    for t in args.tokens:
        for m in args.nodes:
            sampled_ranks = min(m, args.sample_nodes) * args.ranks_per_node
            batches = windows(stream, sampled_ranks, args.micro_batches, t, args.seed)
            rows[(m, t)] = model_bytes(batches, m, args.ranks_per_node, args.sample_nodes, row_bytes, grad_row_bytes)
            print(f"scale_model: {m} nodes, {t} tokens: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    model_s = time.perf_counter() - t0
    checks = {t: gloo_check(stream, t, args.micro_batches, 2, 64, args.check_reps, args.seed) for t in args.check_tokens}

    def ratio(m, t, name):
        flat = rows[(m, t)]["flat"]["inter"]
        return rows[(m, t)][name]["inter"] / flat if flat else float("nan")

    lines = [
        "## Scale model: exchange bytes per rank, intra- and inter-node (`scale_model`)",
        "",
        f"Command: `{COMMAND} --data-dir data/sample` (sample corpus, GPT-2 BPE). Machine: {machine()}.",
        f"{args.ranks_per_node} ranks per node, {args.micro_batches} micro-batches per rank per step, rows of "
        f"{args.layers} STEM layers x {args.ffn} columns (bf16 rows {row_bytes // 1024} KiB, fp32 gradient rows), "
        "shard group = all ranks. Bytes sent per rank per step (lookups + the step's gradient reduce), mean over "
        "ranks, computed by `stem_megatron.stem.traffic_model.sampled_step_bytes`: the engine's routing functions "
        f"and counters run for every rank of the first {args.sample_nodes} node(s) (`--sample-nodes`); rows an "
        "owner serves are counted on the requesting side, which is exact when every node is simulated "
        "(tested) and the sample's estimate beyond (all nodes draw their windows alike). The meta vectors "
        "make flat grow with W (C1 is 2 + 2W ints to every rank). "
        f"Model time {model_s:.0f} s. Plot: [scale_model.png](scale_model.png).",
        "",
        "| ranks | tokens/rank/mb | flat inter MiB | flat intra MiB | hier inter MiB | flat+step inter MiB | "
        "hier+step inter MiB | hier / flat | hier+step / flat |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for t in args.tokens:
        for m in args.nodes:
            r = rows[(m, t)]
            lines.append(
                f"| {m * args.ranks_per_node} | {t} | {r['flat']['inter'] / mib:.2f} | {r['flat']['intra'] / mib:.2f} | "
                f"{r['hierarchical']['inter'] / mib:.2f} | {r['flat+step']['inter'] / mib:.2f} | "
                f"{r['hierarchical+step']['inter'] / mib:.2f} | "
                + (f"{ratio(m, t, 'hierarchical'):.3f} | {ratio(m, t, 'hierarchical+step'):.3f} |" if m > 1 else "- | - |")
            )
    lines += [
        "",
        "At one node nothing crosses a node boundary. Target: hierarchical + step <= 0.5 x flat inter-node bytes "
        "at 8 ranks per node and 16k tokens per rank"
        + (f": max {max(ratio(m, 16384, 'hierarchical+step') for m in args.nodes if m > 1):.3f} over 2..{max(args.nodes)} nodes."
           if 16384 in args.tokens and max(args.nodes) > 1 else "."),
        "",
        "Check on gloo, 4 ranks as 2 nodes x 2 (L=2, F=64, bf16 rows, same windows): the model's per-rank counters "
        "equal the engine's measured ones for every variant (the command fails otherwise). Step time = slowest rank, "
        f"median of {args.check_reps}, lookups + backward + reduce; loopback only, so the hierarchical "
        "exchange's extra phases show as cost and its inter-node saving does not.",
        "",
        "| tokens/rank/mb | " + " | ".join(f"{n} inter KiB" for n in VARIANTS) + " | "
        + " | ".join(f"{n} ms" for n in VARIANTS) + " |",
        "|---|" + "---|" * (2 * len(VARIANTS)),
    ]
    for t, c in checks.items():
        lines.append(
            f"| {t} | " + " | ".join(f"{c[n]['inter'] / 1024:.1f}" for n in VARIANTS) + " | "
            + " | ".join(f"{c[n]['ms']:.0f}" for n in VARIANTS) + " |"
        )
    if not args.no_doc:
        doc_dir = Path(__file__).resolve().parents[1] / "docs"
        plot(rows, doc_dir / "scale_model.png", args.tokens, args.nodes)
        write_section("scale_model", "\n".join(lines))
    else:
        print("\n".join(lines))
    target = [ratio(m, 16384, "hierarchical+step") for m in args.nodes if m > 1 and (m, 16384) in rows]
    print_json_line(
        {
            "benchmark": "scale_model",
            "hier_step_over_flat_inter_16k_max": round(max(target), 4) if target else None,
            "hier_over_flat_inter_16k_max": round(
                max(ratio(m, 16384, "hierarchical") for m in args.nodes if m > 1), 4
            ) if target else None,
            "model_equals_measured_2x2": bool(checks),  # the command exits earlier on a mismatch
            "gloo_ms": {t: {n: round(c[n]["ms"], 1) for n in VARIANTS} for t, c in checks.items()},
            "model_seconds": round(model_s, 1),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
