"""Interpretability statistics of a STEM model on a corpus (library of `stem-analyze`).

Angular spread: for the N most frequent tokens of the corpus, the pairwise cosine similarities of
their STEM rows, per STEM layer. A STEM row is the token's "address vector" in the FFN (what
multiplies SiLU(gate(x))); a dense SwiGLU layer's counterpart is its up-projection output W_up x,
which depends on the context. With a dense model, each token's W_up x is taken at the token's first
occurrence in the corpus (the same positions for every layer), in context windows of the model's
training length. STEM layer l is compared with the dense layer at the same relative depth.

Unique tokens vs context length: the corpus is read as one stream of documents (end-of-document
ids between them, as training packs them); for each context length n, the mean number of distinct
ids in windows of n tokens. A Heaps' law fit U(n) = K n^beta gives the rows a forward pass over n
tokens touches, and so the active STEM parameters: U(n) * STEM layers * ffn.

Legend: n tokens analysed, f ffn, p pairs, t tokens of the stream, h hidden.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


class AnalysisError(ValueError):
    """Bad input for the analysis (empty corpus, no STEM layers, ...); one-line message."""


def encode_corpus(texts: Iterable[str], tokenizer, max_tokens: int | None = None) -> list[list[int]]:
    """Token ids per document of `texts` (the command reads the corpus files); stops after about
    `max_tokens` ids, reading no further."""
    docs, total = [], 0
    for text in texts:
        ids = tokenizer.encode(text)
        if ids:
            docs.append(ids)
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            return docs
    if not docs:
        raise AnalysisError("the corpus has no tokens")
    return docs


def most_frequent(docs: list[list[int]], n: int, exclude: set[int] = frozenset()) -> list[int]:
    counts = Counter(i for d in docs for i in d if i not in exclude)
    return [i for i, _ in counts.most_common(n)]


def pairwise_cosines(vectors_nf: torch.Tensor) -> np.ndarray:
    """cos_p: cosine similarity of every unordered pair of rows."""
    unit_nf = F.normalize(vectors_nf.double(), dim=-1)
    cos_nn = unit_nf @ unit_nf.t()
    i, j = torch.triu_indices(len(unit_nf), len(unit_nf), offset=1)
    return cos_nn[i, j].numpy()


def spread_stats(cos_p: np.ndarray) -> dict:
    angles = np.degrees(np.arccos(np.clip(cos_p, -1.0, 1.0)))
    return {"pairs": int(cos_p.size), "mean": float(cos_p.mean()), "std": float(cos_p.std()),
            "mean_abs": float(np.abs(cos_p).mean()), "mean_angle_deg": float(angles.mean()),
            "percentiles": {str(q): float(v) for q, v in zip(PERCENTILES, np.percentile(cos_p, PERCENTILES))}}


def first_positions(docs: list[list[int]], ids: list[int]) -> dict[int, tuple[int, int]]:
    """{id: (document, position)} of each id's first occurrence."""
    want, found = set(ids), {}
    for d, doc in enumerate(docs):
        for p, i in enumerate(doc):
            if i in want and i not in found:
                found[i] = (d, p)
        if len(found) == len(want):
            break
    return found


def dense_layers(model) -> list[int]:
    stem = set(model.config.stem_layers)
    return [i for i in range(model.config.num_layers) if i not in stem]


def matching_layer(layer: int, num_layers: int, candidates: list[int], other_layers: int) -> int:
    """The candidate layer of a model with `other_layers` layers at the relative depth of `layer`."""
    depth = layer / max(num_layers - 1, 1)
    return min(candidates, key=lambda c: (abs(c / max(other_layers - 1, 1) - depth), c))


