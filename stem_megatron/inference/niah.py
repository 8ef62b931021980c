"""Needle in a haystack (`stem-eval niah`): retrieve a passkey placed at a depth of a long context.

For each context length and depth, `trials` prompts are built (`build_prompt`):

    haystack[:p] + needle + haystack[p:] + question        needle at p = round(depth x haystack tokens)

- haystack: real text (the sample corpus' valid.jsonl, or --haystack), tokenized once; trial t
  starts at another offset of it;
- needle: " The passkey is 48213. Remember it. 48213 is the passkey." (a random 5-digit key per
  trial); question: " What is the passkey? The passkey is";
- the haystack part is cut so that prompt + answer + 2 generated tokens fill the length exactly.

The model answers greedily (answer tokens + 2 new tokens); a trial is correct when the key's digits
appear in its answer. `answer_nll` is the mean negative log-likelihood (nats per token) of the
answer tokens " 48213" given the prompt (teacher forcing); `needle_gain` is the same NLL for the
prompt with the needle removed minus `answer_nll`: above 0 the model draws on the needle, which
moves long before accuracy does and so shows whether a small model uses the context at all.

Output directory: `niah.json` (everything), `niah.md` (accuracy, NLL and needle-gain tables), `niah.png`
(depth x length heatmaps of accuracy and needle gain). Written under a temporary name and
renamed when complete.

Legend: b prompts of one cell, P prompt length, v vocabulary.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from stem_megatron.outputs import atomic_dir

NEEDLE = " The passkey is {key}. Remember it. {key} is the passkey."
QUESTION = " What is the passkey? The passkey is"
ANSWER = " {key}"
EXTRA_TOKENS = 2  # generated beyond the answer's length (room for a different tokenization of the key)


@dataclass
class NeedlePrompt:
    ids: list[int]
    needle_start: int  # index of the needle's first token in `ids`
    needle_len: int
    haystack_len: int  # haystack tokens in the prompt
    depth: float  # needle_start / haystack_len: the depth actually used
    key: str
    answer: list[int]  # token ids of ANSWER


def min_length(tokenizer) -> int:
    """The shortest length that fits needle, question, answer and 16 haystack tokens."""
    key = "00000"
    return (len(tokenizer.encode(NEEDLE.format(key=key))) + len(tokenizer.encode(QUESTION))
            + len(tokenizer.encode(ANSWER.format(key=key))) + EXTRA_TOKENS + 16)


def build_prompt(tokenizer, haystack: list[int], length: int, depth: float, key: str, offset: int = 0) -> NeedlePrompt:
    """The prompt of one trial: prompt + answer + EXTRA_TOKENS fill `length`."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle = tokenizer.encode(NEEDLE.format(key=key))
    question = tokenizer.encode(QUESTION)
    answer = tokenizer.encode(ANSWER.format(key=key))
    n_hay = length - len(needle) - len(question) - len(answer) - EXTRA_TOKENS
    if n_hay < 1:
        raise ValueError(f"length {length} is too short for the needle and question ({length - n_hay + 1} tokens)")
    if n_hay > len(haystack):
        raise ValueError(f"the haystack has {len(haystack)} tokens; length {length} needs {n_hay}")
    offset = offset % (len(haystack) - n_hay + 1)
    hay = haystack[offset:offset + n_hay]
    p = round(depth * n_hay)
    return NeedlePrompt(hay[:p] + needle + hay[p:] + question, p, len(needle), n_hay, p / n_hay, key, answer)


def haystack_ids(texts: Iterable[str], tokenizer, max_tokens: int = 1 << 20, name: str = "--haystack") -> list[int]:
    """Token ids of the haystack: `texts` (the command reads the file) joined by blank lines, at
    most `max_tokens`; reading stops once there is plenty of text."""
    from stem_megatron.inference.documents import InputError

    kept, size = [], 0
    for text in texts:
        kept.append(text)
        size += len(text)
        if size > 8 * max_tokens:  # plenty: a token is rarely under one character
            break
    ids = tokenizer.encode("\n\n".join(kept)[: 8 * max_tokens])[:max_tokens]
    if not ids:
        raise InputError(f"{name}: no text")
    return ids


