"""build_gpt_datasets: splits, item contents, blend proportions, mock, held-out prefixes, gloo ranks."""

import random

import numpy as np
import pytest
import torch
from fixtures.tiny_tokenizers import make_tiktoken

from data_tools.preprocess import PreprocessOptions, preprocess
from stem_megatron.config import DataConfig
from stem_megatron.data.datasets import DataError, build_gpt_datasets
from stem_megatron.data.tokenizer import load_tokenizer
from stem_megatron.testing.distributed import run_distributed

SEQ = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two small indexed datasets ("a" words / "b" words) made with a tiny tiktoken tokenizer and EOD."""
    root = tmp_path_factory.mktemp("data")
    tok_path = make_tiktoken(str(root))
    rng = random.Random(0)
    prefixes = {}
    for name, words in (("a", ["alpha", "apple", "atom"]), ("b", ["beta", "boson", "bit"])):
        src = root / f"{name}.jsonl"
        src.write_text(
            "".join(
                f'{{"text": "{" ".join(rng.choices(words, k=rng.randint(3, 30)))}"}}\n' for _ in range(300)
            )
        )
        preprocess(
            PreprocessOptions(
                inputs=[str(src)],
                output_prefix=str(root / name),
                tokenizer=tok_path,
                append_eod=True,
                progress=False,
            )
        )
        prefixes[name] = str(root / f"{name}_text_document")
    return {"tokenizer": load_tokenizer(tok_path), "root": root, **prefixes}


def build(data_cfg, tok, train=200, valid=20, test=0, **kw):
    return build_gpt_datasets(
        data_cfg,
        seq_length=SEQ,
        seed=1234,
        train_samples=train,
        valid_samples=valid,
        test_samples=test,
        tokenizer=tok,
        **kw,
    )


def test_single_prefix_split_and_item_contents(data, tmp_path):
    tok = data["tokenizer"]
    cfg = DataConfig(data_path=[data["a"]], split="90,10,0", cache_path=str(tmp_path / "cache"))
    train, valid, test = build(cfg, tok)
    assert test is None  # split weight 0
    assert len(train) >= 200 and len(valid) >= 20
    assert set(train.indices).isdisjoint(valid.indices)  # split by document
    item = train[0]
    assert set(item) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask"}
    assert item["tokens"].shape == (SEQ,) and item["tokens"].dtype == torch.int64
    assert torch.equal(item["tokens"][1:], item["labels"][:-1])
    assert torch.equal(item["position_ids"], torch.arange(SEQ))
    assert torch.all(item["loss_mask"] == 1)
    assert item["attention_mask"].shape == (1, SEQ, SEQ) and item["attention_mask"].dtype == torch.bool
    assert "b" not in tok.decode(item["tokens"].tolist()).replace("<|endoftext|>", "")  # only "a" words
    assert any((tmp_path / "cache").iterdir())
    again = build(cfg, tok)[0]  # from the cache
    assert torch.equal(again[5]["tokens"], train[5]["tokens"])


def test_eod_flags_reset_positions_and_mask_loss(data):
    tok = data["tokenizer"]
    cfg = DataConfig(
        data_path=[data["a"]],
        split="100,0,0",
        eod_mask_loss=True,
        reset_position_ids=True,
        reset_attention_mask=True,
    )
    train = build(cfg, tok, valid=0)[0]
    item = next(train[i] for i in range(len(train)) if (train[i]["tokens"][:-1] == tok.eod).any())
    tokens, pos = item["tokens"], item["position_ids"]
    e = int((tokens == tok.eod).nonzero()[0])
    assert item["loss_mask"][e] == 0 and item["loss_mask"].sum() == SEQ - int((tokens == tok.eod).sum())
    assert pos[e + 1] == 0
    assert item["attention_mask"][0, e + 1, e]  # True = masked: no attention across the document boundary


def test_blend_samples_in_proportion_to_weights(data):
    tok = data["tokenizer"]
    cfg = DataConfig(data_path=[0.7, data["a"], 0.3, data["b"]], split="100,0,0")
    train = build(cfg, tok, train=2000, valid=0)[0]
    ids = np.asarray(train.dataset_index)
    assert len(ids) == 2000
    share = np.bincount(ids, minlength=2) / len(ids)
    assert abs(share[0] - 0.7) < 0.02 and abs(share[1] - 0.3) < 0.02
    only_in = {0: set("lphm"), 1: set("bsni")}  # letters of one word list and not the other
    for i in range(0, 2000, 37):
        item = train[i]
        letters = set(tok.decode(item["tokens"].tolist()).replace("<|endoftext|>", ""))
        assert letters & only_in[1 - int(item["dataset_id"])] == set()


def test_held_out_valid_prefix(data):
    tok = data["tokenizer"]
    cfg = DataConfig(data_path=[data["a"]])
    train, valid, test = build(cfg, tok, valid=10, valid_data_path=[data["b"]])
    assert test is None
    assert len(train.indices) == 300 and valid.dataset_path == data["b"]


def test_mock_needs_no_files(data):
    train, valid, _ = build(DataConfig(mock=True), data["tokenizer"], train=50, valid=5)
    assert len(train) >= 50 and len(valid) >= 5
    assert set(train[0]) >= {"tokens", "labels", "loss_mask", "position_ids"}
    assert int(train[0]["tokens"].max()) < data["tokenizer"].vocab_size


@pytest.mark.parametrize(
    "data_path, message",
    [
        (["missing/prefix"], "no indexed dataset at missing/prefix"),
        ([0.5, "A", 0.5, "missing/b"], "no indexed dataset at missing/b"),
        ([], "data.data_path is empty"),  # DataConfig refuses this; a config mutated afterwards gets here
        ([0.5, "A", 0.5], "weight, prefix pairs"),
        ([0.5, "A", -1, "A"], "not a positive number"),
    ],
)
def test_bad_data_path_is_a_one_line_error(data, data_path, message):
    cfg = DataConfig(data_path=["placeholder"])
    cfg.data_path = [data["a"] if p == "A" else p for p in data_path]
    with pytest.raises(DataError, match=message) as err:
        build(cfg, data["tokenizer"])
    assert "\n" not in str(err.value)


def _samples(rank, a, b, tok_path, cache, only_rank0):
    cfg = DataConfig(data_path=[0.7, a, 0.3, b], split="90,10,0", cache_path=cache)
    train, valid, _ = build_gpt_datasets(
        cfg,
        seq_length=SEQ,
        seed=7,
        train_samples=100,
        valid_samples=10,
        test_samples=0,
        tokenizer=load_tokenizer(tok_path),
        is_built_on_rank=(lambda: rank == 0) if only_rank0 else None,
    )
    if train is None:
        return None
    return [train[i]["tokens"].tolist() for i in range(0, 100, 9)] + [valid[0]["tokens"].tolist()]


def _build_on_rank(rank, world_size, a, b, tok_path, cache_dir):
    return {
        "cache": _samples(rank, a, b, tok_path, cache_dir, False),
        "no-cache": _samples(rank, a, b, tok_path, None, False),
        "rank0-only": _samples(rank, a, b, tok_path, cache_dir, True),
    }


def test_two_gloo_ranks_build_the_same_samples_as_one_process(data, tmp_path):
    args = (data["a"], data["b"], data["tokenizer"].path)
    rank0, rank1 = run_distributed(
        _build_on_rank, world_size=2, args=(*args, str(tmp_path / "c2")), timeout=300
    )
    single = _samples(0, *args, str(tmp_path / "c1"), False)  # no process group
    assert rank0["cache"] == rank1["cache"] == rank0["no-cache"] == rank1["no-cache"] == single
    assert rank0["rank0-only"] == single and rank1["rank0-only"] is None


def test_re_preprocessing_a_prefix_drops_its_stale_default_cache(data, tmp_path):
    tok = data["tokenizer"]
    src = tmp_path / "docs.jsonl"
    opts = dict(
        inputs=[str(src)],
        output_prefix=str(tmp_path / "d"),
        tokenizer=tok.path,
        append_eod=True,
        progress=False,
    )
    src.write_text('{"text": "alpha apple atom"}\n' * 50)
    preprocess(PreprocessOptions(**opts))
    prefix = str(tmp_path / "d_text_document")
    cfg = DataConfig(data_path=[prefix], split="100,0,0")  # cache_path None: {prefix}/cache
    first = build(cfg, tok, train=20, valid=0)[0]
    assert (tmp_path / "d_text_document" / "cache").is_dir()
    src.write_text('{"text": "beta boson bit"}\n' * 10)  # fewer documents: old indices would be out of range
    preprocess(PreprocessOptions(**opts))
    assert not (tmp_path / "d_text_document").exists()
    second = build(cfg, tok, train=20, valid=0)[0]
    assert len(second.indices) == 10 and len(first.indices) == 50
    assert "b" in tok.decode(second[0]["tokens"].tolist())
