"""The controlled fact test (stem_megatron/testing/facts.py, docs/editing.md) and `stem-edit` on the
trained fact model: editing country A into country B at the prompt flips the greedy completion to
B's capital (one_to_one >= 80%), prompts about other countries keep their answers, `--persist`
makes the edit permanent in a full export that transformers loads with the same logits, and bad
input is one line with a non-zero exit.

Shape suffixes: 1 a batch of one, s sequence, v vocabulary rows.
"""

import json
import os

import pytest

from stem_megatron.testing import facts

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded


def _train(tmp, seed=0):
    world = facts.FactWorld.make(seed)
    tok = world.tokenizer(str(tmp))
    return world, tok, facts.train_fact_model(world, tok, seed=seed)


def _check_report(report):
    print(json.dumps(report, indent=1))  # the per-mode rates, shown with pytest -s
    assert report["baseline"]["rate"] >= 0.75, report["baseline"]  # the model learned the facts
    assert report["one_to_one"]["rate"] >= 0.8, report["one_to_one"]
    assert report["kept"]["rate"] >= 0.85, report["kept"]


@pytest.fixture(scope="module")
def fact(tmp_path_factory):
    """The trained fact model, also written as an export with its word-level tokenizer."""
    from stem_megatron.export import TokenizerSource, config_json, write_export

    tmp = tmp_path_factory.mktemp("facts")
    world, tok, model = _train(tmp / "tok")
    export = str(tmp / "export")
    # seq_length: the context facts.py trains at
    write_export(export, model.state_dict(), config_json(model.config, seq_length=24), TokenizerSource.at(tok.path))
    return world, tok, model, export


def test_editing_the_country_flips_the_capital(fact):
    world, tok, model, _ = fact
    _check_report(facts.flip_rates(model, world, tok))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fact_test_other_seeds(tmp_path, seed):
    world, tok, model = _train(tmp_path, seed)
    _check_report(facts.flip_rates(model, world, tok, targets_per_country=6))


def _edit(capsys, *args):
    from stem_megatron.cli.edit import main

    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _one_token_pair(world, tok, model):
    """The first one-token countries (a, b) whose in-context edit a -> b flips "The capital of a is"
    (the flip rate is measured above; here the CLI must reproduce the library's edit)."""
    from stem_megatron import editing

    one = [i for i, c in enumerate(world.countries) if " " not in c]
    for a in one:
        for b in one:
            ids = tok.encode(facts.PROMPTS[0].format(c=world.countries[a]))
            plan = editing.plan_edit(ids, tok.encode(world.countries[a]), tok.encode(world.countries[b]), "one_to_one")
            ov = editing.row_overrides(model, plan, model.config.stem_layers, len(ids))
            if a != b and facts._next(model, ids) == tok.encode(world.capitals[a])[0] \
                    and facts._next(model, ids, ov) == tok.encode(world.capitals[b])[0]:
                return a, b
    raise AssertionError("no one-token pair flips")


def test_stem_edit_cli_flips_the_answer(fact, capsys):
    world, tok, model, export = fact
    a, b = _one_token_pair(world, tok, model)
    rc, out, err = _edit(capsys, "--model", export, "--prompt", f"The capital of {world.countries[a]} is",
                         "--source", world.countries[a], "--target", world.countries[b], "--mode", "one_to_one",
                         "--max-new-tokens", "3", "--top-k", "3")
    assert rc == 0, err
    record = json.loads(out.strip().splitlines()[-1])
    assert record["before"]["top_k"][0]["token"] == world.capitals[a]
    assert record["after"]["top_k"][0]["token"] == world.capitals[b]
    assert record["after"]["continuation"].split()[0] == world.capitals[b]  # the continuation keeps the edit
    assert record["span"] == [3, 4] and record["layers"] == [0, 1, 2] and record["top1_changed"]
    assert "before:" in out and "after:" in out


