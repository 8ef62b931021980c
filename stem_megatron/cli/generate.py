"""`stem-generate`: the command line of `stem_megatron.inference.generate` (sampling, the batch and its
exit codes are documented there and in docs/evaluation.md)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from stem_megatron.inference.generate import GenerationError, Generator, Sampling
from stem_megatron.inference.generate import __doc__ as generate_doc


def read_prompts(texts: list[str], prompt_file: str | None) -> list[str]:
    prompts = list(texts or [])
    if prompt_file:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise GenerationError(f"--prompt-file {prompt_file}: {e.strerror or e}") from None
    return prompts


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="stem-generate", description=generate_doc.split("\n")[0])
    ap.add_argument("--model", required=True, help="an export directory or a checkpoint (save or step_N directory)")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    ap.add_argument("--prompt-file", help="more prompts, one per non-empty line")
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy [0]")
    ap.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = all [0]")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus: smallest set with this mass [1.0]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tables", choices=("device", "host"), default="device",
                    help="STEM tables on the compute device, or in host memory with a row cache [device]")
    ap.add_argument("--cache-rows", type=int, default=4096, help="device row cache of --tables host [4096]")
    ap.add_argument("--chunk-size", type=int, default=128, help="prefill chunk, in positions [128]")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from stem_megatron import cli
    from stem_megatron.inference.loading import ModelLoadError

    cli.quiet_known_warnings()
    return cli.run("stem-generate", lambda: _generate(args),
                   errors=((GenerationError, 2, ""), (ModelLoadError, 4, "")))


def _generate(args) -> int:
    from stem_megatron.inference.loading import load_model

    if not 0.0 < args.top_p <= 1.0 or args.top_k < 0 or args.temperature < 0 or args.chunk_size < 1 \
            or args.cache_rows < 0:
        raise GenerationError("need --temperature >= 0, --top-k >= 0, 0 < --top-p <= 1, --chunk-size >= 1, "
                              "--cache-rows >= 0")
    texts = read_prompts(args.prompt, args.prompt_file)
    if not texts:
        raise GenerationError("no prompt given (--prompt or --prompt-file)")
    loaded = load_model(args.model)
    tok = loaded.tokenizer
    prompts = [tok.encode(t) for t in texts]
    generator = Generator(loaded.model, context_length=loaded.context_length, vocab=tok.vocab_size, eod=tok.eod,
                          tables=args.tables, device=args.device, cache_rows=args.cache_rows,
                          chunk_size=args.chunk_size)
    try:  # close() releases the host row cache (--tables host), also after an error or Ctrl-C
        generator.check(prompts, args.max_new_tokens)
        result = generator.generate(prompts, args.max_new_tokens,
                                    Sampling(args.temperature, args.top_k, args.top_p, args.seed))
    finally:
        generator.close()
    completions = [tok.decode([t for t in new if t != tok.eod]) for new in result.tokens]
    for text, completion in zip(texts, completions):
        print(f"{text}\033[1m{completion}\033[0m" if sys.stdout.isatty() else text + completion)
        print("---")
    report = {"model": args.model, "kind": loaded.kind, "device": str(generator.device), "batch": len(prompts),
              "max_new_tokens": args.max_new_tokens, **result.report(), "completions": completions}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
