"""Hugging Face configuration of an exported STEM model (copied into every `stem-export` directory).

A Llama configuration plus the STEM fields:
- `stem_layers`: indices of the decoder layers whose MLP up-projection is a token-indexed table;
- `stem_table_vocab_size`: rows of those tables (the tokenizer's vocabulary; `vocab_size` is
  megatron's padded embedding size and may be larger).

This file imports only transformers: it travels with the export and is loaded by
`AutoConfig.from_pretrained(dir, trust_remote_code=True)` through `auto_map` in config.json.
"""

from transformers import LlamaConfig


class StemLlamaConfig(LlamaConfig):
    model_type = "stem_llama"

    def __init__(self, stem_layers=None, stem_table_vocab_size=None, **kwargs):
        # Set before LlamaConfig's own initialisation, which may validate or serialise the object.
        self.stem_layers = sorted(int(i) for i in (stem_layers or []))
        self.stem_table_vocab_size = stem_table_vocab_size
        super().__init__(**kwargs)
        if self.stem_table_vocab_size is None:
            self.stem_table_vocab_size = self.vocab_size
        bad = [i for i in self.stem_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"stem_layers {bad} outside 0..{self.num_hidden_layers - 1}")


__all__ = ["StemLlamaConfig"]
