"""Training data: tokenizers over four file kinds and megatron-core GPT datasets (real, blended or mock).

`tokenizer.load_tokenizer(path, kind=None)`; `datasets.build_gpt_datasets(data_cfg, ...)`.
Both are re-exported here lazily, so importing the tokenizer alone does not import megatron-core.
"""

_EXPORTS = {
    "load_tokenizer": "stem_megatron.data.tokenizer",
    "Tokenizer": "stem_megatron.data.tokenizer",
    "TokenizerError": "stem_megatron.data.tokenizer",
    "build_gpt_datasets": "stem_megatron.data.datasets",
    "DataError": "stem_megatron.data.datasets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
