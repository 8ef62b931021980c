"""A checkpoint saved at one layout continues at another: directly, and through `stem-reshard`.

Source: TP=2 (PP=1, DP=1) trains 3 steps from fixed reference weights, saves, and runs steps 4
and 5. Every target layout loads the step-3 checkpoint and runs steps 4 and 5 too. Step 4's loss
checks the dense weights, step 5's loss the dense optimizer state (Adam moments and step), the
tables after step 5 the tables, their RowSparseAdamW moments and per-row steps. Both dense
optimizers: the plain one and the distributed one (saved `fully_reshardable`).
Everything runs in one spawned world of 2 ranks to keep the test fast: megatron's parallel state
is torn down and rebuilt between scenarios, and rank 0 runs `stem-reshard` (single-process code
that uses no process group) between the saving and the loading scenarios.
"""

import os

import pytest
import torch

from stem_megatron.testing.distributed import run_distributed

KINDS = ("weight", "exp_avg", "exp_avg_sq")


def _gather_tables(trainer):
    """Rank 0: {(layer, kind): full [V, F]} and {layer: step [V]} of every STEM layer; None elsewhere."""
    import torch.distributed as dist

    mine = []
    for e, st in zip(trainer.engines, trainer.table_optimizer.state):
        rows = e.global_rows()
        keep = rows < e.layout.vocab_size
        for slot, layer in enumerate(e.layout.layer_ids):
            data = {"weight": e.weight[keep, slot]} | {k: st[k][keep, slot] for k in KINDS[1:]}
            mine.append((layer, e.layout.col_start, rows[keep], data, st["step"][keep]))
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    if dist.get_rank() != 0:
        return None
    cfg = trainer.cfg
    vocab, ffn = cfg.model.vocab_size, cfg.model.ffn_hidden_size
    full, steps = {}, {}
    for part in parts:
        for layer, c0, rows, data, step in part:
            for kind, block in data.items():
                full.setdefault((layer, kind), torch.full((vocab, ffn), float("nan")))[rows, c0:c0 + block.shape[1]] = block
            steps.setdefault(layer, torch.full((vocab,), -1, dtype=torch.int64))[rows] = step
    return full, steps


