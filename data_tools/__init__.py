"""Data preparation entry points (scripts, not library): tokenizer training, preprocessing, sample corpus.

`stem-preprocess` (`data_tools.preprocess`), `stem-train-tokenizer` (`data_tools.train_tokenizer`)
and `stem-sample-data` (`data_tools.sample_corpus`). These import `stem_megatron`; the library
never imports them.
"""
