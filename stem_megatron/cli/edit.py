"""`stem-edit`: replace the STEM rows at an entity in a prompt and compare the model's answers.

    stem-edit --model exported/x --prompt "The capital of France is" --source France \\
        --target Germany --mode auto [--layers 1 3] [--top-k 5] [--max-new-tokens 20] [--persist OUT]

`--model` is an export (stem-export) or a checkpoint directory (or save root). Prints the top-k next
tokens and a greedy continuation before and after the edit, then the JSON record as the last line.
`--persist OUT` (one_to_one only) writes a new export whose tables carry the edit: every occurrence
of the source tokens then reads the target's rows. The modes are described in stem_megatron/editing.py.
Exit codes: 0 done, 2 bad arguments or an edit that does not apply, 4 model not loadable,
130 interrupted (Ctrl-C); errors are one line on stderr (stem_megatron.cli.run).
"""

from __future__ import annotations

import json
import os
import sys

from stem_megatron import editing
from stem_megatron.cli.args import OneLineParser, nonblank, nonneg_int, positive_int
from stem_megatron.outputs import prepare_output

DEFAULT_NEW_TOKENS = 20


def _layers(values: list[str] | None) -> list[int] | None:
    if values is None:
        return None
    try:
        return [int(x) for v in values for x in v.split(",") if x]
    except ValueError:
        raise editing.EditError(f"--layers takes layer indices (e.g. 1 3 or 1,3); got {' '.join(values)}") from None


def parse_args(argv):
    ap = OneLineParser(prog="stem-edit", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="export directory or checkpoint directory / save root")
    ap.add_argument("--prompt", required=True, type=nonblank)
    ap.add_argument("--source", required=True, type=nonblank,
                    help="entity text in the prompt (its last occurrence is edited)")
    ap.add_argument("--target", required=True, type=nonblank, help="entity whose STEM rows the source positions take")
    ap.add_argument("--mode", required=True, choices=editing.MODES)
    ap.add_argument("--layers", nargs="+", help="STEM layers to edit (global 0-based) [all STEM layers]")
    ap.add_argument("--top-k", type=positive_int, default=5, help="next-token candidates to show [5]")
    ap.add_argument("--max-new-tokens", type=nonneg_int,
                    help="greedy continuation length; the prompt plus this must fit the model's context "
                         "[20, or what the context leaves after the prompt when less]")
    ap.add_argument("--persist", metavar="OUT", help="write a new export with the edit in the tables (one_to_one)")
    ap.add_argument("--tokenizer", help="tokenizer file/directory instead of the one the model carries (same vocabulary)")
    return ap.parse_args(argv)


def _show(name: str, side: dict) -> None:
    top = ", ".join(f"{t['token']!r} {t['prob']:.3f}" for t in side["top_k"])
    print(f"{name:>6}: next {top}")
    print(f"{'':>6}  continuation {side['continuation']!r}")


def run(args) -> dict:
    from stem_megatron.export import write_export
    from stem_megatron.inference.generate import check_lengths
    from stem_megatron.inference.loading import load_model

    layers = _layers(args.layers)
    if args.persist and args.mode not in ("one_to_one", "auto"):
        raise editing.EditError(f"--persist needs --mode one_to_one (or auto with equal lengths); got {args.mode}")
    if args.persist and os.path.exists(args.persist) and (not os.path.isdir(args.persist) or os.listdir(args.persist)):
        raise FileExistsError(f"--persist {args.persist} exists and is not empty")
    prepare_output(args.persist, inputs=[args.model, args.tokenizer], kind="dir", flag="--persist")
    loaded = load_model(args.model, tokenizer=args.tokenizer)
    editing.check_layers(loaded.model, layers)
    prompt_ids, plan, edit_layers = editing.prepare_edit(loaded.model, loaded.tokenizer, args.prompt, args.source,
                                                         args.target, args.mode, layers)
    # stem-generate's bound: the prompt and the continuation fit the context (no unbounded loop)
    max_new = args.max_new_tokens
    if max_new is None:  # the default, not a number the user gave: shortened to what the context leaves
        max_new = max(0, min(DEFAULT_NEW_TOKENS, loaded.context_length - len(prompt_ids)))
    check_lengths([len(prompt_ids)], max_new, loaded.context_length, min_new=0)
    if args.persist:  # before any output: a mode that does not apply writes nothing
        state, changed = editing.persisted_state(loaded.model, plan, edit_layers)
    record = editing.edit_record(loaded.model, loaded.tokenizer, prompt_ids, plan, edit_layers, args.top_k, max_new)
    record.update(source=args.source, target=args.target)
    if args.persist:
        words = [loaded.tokenizer.decode([i]) for i in changed]
        print(f"stem-edit: warning: --persist rewrites the rows of tokens {words} in layers {record['layers']}: "
              "every occurrence of them, in any text, now reads the target's rows", file=sys.stderr)
        edit = {k: record[k] for k in ("source", "target", "mode", "layers")} | {"changed_ids": changed}
        # a full export (transformers model files, tokenizer.json) like stem-export's, in fp32 as edited
        write_export(args.persist, state, loaded.config | {"stem_edit": edit}, loaded.tokenizer_source, "float32")
        record["persisted"] = args.persist
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    from stem_megatron import cli
    from stem_megatron.data.tokenizer import TokenizerError
    from stem_megatron.inference.generate import GenerationError
    from stem_megatron.inference.loading import ModelLoadError

    cli.quiet_known_warnings()
    return cli.run("stem-edit", lambda: _report(run(args)), errors=(
        (editing.EditError, 2, ""), (GenerationError, 2, ""), (FileExistsError, 2, ""), (TokenizerError, 2, ""),
        (ModelLoadError, 4, "cannot load the model: ")),
        interrupted_note="nothing persisted (an export is written under a temporary name)")


def _report(record: dict) -> int:
    print(f"edit: {record['source_tokens']} -> {record['target_tokens']} at tokens {record['span']} "
          f"({record['resolved_mode']}, layers {record['layers']})")
    _show("before", record["before"])
    _show("after", record["after"])
    if "persisted" in record:
        print(f"persisted: {record['persisted']}")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
