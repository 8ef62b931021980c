"""Load `--model PATH` for the editing and analysis tools: an export directory or a checkpoint.

    loaded = load_model("runs/tiny_stem/checkpoints")      # or an export from stem-export
    loaded.model(ids_bs)                                   # ReferenceStemLM, fp32, eval mode

An export is read with `export.load_exported`; a checkpoint (a checkpoint directory, or a save
root: its latest) is verified and converted to full weights in this process with export.py's
checkpoint reading (`load_dense_tensors`, `full_tables`, `to_reference_names`): nothing is written.
`Loaded.hf_config` is the export's config.json (built with `export.hf_config` for a checkpoint), so
a tool can write a new export of the (edited) weights with `write_export`.

This module is the one place the tools load models; a shared loader can replace `load_model`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

import torch

from stem_megatron import export as ex
from stem_megatron.reference import ReferenceConfig, ReferenceStemLM


class ModelLoadError(ValueError):
    """The path is not a loadable export or checkpoint; one-line message."""


@dataclass
class Loaded:
    model: ReferenceStemLM
    tokenizer: object | None  # stem_megatron.data.tokenizer.Tokenizer
    hf_config: dict  # the export's config.json fields
    tokenizer_files: list[str] = field(default_factory=list)  # files to ship with a new export
    kind: str = "export"  # "export" | "checkpoint"
    path: str = ""  # the export directory or the resolved checkpoint directory

    @property
    def stem_layers(self) -> list[int]:
        return list(self.model.config.stem_layers)

    @property
    def text_vocab_size(self) -> int:
        """Ids a tokenizer can produce (the embedding has padding rows past them)."""
        return self.model.config.table_vocab_size or self.model.config.vocab_size


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ex.CONFIG_JSON)) and os.path.isfile(os.path.join(path, ex.WEIGHTS))


def load_model(path: str, tokenizer: str | None = None) -> Loaded:
    """The model at `path` (export or checkpoint); `tokenizer` overrides the one it carries.

    Raises ModelLoadError (one line) for a path that is neither, or a checkpoint that does not read.
    """
    from stem_megatron.data.tokenizer import TokenizerError
    from stem_megatron.training.checkpoint_format import CheckpointError
    from stem_megatron.training.table_io import TableFormatError

    try:
        loaded = _load_export(path) if is_export(path) else _load_checkpoint(path)
        if tokenizer is not None:
            from stem_megatron.data.tokenizer import detect_kind, load_tokenizer

            loaded.tokenizer = load_tokenizer(tokenizer)
            loaded.tokenizer_files = _files_of(tokenizer)
            loaded.hf_config["stem_tokenizer"] = {"kind": detect_kind(tokenizer),
                                                  "files": [os.path.basename(f) for f in loaded.tokenizer_files]}
    except (CheckpointError, TableFormatError, TokenizerError, KeyError, OSError) as e:
        raise ModelLoadError(f"{path}: {' '.join(str(e).split())}") from None
    return loaded


def _files_of(path: str) -> list[str]:
    if os.path.isdir(path):
        return [os.path.join(path, n) for n in sorted(os.listdir(path)) if os.path.isfile(os.path.join(path, n))]
    return [path]


def _tokenizer_at(directory: str, info: dict | None):
    """The tokenizer an export ships ({"kind", "files"} in config.json), or None."""
    if not info:
        return None, []
    from stem_megatron.data.tokenizer import load_tokenizer

    files = [os.path.join(directory, n) for n in info["files"]]
    # One file (tiktoken, sentencepiece, tokenizer.json) loads by itself; several (GPT-2's vocab.json +
    # merges.txt, or a Hugging Face directory) load as the directory.
    return load_tokenizer(files[0] if len(files) == 1 else directory, info["kind"]), files


def _load_export(path: str) -> Loaded:
    with open(os.path.join(path, ex.CONFIG_JSON)) as f:
        hf = json.load(f)
    model = ex.load_exported(path)
    tok, files = _tokenizer_at(path, hf.get("stem_tokenizer"))
    return Loaded(model=model, tokenizer=tok, hf_config=hf, tokenizer_files=files, kind="export", path=path)


def reference_config_of(hf: dict) -> ReferenceConfig:
    """The ReferenceStemLM config an export's config.json describes (as `export.load_exported` reads it)."""
    return ReferenceConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"], num_query_groups=hf["num_key_value_heads"],
        head_dim=hf["head_dim"], ffn_hidden_size=hf["intermediate_size"], stem_layers=list(hf["stem_layers"]),
        table_vocab_size=hf["stem_table_vocab_size"], rotary_base=hf["rope_theta"], norm_epsilon=hf["rms_norm_eps"],
        tie_embeddings=hf["tie_word_embeddings"],
    )


