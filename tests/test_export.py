"""`stem-export`: a TP=2 checkpoint becomes a Hugging Face style directory whose plain-PyTorch
`ReferenceStemLM` computes the megatron model's logits (fp32, relative error <= 1e-5), for tied
and untied output layers; the tokenizer travels with it; bad input gives one line and exit 4/2.
"""

import json
import os

import pytest
import torch

from stem_megatron.testing.distributed import run_distributed


def _train_and_save(rank, world_size, root, tokenizer):
    from megatron.core import parallel_state

    from stem_megatron.config import CheckpointConfig
    from stem_megatron.testing.models import (
        TokenDataset,
        make_batches,
        pipeline_logits,
        reference_model,
        tiny_config,
    )
    from stem_megatron.training.checkpoint import Checkpointer
    from stem_megatron.training.trainer import Trainer

    out = {}
    for name, tied in (("tied", True), ("untied", False)):
        cfg = tiny_config(tp=2, tie_embeddings=tied)
        cfg.data.tokenizer = tokenizer
        cfg.train.lr, cfg.train.warmup_steps = 3e-3, 1
        cfg.stem.lr = 1e-2
        trainer = Trainer(cfg)
        trainer.checkpointer = Checkpointer(CheckpointConfig(save=os.path.join(root, name)))
        trainer.setup(datasets=(TokenDataset(64, cfg.model.seq_length, 60, seed=3), None))
        trainer.load_full_weights(reference_model(cfg, seed=0).state_dict())
        for _ in range(2):  # trained weights and tables, not the reference's
            trainer.train_step()
        trainer.checkpointer.save(trainer)
        batches = make_batches(cfg, 2, seed=5)
        logits = pipeline_logits(trainer.chunks, cfg, batches)
        out[name] = ([b["tokens"] for b in batches], logits)
        parallel_state.destroy_model_parallel()
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from fixtures.tiny_tokenizers import make_tiktoken

    root = tmp_path_factory.mktemp("export")
    tokenizer = make_tiktoken(str(root))
    out = run_distributed(_train_and_save, world_size=2, args=(str(root), tokenizer), timeout=300)[0]
    return root, out


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_exported_model_gives_the_megatron_logits(saved, name, capsys):
    from safetensors import safe_open

    from stem_megatron.export import load_exported, main

    root, out = saved
    dest = root / f"hf_{name}"
    assert main(["--checkpoint", str(root / name), "--output", str(dest)]) == 0
    assert f"wrote {dest}" in capsys.readouterr().out
    assert sorted(os.listdir(dest)) == ["config.json", "model.safetensors", "tiny.tiktoken"]
    config = json.loads((dest / "config.json").read_text())
    assert config["stem_layers"] == [1, 2] and config["vocab_size"] == 256 and config["stem_table_vocab_size"] == 256
    assert config["tie_word_embeddings"] is (name == "tied")
    assert config["stem_tokenizer"] == {"kind": "tiktoken", "files": ["tiny.tiktoken"]}
    with safe_open(str(dest / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {"model.layers.1.mlp.stem_table.weight", "model.layers.0.mlp.up_proj.weight",
            "model.layers.1.mlp.gate_proj.weight", "model.embed_tokens.weight"} <= keys
    assert "model.layers.1.mlp.up_proj.weight" not in keys
    assert ("lm_head.weight" in keys) is (name == "untied")

    model = load_exported(str(dest))
    tokens, logits = out[name]
    with torch.no_grad():
        for ids, want in zip(tokens, logits):
            got = model(ids)
            assert got.shape == want.shape
            rel = ((got - want).abs().max() / want.abs().max()).item()
            assert rel <= 1e-5, f"{name}: relative logit error {rel:.2e}"


def test_export_refuses_bad_input(saved, tmp_path, capsys):
    from stem_megatron.export import main

    root, _ = saved
    assert main(["--checkpoint", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint there" in err, err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["--checkpoint", str(root / "tied"), "--output", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not empty" in err, err