def test_stem_edit_persist_changes_every_occurrence(fact, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stem_megatron import editing
    from stem_megatron.inference.loading import load_model

    world, tok, model, export = fact
    a, b = _one_token_pair(world, tok, model)
    out_dir = str(tmp_path / "edited")
    rc, out, err = _edit(capsys, "--model", export, "--prompt", f"The capital of {world.countries[a]} is",
                         "--source", world.countries[a], "--target", world.countries[b], "--mode", "auto",
                         "--persist", out_dir)
    assert rc == 0, err
    assert err.count("\n") == 1 and "warning" in err and "every occurrence" in err and world.countries[a] in err
    assert json.loads(out.strip().splitlines()[-1])["persisted"] == out_dir
    edited = load_model(out_dir)
    vocab = edited.text_vocab_size
    for c in range(len(world.countries)):  # no edit at the prompt: the tables carry it
        ids = tok.encode(f"The capital of {world.countries[c]} is")
        got = int(editing.logits(edited.model, ids)[-1, :vocab].argmax())
        want = int(editing.logits(model, ids)[-1, :vocab].argmax())
        if c == a:
            assert got == tok.encode(world.capitals[b])[0]
        else:
            assert got == want, world.countries[c]

    # a full export: transformers loads it (its own model files, tokenizer.json) with the edited logits
    assert {"configuration_stem.py", "modeling_stem.py", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(os.listdir(out_dir))
    config = json.loads(open(os.path.join(out_dir, "config.json")).read())
    assert config["stem_edit"]["source"] == world.countries[a] and config["stem_edit"]["changed_ids"]
    hf = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out_dir)
    prompt = f"The capital of {world.countries[a]} is {world.capitals[a]} . The people of {world.countries[b]} speak"
    ids_1s = torch.tensor([tok.encode(prompt)])
    assert hf_tok(prompt).input_ids == ids_1s[0].tolist()
    with torch.no_grad():
        got_1sv, want_1sv = hf(input_ids=ids_1s).logits, edited.model(ids_1s)
        unedited_1sv = model(ids_1s)
    assert ((got_1sv - want_1sv).abs().max() / want_1sv.abs().max()).item() <= 1e-5
    assert not torch.allclose(got_1sv, unedited_1sv, atol=1e-3)  # the edited tables are the ones loaded


def _dense_export(tmp_path, tok):
    from stem_megatron.export import TokenizerSource, config_json, write_export
    from stem_megatron.reference import ReferenceStemLM

    dense = ReferenceStemLM(facts.fact_model_config(128, stem_layers=()))
    path = str(tmp_path / "dense")
    write_export(path, dense.state_dict(), config_json(dense.config, seq_length=64), TokenizerSource.at(tok.path))
    return path


def test_stem_edit_bad_input_is_one_line(fact, tmp_path, capsys):
    world, tok, model, export = fact
    a, b = _one_token_pair(world, tok, model)
    two = next(c for c in world.countries if " " in c)
    prompt = f"The capital of {world.countries[a]} is"
    base = ["--model", export, "--prompt", prompt, "--target", world.countries[b]]
    cases = [
        (base + ["--source", "Atlantis", "--mode", "auto"], 2, "does not occur in the prompt"),
        (base + ["--source", world.countries[a], "--mode", "average", "--persist", str(tmp_path / "p")], 2,
         "--persist needs --mode one_to_one"),
        (["--model", export, "--prompt", prompt, "--source", world.countries[a], "--target", two, "--mode", "auto",
          "--persist", str(tmp_path / "p")], 2, "--persist needs --mode one_to_one"),
        (["--model", export, "--prompt", prompt, "--source", world.countries[a], "--target", two,
          "--mode", "one_to_one"], 2, "one_to_one needs as many target tokens"),
        (base + ["--source", world.countries[a], "--mode", "auto", "--layers", "1", "7"], 2, "not STEM layers"),
        (base + ["--source", world.countries[a], "--mode", "sideways"], 2, "invalid choice"),
        (["--model", _dense_export(tmp_path, tok), "--prompt", prompt, "--source", world.countries[a],
          "--target", world.countries[b], "--mode", "auto"], 2, "no STEM layers"),
        (["--model", str(tmp_path / "nowhere"), "--prompt", prompt, "--source", world.countries[a],
          "--target", world.countries[b], "--mode", "auto"], 4, "no such file or directory"),
        (["--model", str(tmp_path), "--prompt", prompt, "--source", world.countries[a],
          "--target", world.countries[b], "--mode", "auto"], 4, "neither an export"),
    ]
    for argv, code, message in cases:
        rc, out, err = _edit(capsys, *argv)
        assert rc == code and out == "" and err.count("\n") == 1 and message in err, (argv, rc, err)
    assert not os.path.exists(tmp_path / "p")  # nothing half-written

