"""`stem-eval`: perplexity / bits per byte (`ppl`) and needle-in-a-haystack retrieval (`niah`).

    stem-eval ppl --model PATH --input FILE_OR_PREFIX... [--json-key text] [--seq-length N]
                  [--stride N] [--max-docs N] [--batch-size N] [parallel.tensor_model_parallel_size=2 ...]
    stem-eval niah --model PATH --output DIR [--haystack FILE] [--lengths 64,128] [--depths 0,0.5,1]

`ppl` on an export runs the plain-PyTorch model in one process. On a checkpoint it runs the
megatron model: under torchrun at the layout given by `parallel.*` overrides (default TP = PP = 1,
data parallel over the world), or in one process without torchrun. The default stride is half the
sequence length (each token after a document's first window sees at least seq_length / 2 tokens
of context). Progress goes to stderr; stdout ends with one JSON line (`loss`, `ppl`,
`bits_per_byte`, `tokens`, `bytes`, ...). `niah` loads either kind into the plain-PyTorch
generation engine (see niah.py for the prompts and outputs).

Exit codes: 0 done, 2 bad arguments or input (missing / empty input, lengths beyond the context),
4 the model does not load (missing or damaged checkpoint), 130 interrupted (Ctrl-C); one line on
stderr (stem_megatron.cli.run), from rank 0 under torchrun.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections import Counter

from stem_megatron.cli.args import OneLineParser, float_list, fraction, int_list, positive_int, seed
from stem_megatron.cli.inputs import parse_device, read_texts, say_skipped
from stem_megatron.errors import UserError
from stem_megatron.outputs import prepare_output

_OVERRIDE = re.compile(r"^[A-Za-z_]+(\.[A-Za-z_]+)+=")


def parse_args(argv=None):
    ap = OneLineParser(prog="stem-eval", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ppl", help="mean loss, perplexity and bits per byte")
    p.add_argument("--model", required=True, help="an export directory or a checkpoint (save or step_N directory)")
    p.add_argument("--input", nargs="+", required=True, help="indexed dataset prefixes, *.jsonl or text files")
    p.add_argument("--json-key", default="text", help="JSONL field holding the text [text]")
    p.add_argument("--seq-length", type=positive_int, help="window length [the model's training sequence length]")
    p.add_argument("--stride", type=positive_int, help="targets a window advances [seq_length / 2]")
    p.add_argument("--max-docs", type=positive_int, help="score at most this many documents")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward [8]")
    p.add_argument("--device", help="export only: cpu, cuda, cuda:N, ... [cuda if available, else cpu]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("overrides", nargs="*", help="checkpoint only: parallel.* layout overrides")
    n = sub.add_parser("niah", help="needle-in-a-haystack passkey retrieval")
    n.add_argument("--model", required=True, help="an export directory or a checkpoint (save or step_N directory)")
    n.add_argument("--output", required=True, help="directory to create (must not exist or be empty)")
    n.add_argument("--haystack", default="data/sample/valid.jsonl", help="JSONL or text [data/sample/valid.jsonl]")
    n.add_argument("--json-key", default="text")
    n.add_argument("--lengths", type=int_list(positive_int),
                   help="context lengths, comma separated [1/4, 1/2, 3/4, 1 x the model's]")
    n.add_argument("--depths", type=float_list(fraction), default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths in [0, 1], comma separated [0,0.25,0.5,0.75,1]")
    n.add_argument("--trials", type=positive_int, default=4, help="prompts per (length, depth) cell [4]")
    n.add_argument("--seed", type=seed, default=0, help="0 .. 2**64-1 [0]")
    n.add_argument("--tables", choices=("device", "host"), default="device")
    n.add_argument("--device", help="cpu, cuda, cuda:N, ... [cuda if available, else cpu]")
    args = ap.parse_args(argv)
    if args.command == "ppl":  # `--input a b section.key=value`: nargs="+" takes the overrides too
        args.overrides += [x for x in args.input if _OVERRIDE.match(x)]
        args.input = [x for x in args.input if not _OVERRIDE.match(x)]
    return args


class _Fail(UserError):
    """A user error with its exit code first, as the checks below read best."""

    def __init__(self, code: int, message: str):
        super().__init__(message, code)


def run_ppl(args) -> dict:
    from stem_megatron.inference.documents import InputError, read_documents
    from stem_megatron.inference.loading import ModelLoadError, describe, load_model
    from stem_megatron.inference.perplexity import ReferenceScorer, evaluate

    try:
        info = describe(args.model)
    except ModelLoadError as e:
        raise _Fail(4, str(e)) from None
    seq = info.context_length if args.seq_length is None else args.seq_length
    if not 1 <= seq <= info.context_length:
        raise _Fail(2, f"--seq-length {seq}: must be in [1, {info.context_length}] (the model's context)")
    stride = max(1, seq // 2) if args.stride is None else args.stride
    if not 1 <= stride <= seq:
        raise _Fail(2, f"--stride {stride}: must be in [1, --seq-length {seq}]")
    if info.kind == "export" and args.overrides:
        raise _Fail(2, f"{args.overrides[0]}: layout overrides apply to checkpoints only")
    if not args.input:
        raise _Fail(2, "--input: no input file (only overrides were given)")
    device = parse_device(args.device) if info.kind == "export" else None
    tok = info.tokenizer
    skipped = Counter()
    try:
        docs = read_documents(args.input, tok, lambda path: read_texts([path], json_key=args.json_key, skipped=skipped),
                              args.max_docs)
    except InputError as e:
        raise _Fail(2, str(e)) from None
    say_skipped("stem-eval ppl", skipped)
    pad = tok.eod if tok.eod is not None else 0
    progress = not args.no_progress
    if info.kind == "export":
        loaded = load_model(args.model)
        result = evaluate(ReferenceScorer(loaded.model.to(device), device), docs, seq_length=seq, stride=stride,
                          batch_size=args.batch_size, pad_id=pad, progress=progress)
        return {"model": args.model, "kind": "export", **result, "skipped_records": dict(skipped)}

    from stem_megatron.config import ConfigError
    from stem_megatron.export import single_process_group
    from stem_megatron.inference.megatron_scorer import MegatronScorer
    from stem_megatron.training.checkpoint_format import CheckpointError

    # Under torchrun the trainer starts the process group from the environment; alone, a
    # one-rank group with no network.
    group = contextlib.nullcontext() if "WORLD_SIZE" in os.environ else single_process_group()
    with group:
        try:
            scorer = MegatronScorer(info.path, args.overrides, seq, args.batch_size)
        except ConfigError as e:
            raise _Fail(2, str(e)) from None
        except CheckpointError as e:
            raise _Fail(4, f"checkpoint error: {e}") from None
        try:
            result = evaluate(scorer, docs, seq_length=seq, stride=stride, batch_size=args.batch_size,
                              pad_id=pad, progress=progress)
        finally:
            scorer.close()
        layout = {"world_size": scorer.trainer.info.world_size, "tp": scorer.trainer.info.tp_size,
                  "pp": scorer.trainer.info.pp_size, "dp": scorer.dp_size}
    return {"model": info.path, "kind": "checkpoint", "layout": layout, **result, "skipped_records": dict(skipped)}


def run_niah(args) -> dict:
    from stem_megatron.inference import niah
    from stem_megatron.inference.documents import InputError
    from stem_megatron.inference.generate import Generator
    from stem_megatron.inference.loading import ModelLoadError, describe, load_model
    from stem_megatron.inference.perplexity import Progress

    if os.path.exists(args.output) and (not os.path.isdir(args.output) or os.listdir(args.output)):
        raise _Fail(2, f"--output {args.output} exists and is not an empty directory")
    device = parse_device(args.device)
    prepare_output(args.output, inputs=[args.model, args.haystack], kind="dir")
    try:
        info = describe(args.model)
    except ModelLoadError as e:
        raise _Fail(4, str(e)) from None
    tok = info.tokenizer
    shortest = niah.min_length(tok)
    lengths = niah.default_lengths(info.context_length, shortest) if args.lengths is None else args.lengths
    bad = [n for n in lengths if not shortest <= n <= info.context_length]
    if bad or not lengths:
        raise _Fail(2, f"--lengths {bad or lengths}: each must be in [{shortest}, {info.context_length}] "
                       f"(needle + question + answer + 16 tokens .. the model's context)")
    if not os.path.isfile(args.haystack):
        raise _Fail(2, f"--haystack {args.haystack}: no such file (run `make sample-data`, or pass --haystack FILE)")
    texts = read_texts([args.haystack], json_key=args.json_key, flag="--haystack")
    try:
        haystack = niah.haystack_ids(texts, tok, max_tokens=4 * max(lengths), name=f"--haystack {args.haystack}")
    except (InputError, ValueError) as e:
        raise _Fail(2, str(e)) from None
    if len(haystack) < max(lengths):
        raise _Fail(2, f"--haystack {args.haystack}: {len(haystack)} tokens, the longest length needs {max(lengths)}")
    loaded = load_model(args.model)
    gen = Generator(loaded.model, context_length=info.context_length, vocab=tok.vocab_size, eod=tok.eod,
                    tables=args.tables, device=device)
    bar = Progress("stem-eval niah", len(lengths) * len(args.depths), "cells")
    try:
        result = niah.run_niah(gen, tok, haystack, lengths, args.depths, args.trials, args.seed, progress=bar)
    finally:
        bar.close()
        gen.close()
    result = {"model": args.model, "kind": info.kind, "haystack": args.haystack, **result}
    niah.write_outputs(result, args.output, f"needle in a haystack: {args.model}")
    return {k: v for k, v in result.items() if k != "cells"} | {"output": args.output}


def main(argv=None) -> int:
    args = parse_args(argv)
    from stem_megatron import cli
    from stem_megatron.inference.loading import ModelLoadError

    cli.quiet_known_warnings()

    def body() -> int:
        result = run_ppl(args) if args.command == "ppl" else run_niah(args)
        if cli.rank() == 0:
            print(json.dumps(result), flush=True)
        return 0

    # Under torchrun only rank 0 prints (cli.run): every rank reads the same files and checks.
    return cli.run(f"stem-eval {args.command}", body, errors=((ModelLoadError, 4, ""),),
                   interrupted_note="no result (niah writes its --output only when complete)")


if __name__ == "__main__":
    sys.exit(main())
