"""`stem-export`: checkpoints saved at TP=2 (tied and untied output layer) and at PP=2 (tied
embedding across stages) become Hugging Face directories that both the plain-PyTorch
`ReferenceStemLM` and transformers' `AutoModelForCausalLM` (trust_remote_code, the export's own
modeling file) load; their logits equal the megatron model's (fp32, relative error <= 1e-5;
GQA, STEM and dense layers); greedy `generate()` with the KV cache equals a loop of full
forwards; `AutoTokenizer` loads the export's tokenizer; bad input gives one line and exit 4/2.
"""

import json
import os

import pytest
import torch

from stem_megatron.testing.distributed import run_distributed

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
# vocabulary 320 >= the tiny tiktoken's 270 ids (lm-eval feeds it real text); padded to 384 at TP2
LAYOUTS = {"tied": dict(tp=2, tie_embeddings=True, vocab_size=320),
           "untied": dict(tp=2, tie_embeddings=False, vocab_size=320),
           "pp2": dict(pp=2, tie_embeddings=True, vocab_size=320)}


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
    for name, layout in LAYOUTS.items():
        cfg = tiny_config(**layout)
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
        if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
            # the last stage's TP rank 0; numpy arrays pickle by value (a torch tensor would be passed
            # as a file descriptor of this process, which may have exited when the parent reads it)
            out[name] = ([b["tokens"].numpy() for b in batches], [t.numpy() for t in logits])
        parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from fixtures.tiny_tokenizers import make_tiktoken

    root = tmp_path_factory.mktemp("export")
    tokenizer = make_tiktoken(str(root))
    per_rank = run_distributed(_train_and_save, world_size=2, args=(str(root), tokenizer), timeout=400)
    out = {k: ([torch.from_numpy(a) for a in tokens], [torch.from_numpy(a) for a in logits])
           for r in per_rank for k, (tokens, logits) in r.items()}
    assert sorted(out) == sorted(LAYOUTS)
    for name in LAYOUTS:
        from stem_megatron.cli.export import main

        assert main(["--checkpoint", str(root / name), "--output", str(root / f"hf_{name}")]) == 0
    return root, out


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_exported_model_gives_the_megatron_logits(saved, name):
    from safetensors import safe_open

    from stem_megatron.export import load_exported

    root, out = saved
    dest = root / f"hf_{name}"
    assert sorted(os.listdir(dest)) == ["config.json", "configuration_stem.py", "generation_config.json",
                                        "model.safetensors",
                                        "modeling_stem.py", "tiny.tiktoken", "tokenizer.json",
                                        "tokenizer_config.json"]
    config = json.loads((dest / "config.json").read_text())
    assert config["stem_layers"] == [1, 2] and config["vocab_size"] == 384 and config["stem_table_vocab_size"] == 320
    assert config["tie_word_embeddings"] is (name == "tied")
    assert config["stem_tokenizer"] == {"kind": "tiktoken", "files": ["tiny.tiktoken"]}
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_stem.StemLlamaForCausalLM"
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
            assert _rel(got, want) <= 1e-5, f"{name}: relative logit error {_rel(got, want):.2e}"


def _auto_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=dtype).eval()


@pytest.mark.parametrize("name", ["tied", "untied", "pp2"])
def test_transformers_loads_the_export_with_the_megatron_logits(saved, name):
    root, out = saved
    model = _auto_model(root / f"hf_{name}")
    assert type(model).__name__ == "StemLlamaForCausalLM"
    assert [i for i, layer in enumerate(model.model.layers) if layer.is_stem] == [1, 2]
    assert model.config.num_key_value_heads == 2 < model.config.num_attention_heads  # GQA
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is (name != "untied")
    tokens, logits = out[name]
    with torch.no_grad():
        for ids, want in zip(tokens, logits):
            got = model(input_ids=ids).logits
            assert got.shape == want.shape
            assert _rel(got, want) <= 1e-5, f"{name}: relative logit error {_rel(got, want):.2e}"
        # STEM ids default to input_ids; other ids (or replaced rows) change only what the tables give
        ids = tokens[0]
        other = (ids + 1) % 40
        assert torch.equal(model(input_ids=ids, stem_ids=ids).logits, model(input_ids=ids).logits)
        changed = model(input_ids=ids, stem_ids=other).logits
        assert _rel(changed, logits[0]) > 1e-3
        rows = {i: model.model.layers[i].mlp.stem_table.weight[other] for i in (1, 2)}
        assert torch.allclose(model(input_ids=ids, stem_rows=rows).logits, changed, rtol=0, atol=1e-5)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, 5] = True  # positions before 5 are causal-untouched by an edit at 5
        edited = model(input_ids=ids, stem_rows=rows, stem_rows_mask=mask).logits
        assert torch.equal(edited[:, :5], model(input_ids=ids).logits[:, :5])
        assert not torch.allclose(edited[:, 5:], logits[0][:, 5:], atol=1e-4)


