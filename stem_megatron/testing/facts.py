"""The controlled fact test: invented countries and capitals, a tiny STEM model that learns them,
and the rate at which editing country A's STEM rows into country B's flips the answer.

    world = FactWorld.make(seed=0)              # 24 countries (16 one-token, 8 two-token names)
    tok = world.tokenizer(dir)                  # word-level tokenizer.json: every word one token
    model = train_fact_model(world, tok)        # ReferenceStemLM, plain PyTorch, a few seconds on CPU
    report = flip_rates(model, world, tok)      # {mode: {"rate", "n", by length class}, "kept": ...}

The corpus states each country's capital in six sentence templates (plus a language fact and a
filler sentence), one or two sentences per training sequence; training zeroes whole input embeddings
at random positions (token-embedding dropout), so token identity also lives in the STEM rows. The
evaluation prompts are the first two templates cut before the capital ("The capital of Zorvania is"). An edit A -> B replaces
the rows at A's tokens by B's (stem_megatron.editing, every STEM layer) and counts a flip when the
greedy next token becomes B's capital. `kept` checks that an edit leaves a prompt about a third
country C alone ("Zorvania is a country . The capital of Quenor is", A edited, C's capital expected);
`baseline` is the unedited accuracy. `python -m stem_megatron.testing.facts` prints the report.

Legend: b batch, s sequence, v vocabulary.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stem_megatron import editing
from stem_megatron.reference import ReferenceConfig, ReferenceStemLM

EOD = "<|endoftext|>"
_SYL = ["zor", "van", "que", "lor", "mir", "tas", "bel", "dun", "kra", "sef", "nol", "pri", "vex", "hal", "ost",
        "rin", "gad", "fum", "yel", "cor", "tib", "wen", "sar", "mok", "lep", "dra", "gil", "hun", "jor", "kes"]
CAPITAL_TEMPLATES = [
    "The capital of {c} is {k} .",
    "{c} has its capital in {k} .",
    "The seat of government of {c} is {k} .",
    "In {c} , the capital city is {k} .",
    "{k} is the capital of {c} .",
    "People in {c} call {k} their capital .",
]
OTHER_TEMPLATES = ["The people of {c} speak {l} .", "{c} is a country ."]
PROMPTS = ["The capital of {c} is", "{c} has its capital in"]
KEPT_PROMPT = "{a} is a country . The capital of {c} is"
LANGUAGES = ["Ardic", "Belvish", "Cortan", "Dravic", "Elmish", "Forlan"]


@dataclass
class FactWorld:
    countries: list[str]  # names; two-token names contain a space
    capitals: list[str]
    languages: list[str]

    @staticmethod
    def make(seed: int = 0, n_one: int = 16, n_two: int = 8) -> FactWorld:
        rng = random.Random(seed)
        words: set[str] = set()

        def word(n_syl: int, suffix: str = "") -> str:
            while True:
                w = ("".join(rng.choice(_SYL) for _ in range(n_syl)) + suffix).capitalize()
                if w not in words:
                    words.add(w)
                    return w

        countries = [word(2, "ia") for _ in range(n_one)] + [f"{word(1)} {word(2)}" for _ in range(n_two)]
        capitals = [word(2, "on") for _ in countries]
        languages = [rng.choice(LANGUAGES) for _ in countries]
        return FactWorld(countries, capitals, languages)

    def sentences(self) -> list[str]:
        out = []
        for c, k, lang in zip(self.countries, self.capitals, self.languages):
            out += [t.format(c=c, k=k) for t in CAPITAL_TEMPLATES]
            out += [t.format(c=c, l=lang) for t in OTHER_TEMPLATES]
        return out

    def tokenizer(self, directory: str):
        """A word-level Hugging Face tokenizer.json over the corpus words (whitespace-split)."""
        from tokenizers import Tokenizer, models, pre_tokenizers

        from stem_megatron.data.tokenizer import load_tokenizer

        words = sorted({w for s in self.sentences() + PROMPTS + [KEPT_PROMPT] for w in s.split()} - {"{c}", "{a}"})
        vocab = {EOD: 0, "<unk>": 1} | {w: i + 2 for i, w in enumerate(words)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.add_special_tokens([EOD])
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "tokenizer.json")
        tok.save(path)
        return load_tokenizer(path)


def fact_model_config(vocab_size: int, stem_layers=(0, 1, 2), hidden: int = 64, ffn: int = 128,
                      tie: bool = True) -> ReferenceConfig:
    return ReferenceConfig(vocab_size=vocab_size, hidden_size=hidden, num_layers=3, num_attention_heads=4,
                           num_query_groups=2, head_dim=hidden // 4, ffn_hidden_size=ffn, stem_layers=list(stem_layers),
                           tie_embeddings=tie)


def _batches(world: FactWorld, tok, seq: int, batch: int, rng: random.Random):
    encoded = [tok.encode(s) for s in world.sentences()]
    while True:
        ids_bs = torch.full((batch, seq + 1), tok.eod, dtype=torch.long)
        mask_bs = torch.zeros(batch, seq)
        for row in range(batch):
            ids = [tok.eod]
            for _ in range(rng.randint(1, 2)):
                ids += rng.choice(encoded)
            ids = ids[: seq + 1]
            ids_bs[row, : len(ids)] = torch.tensor(ids)
            mask_bs[row, : len(ids) - 1] = 1.0
        yield ids_bs[:, :-1], ids_bs[:, 1:], mask_bs


def train_fact_model(world: FactWorld, tok, *, steps: int = 300, seed: int = 0, stem_layers=(0, 1, 2),
                     lr: float = 1e-2, weight_decay: float = 0.1, batch: int = 32, seq: int = 24,
                     hidden: int = 64, ffn: int = 128, tie: bool = True, embed_std: float = 0.02,
                     embed_dropout: float = 0.5) -> ReferenceStemLM:
    """Train a tiny ReferenceStemLM on the fact corpus (AdamW, cosine decay); returns it in eval mode.

    As in the project's trainer, the tables get no weight decay and the other matrices do. One CPU
    thread: the same reductions, so the same model, whatever the machine's core count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(world, tok, steps, seed, stem_layers, lr, weight_decay, batch, seq, hidden, ffn, tie, embed_std,
                      embed_dropout)
    finally:
        torch.set_num_threads(threads)


