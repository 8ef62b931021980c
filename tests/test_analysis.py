"""`stem-analyze` on a small trained checkpoint: the PNGs and JSON are written and hold the right
numbers; the statistics on hand-made data; a checkpoint loads to the export's model; bad input is
one line with a non-zero exit.
"""

import json
import os

import numpy as np
import pytest
import torch

from stem_megatron import analysis
from stem_megatron.testing.distributed import run_distributed


def _train_and_save(rank, world_size, root, tokenizer):
    from stem_megatron.config import CheckpointConfig
    from stem_megatron.testing.models import TokenDataset, reference_model, tiny_config
    from stem_megatron.training.checkpoint import Checkpointer
    from stem_megatron.training.trainer import Trainer

    cfg = tiny_config(vocab_size=300)  # the tiny tiktoken's 270 ids, padded by megatron to 320
    cfg.data.tokenizer = tokenizer
    trainer = Trainer(cfg)
    trainer.checkpointer = Checkpointer(CheckpointConfig(save=root))
    trainer.setup(datasets=(TokenDataset(32, cfg.model.seq_length, 270, seed=3), None))
    trainer.load_full_weights(reference_model(cfg, seed=0).state_dict())
    trainer.train_step()
    trainer.checkpointer.save(trainer)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fixtures.tiny_tokenizers import corpus, make_tiktoken

    from stem_megatron.export import TokenizerSource, config_json, write_export
    from stem_megatron.reference import ReferenceConfig, ReferenceStemLM

    root = tmp_path_factory.mktemp("analysis")
    tok = make_tiktoken(str(root))
    run_distributed(_train_and_save, world_size=1, args=(str(root / "ckpt"), tok), timeout=300)
    dense = ReferenceStemLM(ReferenceConfig(vocab_size=320, hidden_size=32, num_layers=3, num_attention_heads=2,
                                            num_query_groups=2, head_dim=16, ffn_hidden_size=48, table_vocab_size=300))
    write_export(str(root / "dense"), dense.state_dict(), config_json(dense.config, seq_length=16),
                 TokenizerSource.at(tok))
    lines = corpus(300, seed=5)
    (root / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[:200]))
    (root / "c.txt").write_text("\n".join(lines[200:]))
    return root


def _analyze(capsys, *args):
    from stem_megatron.cli.analyze import main

    try:
        rc = main(list(args))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_stem_analyze_writes_figures_and_json(setup, capsys):
    from stem_megatron.inference.loading import load_model

    root = setup
    out_dir = root / "out"
    rc, out, err = _analyze(capsys, "--model", str(root / "ckpt"), "--dense", str(root / "dense"), "--corpus",
                            str(root / "c.jsonl"), str(root / "c.txt"), "--output", str(out_dir),
                            "--top-tokens", "40", "--max-context", "512")
    assert rc == 0, err
    assert sorted(os.listdir(out_dir)) == ["angular_spread.json", "angular_spread.png", "unique_tokens.json",
                                           "unique_tokens.png"]
    for png in ("angular_spread.png", "unique_tokens.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    spread = json.loads((out_dir / "angular_spread.json").read_text())
    assert spread["tokens"] == 40 and sorted(spread["layers"]) == ["1", "2"]
    # the dense model has 3 layers, the STEM model 4: STEM layers 1, 2 sit at depths 1/3, 2/3 -> dense 1, 1
    assert [spread["layers"][k]["dense_layer"] for k in ("1", "2")] == [1, 1]

    # recompute layer 2's STEM statistic by hand from the checkpoint's table
    model = load_model(str(root / "ckpt")).model
    from stem_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(root / "tt" / "tiny.tiktoken"))
    docs = [tok.encode(json.loads(line)["text"]) for line in (root / "c.jsonl").read_text().splitlines()]
    docs.append(tok.encode((root / "c.txt").read_text()))
    counts = {}
    for d in docs:
        for i in d:
            counts[i] = counts.get(i, 0) + 1
    top = sorted(counts, key=lambda i: (-counts[i], docs_first(docs, i)))[:40]
    rows = model.model.layers[2].mlp.stem_table.weight.detach().double()[top]
    cos = [float(rows[i] @ rows[j] / rows[i].norm() / rows[j].norm()) for i in range(40) for j in range(i + 1, 40)]
    stats = spread["layers"]["2"]["stem"]
    assert stats["pairs"] == 780 and abs(stats["mean"] - np.mean(cos)) < 1e-9
    pct = list(stats["percentiles"].values())
    assert pct == sorted(pct) and -1 <= pct[0] and pct[-1] <= 1

    unique = json.loads((out_dir / "unique_tokens.json").read_text())
    pts = unique["points"]
    assert [p["context"] for p in pts] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert pts[0]["unique_mean"] == 1 and all(p["unique_mean"] <= p["context"] for p in pts)
    assert all(a["unique_mean"] <= b["unique_mean"] for a, b in zip(pts, pts[1:]))
    assert 0 < unique["heaps"]["beta"] < 1 and unique["heaps"]["r2"] > 0.9
    assert all(p["active_stem_params"] == round(p["unique_mean"] * 2 * 128) for p in pts)
    assert "Heaps' law" in out and "layer 1: STEM rows cos mean" in out


