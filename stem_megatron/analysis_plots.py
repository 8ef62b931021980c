"""PNG figures of stem_megatron.analysis results (matplotlib, headless Agg backend).

matplotlib is the optional `plot` extra (`pip install -e '.[plot]'`, part of `dev`); `require()`
turns its absence into a one-line AnalysisError before any work starts.
"""

from __future__ import annotations

import numpy as np

from stem_megatron.analysis import AnalysisError


def require():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AnalysisError("stem-analyze needs matplotlib: pip install -e '.[plot]'") from None
    return plt


def angular_spread_png(path: str, result: dict, raw: dict) -> None:
    """One panel per STEM layer: histograms of pairwise cosine similarity (STEM rows, dense W_up x)."""
    plt = require()
    layers = sorted(raw)
    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 3.6), squeeze=False)
    bins = np.linspace(-1, 1, 81)
    for ax, layer in zip(axes[0], layers):
        entry = result["layers"][str(layer)]
        ax.hist(raw[layer]["stem"], bins=bins, density=True, alpha=0.6, label=f"STEM rows (mean {entry['stem']['mean']:.3f})")
        if "dense" in raw[layer]:
            ax.hist(raw[layer]["dense"], bins=bins, density=True, alpha=0.6,
                    label=f"dense W_up x, layer {entry['dense_layer']} (mean {entry['dense']['mean']:.3f})")
        ax.set_title(f"layer {layer}: {result['tokens']} most frequent tokens")
        ax.set_xlabel("pairwise cosine similarity")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def unique_tokens_png(path: str, result: dict) -> None:
    """Left: distinct tokens vs context length with the Heaps' law fit; right: active STEM parameters."""
    plt = require()
    pts = result["points"]
    n = np.array([p["context"] for p in pts])
    fit = result["heaps"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.loglog(n, [p["unique_mean"] for p in pts], "o", label="measured (mean over windows)")
    a.loglog(n, [p["unique_fit"] for p in pts], "-",
             label=f"Heaps: {fit['K']:.2f} n^{fit['beta']:.3f} (R² {fit['r2']:.3f})")
    a.loglog(n, n, ":", color="gray", label="every token distinct")
    a.set_xlabel("context length (tokens)")
    a.set_ylabel("distinct tokens")
    a.legend(fontsize=7)
    b.loglog(n, [p["active_stem_params"] for p in pts], "o", label="measured")
    b.loglog(n, [p["active_stem_params_fit"] for p in pts], "-", label="from the fit (capped at the vocabulary)")
    b.axhline(result["table_params"], color="gray", ls=":", label="all table parameters")
    b.set_xlabel("context length (tokens)")
    b.set_ylabel(f"active STEM parameters ({result['stem_layers']} layers x {result['ffn_hidden_size']})")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