def default_lengths(context: int, shortest: int) -> list[int]:
    return sorted({n for n in (context // 4, context // 2, 3 * context // 4, context) if n >= shortest})


def answer_nll(generator, prompts: list[list[int]], answers: list[list[int]]) -> list[float]:
    """Mean NLL (nats per token) of each answer given its prompt, by teacher forcing."""
    logits_bPv = generator.logits([p + a for p, a in zip(prompts, answers)]).float()
    logp_bPv = logits_bPv[..., :generator.vocab].log_softmax(-1)
    P = logits_bPv.shape[1]
    out = []
    for b, answer in enumerate(answers):
        # left-padded: sequence b ends at P - 1; answer token k is predicted at position P - len(answer) - 1 + k
        first = P - len(answer) - 1
        out.append(-sum(logp_bPv[b, first + k, t].item() for k, t in enumerate(answer)) / len(answer))
    return out


def run_niah(generator, tokenizer, haystack: list[int], lengths: list[int], depths: list[float], trials: int,
             seed: int = 0, progress=None) -> dict:
    """Accuracy and answer NLL per (depth, length) cell; `generator` is a generate.Generator."""
    rng = random.Random(seed)
    acc = [[0.0] * len(lengths) for _ in depths]
    nll = [[0.0] * len(lengths) for _ in depths]
    gain = [[0.0] * len(lengths) for _ in depths]
    cells = []
    for j, length in enumerate(lengths):
        for i, depth in enumerate(depths):
            prompts = [build_prompt(tokenizer, haystack, length, depth, f"{rng.randrange(10**5):05d}",
                                    offset=rng.randrange(1 << 30)) for _ in range(trials)]
            out = generator.generate([p.ids for p in prompts], min(len(p.answer) + EXTRA_TOKENS for p in prompts))
            answers = [tokenizer.decode(t) for t in out.tokens]
            correct = [p.key in a for p, a in zip(prompts, answers)]
            cell_nll = answer_nll(generator, [p.ids for p in prompts], [p.answer for p in prompts])
            # control: the same prompts without the needle; the answer can only come from priors
            no_needle = [p.ids[:p.needle_start] + p.ids[p.needle_start + p.needle_len:] for p in prompts]
            cell_control = answer_nll(generator, no_needle, [p.answer for p in prompts])
            acc[i][j] = sum(correct) / trials
            nll[i][j] = sum(cell_nll) / trials
            gain[i][j] = sum(cell_control) / trials - nll[i][j]
            cells.append({"length": length, "depth": depth, "accuracy": acc[i][j], "answer_nll": nll[i][j],
                          "needle_gain": gain[i][j],
                          "trials": [{"key": p.key, "answer": a, "correct": c, "needle_start": p.needle_start,
                                      "depth": p.depth, "haystack_tokens": p.haystack_len, "prompt_tokens": len(p.ids)}
                                     for p, a, c in zip(prompts, answers, correct)]})
            if progress is not None:
                progress.update(1)
    return {"lengths": lengths, "depths": depths, "trials": trials, "accuracy": acc, "answer_nll": nll,
            "needle_gain": gain,
            "mean_accuracy": sum(map(sum, acc)) / (len(depths) * len(lengths)), "cells": cells}


def markdown_table(result: dict, key: str, fmt: str) -> str:
    head = "| depth \\ length | " + " | ".join(str(n) for n in result["lengths"]) + " |"
    rule = "|---" * (len(result["lengths"]) + 1) + "|"
    rows = [f"| {100 * d:.0f}% | " + " | ".join(format(v, fmt) for v in row) + " |"
            for d, row in zip(result["depths"], result[key])]
    return "\n".join([head, rule, *rows])


def heatmap(result: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label, cmap, vmin, vmax in (
        (axes[0], "accuracy", "accuracy", "RdYlGn", 0.0, 1.0),
        (axes[1], "needle_gain", "needle gain: answer NLL without - with needle (nats/token)", "RdBu", None, None),
    ):
        values = torch.tensor(result[key])
        if key == "needle_gain":  # diverging colours centred on 0 (no effect)
            vmax = max(values.abs().max().item(), 1e-6)
            vmin = -vmax
        im = ax.imshow(values.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
        ax.set_yticks(range(len(result["depths"])), [f"{100 * d:.0f}%" for d in result["depths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(label)
        for i, row in enumerate(result[key]):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, output: str, title: str) -> None:
    """niah.json, niah.md, niah.png into `output` (created; must not exist or be empty), atomically."""
    with atomic_dir(output) as tmp:
        with open(os.path.join(tmp, "niah.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(tmp, "niah.md"), "w") as f:
            f.write(f"# {title}\n\nAccuracy ({result['trials']} trials per cell):\n\n"
                    + markdown_table(result, "accuracy", ".2f")
                    + "\n\nAnswer NLL (nats per answer token, teacher forcing):\n\n"
                    + markdown_table(result, "answer_nll", ".3f")
                    + "\n\nNeedle gain (answer NLL without the needle minus with it; > 0: the model uses the needle):\n\n"
                    + markdown_table(result, "needle_gain", ".3f") + "\n")
        heatmap(result, os.path.join(tmp, "niah.png"), title)