def docs_first(docs, token):
    """Order of first appearance: Counter.most_common breaks count ties by first insertion."""
    pos = 0
    for d in docs:
        for i in d:
            if i == token:
                return pos
            pos += 1
    return pos


def test_checkpoint_loads_as_its_export(setup, tmp_path):
    from stem_megatron.cli.export import main as export_main
    from stem_megatron.inference.loading import load_model

    root = setup
    assert export_main(["--checkpoint", str(root / "ckpt"), "--output", str(tmp_path / "hf")]) == 0
    from_ckpt, from_export = load_model(str(root / "ckpt")), load_model(str(tmp_path / "hf"))
    assert from_ckpt.kind == "checkpoint" and from_export.kind == "export"
    assert from_ckpt.stem_layers == [1, 2] and from_ckpt.tokenizer.encode("the") == from_export.tokenizer.encode("the")
    ids_bs = torch.randint(0, 270, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(from_ckpt.model(ids_bs), from_export.model(ids_bs))


def test_statistics_on_hand_made_data():
    eye_nf = torch.eye(4)
    assert np.allclose(analysis.pairwise_cosines(eye_nf), 0) and analysis.pairwise_cosines(eye_nf).size == 6
    assert np.allclose(analysis.pairwise_cosines(torch.ones(3, 5) * torch.tensor([[1.0], [2.0], [3.0]])), 1)
    stats = analysis.spread_stats(np.array([-1.0, 0.0, 1.0]))
    assert stats["mean"] == 0 and stats["mean_angle_deg"] == pytest.approx(90.0)
    pts = [{"context": n, "unique_mean": 2.0 * n ** 0.5} for n in (1, 2, 4, 8, 16)]
    fit = analysis.heaps_fit(pts)
    assert fit["K"] == pytest.approx(2.0) and fit["beta"] == pytest.approx(0.5) and fit["r2"] == pytest.approx(1.0)
    distinct = analysis.unique_vs_context(np.arange(100), [1, 8, 64])
    assert [p["unique_mean"] for p in distinct] == [1, 8, 64]
    assert [p["unique_mean"] for p in analysis.unique_vs_context(np.zeros(50, dtype=np.int64), [4, 32])] == [1, 1]
    assert analysis.matching_layer(3, 4, [0, 1, 2, 3, 4, 5, 6, 7], 8) == 7


def test_stem_analyze_bad_input_is_one_line(setup, tmp_path, capsys):
    root = setup
    (tmp_path / "empty.txt").write_text("")
    corpus = str(root / "c.jsonl")
    cases = [
        (["--model", str(root / "dense"), "--corpus", corpus], 2, "no STEM layers"),
        (["--model", str(root / "ckpt"), "--corpus", str(tmp_path / "missing.txt")], 2, "missing.txt: no such file"),
        (["--model", str(root / "ckpt"), "--corpus", str(tmp_path / "empty.txt")], 2, "no tokens"),
        (["--model", str(root / "ckpt"), "--corpus", corpus, "--dense",
          str(root / "ckpt" / "nothing")], 4, "cannot load the model"),
        (["--model", str(tmp_path), "--corpus", corpus], 4, "neither an export"),
        (["--model", str(root / "ckpt"), "--corpus", corpus, "--top-tokens", "1"], 2, "--top-tokens: must be >= 2"),
    ]
    (root / "c.txt.jsonl").write_text("not json\n")
    cases.append((["--model", str(root / "ckpt"), "--corpus", str(root / "c.txt.jsonl")], 2, "c.txt.jsonl:1: invalid JSON"))
    for argv, code, message in cases:
        out_dir = tmp_path / "o"
        rc, out, err = _analyze(capsys, *argv, "--output", str(out_dir))
        assert rc == code and out == "" and err.count("\n") == 1 and message in err, (argv, rc, err)
        assert not out_dir.exists()  # nothing half-written
