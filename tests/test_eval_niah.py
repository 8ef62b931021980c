"""stem-eval niah: the builder puts the needle at the stated depth with the prompt filling the
length; the CLI on a tiny model writes its table, heatmap PNG and JSON, and refuses bad input.
"""

import json

import pytest
import torch

from stem_megatron.inference import niah

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: tiny models, shared cores


@pytest.fixture(scope="module")
def tok_and_haystack(tmp_path_factory):
    from fixtures.tiny_tokenizers import corpus, make_tiktoken

    from stem_megatron.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("niah")
    path = make_tiktoken(str(root))
    hay = root / "hay.jsonl"
    hay.write_text("".join(json.dumps({"text": line}) + "\n" for line in corpus(60, seed=4)))
    return root, path, load_tokenizer(path), str(hay)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("length", [120, 257])
def test_needle_is_at_the_stated_depth(tok_and_haystack, depth, length):
    _, _, tok, hay = tok_and_haystack
    haystack = niah.haystack_ids((json.loads(line)["text"] for line in open(hay)), tok)
    p = niah.build_prompt(tok, haystack, length, depth, "40917", offset=321)
    needle = tok.encode(niah.NEEDLE.format(key="40917"))
    question = tok.encode(niah.QUESTION)
    assert p.ids[p.needle_start:p.needle_start + len(needle)] == needle and p.needle_len == len(needle)
    assert abs(p.needle_start / p.haystack_len - depth) <= 0.5 / p.haystack_len  # nearest token boundary
    assert p.depth == p.needle_start / p.haystack_len
    assert p.ids[-len(question):] == question
    assert len(p.ids) + len(p.answer) + niah.EXTRA_TOKENS == length
    hay_part = p.ids[:p.needle_start] + p.ids[p.needle_start + len(needle):-len(question)]
    start = 321 % (len(haystack) - p.haystack_len + 1)
    assert hay_part == haystack[start:start + p.haystack_len]  # real haystack text, in order
    assert "40917" in tok.decode(p.ids[p.needle_start:p.needle_start + len(needle)])
    with pytest.raises(ValueError, match="too short"):
        niah.build_prompt(tok, haystack, 20, depth, "40917")


def test_cli_writes_table_png_and_json(tok_and_haystack, tmp_path, capsys):
    from fixtures.tiny_export import write_export

    from stem_megatron.cli.eval import main

    root, tok_path, tok, hay = tok_and_haystack
    export = write_export(str(root / "m"), tok_path, seq_length=160)
    out = tmp_path / "niah"
    argv = ["niah", "--model", export, "--output", str(out), "--haystack", hay, "--lengths", "120,160",
            "--depths", "0,0.5,1", "--trials", "2", "--device", "cpu"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().split("\n")[-1])
    assert sorted(p.name for p in out.iterdir()) == ["niah.json", "niah.md", "niah.png"]
    assert (out / "niah.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "niah.json").read_text())
    assert result["lengths"] == [120, 160] and result["depths"] == [0.0, 0.5, 1.0]
    assert len(result["accuracy"]) == 3 and all(len(r) == 2 for r in result["accuracy"])
    assert len(result["cells"]) == 6 and all(len(c["trials"]) == 2 for c in result["cells"])
    for cell in result["cells"]:
        for t in cell["trials"]:
            assert t["prompt_tokens"] + niah.EXTRA_TOKENS + 6 == cell["length"]  # answer " 12345": 6 byte tokens
            assert abs(t["depth"] - cell["depth"]) <= 0.5 / t["haystack_tokens"] + 1e-12
    assert all(n > 0 for row in result["answer_nll"] for n in row)
    assert len(result["needle_gain"]) == 3 and all(len(r) == 2 for r in result["needle_gain"])
    table = (out / "niah.md").read_text()
    assert "| depth \\ length | 120 | 160 |" in table and "| 50% |" in table
    assert summary["mean_accuracy"] == result["mean_accuracy"] and summary["output"] == str(out)
    # bad input: one line, non-zero exit, nothing written
    for bad, code, words in [
        (["--lengths", "120,400"], 2, "the model's context"),
        (["--haystack", str(tmp_path / "none.jsonl")], 2, "no such file"),
    ]:
        target = tmp_path / "bad"
        assert main([*argv[:4], str(target), *argv[5:], *bad]) == code
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and words in captured.err, captured.err
        assert not target.exists()
    assert main(argv) == 2  # the output directory is not empty
    assert "exists" in capsys.readouterr().err


def test_answer_nll_is_teacher_forced_nll_with_left_padding(tok_and_haystack):
    from fixtures.tiny_export import write_export

    from stem_megatron.inference.generate import Generator
    from stem_megatron.inference.loading import load_model

    root, tok_path, tok, _ = tok_and_haystack
    export = write_export(str(root / "m2"), tok_path, seq_length=64)
    ref = load_model(export).model
    prompts, answers = [[5, 80, 81, 9, 120, 33, 7], [44, 2]], [[49, 50, 51], [52, 53, 54, 55]]
    with torch.no_grad():  # by hand, one unpadded sequence at a time
        want = []
        for p, a in zip(prompts, answers):
            logp = ref(torch.tensor([p + a]))[0, :, :tok.vocab_size].log_softmax(-1)
            want.append(-sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(a)) / len(a))
    gen = Generator(load_model(export).model, context_length=64, vocab=tok.vocab_size, eod=tok.eod)
    assert niah.answer_nll(gen, prompts, answers) == pytest.approx(want, rel=1e-5)
