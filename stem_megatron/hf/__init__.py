"""Hugging Face interop: the model files an export carries, tokenizer files, lm-eval tasks.

`configuration_stem.py` and `modeling_stem.py` are static files copied into every export
directory (they import only torch and transformers, never this package); `stem-export` names
them in config.json's `auto_map`, so `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` loads an export. transformers is the optional extra `.[hf]`.
"""

import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_FILES = ("configuration_stem.py", "modeling_stem.py")
AUTO_MAP = {
    "AutoConfig": "configuration_stem.StemLlamaConfig",
    "AutoModel": "modeling_stem.StemLlamaModel",
    "AutoModelForCausalLM": "modeling_stem.StemLlamaForCausalLM",
}


def copy_model_files(out_dir: str) -> list[str]:
    """Copy the configuration and modeling files into `out_dir`; returns their names."""
    for name in MODEL_FILES:
        shutil.copyfile(os.path.join(HERE, name), os.path.join(out_dir, name))
    return list(MODEL_FILES)


def generation_config(vocab_rows: int, table_vocab: int, special_ids: dict | None) -> dict:
    """generation_config.json: generate() never picks megatron's vocabulary padding ids.

    The embedding and output layer keep the padded rows (logits equal megatron's column for
    column), but ids >= the table vocabulary are no tokens and have no STEM table rows.
    """
    out = {"suppress_tokens": list(range(table_vocab, vocab_rows)) or None}
    out.update({k: v for k, v in (special_ids or {}).items() if v is not None})
    return out
