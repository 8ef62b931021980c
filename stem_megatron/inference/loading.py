"""`--model PATH` for every inference CLI: an export directory or a checkpoint, one loader.

    loaded = load_model("runs/x/checkpoints")       # or "exported/x" (stem-export's output)
    loaded.model(ids_bs)                            # ReferenceStemLM, eval mode, fp32
    loaded.tokenizer, loaded.context_length, loaded.kind ("export" | "checkpoint")

What PATH is, is decided by its contents: `config.json` + `model.safetensors` make an export;
otherwise it must resolve as a checkpoint (a `step_N` directory, or a save directory whose
`latest` names one). A checkpoint is converted to full weights in this process by
`stem_megatron.export.read_checkpoint` (the code `stem-export` runs): its manifest is verified
first, so a damaged checkpoint is a one-line `ModelLoadError`, never a half-loaded model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch


class ModelLoadError(ValueError):
    """`--model` names nothing loadable (missing, damaged, no tokenizer); one-line message."""


@dataclass
class LoadedModel:
    model: torch.nn.Module | None  # ReferenceStemLM, eval mode (None from `describe`)
    tokenizer: object  # stem_megatron.data.tokenizer.Tokenizer
    context_length: int  # the sequence length the model was trained at
    kind: str  # "export" | "checkpoint"
    path: str  # the export directory or the resolved step_N directory


def is_export(path: str) -> bool:
    from stem_megatron.export import CONFIG_JSON, WEIGHTS

    return os.path.isfile(os.path.join(path, CONFIG_JSON)) and os.path.isfile(os.path.join(path, WEIGHTS))


def resolve_checkpoint(path: str) -> str:
    """The step directory a checkpoint PATH names; ModelLoadError when there is none."""
    from stem_megatron.training import checkpoint_format as fmt

    if not os.path.exists(path):
        raise ModelLoadError(f"--model {path}: no such file or directory")
    ckpt = fmt.resolve(path) if os.path.isdir(path) else None
    if ckpt is None:
        raise ModelLoadError(f"--model {path}: neither an export (config.json + model.safetensors) nor a checkpoint")
    return ckpt


def _tokenizer(path: str, kind: str):
    from stem_megatron.data.tokenizer import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(path, kind)
    except TokenizerError as e:
        raise ModelLoadError(f"tokenizer: {e}") from None


def _export_tokenizer(path: str, config: dict):
    info = config.get("stem_tokenizer")
    if not info:
        raise ModelLoadError(f"--model {path}: the export carries no tokenizer (re-export with --tokenizer)")
    # Directory kinds (tokenizer.json, vocab.json + merges.txt) were copied into the export's root.
    where = path if info["kind"] in ("huggingface", "gpt2") else os.path.join(path, info["files"][0])
    return _tokenizer(where, info["kind"])


def describe(path: str) -> LoadedModel:
    """What PATH holds, without its weights (`model` is None): kind, resolved path, tokenizer, context."""
    from stem_megatron.export import CONFIG_JSON

    if is_export(path):
        with open(os.path.join(path, CONFIG_JSON)) as f:
            config = json.load(f)
        return LoadedModel(None, _export_tokenizer(path, config), int(config["max_position_embeddings"]), "export",
                           path)
    from stem_megatron.training.checkpoint_format import CheckpointError
    from stem_megatron.training.checkpoint_meta import read_meta, saved_config

    ckpt = resolve_checkpoint(path)
    try:
        meta, cfg = read_meta(ckpt), saved_config(ckpt)
    except CheckpointError as e:
        raise ModelLoadError(f"--model {path}: checkpoint error: {e}") from None
    if not meta.get("tokenizer"):
        raise ModelLoadError(f"--model {path}: the checkpoint carries no tokenizer copy")
    tok = _tokenizer(os.path.join(ckpt, meta["tokenizer"]["path"]), meta["tokenizer"]["kind"])
    return LoadedModel(None, tok, cfg.model.seq_length, "checkpoint", ckpt)


def load_model(path: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The plain-PyTorch model of an export or checkpoint PATH, with tokenizer and context length."""
    from stem_megatron.export import load_exported

    info = describe(path)
    if info.kind == "export":
        info.model = load_exported(path, dtype)
        return info

    from stem_megatron.export import hf_config, read_checkpoint, reference_from_config
    from stem_megatron.stem.table_io import TableFormatError
    from stem_megatron.training.checkpoint_format import CheckpointError

    try:
        ckpt, meta, cfg, state = read_checkpoint(info.path)
    except (CheckpointError, TableFormatError, KeyError) as e:
        raise ModelLoadError(f"--model {path}: checkpoint error: {e}") from None
    config = hf_config(cfg, meta, "float32", None, state["model.embed_tokens.weight"].shape[0])
    model = reference_from_config(config)
    model.load_state_dict(state, strict=True)
    info.model = model.to(dtype).eval()
    return info
