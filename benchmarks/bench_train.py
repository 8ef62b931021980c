"""Training throughput: tiny_stem vs tiny_dense on this machine, same run, as a ratio.

    python -m benchmarks.bench_train [--steps 12] [--nproc 2]

Both configs train on the sample corpus (`make sample-data`) with `--nproc` gloo processes (or
GPUs) through launch/torchrun.sh; tokens/s and step time are the trainer's own figures over all
steps but the first (which includes warm-up). The runs alternate dense, STEM, dense, STEM so
machine noise hits both; the table gives each run and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks.common import machine, print_json_line, write_section
from benchmarks.runs import train


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    common = [f"train.train_steps={args.steps}", "train.warmup_steps=1", "train.eval_interval=0",
              "checkpoint.save=null", f"logging.log_interval={args.steps}"]
    runs = {"tiny_dense": [], "tiny_stem": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(train(f"configs/{name}.yaml", common + [f"logging.run_name=bench_{name}"], args.nproc))
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "step_time_s")} for n, rs in runs.items()}
    ratio = med["tiny_stem"]["tokens_per_s"] / med["tiny_dense"]["tokens_per_s"]
    lines = [
        "## Training throughput: tiny_stem vs tiny_dense",
        "",
        f"Command: `python -m benchmarks.bench_train --steps {args.steps} --nproc {args.nproc} --repeats {args.repeats}`  ",
        f"Machine: {machine()}; {args.nproc} processes; sample corpus; steps after the first.",
        "",
        "| config | tokens/s (median) | step time s (median) | runs (tokens/s) |",
        "|---|---|---|---|",
    ]
    for n, rs in runs.items():
        lines.append(f"| {n} | {med[n]['tokens_per_s']:,.0f} | {med[n]['step_time_s']:.3f} | "
                     + ", ".join(f"{r['tokens_per_s']:,.0f}" for r in rs) + " |")
    lines += ["", f"STEM / dense tokens/s: **{ratio:.3f}**"]
    if not args.no_write:
        write_section("train-cpu", "\n".join(lines))
    print("\n".join(lines))
    print_json_line({"benchmark": "train", "stem_over_dense_tokens_per_s": ratio, "median": med, "nproc": args.nproc})


if __name__ == "__main__":
    main()