@torch.no_grad()
def up_projection_outputs(model, docs, positions: dict[int, tuple[int, int]], ids: list[int], window: int,
                          layers: list[int]) -> dict[int, torch.Tensor]:
    """{layer: W_up x at each id's position [n, f]}: each document is cut into windows of `window`
    tokens (a position sees its window's earlier tokens, as in training) and every window holding a
    wanted position runs once."""
    by_window: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for row, i in enumerate(ids):
        d, p = positions[i]
        by_window.setdefault((d, p // window), []).append((row, p % window))
    out = {layer: torch.zeros(len(ids), model.config.ffn_hidden_size) for layer in layers}
    captured = {}
    hooks = [model.model.layers[layer].mlp.up_proj.register_forward_hook(
        lambda mod, inp, o, layer=layer: captured.__setitem__(layer, o[0])) for layer in layers]
    try:
        for (d, w), wanted in sorted(by_window.items()):
            model(torch.tensor([docs[d][w * window:(w + 1) * window]]))
            for layer in layers:
                for row, offset in wanted:
                    out[layer][row] = captured[layer][offset].float()
    finally:
        for h in hooks:
            h.remove()
    return out


def check_dense(dense, name: str = "--dense") -> None:
    """The comparison model must be dense: a STEM model's non-STEM layers are not at the depths the
    comparison maps to, and its STEM layers have no up-projection to compare."""
    if list(dense.config.stem_layers):
        raise AnalysisError(f"{name} is a STEM model (STEM layers {list(dense.config.stem_layers)}); the angular-spread "
                            "comparison needs a dense model (e.g. one trained with configs/tiny_dense.yaml)")


def angular_spread(model, docs, n_tokens: int, dense=None, window: int = 256, exclude: set[int] = frozenset()):
    """{"layers": {layer: {"stem": stats, "dense": stats, "dense_layer": k}}, ...} and the raw cosines."""
    stem = list(model.config.stem_layers)
    if not stem:
        raise AnalysisError("the model has no STEM layers")
    vocab = model.config.table_vocab_size or model.config.vocab_size
    ids = [i for i in most_frequent(docs, n_tokens, exclude) if i < vocab]
    if len(ids) < 2:
        raise AnalysisError("the corpus has fewer than 2 distinct tokens")
    raw, result = {}, {"tokens": len(ids), "layers": {}}
    dense_out, mapping = {}, {}
    if dense is not None:
        check_dense(dense)
        candidates = dense_layers(dense)
        if not candidates:
            raise AnalysisError("the --dense model has no dense (up-projection) layers")
        mapping = {layer: matching_layer(layer, model.config.num_layers, candidates, dense.config.num_layers)
                   for layer in stem}
        dense_out = up_projection_outputs(dense, docs, first_positions(docs, ids), ids, window,
                                          sorted(set(mapping.values())))
    for layer in stem:
        table_vf = model.model.layers[layer].mlp.stem_table.weight.detach()
        raw[layer] = {"stem": pairwise_cosines(table_vf[torch.tensor(ids)])}
        entry = {"stem": spread_stats(raw[layer]["stem"])}
        if dense is not None:
            raw[layer]["dense"] = pairwise_cosines(dense_out[mapping[layer]])
            entry |= {"dense_layer": mapping[layer], "dense": spread_stats(raw[layer]["dense"])}
        result["layers"][str(layer)] = entry
    return result, raw


def context_lengths(max_len: int) -> list[int]:
    lengths, n = [], 1
    while n <= max_len:
        lengths.append(n)
        n *= 2
    return lengths


def unique_vs_context(stream_t: np.ndarray, lengths: list[int], windows: int = 64, seed: int = 0) -> list[dict]:
    """Mean / std of the distinct ids in `windows` random windows of each length (all windows when fewer)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        n_starts = len(stream_t) - n + 1
        starts = np.arange(n_starts) if n_starts <= windows else rng.choice(n_starts, windows, replace=False)
        u = np.array([len(np.unique(stream_t[s:s + n])) for s in starts], dtype=np.float64)
        out.append({"context": n, "unique_mean": float(u.mean()), "unique_std": float(u.std()), "windows": int(u.size)})
    return out


def heaps_fit(points: list[dict]) -> dict:
    """U(n) = K n^beta by least squares in log-log over the measured points (n >= 2)."""
    pts = [p for p in points if p["context"] >= 2]
    if len(pts) < 2:
        raise AnalysisError("the corpus is too short for a Heaps' law fit (needs at least 4 tokens)")
    x = np.log([p["context"] for p in pts])
    y = np.log([p["unique_mean"] for p in pts])
    beta, log_k = np.polyfit(x, y, 1)
    resid = y - (beta * x + log_k)
    r2 = 1.0 - float((resid ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-300))
    return {"K": float(np.exp(log_k)), "beta": float(beta), "r2": r2}


def unique_tokens(model, docs, eod: int | None, max_context: int = 4096, windows: int = 64) -> dict:
    """Heaps' law on the corpus stream and the active STEM parameters per context length."""
    stream = []
    for d in docs:
        stream += d + ([eod] if eod is not None else [])
    stream_t = np.asarray(stream, dtype=np.int64)
    points = unique_vs_context(stream_t, context_lengths(min(max_context, len(stream_t))), windows)
    fit = heaps_fit(points)
    n_stem, ffn = len(model.config.stem_layers), model.config.ffn_hidden_size
    vocab = model.config.table_vocab_size or model.config.vocab_size
    for p in points:
        p["unique_fit"] = fit["K"] * p["context"] ** fit["beta"]
        p["active_stem_params"] = int(round(p["unique_mean"] * n_stem * ffn))
        p["active_stem_params_fit"] = int(round(min(p["unique_fit"], vocab) * n_stem * ffn))
    return {"corpus_tokens": int(len(stream_t)), "heaps": fit, "stem_layers": n_stem, "ffn_hidden_size": ffn,
            "table_params": n_stem * ffn * vocab, "points": points}