def hf_config_of(rc: ReferenceConfig, tokenizer: dict | None = None) -> dict:
    """config.json fields for a ReferenceStemLM built in Python (the inverse of `reference_config_of`)."""
    return {
        "architectures": ["StemLlamaForCausalLM"], "model_type": "stem_llama", "vocab_size": rc.vocab_size,
        "hidden_size": rc.hidden_size, "intermediate_size": rc.ffn_hidden_size, "num_hidden_layers": rc.num_layers,
        "num_attention_heads": rc.num_attention_heads, "num_key_value_heads": rc.num_query_groups,
        "head_dim": rc.head_dim, "hidden_act": "silu", "rms_norm_eps": rc.norm_epsilon, "rope_theta": rc.rotary_base,
        "tie_word_embeddings": rc.tie_embeddings, "torch_dtype": "float32", "stem_layers": list(rc.stem_layers),
        "stem_table_vocab_size": rc.table_vocab_size or rc.vocab_size, "stem_tokenizer": tokenizer,
    }


def _load_checkpoint(path: str) -> Loaded:
    from stem_megatron.data.tokenizer import load_tokenizer
    from stem_megatron.training import checkpoint_format as fmt
    from stem_megatron.training.checkpoint import read_meta, saved_config
    from stem_megatron.training.checkpoint_format import CheckpointError

    ckpt = fmt.resolve(path)
    if ckpt is None:
        raise CheckpointError("neither an export (config.json + model.safetensors) nor a checkpoint")
    fmt.verify(ckpt)
    meta, cfg = read_meta(ckpt), saved_config(ckpt)
    if cfg.model.normalization != "RMSNorm":
        raise CheckpointError(f"model.normalization={cfg.model.normalization}; the tools run RMSNorm models only")
    state = ex.to_reference_names(ex.load_dense_tensors(ckpt), cfg, ex.full_tables(ckpt, meta))
    tok, files, tok_info = None, [], None
    if meta.get("tokenizer"):
        src = os.path.join(ckpt, meta["tokenizer"]["path"])
        tok, files = load_tokenizer(src, meta["tokenizer"]["kind"]), _files_of(src)
        tok_info = {"kind": meta["tokenizer"]["kind"], "files": [os.path.basename(f) for f in files]}
    hf = ex.hf_config(cfg, meta, "float32", tok_info, state["model.embed_tokens.weight"].shape[0])
    model = ReferenceStemLM(reference_config_of(hf))
    model.load_state_dict(state, strict=True)
    return Loaded(model=model.float().eval(), tokenizer=tok, hf_config=hf, tokenizer_files=files,
                  kind="checkpoint", path=ckpt)


def write_export(output: str, state: dict[str, torch.Tensor], hf_config: dict, tokenizer_files: list[str]) -> None:
    """A new export directory (config.json, model.safetensors, tokenizer files), written under a
    temporary name and renamed when complete; `output` must not exist or be empty."""
    from safetensors.torch import save_file

    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise FileExistsError(f"{output} exists and is not empty")
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(os.path.abspath(output))}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(tmp, ex.WEIGHTS),
                  metadata={"format": "pt"})
        for f in tokenizer_files:
            shutil.copy2(f, tmp)
        with open(os.path.join(tmp, ex.CONFIG_JSON), "w") as f:
            json.dump(hf_config, f, indent=2)
        if os.path.isdir(output):
            os.rmdir(output)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
