"""Checkpoint format pieces and the refusal paths: table files read at any layout, the manifest
check (truncated, corrupted, missing files), publishing and pruning, incompatible configs, and a
trainer that refuses a damaged checkpoint without changing any of its state.

Legend: V vocab, F ffn columns, L layers.
"""

import inspect
import json
import os
import shutil

import numpy as np
import pytest
import torch

from stem_megatron.stem.table_io import (
    KINDS,
    TableFile,
    TableFormatError,
    TableReader,
    TableTarget,
    write_table_file,
)
from stem_megatron.testing.distributed import run_distributed
from stem_megatron.training import checkpoint_format as fmt
from stem_megatron.training.checkpoint_dense import writes_common_pt
from stem_megatron.training.checkpoint_format import CheckpointError

# megatron-core 0.16 writes the common state to common.pt; 0.19 keeps it inside the .distcp shards.
COMMON_PT = ("common.pt",) if writes_common_pt() else ()

V, F, LAYERS = 37, 8, [1, 4]


# ------------------------------------------------------------------------------------ table files
def _full_state(seed=0):
    gen = torch.Generator().manual_seed(seed)
    full = {(layer, k): torch.randn(V, F, generator=gen) for layer in LAYERS for k in KINDS}
    steps = torch.randint(0, 9, (V,), generator=gen)
    return full, steps


def _write_layout(root, full, steps, tp, shard):
    """Table files as a (TP=tp, shard size=shard) run writes them: rows id % shard, columns by TP rank."""
    os.makedirs(os.path.join(root, "tables"), exist_ok=True)
    cols, files = F // tp, []
    for t in range(tp):
        for g in range(shard):
            rows = torch.arange(g, V, shard)
            tensors = [("rows", rows)]
            for layer in LAYERS:
                for kind in KINDS:
                    tensors.append((f"layers.{layer}.{kind}", full[(layer, kind)][rows, t * cols:(t + 1) * cols]))
                tensors.append((f"layers.{layer}.step", steps[rows]))
            meta = dict(vocab_size=V, ffn_hidden_size=F, col_start=t * cols, cols=cols, shard_rank=g,
                        shard_size=shard, tp_rank=t, tp_size=tp)
            rel = f"tables/t{t}g{g}.safetensors"
            write_table_file(os.path.join(root, rel), tensors, meta)
            files.append({"path": rel, "layers": LAYERS, **meta})
    return {"vocab_size": V, "ffn_hidden_size": F, "layers": LAYERS, "files": files}


