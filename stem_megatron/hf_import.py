"""`stem-import`: a dense Llama-family Hugging Face checkpoint becomes a STEM checkpoint at step 0.

    stem-import --hf DIR --config X.yaml --output CKPT [--table-init up_proj|random] [overrides ...]

DIR holds `config.json` and `model.safetensors` or shards with `model.safetensors.index.json`
(tied or untied embeddings, GQA). X.yaml (with `section.key=value` overrides) is the run that will
continue from it; its model shape must equal the Hugging Face model's. Output: `CKPT/step_00000000`
+ `CKPT/latest`, a *weights-only* checkpoint (no optimizer state, no RNG states):
`stem-train --config X.yaml --load CKPT` starts from it at any parallel layout, with fresh
optimizers and LR schedules from step 0.

- Dense layers map exactly (q/k/v fused per query group, gate and up stacked, norms as they are).
- STEM layers (the config's `stem.layers` / `stem.ratio`) keep gate and down; the up-projection
  becomes the table E_l [vocab, ffn]:
  `--table-init up_proj` (default): E_l[t] = W_up,l . RMSNorm_l(emb[t]), layer l's pre-MLP norm
  (`post_attention_layernorm`) applied to token t's input embedding: the dense layer's
  up-projection of the token's own normalised embedding, the STEM paper's start for extended
  pretraining from a dense model;
  `--table-init random`: the config's table init (`stem.init_std`, `train.seed`), bitwise what a
  fresh run would draw.
- Tensors are read one at a time (`safetensors.safe_open`); each table is computed once, written,
  and freed before the next (never two copies of a table).
Every check (architecture, shapes, vocabulary, missing tensors) runs before anything is written;
a failure prints one line, exits 2 and leaves nothing behind; Ctrl-C exits 130, also leaving nothing.

Legend: V vocabulary, F ffn, h hidden, r a block of rows.
"""

from __future__ import annotations

import json
import os
import time

import torch

from stem_megatron.outputs import prepare_output, staged

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ROW_BLOCK = 4096  # rows of a table computed at once (bounded scratch memory)


class HFImportError(ValueError):
    """The Hugging Face checkpoint cannot become a checkpoint of this config; one-line message."""


def _checkpoint_api():
    """The checkpoint-format functions the importer writes with, imported in this one place (their
    modules may move): (checkpoint_format module, table_io module, use_in_process_write_results)."""
    from stem_megatron.stem import table_io
    from stem_megatron.training import checkpoint_format
    from stem_megatron.training.checkpoint_dense import use_in_process_write_results

    return checkpoint_format, table_io, use_in_process_write_results


# ------------------------------------------------------------------------------ reading the HF side
class HFCheckpoint:
    """A Hugging Face model directory: its config and lazily read tensors (one at a time)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise HFImportError(f"{path}: no config.json (not a Hugging Face model directory)")
        try:
            with open(cfg_path) as f:
                self.config = json.load(f)
        except ValueError as e:
            raise HFImportError(f"{cfg_path}: not valid JSON ({e})") from None
        if os.path.isfile(os.path.join(path, INDEX)):
            with open(os.path.join(path, INDEX)) as f:
                weight_map = json.load(f).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(path, SINGLE)):
            files = [SINGLE]
        else:
            raise HFImportError(f"{path}: neither {SINGLE} nor {INDEX} (only safetensors checkpoints import)")
        self._where: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            full = os.path.join(path, name)
            if not os.path.isfile(full):
                raise HFImportError(f"{path}: {INDEX} names {name}, which is missing")
            try:
                with safe_open(full, framework="pt") as f:
                    for key in f.keys():
                        self._where[key] = full
                        self._shapes[key] = tuple(f.get_slice(key).get_shape())
            except Exception as e:  # safetensors raises its own error types for damaged headers
                raise HFImportError(f"{full}: not a readable safetensors file ({' '.join(str(e).split())})") from None

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` as fp32 (read from its file now; nothing is cached)."""
        from safetensors import safe_open

        with safe_open(self._where[name], framework="pt") as f:
            return f.get_tensor(name).float()


def _rope_scaling(c: dict) -> dict | None:
    scaling = c.get("rope_scaling") or None
    params = c.get("rope_parameters") or {}
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type")) or params.get("rope_type", "default")
    return None if kind == "default" else (scaling or params)


# megatron's Llama-3 RoPE scaling has fixed low/high frequency factors and original context
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192.0}


