"""Step time with host tables over step time with device tables (`stem.offload: host` / `device`).

    python -m benchmarks.bench_offload [--steps 6] [--nproc 2] [--repeats 1] [--data-dir data/sample]

Two configs train on the sample corpus through launch/torchrun.sh, each with device tables and
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

from benchmarks.common import machine, print_json_line, write_section
from benchmarks.runs import train

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
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--data-dir", default="data/sample", help="the sample corpus (default data/sample)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    common = [f"train.train_steps={args.steps}", "train.warmup_steps=1", "train.eval_interval=0",
              "checkpoint.save=null", f"logging.log_interval={args.steps}", *data_overrides(args.data_dir)]
    results: dict = {}
    for name, (config, overrides) in CONFIGS.items():
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
        f"Command: `python -m benchmarks.bench_offload --steps {args.steps} --nproc {args.nproc} --repeats {args.repeats}`  ",
        f"Machine: {machine()}; {args.nproc} processes; sample corpus; host tables: 10% cache, lookahead, "
        "prefetch depth 2; steps after the first. On a CPU the device is the host: the ratio is the cost of the "
        "cache bookkeeping, worker gathers and write-through, not of PCIe copies.",
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
    print_json_line({"benchmark": "offload", **results, "nproc": args.nproc, "machine": machine()})


if __name__ == "__main__":
    main()
