"""Data preparation library: preprocessing, merging partitions, tokenizer training, the sample corpus.

The commands (`stem-preprocess`, `stem-merge`, `stem-train-tokenizer`, `stem-sample-data`) live in
`stem_megatron.cli`, the only part of `stem_megatron` that imports this package; `data_tools` uses
the `stem_megatron` library (tokenizers, errors) and never `stem_megatron.cli`.
"""
