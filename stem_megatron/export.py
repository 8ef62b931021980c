"""`stem-export`: a STEM checkpoint (any layout) to a Hugging Face style directory, on CPU.

    stem-export --checkpoint runs/x/checkpoints --output exported/x [--dtype bfloat16]

Writes `config.json` (Llama fields plus `stem_layers`, `stem_table_vocab_size`, and `auto_map`
naming the two model files below), `model.safetensors` (Hugging Face Llama parameter names plus
`model.layers.{i}.mlp.stem_table.weight` [vocab, ffn] for every STEM layer), the model files
`configuration_stem.py` + `modeling_stem.py` (from `stem_megatron/hf/`), `generation_config.json`
(generate() never picks vocabulary padding ids), the tokenizer files the
checkpoint carries (or `--tokenizer PATH`) and their Hugging Face form (`tokenizer.json`,
`tokenizer_config.json`). So `transformers.AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` and `AutoTokenizer.from_pretrained(dir)` load it (docs/interop.md);
`load_exported(dir)` builds the plain-PyTorch `ReferenceStemLM` without transformers. Both
give the megatron model's logits.

The embedding and output layer keep megatron's padded vocabulary (`vocab_size` in config.json;
the rows past the tokenizer's vocabulary are padding), so the logits are identical, padding
columns included. The output directory is written under a temporary name and renamed when complete.
Arguments are checked before anything is loaded: the output is new or an empty, writable
directory; a `--tokenizer` loads and agrees with the checkpoint's vocabulary. On any failure (and
on Ctrl-C) the temporary directory is removed.
Exit codes: 0 written, 2 bad arguments, 4 checkpoint missing/corrupt/unsupported, 130 Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass

import torch

from stem_megatron.outputs import atomic_dir, prepare_output

CONFIG_JSON = "config.json"
WEIGHTS = "model.safetensors"


@contextlib.contextmanager
def single_process_group():
    """A one-rank gloo process group (no network) for megatron's checkpoint reader, if none exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def load_dense_tensors(ckpt: str) -> dict[str, torch.Tensor]:
    """Full (unsharded) model tensors of a checkpoint by their megatron keys; optimizer state skipped."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    with single_process_group():
        meta = dist_checkpointing.load_tensors_metadata(ckpt)
        want = {k: v for k, v in meta.items() if isinstance(v, ShardedTensor) and not k.startswith("optimizer.")}
        loaded = dist_checkpointing.load(want, ckpt)
    return {k: loaded[k] for k in want}


def _pick(dense: dict, *keys: str) -> torch.Tensor:
    for k in keys:
        if k in dense:
            return dense[k]
    raise KeyError(f"the checkpoint has none of {keys}")


def to_reference_names(dense: dict[str, torch.Tensor], cfg, tables: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face Llama names (+ STEM tables) from full megatron tensors: the inverse of convert.reference_to_chunk."""
    m = cfg.model
    stem = set(cfg.stem_layers)
    g, d, n = m.query_groups, m.head_dim, m.num_attention_heads
    out = {"model.embed_tokens.weight": dense["embedding.word_embeddings.weight"]}
    for i in range(m.num_layers):
        o, r = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = dense[o + "self_attention.linear_qkv.weight"].view(g, (n // g + 2) * d, -1)
        q, k, v = torch.split(qkv, [n // g * d, d, d], dim=1)
        out[r + "self_attn.q_proj.weight"] = q.reshape(n * d, -1)
        out[r + "self_attn.k_proj.weight"] = k.reshape(g * d, -1)
        out[r + "self_attn.v_proj.weight"] = v.reshape(g * d, -1)
        out[r + "self_attn.o_proj.weight"] = dense[o + "self_attention.linear_proj.weight"]
        out[r + "input_layernorm.weight"] = _pick(
            dense, o + "self_attention.linear_qkv.layer_norm_weight", o + "input_layernorm.weight")
        out[r + "post_attention_layernorm.weight"] = _pick(
            dense, o + "mlp.linear_fc1.layer_norm_weight", o + "pre_mlp_layernorm.weight")
        fc1 = dense[o + "mlp.linear_fc1.weight"]
        if i in stem:
            out[r + "mlp.gate_proj.weight"] = fc1
            out[r + "mlp.stem_table.weight"] = tables[i]
        else:  # the checkpoint stores a gated fc1 as [gate (all TP shards); up (all TP shards)]
            out[r + "mlp.gate_proj.weight"], out[r + "mlp.up_proj.weight"] = torch.chunk(fc1, 2, dim=0)
        out[r + "mlp.down_proj.weight"] = dense[o + "mlp.linear_fc2.weight"]
    out["model.norm.weight"] = dense["decoder.final_layernorm.weight"]
    if not m.tie_embeddings:
        out["lm_head.weight"] = dense["output_layer.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def full_tables(ckpt: str, meta: dict) -> dict[int, torch.Tensor]:
    """{layer: fp32 [vocab, ffn]} from the checkpoint's table files."""
    from stem_megatron.stem.table_io import TableReader, TableTarget

    index = meta["tables"]
    if index is None:
        return {}
    reader = TableReader(ckpt, index)
    target = TableTarget(torch.arange(index["vocab_size"]), 0, index["ffn_hidden_size"])
    return {layer: reader.read_layer(layer, target, kinds=("weight",))[0]["weight"] for layer in reader.layers}


def rope_parameters(theta: float, scaling_factor: float | None) -> dict:
    """transformers 5's `rope_parameters`: plain RoPE, or Llama-3 scaling with megatron's fixed
    low/high frequency factors (1, 4) and original context (8192)."""
    if scaling_factor is None:
        return {"rope_type": "default", "rope_theta": theta}
    return {"rope_type": "llama3", "rope_theta": theta, "factor": scaling_factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def config_json(rc, seq_length: int) -> dict:
    """config.json's model fields for a `ReferenceConfig` (the inverse of `reference_config_of`).

    `seq_length` is the context the model was trained at (`max_position_embeddings`). The
    tokenizer, dtype and auto_map fields are `write_export`'s: they describe the written files.
    """
    return {
        "architectures": ["StemLlamaForCausalLM"],
        "model_type": "stem_llama",
        "vocab_size": rc.vocab_size,
        "hidden_size": rc.hidden_size,
        "intermediate_size": rc.ffn_hidden_size,
        "num_hidden_layers": rc.num_layers,
        "num_attention_heads": rc.num_attention_heads,
        "num_key_value_heads": rc.num_query_groups,
        "head_dim": rc.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": rc.norm_epsilon,
        "rope_theta": rc.rotary_base,
        "rope_parameters": rope_parameters(rc.rotary_base, rc.rope_scaling_factor),
        "max_position_embeddings": seq_length,
        "tie_word_embeddings": rc.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "stem_layers": list(rc.stem_layers),
        "stem_table_vocab_size": rc.table_vocab_size or rc.vocab_size,
    }


def reference_config_of(c: dict):
    """The `ReferenceConfig` an export's config.json fields describe (the inverse of `config_json`)."""
    from stem_megatron.reference import ReferenceConfig

    rope = c.get("rope_parameters") or {}
    return ReferenceConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"], num_query_groups=c["num_key_value_heads"],
        head_dim=c["head_dim"], ffn_hidden_size=c["intermediate_size"], stem_layers=list(c["stem_layers"]),
        table_vocab_size=c["stem_table_vocab_size"], rotary_base=c["rope_theta"], norm_epsilon=c["rms_norm_eps"],
        tie_embeddings=c["tie_word_embeddings"],
        rope_scaling_factor=rope.get("factor") if rope.get("rope_type") == "llama3" else None,
    )


def hf_config(cfg, meta: dict, vocab_rows: int) -> dict:
    """config.json's model fields for a checkpoint: its config's shape with `vocab_rows` (padded)
    embedding rows, plus where it came from (step, consumed samples, versions)."""
    from stem_megatron.reference import ReferenceConfig

    m = cfg.model
    rc = ReferenceConfig(
        vocab_size=vocab_rows, table_vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.query_groups, head_dim=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size, stem_layers=cfg.stem_layers, rotary_base=m.rotary_base,
        rope_scaling_factor=m.rope_scaling_factor, norm_epsilon=m.norm_epsilon, tie_embeddings=m.tie_embeddings,
    )
    return config_json(rc, m.seq_length) | {
        "stem_megatron": {"step": meta["step"], "consumed_samples": meta["consumed_samples"],
                          "versions": meta["versions"]}}


def reference_from_config(c: dict):
    """An uninitialised `ReferenceStemLM` for an export's config.json fields."""
    from stem_megatron.reference import ReferenceStemLM

    return ReferenceStemLM(reference_config_of(c))


def load_exported(path: str, dtype: torch.dtype = torch.float32):
    """The `ReferenceStemLM` of an exported directory, weights loaded (strict), in eval mode."""
    from safetensors.torch import load_file

    with open(os.path.join(path, CONFIG_JSON)) as f:
        c = json.load(f)
    ref = reference_from_config(c)
    ref.load_state_dict(load_file(os.path.join(path, WEIGHTS)), strict=True)
    return ref.to(dtype).eval()


@dataclass
class TokenizerSource:
    """A tokenizer an export ships: `path` is what `load_tokenizer` reads (a file, or a directory for
    the huggingface / gpt2 kinds), `files` what is copied into the export's root."""

    path: str
    kind: str
    files: list[str]

    @classmethod
    def at(cls, path: str, kind: str | None = None) -> TokenizerSource:
        """A tokenizer file or directory (every file of a directory is shipped); kind detected if None."""
        from stem_megatron.data.tokenizer import detect_kind

        files = ([os.path.join(path, n) for n in sorted(os.listdir(path)) if os.path.isfile(os.path.join(path, n))]
                 if os.path.isdir(path) else [path])
        return cls(path, kind or detect_kind(path), files)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def write_export(output: str, state: dict[str, torch.Tensor], config: dict, tokenizer: TokenizerSource | None,
                 dtype: str = "float32") -> None:
    """Write an export directory: weights, config.json, the transformers model files, the tokenizer.

    `state` has reference names (`to_reference_names`, a ReferenceStemLM's state_dict) and `config`
    the model fields (`config_json` / `hf_config`, or a loaded export's config.json); this adds
    what the written files decide: `torch_dtype`, `auto_map`, the tokenizer and its special ids.
    Written under a temporary name and renamed when complete, so a failure (e.g. a tokenizer that
    does not convert to tokenizer.json) leaves nothing behind. `output` must not exist or be empty.
    """
    from safetensors.torch import save_file

    from stem_megatron.hf import AUTO_MAP, copy_model_files, generation_config

    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise FileExistsError(f"{output} exists and is not empty")
    with atomic_dir(output) as tmp:
        save_file({k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in state.items()},
                  os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        os.chmod(os.path.join(tmp, WEIGHTS), 0o644)
        tok_info, special_ids = None, {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
        if tokenizer is not None:
            from stem_megatron.hf.tokenizer_files import write_hf_tokenizer

            for f in tokenizer.files:
                shutil.copy2(f, tmp)
            tok_info = {"kind": tokenizer.kind, "files": [os.path.basename(f) for f in tokenizer.files]}
            # after the copies: a huggingface kind's own tokenizer.json is replaced by the same tokenizer,
            # saved with the special-token flags AutoTokenizer expects
            special_ids = write_hf_tokenizer(tokenizer.path, tokenizer.kind, tmp,
                                             max_length=config.get("max_position_embeddings"))
        copy_model_files(tmp)
        out = config | {"auto_map": AUTO_MAP, "torch_dtype": dtype, **special_ids, "stem_tokenizer": tok_info}
        with open(os.path.join(tmp, CONFIG_JSON), "w") as f:
            json.dump(out, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(generation_config(out["vocab_size"], out["stem_table_vocab_size"], special_ids), f, indent=2)


def read_checkpoint(ckpt_path: str):
    """(checkpoint dir, meta, config, full reference-named fp32 state) of a checkpoint or save directory.

    Verifies the manifest first; raises CheckpointError (one line) for a missing, damaged or
    non-RMSNorm checkpoint. Shared by `export` and the inference loader (stem_megatron.inference).
    """
    from stem_megatron.training import checkpoint_format as fmt

    ckpt, meta, cfg = _checkpoint_meta(ckpt_path)
    fmt.verify(ckpt)
    return ckpt, meta, cfg, to_reference_names(load_dense_tensors(ckpt), cfg, full_tables(ckpt, meta))


def _checkpoint_meta(ckpt_path: str):
    """(checkpoint dir, meta, config) without reading tensors; CheckpointError for a missing or
    non-RMSNorm checkpoint (the export format, Llama names and ReferenceStemLM, is RMSNorm only)."""
    from stem_megatron.training import checkpoint_format as fmt
    from stem_megatron.training.checkpoint_format import CheckpointError
    from stem_megatron.training.checkpoint_meta import read_meta, saved_config

    ckpt = fmt.resolve(ckpt_path)
    if ckpt is None:
        raise CheckpointError(f"{ckpt_path}: no checkpoint there")
    meta, cfg = read_meta(ckpt), saved_config(ckpt)
    if cfg.model.normalization != "RMSNorm":
        raise CheckpointError(f"checkpoint {ckpt}: model.normalization={cfg.model.normalization}; the export "
                              "format (Llama names, ReferenceStemLM) is RMSNorm only")
    return ckpt, meta, cfg


def checkpoint_tokenizer(ckpt: str, meta: dict) -> TokenizerSource | None:
    """The tokenizer copy a checkpoint carries, or None."""
    info = meta.get("tokenizer")
    return TokenizerSource.at(os.path.join(ckpt, info["path"]), info["kind"]) if info else None


def export(ckpt_path: str, output: str, dtype: str = "float32", tokenizer: str | None = None) -> str:
    """Write the export of checkpoint `ckpt_path` (a checkpoint or save directory) to `output`.

    The arguments (output, tokenizer against the checkpoint's vocabulary) are checked before any
    tensor is read; `write_export` writes under a temporary name and leaves nothing on failure.
    """
    prepare_output(output, inputs=[ckpt_path], kind="dir")  # UserError, exit 2
    ckpt, meta, cfg = _checkpoint_meta(ckpt_path)
    tok = check_tokenizer(tokenizer, ckpt, meta, cfg)  # arguments first, then the (long) verification
    ckpt, meta, cfg, state = read_checkpoint(ckpt)
    source = TokenizerSource.at(*tok) if tok else None
    write_export(output, state, hf_config(cfg, meta, state["model.embed_tokens.weight"].shape[0]), source, dtype)
    return ckpt


class ExportArgumentError(ValueError):
    """An argument of stem-export that cannot work (exit 2); checked before anything is loaded."""


def check_tokenizer(tokenizer: str | None, ckpt: str, meta: dict, cfg) -> tuple[str, str] | None:
    """(path, kind) of the tokenizer to ship: `--tokenizer`, checked to load and to agree with the
    checkpoint's vocabulary, else the checkpoint's own copy; None when there is neither."""
    from stem_megatron.data.tokenizer import load_tokenizer
    from stem_megatron.inference.loading import check_tokenizer as check_vocabulary

    saved = (os.path.join(ckpt, meta["tokenizer"]["path"]), meta["tokenizer"]["kind"]) if meta.get("tokenizer") else None
    if tokenizer is None:
        return saved
    if not os.path.exists(tokenizer):
        raise ExportArgumentError(f"--tokenizer {tokenizer}: not found")
    tok = load_tokenizer(tokenizer)  # TokenizerError (exit 2) when it does not load
    # the rule every command applies to a --tokenizer (UserError, exit 2)
    check_vocabulary(tok, cfg.model.vocab_size, TokenizerSource.at(*saved) if saved else None, tokenizer,
                     "the checkpoint")
    return tokenizer, tok.kind
