"""`stem-generate`: text from a checkpoint or an export, with a KV cache and STEM tables on the device or the host.

    stem-generate --model exported/x --prompt "The capital of France is" --max-new-tokens 32 \
        [--prompt-file prompts.txt] [--temperature 0.8 --top-k 50 --top-p 0.95 --seed 0] [--tables host]

A batch of prompts (every --prompt, then one per non-empty line of --prompt-file) is left-padded
and generated together. Prefill runs the prompts through the model in chunks of `--chunk-size`
positions (128), filling the KV cache; with `--tables host` the STEM rows of chunk i+1's unique
token ids are gathered on the host and copied while chunk i computes (double buffering, rows.py).
Decode then fetches one row set (the batch's new tokens) per step. Temperature 0 is greedy;
otherwise logits / temperature, then top-k, then top-p (nucleus), sampled with a generator seeded
by `--seed` (on the CPU, so a seed gives the same tokens on any device). Padding vocabulary
columns (megatron pads the embedding) are never sampled. A sequence stops at the EOD token.

stdout: each completion, then one JSON line: prefill and decode tokens/s, counts, the row cache's
statistics and the completions. Exit codes: 0 done, 2 bad arguments or prompts (empty, longer
than the context), 4 the model does not load, 130 interrupted (Ctrl-C); errors are one line on stderr.

Legend: b batch, P padded prompt length, s positions of one forward, U unique ids, L STEM layers,
F ffn, v vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from stem_megatron.inference.kv_model import KVCache, KVModel
from stem_megatron.inference.rows import DeviceTables, HostTables, take_tables


class GenerationError(ValueError):
    """Prompts or options that cannot be generated from (empty prompt, longer than the context); one line."""


def check_lengths(prompt_lengths: list[int], max_new_tokens: int, context_length: int, min_new: int = 1) -> None:
    """The bound every command that generates shares (stem-generate, stem-edit, NIAH): each prompt
    has a token and, with `max_new_tokens` more, fits the model's context; so the work is bounded
    by the context, never by a number the user typed. GenerationError (exit 2) otherwise."""
    if not prompt_lengths:
        raise GenerationError("no prompt given (--prompt or --prompt-file)")
    if max_new_tokens < min_new:
        raise GenerationError(f"--max-new-tokens must be >= {min_new}, got {max_new_tokens}")
    for i, n in enumerate(prompt_lengths):
        if n < 1:
            raise GenerationError(f"prompt {i + 1} is empty")
        if n + max_new_tokens > context_length:
            raise GenerationError(
                f"prompt {i + 1} is {n} tokens; with --max-new-tokens {max_new_tokens} that exceeds the "
                f"model's context of {context_length} tokens")


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int = 0


def sample(logits_bv: torch.Tensor, vocab: int, s: Sampling, gen: torch.Generator) -> torch.Tensor:
    """Next token ids [b] from the logits of the real vocabulary (columns >= vocab are padding)."""
    logits_bv = logits_bv[:, :vocab].float().cpu()
    if s.temperature <= 0:
        return logits_bv.argmax(-1)
    logits_bv = logits_bv / s.temperature
    if s.top_k > 0:
        kth_b1 = logits_bv.topk(min(s.top_k, vocab), dim=-1).values[:, -1:]
        logits_bv = logits_bv.masked_fill(logits_bv < kth_b1, float("-inf"))
    if s.top_p < 1.0:
        sorted_bv, order_bv = logits_bv.sort(dim=-1, descending=True)
        cum_bv = sorted_bv.softmax(-1).cumsum(-1)
        drop_bv = cum_bv - sorted_bv.softmax(-1) >= s.top_p  # the mass before a token already reaches top_p
        logits_bv = logits_bv.scatter(-1, order_bv, sorted_bv.masked_fill(drop_bv, float("-inf")))
    return torch.multinomial(logits_bv.softmax(-1), 1, generator=gen).squeeze(-1)


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt (up to and including EOD when it stopped there)
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    rows: dict = field(default_factory=dict)
    # generate(keep_logits=True): the logits [b, v] each step sampled from (prefill's last position,
    # then every decode step), on the CPU; empty otherwise. Not part of report() (the CLI's JSON).
    logits: list[torch.Tensor] = field(default_factory=list)

    def report(self) -> dict:
        return {
            "prefill_tokens": self.prefill_tokens, "prefill_seconds": round(self.prefill_seconds, 4),
            "prefill_tokens_per_s": self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else None,
            "decode_tokens": self.decode_tokens, "decode_seconds": round(self.decode_seconds, 4),
            "decode_tokens_per_s": self.decode_tokens / self.decode_seconds if self.decode_seconds else None,
            **self.rows,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Generator:
    """Batched generation over a `ReferenceStemLM` (which it takes over: its tables move into the row source)."""

    def __init__(self, ref, *, context_length: int, vocab: int, eod: int | None, tables: str = "device",
                 device="cpu", cache_rows: int = 4096, chunk_size: int = 128):
        if tables not in ("device", "host"):
            raise GenerationError(f"--tables {tables}: expected device or host")
        self.device = torch.device(device)
        tables_VLF = take_tables(ref)
        self.model = KVModel(ref.to(self.device)).eval()
        self.rows = None
        if tables_VLF is not None:
            self.rows = (DeviceTables(tables_VLF, self.device) if tables == "device"
                         else HostTables(tables_VLF, self.device, cache_rows=cache_rows))
        self.context_length, self.vocab, self.eod, self.chunk_size = context_length, vocab, eod, chunk_size
        self.pad_id = eod if eod is not None else 0

    def check(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        check_lengths([len(p) for p in prompts], max_new_tokens, self.context_length)

    def _fetch(self, ids_bs: torch.Tensor):
        if self.rows is None:
            return None
        uniq_U, inv_bs = torch.unique(ids_bs, return_inverse=True)
        return self.rows.fetch(uniq_U), inv_bs

    @staticmethod
    def _rows(pending):
        if pending is None:
            return None
        fetch, inv_bs = pending
        return fetch.rows()[inv_bs.to(fetch.rows().device)]  # [b, s, L, F]

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], cache: KVCache, keep_all: bool = False):
        """Run the left-padded prompts into the cache in chunks; returns (logits, positions [b]).

        logits: the last position's [b, v], or with `keep_all` every position's [b, P, v] (left-padded).
        """
        b, P = len(prompts), max(len(p) for p in prompts)
        ids_bP = torch.full((b, P), self.pad_id, dtype=torch.long)
        real_bP = torch.zeros(b, P, dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids_bP[i, P - len(p):] = torch.tensor(p)
            real_bP[i, P - len(p):] = True
        pos_bP = (real_bP.long().cumsum(-1) - 1).clamp_min(0)
        ids_bP, real_bP, pos_bP = ids_bP.to(self.device), real_bP.to(self.device), pos_bP.to(self.device)
        starts = list(range(0, P, self.chunk_size))
        pending = self._fetch(ids_bP[:, :self.chunk_size])
        kept = []
        for k, a in enumerate(starts):
            e = a + self.chunk_size
            upcoming = self._fetch(ids_bP[:, e:e + self.chunk_size]) if k + 1 < len(starts) else None
            head = "all" if keep_all else ("last" if k + 1 == len(starts) else "none")
            logits_bsv = self.model(ids_bP[:, a:e], pos_bP[:, a:e], real_bP[:, a:e], cache, self._rows(pending), head)
            if keep_all:
                kept.append(logits_bsv)
            pending = upcoming
        return (torch.cat(kept, 1) if keep_all else logits_bsv[:, -1]), pos_bP[:, -1]

    @torch.no_grad()
    def logits(self, sequences: list[list[int]]) -> torch.Tensor:
        """Every position's logits [b, P, v] of left-padded `sequences` (teacher forcing, no generation)."""
        dtype = self.model.ref.model.embed_tokens.weight.dtype
        cache = KVCache(self.model.ref, len(sequences), max(len(p) for p in sequences), self.device, dtype)
        return self.prefill(sequences, cache, keep_all=True)[0]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling | None = None,
                 stop_at_eod: bool = True, keep_logits: bool = False) -> Generation:
        """New tokens for each prompt; `keep_logits` also keeps every step's logits (Generation.logits)."""
        sampling = sampling or Sampling()
        self.check(prompts, max_new_tokens)
        b = len(prompts)
        dtype = self.model.ref.model.embed_tokens.weight.dtype
        cache = KVCache(self.model.ref, b, max(len(p) for p in prompts) + max_new_tokens, self.device, dtype)
        gen = torch.Generator().manual_seed(sampling.seed)
        out = Generation(tokens=[[] for _ in range(b)], prefill_tokens=sum(len(p) for p in prompts))
        _sync(self.device)
        t0 = time.perf_counter()
        logits_bv, pos_b = self.prefill(prompts, cache)
        if keep_logits:
            out.logits.append(logits_bv.detach().cpu())
        next_b = sample(logits_bv, self.vocab, sampling, gen)
        _sync(self.device)
        t1 = time.perf_counter()
        out.prefill_seconds = t1 - t0
        done_b = torch.zeros(b, dtype=torch.bool)
        for step in range(max_new_tokens):
            for i in range(b):
                if not done_b[i]:
                    out.tokens[i].append(int(next_b[i]))
            out.decode_tokens += int((~done_b).sum())
            if stop_at_eod and self.eod is not None:
                done_b |= next_b == self.eod
            if step == max_new_tokens - 1 or bool(done_b.all()):
                break
            ids_b1 = next_b.masked_fill(done_b, self.pad_id)[:, None].to(self.device)
            pos_b = pos_b + 1
            real_b1 = torch.ones(b, 1, dtype=torch.bool, device=self.device)
            logits_bv = self.model(ids_b1, pos_b[:, None], real_b1, cache, self._rows(self._fetch(ids_b1)))[:, -1]
            if keep_logits:
                out.logits.append(logits_bv.detach().cpu())
            next_b = sample(logits_bv, self.vocab, sampling, gen)
        _sync(self.device)
        out.decode_seconds = time.perf_counter() - t1
        out.rows = self.rows.stats() if self.rows is not None else {"tables": None}
        return out

    def close(self) -> None:
        if self.rows is not None:
            self.rows.close()
