"""Knowledge editing through STEM rows: the input text stays, the table rows at an entity change.

A STEM layer reads its up-projection from a per-token table, so the rows at the positions of a
source entity ("Zorvania") can be replaced by a target entity's rows ("Quelmar") while the
embedding, attention and every other position still see the source tokens. `plan_edit` finds the
source at its last occurrence in the prompt and decides, by mode, which rows each of its n
positions takes from the target's m tokens:

    one_to_one  position i takes target token i (needs n == m)
    average     every position takes the mean of the target's rows (per layer)
    copy        the target's tokens repeated: position i takes target token i mod m
    left_pad    the target right-aligned in the span: truncated to its last n tokens when m > n;
                when m < n the first n - m positions are padding and keep their own (source) rows
    right_pad   the target left-aligned: truncated to its first n tokens; the last n - m
                positions are padding and keep their own rows
    auto        one_to_one when n == m, otherwise average

`row_overrides` turns a plan into the reference model's per-layer overrides
(`ReferenceStemLM.forward(..., row_overrides=...)`, see reference.py); `generate` keeps them on the
edited positions while it appends tokens, so the continuation runs with the edit. `persisted_state`
writes a one_to_one edit into the tables themselves (every occurrence of those tokens changes).

Legend: b batch (1 here), s sequence, n source tokens, m target tokens, f ffn, v vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("one_to_one", "average", "copy", "left_pad", "right_pad", "auto")


class EditError(ValueError):
    """The edit cannot be made (entity absent, mode does not apply, no STEM layers); one line."""


@dataclass
class EditPlan:
    """Where the edit goes and what each source position reads.

    span_ids: per source position, the table id it reads (one_to_one, copy, pads); None for average.
    """

    mode: str  # as requested
    resolved_mode: str  # auto resolved
    start: int  # source span [start, end) in the prompt's ids
    end: int
    source_ids: list[int]
    target_ids: list[int]
    span_ids: list[int] | None


def find_last(ids: list[int], sub: list[int]) -> int | None:
    """Start of the last occurrence of `sub` in `ids`, or None."""
    n = len(sub)
    for start in range(len(ids) - n, -1, -1):
        if ids[start:start + n] == sub:
            return start
    return None


def span_table_ids(mode: str, source_ids: list[int], target_ids: list[int]) -> list[int] | None:
    """The table id each source position reads under `mode` (None: average of the target's rows)."""
    n, m = len(source_ids), len(target_ids)
    if n == 0 or m == 0:
        raise EditError("the source and the target need at least one token each")
    if mode == "auto":
        mode = "one_to_one" if n == m else "average"
    if mode == "one_to_one":
        if n != m:
            raise EditError(f"--mode one_to_one needs as many target tokens as source tokens (source {n}, "
                            f"target {m}); use auto, average, copy, left_pad or right_pad")
        return list(target_ids)
    if mode == "average":
        return None
    if mode == "copy":
        return [target_ids[i % m] for i in range(n)]
    if mode == "left_pad":
        return target_ids[m - n:] if m >= n else source_ids[:n - m] + target_ids
    if mode == "right_pad":
        return target_ids[:n] if m >= n else target_ids + source_ids[m:]
    raise EditError(f"unknown --mode {mode!r} (expected one of {', '.join(MODES)})")


def plan_edit(prompt_ids: list[int], source_ids: list[int], target_ids: list[int], mode: str) -> EditPlan:
    """The edit of the source's last occurrence in the prompt; EditError when it is absent."""
    if mode not in MODES:
        raise EditError(f"unknown --mode {mode!r} (expected one of {', '.join(MODES)})")
    start = find_last(prompt_ids, source_ids) if source_ids else None
    if start is None:
        raise EditError("the source entity does not occur in the prompt")
    resolved = mode if mode != "auto" else ("one_to_one" if len(source_ids) == len(target_ids) else "average")
    return EditPlan(mode=mode, resolved_mode=resolved, start=start, end=start + len(source_ids),
                    source_ids=list(source_ids), target_ids=list(target_ids),
                    span_ids=span_table_ids(resolved, source_ids, target_ids))


def stem_table(model, layer: int) -> torch.Tensor:
    """The [v, f] table weight of STEM layer `layer` of a ReferenceStemLM."""
    return model.model.layers[layer].mlp.stem_table.weight


def check_layers(model, layers: list[int] | None) -> list[int]:
    """The STEM layers to edit (all when None); EditError for a model without any or a dense layer."""
    stem = list(model.config.stem_layers)
    if not stem:
        raise EditError("the model has no STEM layers: there are no rows to edit")
    if layers is None:
        return stem
    bad = sorted(set(layers) - set(stem))
    if bad:
        raise EditError(f"--layers {bad} are not STEM layers (the model's STEM layers: {stem})")
    return sorted(set(layers))


def span_rows(model, plan: EditPlan, layer: int) -> torch.Tensor:
    """rows_nf: what the source positions read in `layer` under the plan."""
    table_vf = stem_table(model, layer)
    n = plan.end - plan.start
    if plan.span_ids is None:  # average
        mean_f = table_vf[torch.tensor(plan.target_ids)].float().mean(0)
        return mean_f.to(table_vf.dtype).expand(n, -1).clone()
    return table_vf[torch.tensor(plan.span_ids)].clone()


def row_overrides(model, plan: EditPlan, layers: list[int], seq_len: int) -> dict:
    """{layer: (mask_bs, rows_nf)} for a [1, seq_len] input: the plan's span, in every edited layer."""
    mask_bs = torch.zeros(1, seq_len, dtype=torch.bool)
    mask_bs[0, plan.start:plan.end] = True
    with torch.no_grad():
        return {layer: (mask_bs, span_rows(model, plan, layer)) for layer in layers}


def extend_overrides(overrides: dict | None, seq_len: int) -> dict | None:
    """The same overrides for a longer input: appended positions are not edited."""
    if not overrides:
        return overrides
    out = {}
    for layer, (mask_bs, rows_nf) in overrides.items():
        pad_bs = torch.zeros(mask_bs.shape[0], seq_len - mask_bs.shape[1], dtype=torch.bool)
        out[layer] = (torch.cat([mask_bs, pad_bs], 1), rows_nf)
    return out


@torch.no_grad()
def logits(model, ids: list[int], overrides: dict | None = None) -> torch.Tensor:
    """logits_sv of one sequence (no batch dim), with the overrides applied."""
    ids_bs = torch.tensor([ids])
    return model(ids_bs, row_overrides=extend_overrides(overrides, len(ids)))[0]


def top_k(logits_v: torch.Tensor, k: int, vocab: int) -> list[tuple[int, float]]:
    """[(id, probability)] of the k most likely next tokens among the first `vocab` ids (the
    embedding's padding rows are not tokens)."""
    probs_v = logits_v[:vocab].float().softmax(-1)
    p, i = probs_v.topk(min(k, vocab))
    return [(int(a), float(b)) for a, b in zip(i, p)]


@torch.no_grad()
def generate(model, ids: list[int], max_new_tokens: int, vocab: int, overrides: dict | None = None,
             stop: int | None = None) -> list[int]:
    """Greedy continuation (the new ids). Edited positions keep their override rows throughout."""
    out = list(ids)
    for _ in range(max_new_tokens):
        nxt = int(logits(model, out, overrides)[-1, :vocab].argmax())
        out.append(nxt)
        if nxt == stop:
            break
    return out[len(ids):]


def persisted_state(model, plan: EditPlan, layers: list[int]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """A state dict whose tables make the one_to_one edit permanent, and the source ids it changes.

    Every source token's row becomes its target token's (original) row in each edited layer, so every
    occurrence of those tokens, in any text, now reads the target's rows.
    """
    if plan.resolved_mode != "one_to_one":
        raise EditError(f"--persist needs --mode one_to_one (or auto with equal lengths); got {plan.resolved_mode}")
    pairs: dict[int, int] = {}
    for s, t in zip(plan.source_ids, plan.target_ids):
        if pairs.setdefault(s, t) != t:
            raise EditError(f"--persist: source token {s} would map to two target tokens ({pairs[s]} and {t})")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    src, tgt = torch.tensor(list(pairs)), torch.tensor(list(pairs.values()))
    for layer in layers:
        key = f"model.layers.{layer}.mlp.stem_table.weight"
        state[key][src] = model.state_dict()[key][tgt]  # read from the unedited table: swaps stay swaps
    return state, sorted(s for s, t in pairs.items() if s != t)


def locate(tokenizer, prompt: str, source: str, target: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, source ids, target ids). BPE tokenizers spell a word differently after a space,
    so the source is searched as written and with a leading space; the later match wins and the
    target is encoded the same way."""
    for name, text in (("--prompt", prompt), ("--source", source), ("--target", target)):
        if not text.strip():  # " " + "" would encode to a space token: an edit into whitespace
            raise EditError(f"{name} must not be empty or blank, got {text!r}")
    prompt_ids = tokenizer.encode(prompt)
    best = None
    for prefix in ("", " "):
        source_ids = tokenizer.encode(prefix + source)
        start = find_last(prompt_ids, source_ids) if source_ids else None
        if start is not None and (best is None or start > best[0]):
            best = (start, source_ids, tokenizer.encode(prefix + target))
    if best is None:
        raise EditError(f"the source {source!r} does not occur in the prompt")
    return prompt_ids, best[1], best[2]


def prepare_edit(model, tokenizer, prompt: str, source: str, target: str, mode: str,
                 layers: list[int] | None = None) -> tuple[list[int], EditPlan, list[int]]:
    """(prompt ids, plan, edited layers) for an edit given as text; EditError when it does not apply."""
    edit_layers = check_layers(model, layers)
    prompt_ids, source_ids, target_ids = locate(tokenizer, prompt, source, target)
    return prompt_ids, plan_edit(prompt_ids, source_ids, target_ids, mode), edit_layers


def edit_record(model, tokenizer, prompt_ids: list[int], plan: EditPlan, layers: list[int], k: int = 5,
                max_new_tokens: int = 20) -> dict:
    """Top-k next tokens and a greedy continuation before and after the edit, as a JSON-able record."""
    vocab = model.config.table_vocab_size or model.config.vocab_size
    stop = getattr(tokenizer, "eod", None)
    overrides = row_overrides(model, plan, layers, len(prompt_ids))

    def side(ov):
        top = top_k(logits(model, prompt_ids, ov)[-1], k, vocab)
        cont = generate(model, prompt_ids, max_new_tokens, vocab, ov, stop)
        return {"top_k": [{"id": i, "token": tokenizer.decode([i]), "prob": round(p, 6)} for i, p in top],
                "continuation_ids": cont, "continuation": tokenizer.decode(cont)}

    def words(ids):
        return None if ids is None else [tokenizer.decode([i]) for i in ids]

    before, after = side(None), side(overrides)
    return {
        "prompt": tokenizer.decode(prompt_ids), "mode": plan.mode, "resolved_mode": plan.resolved_mode,
        "layers": layers, "span": [plan.start, plan.end], "source_tokens": words(plan.source_ids),
        "target_tokens": words(plan.target_ids), "span_table_tokens": words(plan.span_ids),
        "before": before, "after": after, "top1_changed": before["top_k"][0]["id"] != after["top_k"][0]["id"],
    }