def _check_rope_scaling(path, scaling: dict | None, factor: float | None) -> None:
    """Raise HFImportError (one line) unless the checkpoint's RoPE scaling is the config's
    `model.rope_scaling_factor` (None = plain RoPE; otherwise Llama-3 with megatron's fixed values)."""
    if scaling is None:
        if factor is not None:
            raise HFImportError(f"{path}: plain RoPE, but the config has model.rope_scaling_factor={factor}")
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise HFImportError(f"{path}: RoPE scaling {scaling} is not supported (plain RoPE or rope_type llama3 only)")
    have = {key: scaling.get(key) for key in LLAMA3_FIXED}
    if any(not isinstance(v, (int, float)) or float(v) != want for v, want in zip(have.values(), LLAMA3_FIXED.values())):
        raise HFImportError(f"{path}: llama3 RoPE scaling with {have} is not supported (only low_freq_factor=1, "
                            f"high_freq_factor=4, original_max_position_embeddings=8192)")
    have_factor = scaling.get("factor")
    if not isinstance(have_factor, (int, float)) or factor is None or float(have_factor) != float(factor):
        raise HFImportError(f"{path}: llama3 RoPE scaling factor={have_factor}, "
                            f"but the config has model.rope_scaling_factor={factor}")


def check_compatible(hf: HFCheckpoint, cfg) -> None:
    """Raise HFImportError (one line) unless `hf` maps exactly onto the model of `cfg`."""
    c, m = hf.config, cfg.model
    arch = (c.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise HFImportError(f"{hf.path}: architecture {arch} is not supported (only {', '.join(SUPPORTED_ARCHITECTURES)})")
    unsupported = {
        "hidden_act": (c.get("hidden_act", "silu"), "silu"),
        "attention_bias": (bool(c.get("attention_bias", False)), False),
        "mlp_bias": (bool(c.get("mlp_bias", False)), False),
    }
    for key, (have, want) in unsupported.items():
        if have != want:
            raise HFImportError(f"{hf.path}: {key}={have} is not supported (this model has {key}={want})")
    _check_rope_scaling(hf.path, _rope_scaling(c), m.rope_scaling_factor)
    window = c.get("sliding_window")
    if window is not None and window < m.seq_length:
        raise HFImportError(f"{hf.path}: sliding_window={window} < model.seq_length={m.seq_length} (full attention only)")
    if m.normalization != "RMSNorm":
        raise HFImportError(f"model.normalization={m.normalization}: Llama checkpoints use RMSNorm")
    n_heads = c.get("num_attention_heads")
    theta = c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    pairs = {
        "vocab_size": (c.get("vocab_size"), m.vocab_size),
        "hidden_size": (c.get("hidden_size"), m.hidden_size),
        "intermediate_size": (c.get("intermediate_size"), m.ffn_hidden_size),
        "num_hidden_layers": (c.get("num_hidden_layers"), m.num_layers),
        "num_attention_heads": (n_heads, m.num_attention_heads),
        "num_key_value_heads": (c.get("num_key_value_heads") or n_heads, m.query_groups),
        "head_dim": (c.get("head_dim") or c.get("hidden_size", 0) // max(n_heads or 1, 1), m.head_dim),
        "tie_word_embeddings": (bool(c.get("tie_word_embeddings", False)), m.tie_embeddings),
        "rope_theta": (float(theta), float(m.rotary_base)),
        "rms_norm_eps": (float(c.get("rms_norm_eps", 1e-6)), float(m.norm_epsilon)),
    }
    to_config = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "ffn_hidden_size",
                 "num_hidden_layers": "num_layers", "num_attention_heads": "num_attention_heads",
                 "num_key_value_heads": "num_query_groups", "head_dim": "kv_channels",
                 "tie_word_embeddings": "tie_embeddings", "rope_theta": "rotary_base", "rms_norm_eps": "norm_epsilon"}
    for key, (have, want) in pairs.items():
        if have != want:
            raise HFImportError(f"{hf.path}: {key}={have}, but the config has model.{to_config[key]}={want}")
    for name, shape in expected_shapes(cfg).items():
        if not hf.has(name):
            if name == "lm_head.weight":
                raise HFImportError(f"{hf.path}: no lm_head.weight, but the config has untied embeddings")
            raise HFImportError(f"{hf.path}: tensor {name} is missing")
        if hf.shape(name) != shape:
            raise HFImportError(f"{hf.path}: tensor {name} has shape {list(hf.shape(name))}, the config needs {list(shape)}")


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Hugging Face Llama tensor names and shapes the import reads (up_proj of every layer: the
    STEM layers' tables are made from it)."""
    m = cfg.model
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.head_dim
    out = {"model.embed_tokens.weight": (m.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(m.num_layers):
        r = f"model.layers.{i}."
        out |= {r + "input_layernorm.weight": (h,), r + "post_attention_layernorm.weight": (h,),
                r + "self_attn.q_proj.weight": (m.num_attention_heads * d, h),
                r + "self_attn.k_proj.weight": (m.query_groups * d, h),
                r + "self_attn.v_proj.weight": (m.query_groups * d, h),
                r + "self_attn.o_proj.weight": (h, m.num_attention_heads * d),
                r + "mlp.gate_proj.weight": (f, h), r + "mlp.up_proj.weight": (f, h), r + "mlp.down_proj.weight": (h, f)}
    if not m.tie_embeddings:
        out["lm_head.weight"] = (m.vocab_size, h)
    return out


# ------------------------------------------------------------------------------ the STEM tables
@torch.no_grad()
def up_proj_table(hf: HFCheckpoint, layer: int, eps: float) -> torch.Tensor:
    """E_l [V, F] = RMSNorm_l(emb) @ W_up,l^T, computed in blocks of rows into one fp32 tensor."""
    emb_Vh = hf.get("model.embed_tokens.weight")
    norm_h = hf.get(f"model.layers.{layer}.post_attention_layernorm.weight")
    up_Fh = hf.get(f"model.layers.{layer}.mlp.up_proj.weight")
    table_VF = torch.empty(emb_Vh.shape[0], up_Fh.shape[0], dtype=torch.float32)
    for start in range(0, emb_Vh.shape[0], ROW_BLOCK):
        x_rh = emb_Vh[start : start + ROW_BLOCK]
        x_rh = x_rh * torch.rsqrt(x_rh.pow(2).mean(-1, keepdim=True) + eps) * norm_h
        torch.matmul(x_rh, up_Fh.t(), out=table_VF[start : start + ROW_BLOCK])
    return table_VF


@torch.no_grad()
def random_table(cfg, layer: int) -> torch.Tensor:
    """The table a fresh run of `cfg` initialises for `layer` (layout-independent init)."""
    from stem_megatron.stem.table_init import default_init_std, fill_table_rows

    m = cfg.model
    std = cfg.stem.init_std if cfg.stem.init_std is not None else default_init_std(m.vocab_size, m.ffn_hidden_size)
    out_V1F = torch.empty(m.vocab_size, 1, m.ffn_hidden_size, dtype=torch.float32)
    fill_table_rows(out_V1F, torch.arange(m.vocab_size), [layer], 0, std, cfg.train.seed, m.vocab_size)
    return out_V1F[:, 0]


# ------------------------------------------------------------------------------ writing
def _dense_state(hf: HFCheckpoint, cfg, dtype: torch.dtype) -> dict:
    """megatron's dist_checkpointing keys -> full tensors (one layer converted at a time)."""
    from stem_megatron.convert import reference_to_chunk

    m = cfg.model
    tp = cfg.parallel.tensor_model_parallel_size
    stem = set(cfg.stem_layers)
    # megatron's TransformerLayer saves its norms under the fused (Transformer Engine) names.
    renames = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
               "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    ends = {"model.embed_tokens.weight", "model.norm.weight"} | ({"lm_head.weight"} if not m.tie_embeddings else set())
    # Embedding and output layer: padded to the vocabulary padding of the config's TP (zero rows).
    out = reference_to_chunk({k: hf.get(k) for k in ends}, cfg, tp_rank=0, tp_size=1, layer_offset=0,
                             num_local_layers=0, pre_process=True, post_process=True)
    vp = m.padded_vocab_size(tp)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in out and out[key].shape[0] != vp:
            out[key] = torch.cat([out[key], out[key].new_zeros(vp - out[key].shape[0], out[key].shape[1])])
    for i in range(m.num_layers):
        names = [n for n in expected_shapes(cfg) if n.startswith(f"model.layers.{i}.")
                 and not (i in stem and n.endswith("up_proj.weight"))]
        local = reference_to_chunk({n: hf.get(n) for n in names}, cfg, tp_rank=0, tp_size=1, layer_offset=i,
                                   num_local_layers=1, pre_process=False, post_process=False)
        for key, t in local.items():
            key = key.replace("decoder.layers.0.", f"decoder.layers.{i}.")
            for a, b in renames.items():
                key = key.replace(a, b)
            out[key] = t
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def _save_dense(state: dict, ckpt_dir: str) -> None:
    """dist_checkpointing (torch_dist) files with every tensor whole (one writer, replica 0)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from stem_megatron import compat
    from stem_megatron.export import single_process_group

    _, _, use_in_process_write_results = _checkpoint_api()
    compat.apply()
    use_in_process_write_results()
    sharded = {k: ShardedTensor.from_rank_offsets(k, t, replica_id=0) for k, t in state.items()}
    with single_process_group():
        dist_checkpointing.save(sharded, ckpt_dir)


def _write_tables(hf: HFCheckpoint, cfg, ckpt_dir: str, table_init: str) -> dict | None:
    """One table file, all rows and columns, weights (+ zero update counters) of every STEM layer."""
    fmt, table_io, _ = _checkpoint_api()
    LazyTensor, write_table_file = table_io.LazyTensor, table_io.write_table_file
    m, layers = cfg.model, cfg.stem_layers
    if not layers:
        return None
    V, F = m.vocab_size, m.ffn_hidden_size
    rel = os.path.join(fmt.TABLES, "imported.safetensors")
    os.makedirs(os.path.join(ckpt_dir, fmt.TABLES))

    def make(layer):  # produced while the writer reaches it, freed right after: one table at a time
        return up_proj_table(hf, layer, m.norm_epsilon) if table_init == "up_proj" else random_table(cfg, layer)

    tensors = [("rows", torch.arange(V, dtype=torch.int64))]
    for layer in layers:
        tensors.append((f"layers.{layer}.weight", LazyTensor((V, F), torch.float32, lambda layer=layer: make(layer))))
        tensors.append((f"layers.{layer}.step", LazyTensor((V,), torch.int64, lambda: torch.zeros(V, dtype=torch.int64))))
    meta = dict(vocab_size=V, ffn_hidden_size=F, col_start=0, cols=F, shard_rank=0, shard_size=1, tp_rank=0, tp_size=1)
    write_table_file(os.path.join(ckpt_dir, rel), tensors, meta)
    return {"vocab_size": V, "ffn_hidden_size": F, "layers": list(layers),
            "files": [{"path": rel, "layers": list(layers), **meta}]}


def _copy_tokenizer(cfg, hf: HFCheckpoint, ckpt_dir: str) -> dict | None:
    """The config's tokenizer if it exists, else the Hugging Face directory's tokenizer.json."""
    from stem_megatron.training.checkpoint_meta import copy_tokenizer

    src, kind = cfg.data.tokenizer, cfg.data.tokenizer_type
    if not (src and os.path.exists(src)):
        src, kind = os.path.join(hf.path, "tokenizer.json"), "huggingface"
        if not os.path.isfile(src):
            return None
    return copy_tokenizer(src, kind, ckpt_dir)


def import_hf(hf_dir: str, cfg, output: str, table_init: str = "up_proj") -> str:
    """Write the weights-only checkpoint; returns its step directory. Nothing is left on failure."""
    from stem_megatron.training.checkpoint_format import STALE_PREFIXES

    if table_init not in ("up_proj", "random"):
        raise HFImportError(f"--table-init {table_init}: expected up_proj or random")
    # before megatron-core is imported (seconds); a killed run's leftovers do not count, and are removed
    prepare_output(output, inputs=[hf_dir], kind="root", leftovers=STALE_PREFIXES)
    fmt, _, _ = _checkpoint_api()
    hf = HFCheckpoint(hf_dir)
    check_compatible(hf, cfg)
    name = fmt.step_dir_name(0)
    if os.path.isdir(output):
        fmt.clean_stale(output)
    # removed on any failure, with the output directory when this run created it
    with staged(os.path.join(output, fmt.TMP_PREFIX + name)) as tmp:
        import megatron.core

        bf16 = cfg.train.precision == "bf16"
        _save_dense(_dense_state(hf, cfg, torch.bfloat16 if bf16 else torch.float32), tmp)
        tables = _write_tables(hf, cfg, tmp, table_init)
        with open(os.path.join(tmp, fmt.CONFIG), "w") as f:
            f.write(cfg.to_yaml())
        p = cfg.parallel
        meta = {
            "format": fmt.FORMAT, "version": fmt.VERSION, "step": 0, "consumed_samples": 0,
            "global_batch_size": cfg.train.global_batch_size, "skipped_steps": 0, "consecutive_skips": 0,
            "lr": None, "table_lr": None,
            # The layout it was written at: one writer, every tensor whole.
            "layout": {"world_size": 1, "tp": 1, "pp": 1, "vpp": None, "cp": 1, "dp": 1,
                       "shard_size": 1 if tables else None, "use_distributed_optimizer": p.use_distributed_optimizer},
            "bf16": bf16, "padded_vocab_size": cfg.model.padded_vocab_size(p.tensor_model_parallel_size),
            "dense_optimizer": None,  # weights only: see checkpoint.weights_only
            "tables": tables, "rng": {"layout": None, "files": []},
            "tokenizer": _copy_tokenizer(cfg, hf, tmp),
            "versions": {"torch": torch.__version__, "megatron_core": megatron.core.__version__},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "imported_from": {"path": os.path.abspath(hf_dir), "architecture": hf.config["architectures"][0],
                              "table_init": table_init},
        }
        fmt.write_json_atomic(os.path.join(tmp, fmt.META), meta)
        return fmt.seal_and_publish(tmp, output, name, 0, fmt.describe_files(tmp, fmt.list_files(tmp)))
