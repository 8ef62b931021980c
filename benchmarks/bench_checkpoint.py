"""Benchmark of the STEM table checkpoint format against the alternative it was chosen over.

    python -m benchmarks.bench_checkpoint    # writes its section of docs/benchmarks.md, ends with a JSON line

Tables: GPT-2 vocabulary (50257 rows), L=2 STEM layers, F=256 columns, fp32 weight + two Adam
moments + per-row steps (about 310 MB), rows round-robin over W=2 gloo ranks (shard size 2), as
the trainer holds them. Timed, slowest rank, median of 3:

- `files`: what stem_megatron saves: every rank streams its own rows (global ids + rows, one
  safetensors file per rank, no communication); loading at the same layout reads one file per
  rank; loading at another layout (G=1: one rank reads all rows; T=2: half the columns) reads
  the rows it owns from every file through np.memmap (stem/table_io.TableReader);
- `blocks`: the alternative: an all-to-all moves the round-robin rows to contiguous row blocks
  (vocabulary padded to a multiple of G), saved and loaded as ShardedTensors with megatron's
  dist_checkpointing (torch_dist); loading is the reverse all-to-all.
Also: sha256 throughput (the manifest's cost per byte at save and at load).

Legend: V vocab, L layers, F columns, G shard size, R rows per rank.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from benchmarks.common import machine, print_json_line, write_section
from stem_megatron.testing.distributed import run_distributed

V, LAYERS, F = 50257, [3, 7], 256
COMMAND = "python -m benchmarks.bench_checkpoint"


def _engine_state(g, shard):
    """This rank's round-robin rows: global ids [R] and {kind: [R, L, F]} + step [R]."""
    from stem_megatron.stem.ownership import RowOwnership

    rows_R = RowOwnership(V, shard).global_rows(g)
    gen = torch.Generator().manual_seed(g)
    data = {k: torch.randn(rows_R.numel(), len(LAYERS), F, generator=gen) for k in ("weight", "exp_avg", "exp_avg_sq")}
    return rows_R, data, torch.randint(0, 100, (rows_R.numel(),), generator=gen)


def _save_files(root, g, shard, rows_R, data, step_R):
    from stem_megatron.stem.ownership import RowOwnership
    from stem_megatron.stem.table_io import write_table_file

    n = RowOwnership(V, shard).num_owned(g)
    tensors = [("rows", rows_R[:n])]
    for slot, layer in enumerate(LAYERS):
        tensors += [(f"layers.{layer}.{k}", data[k][:n, slot]) for k in data]
        tensors.append((f"layers.{layer}.step", step_R[:n]))
    meta = dict(vocab_size=V, ffn_hidden_size=F, col_start=0, cols=F, shard_rank=g, shard_size=shard, tp_rank=0, tp_size=1)
    rel = f"rank{g}.safetensors"
    write_table_file(os.path.join(root, rel), tensors, meta)
    return {"path": rel, "layers": LAYERS, **meta}


def _read(root, index, rows, col_start, cols):
    from stem_megatron.stem.table_io import TableReader, TableTarget

    reader = TableReader(root, index)
    for layer in LAYERS:
        reader.read_layer(layer, TableTarget(rows, col_start, cols))


def _to_blocks(rows_R, t_RLF, g, shard):
    """All-to-all: round-robin rows -> contiguous block [B, L, F] of rank g (B = padded V / G)."""
    block = rows_R.numel()  # padded V / G
    dest_R = rows_R // block
    order = torch.argsort(dest_R, stable=True)
    send = torch.bincount(dest_R, minlength=shard)
    recv = torch.empty(shard, dtype=torch.int64)
    dist.all_to_all_single(recv, send)
    send, recv = send.tolist(), recv.tolist()
    ids = torch.empty(block, dtype=torch.int64)
    dist.all_to_all_single(ids, rows_R[order].contiguous(), recv, send)
    out = torch.empty(block, *t_RLF.shape[1:])
    dist.all_to_all_single(out, t_RLF[order].contiguous(), recv, send)
    result = torch.empty_like(out)
    result[ids - g * block] = out
    return result


def _from_blocks(block_BLF, rows_R, g, shard):
    """The reverse all-to-all: contiguous block -> this rank's round-robin rows."""
    from stem_megatron.stem.ownership import local_row, owner

    block = block_BLF.shape[0]
    ids_B = torch.arange(g * block, (g + 1) * block)
    owner_B = owner(ids_B, shard)
    order = torch.argsort(owner_B, stable=True)
    send = torch.bincount(owner_B, minlength=shard).tolist()
    recv_t = torch.empty(shard, dtype=torch.int64)
    dist.all_to_all_single(recv_t, torch.tensor(send))
    recv = recv_t.tolist()
    got_ids = torch.empty(rows_R.numel(), dtype=torch.int64)
    dist.all_to_all_single(got_ids, ids_B[order].contiguous(), recv, send)
    got = torch.empty(rows_R.numel(), *block_BLF.shape[1:])
    dist.all_to_all_single(got, block_BLF[order].contiguous(), recv, send)
    out = torch.empty_like(got)
    out[local_row(got_ids, shard)] = got
    return out


