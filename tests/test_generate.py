"""stem-generate's engine: the KV-cached model equals full recomputation with the reference;
host tables (HostRowStore + row cache + double-buffered chunks) equal device tables: the logits
of every step bitwise (the same rows in the same computation), hence the tokens, greedy and
seeded sampling; the sampler's cuts; bad prompts are refused.
"""

import copy

import pytest
import torch

from stem_megatron.inference.generate import GenerationError, Generator, Sampling, sample
from stem_megatron.testing.models import reference_model, tiny_config

PROMPTS = [[5, 9, 9, 17, 3, 5, 30, 2, 9, 11, 5], [7, 7, 1], [12, 30, 4, 4, 8, 2, 19]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: tiny models, shared cores


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    cfg = tiny_config(seq_length=64, vocab_size=200)  # 200 real ids, embedding padded to 256
    return reference_model(cfg, seed=3).eval()


def _generator(ref, tables, **kw):
    return Generator(copy.deepcopy(ref), context_length=64, vocab=200, eod=None, tables=tables, **kw)


def test_kv_cache_generation_equals_full_recomputation(ref):
    gen = _generator(ref, "device", chunk_size=4)
    out = gen.generate(PROMPTS, max_new_tokens=12)
    with torch.no_grad():
        for prompt, new in zip(PROMPTS, out.tokens):
            ids = list(prompt)
            for t in new:  # greedy with the full reference, one whole sequence per step
                logits = ref(torch.tensor([ids]))[0, -1, :200]
                assert int(logits.argmax()) == t
                ids.append(t)
    # and the logits themselves: a cached chunked forward vs the reference over the whole sequence
    from stem_megatron.inference.kv_model import KVCache

    seq = torch.tensor([PROMPTS[0] + out.tokens[0]])
    cache = KVCache(gen.model.ref, 1, seq.shape[1], "cpu", torch.float32)
    got = []
    with torch.no_grad():
        for a in range(0, seq.shape[1], 5):
            ids = seq[:, a:a + 5]
            pos = torch.arange(a, a + ids.shape[1])[None]
            got.append(gen.model(ids, pos, torch.ones_like(ids, dtype=torch.bool), cache, gen._rows(gen._fetch(ids))))
        want = ref(seq)
    got = torch.cat(got, 1)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.9, top_k=40, top_p=0.9, seed=7)],
                         ids=["greedy", "seeded"])
def test_host_tables_equal_device_tables(ref, sampling):
    device = _generator(ref, "device", chunk_size=4).generate(PROMPTS, 16, sampling, keep_logits=True)
    host_gen = _generator(ref, "host", chunk_size=4, cache_rows=6)  # tiny cache: evictions happen
    host = host_gen.generate(PROMPTS, 16, sampling, keep_logits=True)
    host_gen.close()
    # Tokens alone can agree with wrong rows (an argmax or a seeded draw survives small changes).
    assert len(host.logits) == len(device.logits) == 16
    for step, (h, d) in enumerate(zip(host.logits, device.logits)):
        assert torch.equal(h, d), f"step {step}: host-table logits differ by {(h - d).abs().max().item():.3g}"
    assert host.tokens == device.tokens
    stats = host.rows
    assert stats["row_hits"] > 0 and stats["row_misses"] > 0  # the cache served some rows, the store the rest
    assert stats["bytes_to_device"] == stats["row_misses"] * 2 * 128 * 4  # 2 STEM layers x F=128 x fp32
    if sampling.temperature:  # the seed matters: another seed gives other tokens
        other = _generator(ref, "host", chunk_size=4).generate(PROMPTS, 16, Sampling(0.9, 40, 0.9, seed=8))
        assert other.tokens != host.tokens


def test_batched_left_padding_equals_one_prompt_at_a_time(ref):
    batch = _generator(ref, "host", chunk_size=3).generate(PROMPTS, 8)
    for i, p in enumerate(PROMPTS):
        assert _generator(ref, "device", chunk_size=128).generate([p], 8).tokens[0] == batch.tokens[i]


def test_sampler_cuts():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0, 9.0]])  # column 5 is vocabulary padding
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, 5, Sampling(), gen).tolist() == [1]
    draws = {int(sample(logits, 5, Sampling(temperature=1.0, top_k=2), gen)) for _ in range(200)}
    assert draws == {1, 3}
    # p(1) ~ 0.55, p(3) ~ 0.33: top_p 0.5 keeps only the first token, 0.7 the first two
    assert {int(sample(logits, 5, Sampling(temperature=1.0, top_p=0.5), gen)) for _ in range(100)} == {1}
    assert {int(sample(logits, 5, Sampling(temperature=1.0, top_p=0.7), gen)) for _ in range(300)} == {1, 3}


def test_bad_prompts_are_refused(ref):
    gen = _generator(ref, "device")
    with pytest.raises(GenerationError, match="exceeds the model's context of 64"):
        gen.generate([list(range(60))], 8)
    with pytest.raises(GenerationError, match="prompt 2 is empty"):
        gen.generate([[1], []], 2)


def test_cli_generates_and_refuses_bad_prompts_with_one_line(tmp_path, capsys):
    import json

    from fixtures.tiny_export import write_export
    from fixtures.tiny_tokenizers import make_tiktoken

    from stem_megatron.cli.generate import main

    export = write_export(str(tmp_path / "m"), make_tiktoken(str(tmp_path)), seq_length=32)
    (tmp_path / "prompts.txt").write_text("the end of\n\nof the\n")
    argv = ["--model", export, "--prompt", "in the", "--prompt-file", str(tmp_path / "prompts.txt"),
            "--max-new-tokens", "5", "--device", "cpu"]
    for tables in ("device", "host"):
        assert main([*argv, "--tables", tables]) == 0
        lines = capsys.readouterr().out.strip().split("\n")
        report = json.loads(lines[-1])
        assert report["batch"] == 3 and report["tables"] == tables and len(report["completions"]) == 3
        assert report["prefill_tokens_per_s"] > 0 and report["decode_tokens_per_s"] > 0
        assert lines[0].startswith("in the")
        if tables == "device":
            device_completions = report["completions"]
    assert report["completions"] == device_completions
    cases = [
        (["--model", export, "--prompt", "x" * 40, "--max-new-tokens", "1"], 2, "exceeds the model's context"),
        (["--model", str(tmp_path / "nothing"), "--prompt", "x", "--max-new-tokens", "1"], 4, "no such file"),
        (["--model", export, "--prompt-file", str(tmp_path / "missing.txt"), "--max-new-tokens", "1"], 2,
         "missing.txt"),
    ]
    for argv, code, words in cases:
        assert main(argv) == code
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and words in captured.err, captured.err


def test_host_row_cache_is_bounded_by_the_table():
    """--cache-rows past the table's rows allocates the table's rows (a cache cannot hold more ids)."""
    from stem_megatron.inference.rows import HostTables

    tables = HostTables(torch.randn(10, 2, 3), "cpu", cache_rows=10**12)
    assert tables.cache_CLF.shape == (10, 2, 3) and len(tables.free) == 10
    tables.close()