def test_generate_with_the_kv_cache_equals_full_forwards_and_bf16_loads(saved):
    root, _ = saved
    model = _auto_model(root / "hf_untied")
    prompt = torch.tensor([[5, 17, 3, 29, 11, 2], [8, 8, 1, 30, 2, 7]])
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True,
                                   eos_token_id=None, pad_token_id=0)
        ids = prompt
        for _ in range(10):  # real tokens only: generation_config.json suppresses the padding ids 320..383
            logits = model(input_ids=ids, use_cache=False).logits[:, -1:, :320]
            ids = torch.cat([ids, logits.argmax(-1)], dim=1)
    assert torch.equal(generated, ids)
    bf16 = _auto_model(root / "hf_untied", dtype=torch.bfloat16)
    assert bf16.model.layers[1].mlp.stem_table.weight.dtype == torch.bfloat16
    with torch.no_grad():
        want = model(input_ids=prompt).logits
        assert _rel(bf16(input_ids=prompt).logits.float(), want) < 0.05


def test_autotokenizer_loads_the_export(saved):
    from fixtures.tiny_tokenizers import DOCUMENTS
    from transformers import AutoTokenizer

    from stem_megatron.data.tokenizer import load_tokenizer

    root, _ = saved
    hf = AutoTokenizer.from_pretrained(str(root / "hf_tied"))
    ours = load_tokenizer(str(root / "hf_tied" / "tiny.tiktoken"))
    for doc in DOCUMENTS:
        ids = hf(doc, add_special_tokens=False)["input_ids"]
        assert hf.decode(ids) == doc
        if "<|endoftext|>" not in doc:  # transformers encodes a special token's spelling as the token
            assert ids == ours.encode(doc)
    assert hf.eos_token_id == ours.eod == json.loads((root / "hf_tied" / "config.json").read_text())["eos_token_id"]


def test_lm_eval_loglikelihoods_equal_the_projects(saved, tmp_path):
    import subprocess
    import sys

    from fixtures.tiny_tokenizers import corpus

    from stem_megatron.data.tokenizer import load_tokenizer
    from stem_megatron.export import load_exported
    from stem_megatron.hf.lm_eval_task import TASK, continuation_logprobs, make_items, write_task

    root, _ = saved
    export = root / "hf_untied"
    model, tok = load_exported(str(export)), load_tokenizer(str(export / "tiny.tiktoken"))
    # items that fit the model's 16 positions, so lm-eval truncates nothing
    items = [it for it in make_items(corpus(80, seed=4), 80, context_words=2, continuation_words=1, seed=1)
             if max(len(tok.encode(it["context"] + " " + c)) for c in it["choices"]) <= 16][:6]
    assert len(items) >= 4
    write_task(str(tmp_path / "task"), items)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={export},trust_remote_code=True",
         "--include_path", str(tmp_path / "task"), "--tasks", TASK, "--device", "cpu", "--batch_size", "4",
         "--log_samples", "--output_path", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    (samples,) = (tmp_path / "out").rglob(f"samples_{TASK}_*.jsonl")
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(records) == len(items)
    for rec in records:
        doc = rec["doc"]
        got = [float(r[0]) for r in rec["filtered_resps"]]
        want = continuation_logprobs(model, tok, doc["context"], [" " + c for c in doc["choices"]])
        assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4 * max(1.0, max(abs(b) for b in want)), (got, want)


def test_export_refuses_bad_input(saved, tmp_path, capsys):
    from stem_megatron.cli.export import main

    root, _ = saved
    assert main(["--checkpoint", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint there" in err, err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["--checkpoint", str(root / "tied"), "--output", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not empty" in err, err