def _all_to_blocks(rows_R, data, g, shard):
    return {k: _to_blocks(rows_R, t, g, shard) for k, t in data.items()}


def _all_from_blocks(loaded, rows_R, g, shard):
    kinds = sorted({key.split(".")[0] for key in loaded if key.split(".")[0] in ("weight", "exp_avg", "exp_avg_sq")})
    return {k: _from_blocks(torch.stack([loaded[f"{k}.{layer}"] for layer in LAYERS], dim=1), rows_R, g, shard)
            for k in kinds}


def _blocks_sharded(g, shard, blocks):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    sd = {}
    for kind, t in blocks.items():
        for slot, layer in enumerate(LAYERS):
            sd[f"{kind}.{layer}"] = ShardedTensor.from_rank_offsets(
                f"stem.{layer}.{kind}", t[:, slot].contiguous(), (0, g, shard), replica_id=0)
    return sd


def _bench(rank, world, root, reps):
    from megatron.core import dist_checkpointing

    from stem_megatron import compat

    compat.apply()
    g, shard = rank, world
    rows_R, data, step_R = _engine_state(g, shard)
    times: dict[str, list[float]] = {}

    def timed(name, fn, *args):
        dist.barrier()
        t0 = time.perf_counter()
        out = fn(*args)
        dist.barrier()
        dt = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        times.setdefault(name, []).append(dt.item())
        return out

    for rep in range(reps):
        files_dir, blocks_dir = os.path.join(root, f"files{rep}"), os.path.join(root, f"blocks{rep}")
        if rank == 0:
            os.makedirs(files_dir)
            os.makedirs(blocks_dir)
        dist.barrier()
        entry = timed("files: save", _save_files, files_dir, g, shard, rows_R, data, step_R)
        entries = [None] * world
        dist.all_gather_object(entries, entry)
        index = {"vocab_size": V, "ffn_hidden_size": F, "layers": LAYERS, "files": entries}
        timed("files: load, same layout", _read, files_dir, index, rows_R, 0, F)
        if rank == 0:  # one rank of a G=1 run reads every row
            t0 = time.perf_counter()
            _read(files_dir, index, torch.arange(V), 0, F)
            times.setdefault("files: load at G=1 (one rank, all rows)", []).append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _read(files_dir, index, torch.arange(V), 0, F // 2)
            times.setdefault("files: load at G=1, T=2 (half the columns)", []).append(time.perf_counter() - t0)
        blocks = timed("blocks: all-to-all to row blocks", _all_to_blocks, rows_R, data, g, shard)
        timed("blocks: dist_checkpointing.save", dist_checkpointing.save, _blocks_sharded(g, shard, blocks), blocks_dir)
        empty = {k: torch.empty_like(t) for k, t in blocks.items()}
        loaded = timed("blocks: dist_checkpointing.load", dist_checkpointing.load,
                       _blocks_sharded(g, shard, empty), blocks_dir)
        back = timed("blocks: all-to-all back", _all_from_blocks, loaded, rows_R, g, shard)
        assert all(torch.equal(back[k], data[k]) for k in data), "block round trip changed the rows"
    sizes = {"files": sum(os.path.getsize(os.path.join(root, "files0", f)) for f in os.listdir(os.path.join(root, "files0")))}
    sha = None
    if rank == 0:
        path = os.path.join(root, "files0", "rank0.safetensors")
        t0 = time.perf_counter()
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        sha = os.path.getsize(path) / (time.perf_counter() - t0) / 2**20
    return {k: statistics.median(v) for k, v in times.items()}, sizes, sha


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="bench_ckpt_")
    try:
        times, sizes, sha = run_distributed(_bench, world_size=2, args=(root, args.reps), timeout=1800)[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mb = sizes["files"] / 2**20
    lines = [
        "## STEM table checkpoints (`bench_checkpoint`)",
        "",
        f"Machine: {machine()}; `{COMMAND}`. Tables V={V}, L={len(LAYERS)}, F={F}, weight + 2 moments fp32 + steps "
        f"= {mb:.0f} MiB, 2 gloo ranks (G=2), slowest rank, median of {args.reps}. Shared 2-core machine: "
        "compare rows with each other, not with other machines.",
        "",
        "| operation | seconds |",
        "| --- | --- |",
    ]
    for name, t in times.items():
        lines.append(f"| {name} | {t:.3f} |")
    lines += ["", f"sha256 (manifest) throughput: {sha:.0f} MiB/s on one core."]
    if not args.no_doc:
        write_section("bench_checkpoint", "\n".join(lines))
    print("\n".join(lines))
    print_json_line({"times_s": times, "mib": mb, "sha256_mib_s": sha})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
