"""A small local multiple-choice task for lm-eval-harness, and the project's own scoring of it.

No benchmark dataset can be downloaded on an offline machine, so this builds one from text the
project has (the sample corpus' `valid.jsonl`, or any `{"text": ...}` JSONL):

    python -m stem_megatron.hf.lm_eval_task --input data/sample/valid.jsonl --output runs/lm_eval_task
    lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True \\
        --include_path runs/lm_eval_task --tasks stem_local_mc --device cpu --batch_size 8

Each item: the first `context_words` words of a sentence as the context; its next
`continuation_words` words are the right answer, the words at the same place in other sentences
are the wrong ones (lm-eval scores each choice by log p(" " + choice | context), `acc` and
`acc_norm`, like hellaswag). `continuation_logprobs` computes the same log-likelihoods with the
project's `ReferenceStemLM` and tokenizer (docs/interop.md; tests/test_export.py compares them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys

import torch

TASK = "stem_local_mc"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def make_items(texts: list[str], n_items: int, *, n_choices: int = 4, context_words: int = 12,
               continuation_words: int = 4, seed: int = 0) -> list[dict]:
    """Multiple-choice items {"context", "choices", "label"} from sentences of `texts`."""
    need = context_words + continuation_words
    sentences = []
    for text in texts:
        for s in _SENTENCE_END.split(text):
            words = s.split()
            if len(words) >= need:
                sentences.append(words)
    if len(sentences) < n_choices:
        raise ValueError(f"only {len(sentences)} sentences of >= {need} words; need at least {n_choices}")
    rng = random.Random(seed)
    rng.shuffle(sentences)
    items = []
    for k, words in enumerate(sentences[:n_items]):
        gold = " ".join(words[context_words:need])
        others = [w for j, w in enumerate(sentences) if j != k]
        wrong = []
        while len(wrong) < n_choices - 1:
            cand = " ".join(rng.choice(others)[context_words:need])
            if cand != gold and cand not in wrong:
                wrong.append(cand)
        label = rng.randrange(n_choices)
        choices = wrong[:label] + [gold] + wrong[label:]
        items.append({"context": " ".join(words[:context_words]), "choices": choices, "label": label})
    return items


def write_task(out_dir: str, items: list[dict], name: str = TASK) -> str:
    """Write `items.jsonl` and `{name}.yaml` (an lm-eval task over that file); returns the YAML path."""
    os.makedirs(out_dir, exist_ok=True)
    data = os.path.abspath(os.path.join(out_dir, "items.jsonl"))
    with open(data, "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    yaml_path = os.path.join(out_dir, f"{name}.yaml")
    with open(yaml_path, "w") as f:
        f.write(
            f"task: {name}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(data)}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            'doc_to_text: "{{context}}"\n'
            'doc_to_choice: "{{choices}}"\n'
            'doc_to_target: "{{label}}"\n'
            'target_delimiter: " "\n'
            "metric_list:\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
            "metadata:\n  version: 1.0\n"
        )
    return yaml_path


@torch.no_grad()
def continuation_logprobs(model, tokenizer, context: str, continuations: list[str]) -> list[float]:
    """sum log p(continuation tokens | context) for each continuation, with the project's model.

    Tokenised as lm-eval does for causal models: the continuation's tokens are those of
    `context + continuation` after the tokens of `context` alone. `model(ids [1, s])` -> logits.
    """
    ctx = tokenizer.encode(context)
    out = []
    for cont in continuations:
        whole = tokenizer.encode(context + cont)
        target = whole[len(ctx):]
        ids = torch.tensor([whole[:-1]])
        logp_sv = model(ids)[0].float().log_softmax(-1)[-len(target):]
        out.append(float(logp_sv.gather(1, torch.tensor(target)[:, None]).sum()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", required=True, help='JSONL with a "text" field per line (data/sample/valid.jsonl)')
    ap.add_argument("--output", required=True, help="directory for items.jsonl + the task YAML (--include_path)")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--context-words", type=int, default=12)
    ap.add_argument("--continuation-words", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        with open(args.input) as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        items = make_items(texts, args.items, context_words=args.context_words,
                           continuation_words=args.continuation_words, seed=args.seed)
    except (OSError, ValueError, KeyError) as e:
        print(f"lm_eval_task: {e}", file=sys.stderr)
        return 2
    path = write_task(args.output, items)
    print(f"lm_eval_task: wrote {len(items)} items and {path} (lm_eval --include_path {args.output} --tasks {TASK})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
