"""`--model PATH` for every CLI that runs a model (stem-eval, stem-generate, stem-edit, stem-analyze):
an export directory or a checkpoint, one loader.

    loaded = load_model("runs/x/checkpoints")       # or "exported/x" (stem-export's output)
    loaded.model(ids_bs)                            # ReferenceStemLM, eval mode, fp32
    loaded.tokenizer, loaded.context_length, loaded.kind ("export" | "checkpoint"), loaded.path
    loaded.config, loaded.tokenizer_source          # what export.write_export needs to write it again

What PATH is, is decided by its contents: `config.json` + `model.safetensors` make an export;
otherwise it must resolve as a checkpoint (a `step_N` directory, or a save directory whose
`latest` names one). A checkpoint is converted to full weights in this process by
`stem_megatron.export.read_checkpoint` (the code `stem-export` runs): its manifest is verified
first, so a damaged checkpoint is a one-line `ModelLoadError`, never a half-loaded model.
`tokenizer=` (a file or directory) replaces the tokenizer the model carries.
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
    tokenizer_source: object  # stem_megatron.export.TokenizerSource: the files a new export ships
    config: dict | None = None  # config.json's fields (export.hf_config for a checkpoint); None from `describe`

    @property
    def stem_layers(self) -> list[int]:
        return list(self.model.config.stem_layers)

    @property
    def text_vocab_size(self) -> int:
        """Ids a tokenizer can produce (the embedding has padding rows past them)."""
        return self.model.config.table_vocab_size or self.model.config.vocab_size


def is_export(path: str) -> bool:
    from stem_megatron.export import CONFIG_JSON, WEIGHTS

    return os.path.isfile(os.path.join(path, CONFIG_JSON)) and os.path.isfile(os.path.join(path, WEIGHTS))


def resolve_checkpoint(path: str, flag: str = "--model") -> str:
    """The step directory a checkpoint PATH names; ModelLoadError when there is none."""
    from stem_megatron.training import checkpoint_format as fmt
    from stem_megatron.training.checkpoint_format import CheckpointError

    if not os.path.exists(path):
        raise ModelLoadError(f"{flag} {path}: no such file or directory")
    try:
        ckpt = fmt.resolve(path) if os.path.isdir(path) else None
    except CheckpointError as e:  # a `latest` that names a missing or malformed step
        raise ModelLoadError(f"{flag} {path}: checkpoint error: {e}") from None
    if ckpt is None:
        raise ModelLoadError(f"{flag} {path}: neither an export (config.json + model.safetensors) nor a checkpoint")
    return ckpt


def _tokenizer(source):
    from stem_megatron.data.tokenizer import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(source.path, source.kind)
    except TokenizerError as e:
        raise ModelLoadError(f"tokenizer: {e}") from None


def _override(tokenizer: str):
    from stem_megatron.data.tokenizer import TokenizerError
    from stem_megatron.export import TokenizerSource

    if not os.path.exists(tokenizer):
        raise ModelLoadError(f"--tokenizer {tokenizer}: no such file or directory")
    try:
        return TokenizerSource.at(tokenizer)
    except TokenizerError as e:
        raise ModelLoadError(f"tokenizer: {e}") from None


def _export_tokenizer(path: str, config: dict, flag: str):
    from stem_megatron.export import TokenizerSource

    info = config.get("stem_tokenizer")
    if not info:
        raise ModelLoadError(f"{flag} {path}: the export carries no tokenizer (re-export with --tokenizer, "
                             "or pass --tokenizer to stem-edit / stem-analyze)")
    files = [os.path.join(path, n) for n in info["files"]]
    # Directory kinds (tokenizer.json, vocab.json + merges.txt) were copied into the export's root.
    where = path if info["kind"] in ("huggingface", "gpt2") else files[0]
    return TokenizerSource(where, info["kind"], files)


def check_tokenizer(tok, vocab: int, carried, tokenizer: str, model: str) -> None:
    """A `--tokenizer` must fit the model (`model` names it in the message): no id past the model's
    vocabulary (`vocab`, unpadded) and, when the model carries its own tokenizer (`carried`, a
    TokenizerSource or None), the same number of ids (another vocabulary would read other rows).
    UserError, exit 2. The one rule stem-export, stem-edit, stem-analyze and stem-eval apply."""
    from stem_megatron.errors import EXIT_INPUT, UserError

    if tok.vocab_size > vocab:
        raise UserError(f"--tokenizer {tokenizer} has {tok.vocab_size} tokens; {model} has a vocabulary of "
                        f"{vocab} (model.vocab_size): not the tokenizer it was trained with", EXIT_INPUT)
    if carried is not None:
        trained = _tokenizer(carried).vocab_size
        if trained != tok.vocab_size:
            raise UserError(f"--tokenizer {tokenizer} has {tok.vocab_size} tokens; {model} was trained with a "
                            f"tokenizer of {trained} (its copy in {carried.path})", EXIT_INPUT)


def describe(path: str, tokenizer: str | None = None, flag: str = "--model") -> LoadedModel:
    """What PATH holds, without its weights (`model` is None; `config` too for a checkpoint): kind,
    resolved path, tokenizer, context. `flag` names the option in error messages. A `tokenizer`
    override is checked against the model's vocabulary (check_tokenizer)."""
    from stem_megatron.export import CONFIG_JSON, checkpoint_tokenizer

    override = _override(tokenizer) if tokenizer is not None else None
    if is_export(path):
        with open(os.path.join(path, CONFIG_JSON)) as f:
            config = json.load(f)
        if override is None:
            source = _export_tokenizer(path, config, flag)
            tok = _tokenizer(source)
        else:
            source, tok = override, _tokenizer(override)
            carried = _export_tokenizer(path, config, flag) if config.get("stem_tokenizer") else None
            check_tokenizer(tok, int(config.get("stem_table_vocab_size") or config["vocab_size"]), carried,
                            tokenizer, f"{flag} {path}")
        return LoadedModel(None, tok, int(config["max_position_embeddings"]), "export", path, source, config)
    from stem_megatron.training.checkpoint_format import CheckpointError
    from stem_megatron.training.checkpoint_meta import read_meta, saved_config

    ckpt = resolve_checkpoint(path, flag)
    try:
        meta, cfg = read_meta(ckpt), saved_config(ckpt)
    except CheckpointError as e:
        raise ModelLoadError(f"{flag} {path}: checkpoint error: {e}") from None
    carried = checkpoint_tokenizer(ckpt, meta)
    source = override or carried
    if source is None:
        raise ModelLoadError(f"{flag} {path}: the checkpoint carries no tokenizer copy")
    tok = _tokenizer(source)
    if override is not None:
        check_tokenizer(tok, cfg.model.vocab_size, carried, tokenizer, f"{flag} {path}")
    return LoadedModel(None, tok, cfg.model.seq_length, "checkpoint", ckpt, source)


def load_model(path: str, dtype: torch.dtype = torch.float32, tokenizer: str | None = None,
               flag: str = "--model") -> LoadedModel:
    """The plain-PyTorch model of an export or checkpoint PATH, with tokenizer, context length, config."""
    from stem_megatron.export import load_exported

    info = describe(path, tokenizer, flag)
    if info.kind == "export":
        info.model = load_exported(path, dtype)
        return info

    from stem_megatron.export import hf_config, read_checkpoint, reference_from_config
    from stem_megatron.stem.table_io import TableFormatError
    from stem_megatron.training.checkpoint_format import CheckpointError

    try:
        ckpt, meta, cfg, state = read_checkpoint(info.path)
    except (CheckpointError, TableFormatError, KeyError) as e:
        raise ModelLoadError(f"{flag} {path}: checkpoint error: {e}") from None
    info.config = hf_config(cfg, meta, state["model.embed_tokens.weight"].shape[0])
    model = reference_from_config(info.config)
    model.load_state_dict(state, strict=True)
    info.model = model.to(dtype).eval()
    return info
