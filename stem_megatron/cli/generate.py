"""`stem-generate`: the command line of `stem_megatron.inference.generate` (sampling, the batch and its
exit codes are documented there and in docs/evaluation.md).

Arguments are checked before anything is loaded (stem_megatron.cli.args: no nan, no negative, a
64-bit seed; --device must exist here); prompts longer than the context with --max-new-tokens are
refused by the bound every generating command shares (inference.generate.check_lengths).
"""

from __future__ import annotations

import json
import sys

from stem_megatron.cli.args import OneLineParser, nonneg_float, nonneg_int, positive_int, seed, unit_interval


def read_prompts(texts: list[str], prompt_file: str | None) -> list[str]:
    """Every --prompt, then one prompt per non-blank line of --prompt-file (UTF-8; a line that is
    not is a one-line error naming it)."""
    from stem_megatron.cli.inputs import read_texts

    prompts = list(texts or [])
    if prompt_file:
        prompts += list(read_texts([prompt_file], flag="--prompt-file", split="lines"))
    return prompts


def parse_args(argv=None):
    ap = OneLineParser(prog="stem-generate", description="text from a checkpoint or an export, with a KV cache "
                       "and STEM tables on the device or the host")
    ap.add_argument("--model", required=True, help="an export directory or a checkpoint (save or step_N directory)")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    ap.add_argument("--prompt-file", help="more prompts, one per non-empty line")
    ap.add_argument("--max-new-tokens", type=positive_int, required=True,
                    help="tokens to generate; each prompt plus this must fit the model's context")
    ap.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy [0]")
    ap.add_argument("--top-k", type=nonneg_int, default=0, help="keep the k most likely tokens; 0 = all [0]")
    ap.add_argument("--top-p", type=unit_interval, default=1.0, help="nucleus: smallest set with this mass [1.0]")
    ap.add_argument("--seed", type=seed, default=0, help="sampling seed, 0 .. 2**64-1 [0]")
    ap.add_argument("--tables", choices=("device", "host"), default="device",
                    help="STEM tables on the compute device, or in host memory with a row cache [device]")
    ap.add_argument("--cache-rows", type=nonneg_int, default=4096, help="device row cache of --tables host [4096]")
    ap.add_argument("--chunk-size", type=positive_int, default=128, help="prefill chunk, in positions [128]")
    ap.add_argument("--device", help="cpu, cuda, cuda:N, ... [cuda if available, else cpu]")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from stem_megatron import cli
    from stem_megatron.inference.generate import GenerationError
    from stem_megatron.inference.loading import ModelLoadError

    cli.quiet_known_warnings()
    return cli.run("stem-generate", lambda: _generate(args),
                   errors=((GenerationError, 2, ""), (ModelLoadError, 4, "")))


def _generate(args) -> int:
    from stem_megatron.cli.inputs import parse_device
    from stem_megatron.inference.generate import GenerationError, Generator, Sampling
    from stem_megatron.inference.loading import load_model

    device = parse_device(args.device)
    texts = read_prompts(args.prompt, args.prompt_file)
    if not texts:
        raise GenerationError("no prompt given (--prompt or --prompt-file)")
    loaded = load_model(args.model)
    tok = loaded.tokenizer
    prompts = [tok.encode(t) for t in texts]
    generator = Generator(loaded.model, context_length=loaded.context_length, vocab=tok.vocab_size, eod=tok.eod,
                          tables=args.tables, device=device, cache_rows=args.cache_rows,
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