def _train(world, tok, steps, seed, stem_layers, lr, weight_decay, batch, seq, hidden, ffn, tie, embed_std,
           embed_dropout):
    torch.manual_seed(seed)
    vocab = -(-tok.vocab_size // 64) * 64  # padded like megatron's embedding
    model = ReferenceStemLM(fact_model_config(vocab, stem_layers, hidden, ffn, tie))
    with torch.no_grad():  # nn.Embedding's default N(0, 1) is far larger than the linears' (and slows learning)
        model.model.embed_tokens.weight.normal_(0.0, embed_std)
        for layer in stem_layers:
            editing.stem_table(model, layer).normal_(0.0, 0.02)
    tables = {id(editing.stem_table(model, layer)) for layer in stem_layers}
    decayed = [p for p in model.parameters() if id(p) not in tables and p.dim() == 2]
    rest = [p for p in model.parameters() if id(p) in tables or p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.1 + 0.45 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    data = _batches(world, tok, seq, batch, random.Random(seed))
    # Token-embedding dropout: whole input embeddings zeroed at random positions while training, so a
    # token's identity must also come from its STEM rows (see docs/editing.md: without it, whether
    # the facts end up in the tables or in the embedding differs from seed to seed).
    drop = model.model.embed_tokens.register_forward_hook(
        lambda mod, inp, out: out * (torch.rand(out.shape[:-1] + (1,)) >= embed_dropout))
    model.train()
    for _ in range(steps):
        ids_bs, labels_bs, mask_bs = next(data)
        logits_bsv = model(ids_bs)
        loss = (F.cross_entropy(logits_bsv.flatten(0, 1), labels_bs.flatten(), reduction="none")
                * mask_bs.flatten()).sum() / mask_bs.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    drop.remove()
    model.final_loss = loss.item()
    return model.eval()


def _next(model, ids: list[int], overrides=None) -> int:
    vocab = model.config.table_vocab_size or model.config.vocab_size
    return int(editing.logits(model, ids, overrides)[-1, :vocab].argmax())


def _length_class(world: FactWorld, a: int, b: int) -> str:
    return f"{len(world.countries[a].split())}->{len(world.countries[b].split())}"


def flip_rates(model, world: FactWorld, tok, targets_per_country: int = 3, modes=editing.MODES) -> dict:
    """Flip rate per mode over (country A, target B) pairs and both prompts; see the module docstring.

    one_to_one only applies to names of equal length, so it is measured on those pairs; every other
    mode on all pairs (its per-length-class rates are in `by_length`). A (pair, prompt) counts only
    when the unedited model answers that prompt for both A and B (`not_known` counts the others).
    """
    n = len(world.countries)
    layers = list(model.config.stem_layers)
    pairs = [(a, (a + 1 + j * 5) % n) for a in range(n) for j in range(targets_per_country)]
    pairs = [(a, b) for a, b in pairs if a != b]
    cap_ids = [tok.encode(k)[0] for k in world.capitals]
    report: dict = {}
    knows = {}  # (country, prompt template): the unedited model answers it
    for a in range(n):
        for p in PROMPTS:
            knows[a, p] = _next(model, tok.encode(p.format(c=world.countries[a]))) == cap_ids[a]
    report["baseline"] = {"rate": sum(knows.values()) / len(knows), "n": len(knows)}
    for mode in modes:
        hits, by_len, unknown = [0, 0], {}, 0
        for a, b in pairs:
            src, tgt = tok.encode(world.countries[a]), tok.encode(world.countries[b])
            if mode == "one_to_one" and len(src) != len(tgt):
                continue
            for p in PROMPTS:
                if not (knows[a, p] and knows[b, p]):  # an edit can only flip to a fact the model knows
                    unknown += 1
                    continue
                ids = tok.encode(p.format(c=world.countries[a]))
                plan = editing.plan_edit(ids, src, tgt, mode)
                hit = _next(model, ids, editing.row_overrides(model, plan, layers, len(ids))) == cap_ids[b]
                cls = by_len.setdefault(_length_class(world, a, b), [0, 0])
                for acc in (hits, cls):
                    acc[0] += hit
                    acc[1] += 1
        report[mode] = {"rate": hits[0] / max(hits[1], 1), "n": hits[1], "not_known": unknown,
                        "by_length": {k: round(v[0] / v[1], 3) for k, v in sorted(by_len.items())}}
    kept = [0, 0]
    for a, b in pairs:
        c = (b + 1) % n if (b + 1) % n != a else (b + 2) % n
        ids = tok.encode(KEPT_PROMPT.format(a=world.countries[a], c=world.countries[c]))
        plan = editing.plan_edit(ids, tok.encode(world.countries[a]), tok.encode(world.countries[b]), "auto")
        kept[0] += _next(model, ids, editing.row_overrides(model, plan, layers, len(ids))) == cap_ids[c]
        kept[1] += 1
    report["kept"] = {"rate": kept[0] / kept[1], "n": kept[1]}
    return report


def main() -> None:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="train the fact model and print flip rates per mode")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--stem-layers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--untied", action="store_true")
    ap.add_argument("--embed-std", type=float, default=0.02)
    ap.add_argument("--embed-dropout", type=float, default=0.5)
    args = ap.parse_args()
    for seed in args.seeds:
        world = FactWorld.make(seed)
        with tempfile.TemporaryDirectory() as d:
            tok = world.tokenizer(d)
            t0, c0 = time.time(), time.process_time()
            model = train_fact_model(world, tok, steps=args.steps, seed=seed, stem_layers=args.stem_layers,
                                     weight_decay=args.weight_decay, lr=args.lr, hidden=args.hidden, ffn=args.ffn,
                                     tie=not args.untied, embed_std=args.embed_std, embed_dropout=args.embed_dropout)
            t1, c1 = time.time(), time.process_time()
            report = flip_rates(model, world, tok)
        print(json.dumps({"seed": seed, "stem_layers": args.stem_layers, "weight_decay": args.weight_decay,
                          "steps": args.steps, "lr": args.lr, "hidden": args.hidden, "ffn": args.ffn,
                          "tied": not args.untied, "embed_std": args.embed_std,
                          "embed_dropout": args.embed_dropout, "final_loss": round(model.final_loss, 4),
                          "train_s": round(t1 - t0, 1), "train_cpu_s": round(c1 - c0, 1),
                          "eval_s": round(time.time() - t1, 1), "eval_cpu_s": round(time.process_time() - c1, 1)}
                         | report))


if __name__ == "__main__":
    main()