def _gather_embedding(trainer):
    """Rank 0: the first stage's full embedding [padded V, h] (its TP shards concatenated); None elsewhere."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    chunk = trainer.chunks[0]
    mine = None
    if chunk.pre_process:
        mine = (parallel_state.get_tensor_model_parallel_rank(), chunk.embedding.word_embeddings.weight.detach().clone())
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    shards = dict(p for p in parts if p is not None)
    return torch.cat([shards[t] for t in sorted(shards)]) if dist.get_rank() == 0 else None


def _scenarios(rank, world_size, scenarios):
    """Each scenario: build a trainer at its layout, (load or) start, run its steps, report."""
    from megatron.core import parallel_state

    from stem_megatron.config import CheckpointConfig
    from stem_megatron.testing.models import TokenDataset, reference_model, tiny_config
    from stem_megatron.training.checkpoint import Checkpointer
    from stem_megatron.training.trainer import Trainer

    results = []
    for sc in scenarios:
        if "reshard" in sc:
            from stem_megatron.cli.reshard import main as reshard_main

            results.append({"rc": reshard_main(sc["reshard"]) if rank == 0 else None})
            torch.distributed.barrier()
            continue
        cfg = tiny_config(**sc["layout"], vocab_size=sc.get("vocab", 256), deterministic=True)
        cfg.parallel.use_distributed_optimizer = sc["distributed_optimizer"]
        cfg.train.lr, cfg.train.warmup_steps, cfg.train.train_steps = 3e-3, 2, 5
        cfg.stem.lr, cfg.stem.weight_decay = 1e-2, 0.01
        trainer = Trainer(cfg)
        trainer.checkpointer = Checkpointer(CheckpointConfig(save=sc.get("save"), load=sc.get("load")))
        trainer.setup(datasets=(TokenDataset(64, cfg.model.seq_length, 60, seed=3), None))
        start = trainer.step
        if start == 0:
            trainer.load_full_weights(reference_model(cfg, seed=0).state_dict())
        losses, captured = {}, None
        if start and sc.get("capture"):
            captured = (_gather_tables(trainer), _gather_embedding(trainer))
        while trainer.step < sc.get("until", 5):
            r = trainer.train_step()
            losses[r.step] = r.loss
            if trainer.step == sc.get("save_at"):
                trainer.checkpointer.save(trainer)
                if sc.get("capture"):
                    captured = (_gather_tables(trainer), _gather_embedding(trainer))
        results.append({"start": start, "losses": losses, "tables": _gather_tables(trainer), "captured": captured})
        parallel_state.destroy_model_parallel()
    return results if rank == 0 else None


def _run(world, scenarios):
    return run_distributed(_scenarios, world_size=world, args=(scenarios,), timeout=600)[0]


# (name, tiny_config layout at world 2)
TARGETS = [
    ("tp1_pp2", dict(pp=2)),
    ("tp1_dp2_shard2", dict(shard_size=2)),
    ("tp1_pp2_vpp2", dict(pp=2, vpp=2)),
]
OPTIMIZERS = [("plain", False), ("distributed", True)]


RESHARD_TARGETS = [
    ("tp1_pp2", ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2"]),
    ("tp1_dp2_shard2", ["parallel.tensor_model_parallel_size=1", "stem.shard_size=2"]),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    scenarios, keys = [], []

    def add(key, **sc):
        keys.append(key)
        scenarios.append(sc)

    for opt, dist_opt in OPTIMIZERS:  # the unresharded runs: save at step 3, go on to step 5
        add(("source", opt), layout=dict(tp=2), distributed_optimizer=dist_opt, save=str(root / f"src_{opt}"), save_at=3)
    for opt, dist_opt in OPTIMIZERS:
        for name, layout in TARGETS:  # load the TP=2 checkpoint at another layout
            add(("direct", opt, name), layout=layout, distributed_optimizer=dist_opt, load=str(root / f"src_{opt}"))
        for name, overrides in RESHARD_TARGETS:  # convert offline, then load
            out = str(root / f"resharded_{opt}_{name}")
            add(("code", opt, name), reshard=["--input", str(root / f"src_{opt}"), "--output", out,
                                             "--world-size", "2", *overrides])
            add(("offline", opt, name), layout=dict(TARGETS)[name], distributed_optimizer=dist_opt, load=out)
    # A vocabulary whose padding depends on TP (130 -> 256 rows at TP=2, 192 at TP=1).
    add(("source", "padding"), layout=dict(tp=2), vocab=130, distributed_optimizer=False,
        save=str(root / "src_padding"), save_at=3, until=3, capture=True)
    add(("direct", "padding"), layout=dict(pp=2), vocab=130, distributed_optimizer=False,
        load=str(root / "src_padding"), until=3, capture=True)
    return {"root": root, **dict(zip(keys, _run(2, scenarios)))}



def _compare(got, src, what):
    assert got["start"] == 3, f"{what}: resumed at step {got['start']}, expected 3"
    for step in (4, 5):
        a, b = got["losses"][step], src["losses"][step]
        assert abs(a - b) <= 1e-6 * abs(b), f"{what}: step {step} loss {a} vs unresharded {b}"
    full, steps = got["tables"]
    ref_full, ref_steps = src["tables"]
    for key, ref in ref_full.items():
        assert not torch.isnan(full[key]).any(), f"{what}: table {key} not fully gathered"
        torch.testing.assert_close(full[key], ref, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{what}: table {key}: {m}")
    for layer, ref in ref_steps.items():
        assert torch.equal(steps[layer], ref), f"{what}: per-row steps of layer {layer} differ"


def test_source_run_trains_and_touches_tables(runs):
    for opt, _ in OPTIMIZERS:
        res = runs[("source", opt)]
        assert res["start"] == 0 and res["losses"][5] < res["losses"][1], f"{opt}: {res['losses']}"
        _, steps = res["tables"]
        assert int(steps[1].max()) == 5 and int((steps[1] == 0).sum()) > 0, f"{opt}: rows touched {steps[1]}"


@pytest.mark.parametrize("name", [n for n, _ in TARGETS])
@pytest.mark.parametrize("opt", [o for o, _ in OPTIMIZERS])
def test_load_at_another_layout_continues_exactly(runs, opt, name):
    _compare(runs[("direct", opt, name)], runs[("source", opt)], f"{opt} optimizer, tp2 -> {name}")


@pytest.mark.parametrize("name", [n for n, _ in RESHARD_TARGETS])
@pytest.mark.parametrize("opt", [o for o, _ in OPTIMIZERS])
def test_stem_reshard_output_continues_exactly(runs, opt, name):
    assert runs[("code", opt, name)]["rc"] == 0
    out = runs["root"] / f"resharded_{opt}_{name}"
    assert (out / "latest").read_text().strip() == "step_00000003"
    tables = sorted(os.listdir(out / "step_00000003" / "tables"))
    expected = ["tp000_shard00000.safetensors"] + (["tp000_shard00001.safetensors"] if "shard2" in name else [])
    assert tables == expected
    _compare(runs[("offline", opt, name)], runs[("source", opt)], f"{opt} optimizer, stem-reshard tp2 -> {name}")


def test_tp_dependent_vocabulary_padding_loads_the_vocabulary_rows_exactly(runs):
    """TP=2 pads 130 rows to 256, TP=1 to 192: megatron drops the extra padding rows on load (or
    zero-fills missing ones); the 130 real rows and the tables are exact."""
    (src_tables, _), src_emb = runs[("source", "padding")]["captured"]
    (tables, _), emb = runs[("direct", "padding")]["captured"]
    assert runs[("direct", "padding")]["start"] == 3
    assert src_emb.shape[0] == 256 and emb.shape[0] == 192
    assert torch.equal(emb[:130], src_emb[:130])
    assert torch.equal(emb[130:], src_emb[130:192]), "kept padding rows are loaded as saved"
    for key, ref in src_tables.items():
        assert torch.equal(tables[key], ref), key


def test_stem_reshard_rejects_bad_targets(runs, tmp_path, capsys):
    from stem_megatron.cli.reshard import main

    src = str(runs["root"] / "src_plain")
    cases = [
        (["--world-size", "3"], 2, "must be divisible"),
        (["--world-size", "2", "train.lr=1.0"], 2, "changes the layout only"),
        (["--world-size", "2", "parallel.use_distributed_optimizer=true"], 4, "use_distributed_optimizer"),
        (["--world-size", "2", "parallel.tensor_model_parallel_size=3"], 2, "must divide"),
    ]
    for extra, code, text in cases:
        rc = main(["--input", src, "--output", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert rc == code and text in err and err.count("\n") == 1, (extra, rc, err)
    assert not (tmp_path / "out" / "latest").exists()


def test_stem_reshard_fsyncs_every_file_and_directory_it_publishes(runs, tmp_path, monkeypatch):
    """As the trainer's saves: every file and every directory of the output (and the entries of
    the output root) reach stable storage before `latest` names the checkpoint."""
    import re

    from stem_megatron import reshard

    synced = set()
    real_fsync = os.fsync

    def fsync(fd):  # the path as named at that moment; atomic writes fsync `NAME.tmpPID`, then rename it
        synced.add(re.sub(r"\.tmp\d+$", "", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    ckpt, _, _ = reshard.reshard(str(runs["root"] / "src_plain"), str(out), 2,
                                 ["parallel.tensor_model_parallel_size=1", "stem.shard_size=2"])
    monkeypatch.undo()
    tmp = str(out / (".tmp-" + os.path.basename(ckpt)))  # names the files had when they were synced
    wanted = {str(out), str(out / "latest")}
    for base, _, files in os.walk(ckpt):
        rel = os.path.relpath(base, ckpt)
        wanted.add(os.path.normpath(os.path.join(tmp, rel)))
        wanted.update(os.path.normpath(os.path.join(tmp, rel, f)) for f in files)
    missing = sorted(os.path.relpath(p, out) for p in wanted - synced)
    assert not missing, f"stem-reshard did not fsync {missing}"
