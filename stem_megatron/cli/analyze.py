"""`stem-analyze`: angular spread of STEM rows and unique tokens vs context length on a corpus.

    stem-analyze --model runs/tiny_stem/checkpoints --corpus data/sample/valid.jsonl --output analysis/ \\
        [--dense runs/tiny_dense/checkpoints] [--top-tokens 256] [--max-tokens 200000] [--max-context 4096]

`--model` / `--dense` take an export or a checkpoint directory (or save root). Corpus files are
`.jsonl` ({"text": ...} per line) or plain text. Writes, into DIR, angular_spread.{json,png}
and unique_tokens.{json,png} (the methods: stem_megatron/analysis.py), only after every number
is computed. Exit codes: 0 written, 2 bad input, 4 model not loadable, 130 interrupted (Ctrl-C);
errors are one line on stderr (stem_megatron.cli.run).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

from stem_megatron.cli.args import OneLineParser, int_at_least, positive_int
from stem_megatron.cli.inputs import read_texts, say_skipped
from stem_megatron.outputs import prepare_output


def parse_args(argv):
    ap = OneLineParser(prog="stem-analyze", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="STEM model: export or checkpoint directory / save root")
    ap.add_argument("--corpus", required=True, nargs="+", metavar="FILE", help=".jsonl or plain-text files")
    ap.add_argument("--output", required=True, metavar="DIR")
    ap.add_argument("--dense", help="dense model (export or checkpoint) for the angular-spread comparison")
    ap.add_argument("--top-tokens", type=int_at_least(2), default=256,
                    help="N most frequent tokens compared pairwise [256]")
    ap.add_argument("--max-tokens", type=int_at_least(4), default=200_000,
                    help="read at most about this many corpus tokens")
    ap.add_argument("--max-context", type=int_at_least(2), default=4096, help="longest context length measured [4096]")
    ap.add_argument("--window", type=positive_int,
                    help="dense model context window, at most its training length [its training length]")
    ap.add_argument("--tokenizer", help="tokenizer instead of the one the model carries (same vocabulary)")
    return ap.parse_args(argv)


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def run(args) -> dict:
    from stem_megatron import analysis, analysis_plots
    from stem_megatron.inference.loading import load_model

    analysis_plots.require()
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise analysis.AnalysisError(f"--output {args.output} exists and is not a directory")
    prepare_output(args.output, inputs=args.corpus, kind="root", overwrite=True)
    loaded = load_model(args.model, tokenizer=args.tokenizer)
    if not loaded.stem_layers:
        raise analysis.AnalysisError(f"{args.model}: the model has no STEM layers")
    dense = load_model(args.dense, tokenizer=args.tokenizer, flag="--dense") if args.dense else None
    if dense is not None:
        analysis.check_dense(dense.model, f"--dense {args.dense}")
        if dense.model.config.vocab_size < loaded.text_vocab_size:
            raise analysis.AnalysisError("--dense has a smaller vocabulary than --model: they must share the tokenizer")
        if args.window is not None and args.window > dense.context_length:
            raise analysis.AnalysisError(f"--window {args.window}: the --dense model was trained at "
                                         f"{dense.context_length} positions; give at most that")
    window = args.window or (dense.context_length if dense else 256)
    tok = loaded.tokenizer
    skipped = Counter()
    docs = analysis.encode_corpus(read_texts(args.corpus, flag="--corpus", skipped=skipped), tok, args.max_tokens)
    say_skipped("stem-analyze", skipped)
    exclude = {tok.eod} if tok.eod is not None else set()
    spread, raw = analysis.angular_spread(loaded.model, docs, args.top_tokens,
                                           dense.model if dense else None, window, exclude)
    spread |= {"model": args.model, "dense": args.dense, "corpus": args.corpus, "dense_window": window if dense else None}
    unique = analysis.unique_tokens(loaded.model, docs, tok.eod, args.max_context) | {"corpus": args.corpus}
    os.makedirs(args.output, exist_ok=True)
    paths = {k: os.path.join(args.output, k) for k in
             ("angular_spread.png", "unique_tokens.png", "angular_spread.json", "unique_tokens.json")}
    analysis_plots.angular_spread_png(paths["angular_spread.png"], spread, raw)
    analysis_plots.unique_tokens_png(paths["unique_tokens.png"], unique)
    _write_json(paths["angular_spread.json"], spread)
    _write_json(paths["unique_tokens.json"], unique)
    return {"angular_spread": spread, "unique_tokens": unique}


def main(argv=None) -> int:
    args = parse_args(argv)
    from stem_megatron import analysis, cli
    from stem_megatron.data.tokenizer import TokenizerError
    from stem_megatron.inference.loading import ModelLoadError

    cli.quiet_known_warnings()
    return cli.run("stem-analyze", lambda: _report(args, run(args)), errors=(
        (analysis.AnalysisError, 2, ""), (TokenizerError, 2, ""), (UnicodeDecodeError, 2, ""),
        (ModelLoadError, 4, "cannot load the model: ")))


def _report(args, out: dict) -> int:
    spread, unique = out["angular_spread"], out["unique_tokens"]
    for layer, e in spread["layers"].items():
        line = f"layer {layer}: STEM rows cos mean {e['stem']['mean']:.4f} (angle {e['stem']['mean_angle_deg']:.1f} deg)"
        if "dense" in e:
            line += (f" | dense layer {e['dense_layer']} W_up x cos mean {e['dense']['mean']:.4f} "
                     f"(angle {e['dense']['mean_angle_deg']:.1f} deg)")
        print(line)
    h = unique["heaps"]
    print(f"Heaps' law: unique(n) = {h['K']:.3f} n^{h['beta']:.3f} (R^2 {h['r2']:.4f}) over "
          f"{unique['corpus_tokens']} tokens")
    print(f"wrote {args.output}: angular_spread.png angular_spread.json unique_tokens.png unique_tokens.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