@pytest.mark.parametrize("saved,read", [((2, 3), (1, 2)), ((1, 1), (4, 5)), ((4, 2), (2, 4))])
def test_table_files_read_exactly_at_any_layout(tmp_path, saved, read):
    full, steps = _full_state()
    index = _write_layout(str(tmp_path), full, steps, *saved)
    reader = TableReader(str(tmp_path), index)
    tp, shard = read
    cols = F // tp
    for t in range(tp):
        for g in range(shard):
            rows = torch.arange(shard * (-(-V // shard))) [g::shard]  # this rank's rows, padding included
            out, step = reader.read_layer(4, TableTarget(rows, t * cols, cols))
            real = rows < V
            for kind in KINDS:
                assert torch.equal(out[kind][real], full[(4, kind)][rows[real], t * cols:(t + 1) * cols]), (t, g, kind)
                assert not out[kind][~real].any(), "padding rows must be zero"
            assert torch.equal(step[real], steps[rows[real]])


def test_table_files_are_safetensors(tmp_path):
    from safetensors import safe_open

    full, steps = _full_state()
    index = _write_layout(str(tmp_path), full, steps, 2, 3)
    path = str(tmp_path / index["files"][1]["path"])
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["shard_rank"] == "1" and f.metadata()["tp_rank"] == "0"
        assert torch.equal(f.get_tensor("rows"), torch.arange(1, V, 3))
        assert torch.equal(f.get_tensor("layers.1.exp_avg"), full[(1, "exp_avg")][1::3, :4])
    assert TableFile(path).layers == LAYERS


def test_missing_or_duplicate_table_shards_are_reported(tmp_path):
    full, steps = _full_state()
    index = _write_layout(str(tmp_path), full, steps, 1, 3)
    target = TableTarget(torch.arange(V), 0, F)
    missing = dict(index, files=index["files"][:2])
    with pytest.raises(TableFormatError, match=r"layer 1: row 2 \(columns 0..7\) is in 0 table files"):
        TableReader(str(tmp_path), missing).read_layer(1, target)
    duplicated = dict(index, files=index["files"] + index["files"][:1])
    with pytest.raises(TableFormatError, match=r"row 0 .* is in 2 table files"):
        TableReader(str(tmp_path), duplicated).read_layer(1, target)
    half = _write_layout(str(tmp_path / "tp2"), full, steps, 2, 1)
    cut = dict(half, files=half["files"][:1])
    with pytest.raises(TableFormatError, match="do not tile|up to 4"):
        TableReader(str(tmp_path / "tp2"), cut).read_layer(1, target)


def test_truncated_table_file_is_reported(tmp_path):
    full, steps = _full_state()
    index = _write_layout(str(tmp_path), full, steps, 1, 1)
    path = tmp_path / index["files"][0]["path"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(TableFormatError, match="ends past the end of the file"):
        TableReader(str(tmp_path), index).read_layer(4, TableTarget(torch.arange(V), 0, F))


# ------------------------------------------------------------------------------------ the manifest
def _fake_checkpoint(root, step=7):
    d = os.path.join(root, fmt.step_dir_name(step))
    os.makedirs(os.path.join(d, "tables"))
    for name, size in (("common.pt", 100), ("__0_0.distcp", 5000), ("tables/rank00000.safetensors", 3000)):
        with open(os.path.join(d, name), "wb") as f:
            f.write(np.random.default_rng(size).bytes(size))
    fmt.write_manifest(d, step, fmt.describe_files(d, fmt.list_files(d)))
    return d


def _one_line_error(fn, *args):
    with pytest.raises(CheckpointError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_manifest_catches_truncation_corruption_and_missing_files(tmp_path):
    d = _fake_checkpoint(str(tmp_path))
    assert set(fmt.verify(d)["files"]) == {"common.pt", "__0_0.distcp", "tables/rank00000.safetensors"}
    path = os.path.join(d, "__0_0.distcp")
    good = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(good[:4000])
    assert _one_line_error(fmt.verify, d).endswith("__0_0.distcp is 4000 bytes, the manifest says 5000 (truncated)")
    with open(path, "wb") as f:
        f.write(good[:1234] + bytes([good[1234] ^ 1]) + good[1235:])
    msg = _one_line_error(fmt.verify, d)
    assert "__0_0.distcp has sha256" in msg and msg.endswith("(corrupt)")
    os.remove(path)
    assert _one_line_error(fmt.verify, d).endswith("__0_0.distcp is missing")
    with open(os.path.join(d, fmt.MANIFEST), "w") as f:
        f.write('{"format": "stem-checkpoint", "files": ')
    assert "manifest.json is unreadable" in _one_line_error(fmt.verify, d)
    os.remove(os.path.join(d, fmt.MANIFEST))
    assert "no manifest.json (an interrupted save" in _one_line_error(fmt.verify, d)


def test_publish_latest_prune_and_stale_saves(tmp_path):
    root = str(tmp_path)
    assert fmt.resolve(root) is None
    for step in (3, 6, 9):
        tmp = os.path.join(root, fmt.TMP_PREFIX + fmt.step_dir_name(step))
        os.makedirs(tmp)
        fmt.write_manifest(tmp, step, {})
        fmt.publish(tmp, root, fmt.step_dir_name(step))
        assert fmt.read_latest(root) == os.path.join(root, fmt.step_dir_name(step))
    assert fmt.prune(root, keep_last=2) == ["step_00000003"]
    assert sorted(n for n in os.listdir(root) if n.startswith("step_")) == ["step_00000006", "step_00000009"]
    # An interrupted save and an interrupted deletion are cleaned, the latest checkpoint is untouched.
    os.makedirs(os.path.join(root, fmt.TMP_PREFIX + "step_00000012"))
    os.makedirs(os.path.join(root, fmt.TRASH_PREFIX + "step_00000006"))
    assert fmt.resolve(root) == os.path.join(root, "step_00000009")
    assert fmt.clean_stale(root) == [fmt.TRASH_PREFIX + "step_00000006", fmt.TMP_PREFIX + "step_00000012"]
    assert fmt.resolve(os.path.join(root, "step_00000006")) == os.path.join(root, "step_00000006")
    with open(os.path.join(root, fmt.LATEST), "w") as f:
        f.write("step_00000099\n")
    assert "names step_00000099, which does not exist" in _one_line_error(fmt.resolve, root)
    os.remove(os.path.join(root, fmt.LATEST))  # as if killed between the rename and the pointer update
    assert fmt.resolve(root) == os.path.join(root, "step_00000009")


def _publish_step(root, step, payload):
    tmp = os.path.join(root, fmt.TMP_PREFIX + fmt.step_dir_name(step))
    os.makedirs(tmp)
    with open(os.path.join(tmp, "payload"), "w") as f:
        f.write(payload)
    fmt.write_manifest(tmp, step, fmt.describe_files(tmp, ["payload"]))
    return fmt.publish(tmp, root, fmt.step_dir_name(step))


def _payload(ckpt):
    fmt.verify(ckpt)
    with open(os.path.join(ckpt, "payload")) as f:
        return f.read()


@pytest.mark.parametrize("crash_at", ["second_rename", "pointer", "cleanup", None])
def test_republishing_the_latest_step_never_loses_it(tmp_path, monkeypatch, crash_at):
    """A save of the step `latest` already names (a run that went back to an earlier checkpoint)
    replaces that checkpoint: a crash at any point leaves `latest` resolving to a complete one,
    the old until the new is in place, and the next save's cleanup keeps it."""
    root = str(tmp_path)
    _publish_step(root, 3, "three")
    _publish_step(root, 6, "old six")

    class Crash(Exception):
        pass

    real_rename, real_write, real_rmtree = os.rename, fmt.write_text_atomic, fmt.shutil.rmtree

    def rename(src, dst):
        if crash_at == "second_rename" and os.path.basename(src).startswith(fmt.TMP_PREFIX):
            raise Crash
        return real_rename(src, dst)

    def write_text_atomic(path, text):
        if crash_at == "pointer" and os.path.basename(path) == fmt.LATEST:
            raise Crash
        return real_write(path, text)

    def rmtree(path, *args, **kwargs):
        if crash_at == "cleanup":
            raise Crash
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(fmt.os, "rename", rename)
    monkeypatch.setattr(fmt, "write_text_atomic", write_text_atomic)
    monkeypatch.setattr(fmt.shutil, "rmtree", rmtree)
    try:
        _publish_step(root, 6, "new six")
        crashed = False
    except Crash:
        crashed = True
    monkeypatch.undo()
    assert crashed == (crash_at is not None)
    expect = "old six" if crash_at == "second_rename" else "new six"
    assert _payload(fmt.resolve(root)) == expect, sorted(os.listdir(root))
    fmt.clean_stale(root)  # what the next save does first
    assert fmt.read_latest(root) == os.path.join(root, "step_00000006")
    assert _payload(fmt.resolve(root)) == expect
    assert sorted(os.listdir(root)) == ["latest", "step_00000003", "step_00000006"]


def test_megatron_write_results_queue_hook_still_exists():
    """checkpoint.use_in_process_write_results replaces this module global (a spawned Manager's queue)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from stem_megatron.megatron_version import installed_version

    # 0.19 renamed the getter (_get_write_results_queue -> get_write_results_queue); the global stays.
    getter = "_get_write_results_queue" if installed_version().release < (0, 19) else "get_write_results_queue"
    source = inspect.getsource(getattr(filesystem_async, getter))
    assert "global _results_queue" in source and "if _results_queue is None" in source, source


def test_megatron_rank_local_write_sites_still_exist():
    """checkpoint_dense defers the failures of these rank-local writes inside dist_checkpointing.save."""
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies import state_dict_saver

    from stem_megatron.training.checkpoint_dense import rank_local_write_sites, writes_common_pt

    for owner, name, _ in rank_local_write_sites():
        assert callable(owner.__dict__.get(name)), (owner, name)
    save_src = inspect.getsource(serialization.save)
    assert "save_config(" in save_src, save_src
    if writes_common_pt():  # 0.16: rank 0 writes common.pt between collectives
        assert "common_strategy.save_common(" in save_src, save_src
    else:  # 0.19: the common state rides in the collective save; no rank-local common.pt
        assert "common_strategy" not in save_src and 'sharded_state_dict["common_state"] = ShardedObject(' in save_src
    assert "storage_writer.finish(" in inspect.getsource(state_dict_saver.save_state_dict_async_finalize)


# ------------------------------------------------------------------------------------ a trainer refuses bad checkpoints
def _snapshot(trainer):
    dense = [p.detach().clone() for c in trainer.chunks for p in c.parameters()]
    opt = [v.detach().clone() for o in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
           for st in o.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    tables = [t.clone() for e, st in zip(trainer.engines, trainer.table_optimizer.state)
              for t in (e.weight, st["exp_avg"], st["exp_avg_sq"], st["step"])]
    return dense + opt + tables, trainer.step


def _same(a, b):
    return a[1] == b[1] and len(a[0]) == len(b[0]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))


def _refusals(rank, world_size, root):
    from megatron.core import parallel_state

    from stem_megatron.config import CheckpointConfig
    from stem_megatron.testing.models import TokenDataset, reference_model, tiny_config
    from stem_megatron.training.checkpoint import Checkpointer
    from stem_megatron.training.trainer import Trainer

    def build(save=None, **overrides):
        cfg = tiny_config(deterministic=True, **overrides.pop("layout", {}))
        for key, value in overrides.items():
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
        trainer = Trainer(cfg)
        trainer.checkpointer = Checkpointer(CheckpointConfig(save=save))
        trainer.setup(datasets=(TokenDataset(64, cfg.model.seq_length, 60, seed=3), None))
        return trainer

    out = {"root": root}
    trainer = build(save=os.path.join(root, "run"))
    trainer.load_full_weights(reference_model(trainer.cfg, seed=0).state_dict())
    for _ in range(2):
        trainer.train_step()
    ckpt = trainer.checkpointer.save(trainer)
    trainer.train_step()
    before = _snapshot(trainer)
    damage = {
        "truncated_dense": ("__0_0.distcp", lambda b: b[: len(b) // 2]),
        "corrupt_table": ("tables/rank00000.safetensors", lambda b: b[:-9] + bytes([b[-9] ^ 0xFF]) + b[-8:]),
        **({"truncated_common": ("common.pt", lambda b: b[:10])} if COMMON_PT else {}),
        "corrupt_meta": (fmt.META, lambda b: b.replace(b'"step": 2', b'"step": 9')),
        "no_manifest": (fmt.MANIFEST, None),
    }
    for name, (rel, change) in damage.items():
        bad = os.path.join(root, name)
        shutil.copytree(ckpt, bad)
        path = os.path.join(bad, rel)
        if change is None:
            os.remove(path)
        else:
            with open(path, "rb") as f:
                data = f.read()
            with open(path, "wb") as f:
                f.write(change(data))
        try:
            trainer.checkpointer.load(trainer, bad)
            out[name] = "loaded"
        except CheckpointError as e:
            out[name] = str(e)
        out[name + "_unchanged"] = _same(before, _snapshot(trainer))
    trainer.checkpointer.load(trainer, ckpt)  # the intact checkpoint loads, and it changes the state
    out["intact_changes_state"] = not _same(before, _snapshot(trainer)) and trainer.step == 2
    parallel_state.destroy_model_parallel()

    for name, overrides in {
        "hidden": {"model.hidden_size": 32},
        "stem_layers": {"stem.layers": [1]},
        "batch": {"train.global_batch_size": 16},
        "optimizer": {"parallel.use_distributed_optimizer": True},
    }.items():
        other = build(**overrides)
        try:
            other.checkpointer.load(other, ckpt)
            out[name] = "loaded"
        except CheckpointError as e:
            out[name] = str(e)
        parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("refusals"))
    return run_distributed(_refusals, world_size=1, args=(root,), timeout=300)[0]


@pytest.mark.parametrize("name,expected", [pytest.param(n, e, id=n) for n, e in [
    ("truncated_dense", r"__0_0.distcp is \d+ bytes, the manifest says \d+ \(truncated\)$"),
    ("corrupt_table", r"tables/rank00000.safetensors has sha256 \w+\.\.\., the manifest says \w+\.\.\. \(corrupt\)$"),
    *([("truncated_common", r"common.pt is 10 bytes, the manifest says \d+ \(truncated\)$")] if COMMON_PT else []),
    ("corrupt_meta", r"stem_checkpoint.json has sha256 .* \(corrupt\)$"),
    ("no_manifest", r"no manifest.json \(an interrupted save, or not a STEM checkpoint\)$"),
]])
def test_damaged_checkpoint_gives_one_line_error_and_loads_nothing(refusals, name, expected):
    import re

    msg = refusals[name]
    assert msg != "loaded" and "\n" not in msg and msg.startswith("checkpoint "), msg
    assert re.search(expected, msg), msg
    assert refusals[name + "_unchanged"], f"{name}: the trainer's state changed"


def test_intact_checkpoint_loads(refusals):
    assert refusals["intact_changes_state"]


@pytest.mark.parametrize("name,expected", [
    ("hidden", "saved with model.hidden_size=64, this run has 32"),
    ("stem_layers", "saved with STEM layers [1, 2], this run has [1]"),
    ("batch", "saved with train.global_batch_size=8; the data position (consumed samples 16)"),
    ("optimizer", "saved with parallel.use_distributed_optimizer=False, this run has True"),
])
def test_incompatible_config_is_refused(refusals, name, expected):
    assert expected in refusals[name] and "\n" not in refusals[name], refusals[name]


def test_manifest_lists_every_file_of_a_real_checkpoint(refusals):
    ckpt = fmt.resolve(os.path.join(refusals["root"], "run"))
    manifest = json.load(open(os.path.join(ckpt, fmt.MANIFEST)))
    assert sorted(manifest["files"]) == fmt.list_files(ckpt)
    names = set(manifest["files"])
    assert {fmt.META, fmt.CONFIG, *COMMON_PT, "metadata.json", ".metadata", "tables/rank00000.safetensors",
            "rng/rank00000.pt"} <= names


def test_a_checkpoint_without_common_pt_is_refused_in_one_line_by_megatron_016(tmp_path, monkeypatch):
    # 0.19 writes no common.pt; 0.16.1's loader would fail on it with a traceback inside megatron.
    from stem_megatron.training import checkpoint_dense

    meta = {"versions": {"megatron_core": "0.19.2+abc1234"}}
    monkeypatch.setattr(checkpoint_dense, "writes_common_pt", lambda: True)  # the 0.16 line
    (tmp_path / "metadata.json").write_text("{}")
    msg = checkpoint_dense.dense_format_problem(str(tmp_path), meta)
    assert msg is not None and "\n" not in msg
    assert "written by megatron-core 0.19.2, which keeps the common state inside its shards (no common.pt)" in msg
    assert msg.endswith("load it with megatron-core 0.19.x (Python 3.12)")
    (tmp_path / "common.pt").write_bytes(b"0.16 checkpoint")
    assert checkpoint_dense.dense_format_problem(str(tmp_path), meta) is None
    monkeypatch.setattr(checkpoint_dense, "writes_common_pt", lambda: False)  # 0.19 reads both kinds
    os.remove(tmp_path / "common.pt")
    assert checkpoint_dense.dense_format_problem(str(tmp_path), meta) is None
