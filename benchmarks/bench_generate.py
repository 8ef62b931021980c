"""stem-generate throughput: prefill and decode tokens/s with STEM tables on the device vs in host memory.

    python -m benchmarks.bench_generate [--config configs/tiny_stem.yaml] [--model PATH] [--batch 4]
        [--prompt-tokens 384] [--new-tokens 64] [--repeats 3] [--threads 1] [--no-write]

The model: `--model` (an export or checkpoint), else random weights in the shapes of `--config`
(tiny_stem: 4 layers, hidden 128, ffn 512, GPT-2 vocabulary, STEM layers 1 and 3: 206 MB of
tables). Prompts: `--batch` prompts of `--prompt-tokens` GPT-2 tokens of real text (the sample
corpus' valid.jsonl; random ids if it is absent, said in the table). Each repeat runs both table
placements (device first, then host, alternating the order to share machine noise) through the
`stem_megatron.inference.generate.Generator` that stem-generate uses, greedy, with the default
128-token prefill chunks and a 4096-row cache; the figures are medians over repeats. On a CPU the
"device" is host memory too, so host tables measure the overhead of the HostRowStore path (worker
thread, cache bookkeeping), not a PCIe copy.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics

import torch

from benchmarks.common import machine, print_json_line, write_section


def _prompts(tok, batch: int, n: int, path: str = "data/sample/valid.jsonl") -> tuple[list[list[int]], str]:
    if tok is not None and os.path.isfile(path):
        with open(path) as f:
            text = "\n\n".join(json.loads(line)["text"] for _, line in zip(range(400), f))
        ids = tok.encode(text)
        if len(ids) >= batch * n:
            return [ids[i * n:(i + 1) * n] for i in range(batch)], f"sample corpus ({path})"
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 50000, (batch, n), generator=gen).tolist(), "random ids"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny_stem.yaml")
    ap.add_argument("--model", help="an export or checkpoint instead of random weights")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=384)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads [1]")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from stem_megatron.data.tokenizer import load_tokenizer
    from stem_megatron.inference.generate import Generator

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model:
        from stem_megatron.inference.loading import load_model

        loaded = load_model(args.model)
        ref, tok, vocab = loaded.model, loaded.tokenizer, loaded.tokenizer.vocab_size
        what = f"`{args.model}`"
    else:
        from stem_megatron.config import load_config
        from stem_megatron.testing.models import reference_model

        cfg = load_config(args.config)
        ref, vocab = reference_model(cfg, seed=0).eval(), cfg.model.vocab_size
        tok = load_tokenizer(cfg.data.tokenizer) if os.path.exists(cfg.data.tokenizer) else None
        what = f"random weights, shapes of `{args.config}`"
    prompts, source = _prompts(tok, args.batch, args.prompt_tokens)
    context = args.prompt_tokens + args.new_tokens
    runs = {"device": [], "host": []}
    for r in range(args.repeats):
        for tables in (("device", "host") if r % 2 == 0 else ("host", "device")):
            g = Generator(copy.deepcopy(ref), context_length=context, vocab=vocab, eod=None, tables=tables,
                          device=device)
            out = g.generate(prompts, args.new_tokens).report()
            g.close()
            runs[tables].append(out)
    med = {t: {k: statistics.median(o[k] for o in rs) for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
           for t, rs in runs.items()}
    host = runs["host"][-1]
    cmd = (f"python -m benchmarks.bench_generate --batch {args.batch} --prompt-tokens {args.prompt_tokens} "
           f"--new-tokens {args.new_tokens} --repeats {args.repeats} --threads {args.threads}"
           + (f" --model {args.model}" if args.model else ""))
    lines = [
        "## stem-generate: device vs host tables (`bench_generate`)",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {machine()}; {args.threads} torch thread(s); model: {what}; prompts: {source}; "
        f"batch {args.batch} x {args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens, greedy; "
        f"median of {args.repeats}.",
        "",
        "| tables | prefill tokens/s | decode tokens/s | runs (prefill / decode) |",
        "|---|---|---|---|",
    ]
    for t, rs in runs.items():
        lines.append(f"| {t} | {med[t]['prefill_tokens_per_s']:,.0f} | {med[t]['decode_tokens_per_s']:,.1f} | "
                     + ", ".join(f"{o['prefill_tokens_per_s']:,.0f} / {o['decode_tokens_per_s']:,.1f}" for o in rs)
                     + " |")
    lines += ["", "On a CPU the device is host memory too: host tables cost the HostRowStore path (worker thread, "
              "cache bookkeeping), not a PCIe copy, so the two rows should be about equal; their spread across runs "
              "is this shared machine's load (compare medians). On a GPU the host row shows the cost of copying "
              "rows over PCIe with prefill chunk i+1's copy overlapping chunk i's compute."]
    lines += ["", f"Host row cache (last run): {host['row_hits']} hits, {host['row_misses']} misses "
              f"(hit rate {host['hit_rate']:.2f}), {host['bytes_to_device'] / 2**20:.1f} MiB gathered through HostRowStore."]
    if not args.no_write:
        write_section("bench_generate", "\n".join(lines))
    print("\n".join(lines))
    print_json_line({"benchmark": "generate", "machine": machine(), "median": med, "batch": args.batch,
                     "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                     "host_hit_rate": host["hit_rate"]})


if __name__ == "__main__":
    main()
