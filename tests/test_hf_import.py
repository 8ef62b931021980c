"""`stem-import`: Llama models built with transformers (random weights, `save_pretrained`; tied,
untied, sharded files) become weights-only checkpoints. Without STEM layers the megatron model
loaded from them at TP1 (DP4) and at TP2 x PP2 gives transformers' logits; with STEM layers and
`--table-init up_proj` the tables equal W_up . RMSNorm(emb) computed with transformers' own
modules, and training started from the import runs with a falling loss; import then export gives
transformers the original logits back. Bad inputs: one line, exit 2, nothing written.
"""

import json
import os

import pytest
import torch

from stem_megatron.testing.distributed import run_distributed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
STEM = [1, 2]


LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def _tiny(tied, stem_layers=None, rope_scaling_factor=None, rotary_base=None, **layout):
    from stem_megatron.testing.models import tiny_config

    cfg = tiny_config(stem_layers=stem_layers, tie_embeddings=tied, **layout)
    cfg.model.rope_scaling_factor = rope_scaling_factor
    cfg.model.rotary_base = rotary_base or cfg.model.rotary_base
    return cfg


def _hf_model(tied: bool, seed: int, rope_scaling: dict | None = None, rotary_base: float | None = None):
    """A transformers Llama of the tiny config's shape; norms random too (they matter in the formula)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = _tiny(tied).model
    config = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.query_groups, head_dim=m.head_dim, rms_norm_eps=m.norm_epsilon,
        rope_theta=rotary_base or m.rotary_base, tie_word_embeddings=tied,
        max_position_embeddings=64 if rope_scaling is None else 16384, rope_scaling=rope_scaling,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 1.0 if "embed" in name else p.shape[1] ** -0.5)
    return model


def _import(hf_dir, cfg, out, *extra):
    from stem_megatron.cli.import_hf import main

    yaml = os.path.join(os.path.dirname(out), os.path.basename(out) + ".yaml")
    with open(yaml, "w") as f:
        f.write(cfg.to_yaml())
    return main(["--hf", str(hf_dir), "--config", yaml, "--output", str(out), *extra])


def _run_from_imports(rank, world_size, cases):
    """Each case: set up a trainer loading the import, then logits (no training) or `steps` losses."""
    from megatron.core import parallel_state

    from stem_megatron.config import CheckpointConfig
    from stem_megatron.testing.models import TokenDataset, make_batches, pipeline_logits
    from stem_megatron.training.checkpoint import Checkpointer
    from stem_megatron.training.trainer import Trainer

    out = {}
    for name, ckpt, tied, stem_layers, layout, steps in cases:
        cfg = _tiny(tied, stem_layers, **layout)  # layout: parallel sizes, and RoPE fields
        cfg.train.lr, cfg.train.warmup_steps, cfg.stem.lr = 3e-3, 1, 1e-2
        trainer = Trainer(cfg)
        trainer.checkpointer = Checkpointer(CheckpointConfig(load=ckpt))
        trainer.setup(datasets=(TokenDataset(64, cfg.model.seq_length, 60, seed=3), None))
        assert trainer.step == 0 and trainer.checkpointer.loaded is not None
        if steps:
            out[name] = [trainer.train_step().loss for _ in range(steps)]
        else:
            logits = pipeline_logits(trainer.chunks, cfg, make_batches(cfg, 2, seed=5))
            if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
                out[name] = [t.numpy() for t in logits]  # by value: this process may exit before the parent reads
        parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from stem_megatron.testing.models import make_batches

    root = tmp_path_factory.mktemp("hf_import")
    want = {}
    for tied in (True, False):
        name = "tied" if tied else "untied"
        model = _hf_model(tied, seed=1 if tied else 2)
        # the untied model in shards with an index, the tied one as a single file
        model.save_pretrained(root / f"hf_{name}", max_shard_size="50GB" if tied else "100KB")
        with torch.no_grad():
            want[name] = [model(input_ids=b["tokens"]).logits for b in make_batches(_tiny(tied), 2, seed=5)]
        assert _import(root / f"hf_{name}", _tiny(tied), root / f"ck_{name}") == 0
    assert _import(root / "hf_untied", _tiny(False, STEM), root / "ck_stem", "--table-init", "up_proj") == 0
    tp1, tp2pp2 = dict(), dict(tp=2, pp=2)
    cases = [("tied_tp1", str(root / "ck_tied"), True, None, tp1, 0),
             ("untied_tp1", str(root / "ck_untied"), False, None, tp1, 0),
             ("tied_tp2pp2", str(root / "ck_tied"), True, None, tp2pp2, 0),
             ("untied_tp2pp2", str(root / "ck_untied"), False, None, tp2pp2, 0),
             ("stem_train", str(root / "ck_stem"), False, STEM, tp2pp2, 8)]
    per_rank = run_distributed(_run_from_imports, world_size=4, args=(cases,), timeout=500)
    got = {}
    for r in per_rank:
        got.update(r)
    return root, want, got


def test_checkpoint_files_are_weights_only_at_step_0(imported):
    root, _, _ = imported
    assert sorted(os.listdir(root / "hf_untied")) == sorted(
        ["config.json", "generation_config.json", "model.safetensors.index.json"]
        + [f for f in os.listdir(root / "hf_untied") if f.startswith("model-0")])
    assert len([f for f in os.listdir(root / "hf_untied") if f.startswith("model-0")]) > 1
    meta = json.loads((root / "ck_stem" / "step_00000000" / "stem_checkpoint.json").read_text())
    assert meta["step"] == 0 and meta["dense_optimizer"] is None and meta["rng"]["files"] == []
    assert meta["tables"]["layers"] == STEM


@pytest.mark.parametrize("name", ["tied_tp1", "untied_tp1", "tied_tp2pp2", "untied_tp2pp2"])
def test_imported_dense_model_gives_the_transformers_logits(imported, name):
    _, want, got = imported
    for a, b in zip(got[name], want[name.split("_")[0]]):
        a = torch.from_numpy(a)
        assert a.shape == b.shape
        rel = ((a - b).abs().max() / b.abs().max()).item()
        assert rel <= 1e-5, f"{name}: relative logit error {rel:.2e}"


def test_up_proj_tables_equal_the_formula_and_training_runs(imported):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    root, _, got = imported
    model = AutoModelForCausalLM.from_pretrained(str(root / "hf_untied")).eval()
    emb = model.model.embed_tokens.weight
    with safe_open(str(root / "ck_stem" / "step_00000000" / "tables" / "imported.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("rows"), torch.arange(emb.shape[0]))
        for layer in STEM:
            mlp_in = model.model.layers[layer].post_attention_layernorm
            with torch.no_grad():
                want = mlp_in(emb) @ model.model.layers[layer].mlp.up_proj.weight.t()
            table = f.get_tensor(f"layers.{layer}.weight")
            assert table.shape == want.shape
            assert torch.allclose(table, want, rtol=1e-5, atol=1e-5), (table - want).abs().max()
    losses = got["stem_train"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < losses[0] - 0.3, losses


def test_random_table_init_is_the_configs(tmp_path, imported):
    from safetensors import safe_open

    from stem_megatron.stem.table_init import default_init_std, reference_full_table

    root, _, _ = imported
    cfg = _tiny(False, STEM)
    assert _import(root / "hf_untied", cfg, tmp_path / "ck", "--table-init", "random") == 0
    m = cfg.model
    want = reference_full_table(m.vocab_size, STEM, m.ffn_hidden_size,
                                default_init_std(m.vocab_size, m.ffn_hidden_size), cfg.train.seed)
    with safe_open(str(tmp_path / "ck" / "step_00000000" / "tables" / "imported.safetensors"), "pt") as f:
        for slot, layer in enumerate(STEM):
            assert torch.equal(f.get_tensor(f"layers.{layer}.weight"), want[:, slot])


def test_bad_inputs_give_one_line_and_write_nothing(imported, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    root, _, _ = imported
    bad = tmp_path / "bad"
    bad.mkdir()
    state = load_file(str(root / "hf_tied" / "model.safetensors"))
    config = json.loads((root / "hf_tied" / "config.json").read_text())

    def case(mutate_config=None, drop=None, reshape=None, cfg=None):
        (bad / "config.json").write_text(json.dumps({**config, **(mutate_config or {})}))
        tensors = {k: v for k, v in state.items() if k != drop}
        if reshape:
            tensors[reshape] = tensors[reshape][:-1]
        save_file(tensors, str(bad / "model.safetensors"))
        out = tmp_path / "out"
        code = _import(bad, cfg or _tiny(True), out)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("stem-import: "), err
        assert not out.exists()
        return err

    wrong_vocab = _tiny(True)
    wrong_vocab.model.vocab_size = 300
    assert "vocab_size=256, but the config has model.vocab_size=300" in case(cfg=wrong_vocab)
    assert "tensor model.layers.2.mlp.down_proj.weight is missing" in case(drop="model.layers.2.mlp.down_proj.weight")
    assert "has shape [127, 64], the config needs [128, 64]" in case(reshape="model.layers.0.mlp.up_proj.weight")
    assert "architecture GPT2LMHeadModel is not supported" in case({"architectures": ["GPT2LMHeadModel"]})
    assert "intermediate_size=100" in case({"intermediate_size": 100})
    assert "no lm_head.weight" in case({"tie_word_embeddings": False}, cfg=_tiny(False))
    assert "tie_word_embeddings=True, but the config has model.tie_embeddings=False" in case(cfg=_tiny(False))
    assert "RoPE scaling" in case({"rope_scaling": {"rope_type": "yarn", "factor": 32.0}})
    assert "llama3 RoPE scaling with" in case({"rope_scaling": {**LLAMA3, "high_freq_factor": 2.0}})
    assert "factor=32.0, but the config has model.rope_scaling_factor=None" in case({"rope_scaling": LLAMA3})
    assert "plain RoPE, but the config has model.rope_scaling_factor=8.0" in case(
        cfg=_tiny(True, rope_scaling_factor=8.0))
    os.remove(bad / "model.safetensors")
    (bad / "config.json").write_text(json.dumps(config))
    assert _import(bad, _tiny(True), tmp_path / "out") == 2
    assert "neither model.safetensors nor" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_import_then_export_round_trips_to_transformers(imported, tmp_path):
    from transformers import AutoModelForCausalLM

    from stem_megatron.cli.export import main
    from stem_megatron.testing.models import make_batches

    root, want, _ = imported
    assert main(["--checkpoint", str(root / "ck_untied"), "--output", str(tmp_path / "hf")]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    assert type(model).__name__ == "StemLlamaForCausalLM" and model.config.stem_layers == []
    with torch.no_grad():
        for batch, b in zip(make_batches(_tiny(False), 2, seed=5), want["untied"]):
            a = model(input_ids=batch["tokens"]).logits
            assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-6


def test_llama3_rope_scaling_imports_and_exports_with_the_transformers_logits(tmp_path, capsys):
    """Llama-3.x RoPE scaling (factor 32, theta 5e5: the low frequencies change even at short
    lengths): the import at TP1 and its export give transformers' logits; without the factor in
    the config the import is refused."""
    from transformers import AutoModelForCausalLM

    from stem_megatron.cli.export import main as export_main
    from stem_megatron.export import reference_config_of
    from stem_megatron.reference import ReferenceConfig, rope_inv_freq
    from stem_megatron.testing.models import make_batches

    theta, rope = 500000.0, dict(rope_scaling_factor=32.0, rotary_base=500000.0)
    plain = ReferenceConfig(vocab_size=8, hidden_size=64, num_layers=1, num_attention_heads=4, num_query_groups=2,
                            head_dim=16, ffn_hidden_size=8, rotary_base=theta)
    scaled = ReferenceConfig(**{**plain.__dict__, "rope_scaling_factor": 32.0})
    assert not torch.equal(rope_inv_freq(plain), rope_inv_freq(scaled))
    model = _hf_model(True, seed=4, rope_scaling=LLAMA3, rotary_base=theta)
    torch.testing.assert_close(rope_inv_freq(scaled), model.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    model.save_pretrained(tmp_path / "hf")
    batches = make_batches(_tiny(True), 2, seed=5)
    with torch.no_grad():
        want = [model(input_ids=b["tokens"]).logits for b in batches]
    capsys.readouterr()  # save_pretrained's progress bar
    assert _import(tmp_path / "hf", _tiny(True, rotary_base=theta), tmp_path / "refused") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "but the config has model.rope_scaling_factor=None" in err, err
    assert _import(tmp_path / "hf", _tiny(True, **rope), tmp_path / "ck") == 0
    got = run_distributed(_run_from_imports, world_size=1,
                          args=([("scaled", str(tmp_path / "ck"), True, None, rope, 0)],), timeout=300)[0]
    assert export_main(["--checkpoint", str(tmp_path / "ck"), "--output", str(tmp_path / "export")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), trust_remote_code=True).eval()
    assert exported.config.rope_parameters["rope_type"] == "llama3"
    export_config = json.loads((tmp_path / "export" / "config.json").read_text())
    torch.testing.assert_close(rope_inv_freq(reference_config_of(export_config)), exported.model.rotary_emb.inv_freq,
                               rtol=1e-6, atol=0)
    for a, b, batch in zip(got["scaled"], want, batches):
        a = torch.from_numpy(a)
        assert a.shape == b.shape
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5
        with torch.no_grad():
            c = exported(input_ids=batch["tokens"]).logits
        assert ((c - b).abs().max() / b.abs().max()).item() <= 1e-5
