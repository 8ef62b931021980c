"""Host tables (`stem.offload: host`) with a device row cache train bitwise like device tables.

Deterministic mode, a cache of 4 rows per engine (far fewer than the rows a step touches, so rows
are evicted between and within steps, and misses bypass the cache when every slot is pinned), one
micro-batch of 1 sequence per forward (4 per rank and step), reduce rounds and update chunks of
1 row. Layouts: DP2 with tables sharded over 2 ranks, TP2 x DP2 (shard 2, replicas 2), PP2, and
DP2 with shard size 1 (2 replicas: each rank updates rows only the other replica touched, from
the all-reduced gradient alone). Every cache policy, prefetch depths 1 and 2, updates streamed
through the device and on the host: per-step losses and gradient norms, and after the last step
the dense weights, table rows, moments and step counters equal the device-table run exactly.
No pinned row is evicted, the cache allocation is the configured 4 rows, and the metered peak of
device bytes stays within the dry run's bound for the rank's stage (memory.py).

Checkpoints: a run saved after 2 steps with host tables and resumed with device tables, and the
reverse, give the per-step losses of the uninterrupted run (the DP2 world runs these too, to
spawn one world less).
"""

import pytest
import torch

from stem_megatron.testing.distributed import run_distributed
from stem_megatron.testing.models import TokenDataset

STEPS = 3
CACHE_ROWS = 4
VARIANTS = [("device", dict(offload="device", prefetch_depth=1))] + [
    (f"host_{policy}_depth{depth}", dict(offload="host", cache_rows=CACHE_ROWS, cache_policy=policy, prefetch_depth=depth))
    for policy in ("lfu", "lru", "lookahead")
    for depth in (1, 2)
] + [("host_lfu_depth2_hostupdate", dict(offload="host", cache_rows=CACHE_ROWS, cache_policy="lfu", prefetch_depth=2,
                                          host_update="host"))]
# The default run covers TP2 x DP2 with each policy once and both depths (4 ranks on a 2-core
# machine are slow); `make test-slow` runs the whole matrix there too.
TP2_DEFAULT = ("device", "host_lfu_depth1", "host_lru_depth2", "host_lookahead_depth2")
DP2_DEFAULT = tuple(name for name, _ in VARIANTS if name != "host_lfu_depth2_hostupdate")  # as before this variant
# PP2 and shard-1 replicas: one host variant each by default (~20 s each on 2 cores), covering both
# update places between them; `make test-slow` runs every variant there.
PP2_DEFAULT = ("device", "host_lookahead_depth2")
REPLICAS_DEFAULT = ("device", "host_lfu_depth2_hostupdate")


def _trainer(layout, shard_size, stem, save=None, steps=STEPS):
    from stem_megatron.config import CheckpointConfig
    from stem_megatron.testing.models import reference_model, tiny_config
    from stem_megatron.training.checkpoint import Checkpointer
    from stem_megatron.training.trainer import Trainer

    cfg = tiny_config(deterministic=True, micro_batch_size=1, shard_size=shard_size, **layout)
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.train_steps = 3e-3, 1, steps
    cfg.stem.lr = 1e-2
    for key, value in stem.items():
        setattr(cfg.stem, key, value)
    trainer = Trainer(cfg)
    if save:
        trainer.checkpointer = Checkpointer(CheckpointConfig(save=save, keep_last=1))
    trainer.setup(datasets=(TokenDataset(64, cfg.model.seq_length, 60, seed=3), None))
    if trainer.step == 0:
        trainer.load_full_weights(reference_model(cfg, seed=0).state_dict())
    return trainer


def _save_and_resume(layout, shard_size, tmp):
    """{name: per-step losses} of uninterrupted, host->device and device->host resumed runs (4 steps)."""
    import os

    from megatron.core import parallel_state

    host = dict(offload="host", cache_rows=CACHE_ROWS, cache_policy="lfu", prefetch_depth=2)
    device = dict(offload="device")
    out = {}
    runs = [("uninterrupted", device, None), ("host_then_device", host, device), ("device_then_host", device, host)]
    for name, first, second in runs:
        save = os.path.join(tmp, name)
        losses = {}
        for stem in (first, second) if second else (first,):
            trainer = _trainer(layout, shard_size, stem, save=save if second else None, steps=4)
            stop = 2 if trainer.step == 0 and second else 4
            while trainer.step < stop:
                r = trainer.train_step()
                losses[r.step] = r.loss
            if second:
                trainer.checkpointer.save(trainer)
            parallel_state.destroy_model_parallel()
        out[name] = losses
    return out


def _train_variants(rank, world_size, layout, shard_size, tmp=None, names=None):
    from megatron.core import parallel_state

    out = {}
    for name, stem in VARIANTS:
        if names is not None and name not in names:
            continue
        trainer = _trainer(layout, shard_size, stem)
        steps, replica_only = [], 0
        for _ in range(STEPS):
            r = trainer.train_step()
            steps.append((r.loss, r.grad_norm))
            replica_only += sum(e.stats.get("replica_only_rows", 0) for e in trainer.engines)
        tensors = [p.detach().clone() for c in trainer.chunks for p in c.parameters()]
        for e in trainer.engines:
            tensors.append(e.weight.detach().cpu().clone())
            tensors += [v.detach().cpu().clone() for v in e.row_state().values()]
        stats = [e.offload_stats() for e in trainer.engines]
        for st in stats:
            st["replica_only"] = replica_only
            st["device_bound"] = trainer.offload_meter.device_bound_bytes  # the dry run's, this stage
            st["device_peak_sum"] = sum(x.get("device_peak_bytes", 0) for x in stats)
        replicas = trainer.engines[0].num_replicas
        out[name] = (steps, tensors, stats, replicas, sum(c.stem_prefetch_hits for c in trainer.chunks))
        parallel_state.destroy_model_parallel()
    # Compare here: tensors sent back through the result queue travel as shared-memory handles that
    # may vanish with the rank's process before the parent reads them.
    ref = out["device"][1]
    for name, (steps, tensors, stats, replicas, hits) in out.items():
        differ = [i for i, (a, b) in enumerate(zip(tensors, ref)) if not torch.equal(a, b)]
        out[name] = (steps, (len(tensors), differ), stats, replicas, hits)
    if tmp is not None:
        out["checkpoints"] = _save_and_resume(layout, shard_size, tmp)
    return out


@pytest.mark.parametrize(
    "name,world,layout,shard,names",
    [
        ("dp2_shard2", 2, dict(), 2, DP2_DEFAULT),
        ("tp2_dp2", 4, dict(tp=2), 2, TP2_DEFAULT),
        ("pp2", 2, dict(pp=2), None, PP2_DEFAULT),
        ("dp2_shard1_replicas2", 2, dict(), 1, REPLICAS_DEFAULT),
        pytest.param("dp2_shard2_all", 2, dict(), 2, None, marks=pytest.mark.slow),
        pytest.param("tp2_dp2_all", 4, dict(tp=2), 2, None, marks=pytest.mark.slow),
        pytest.param("pp2_all", 2, dict(pp=2), None, None, marks=pytest.mark.slow),
        pytest.param("dp2_shard1_replicas2_all", 2, dict(), 1, None, marks=pytest.mark.slow),
    ],
)
def test_host_tables_train_bitwise_like_device_tables(name, world, layout, shard, names, tmp_path):
    tmp = str(tmp_path) if name == "dp2_shard2" else None
    results = run_distributed(_train_variants, world_size=world, args=(layout, shard, tmp, names), timeout=600)
    if tmp is not None:
        ckpt = results[0].pop("checkpoints")
        ref = ckpt["uninterrupted"]
        assert sorted(ref) == [1, 2, 3, 4]
        for run in ("host_then_device", "device_then_host"):
            assert ckpt[run] == ref, f"{run}: losses {ckpt[run]} vs uninterrupted {ref}"
        for out in results[1:]:
            out.pop("checkpoints")
    for rank, out in enumerate(results):
        ref_steps, (ref_count, _), _, _, _ = out["device"]
        for variant, (steps, (count, differ), stats, replicas, hits) in out.items():
            where = f"{name} rank {rank} {variant}"
            assert steps == ref_steps, f"{where}: losses/grad norms {steps} vs device {ref_steps}"
            assert count == ref_count and count > 0
            assert not differ, f"{where}: tensors {differ} (dense weights, rows, moments, steps) differ from device tables"
            assert hits > 0, f"{where}: prefetched exchanges were not used"
            if variant == "device":
                continue
            for st in stats:
                assert st["evictions"] > 0, f"{where}: no eviction, the cache was not under pressure"
                assert st["evicted_pinned"] == 0, f"{where}: a pinned row was evicted"
                assert st["hit_rows"] > 0 and st["hit_rows"] < st["req_rows"], f"{where}: {st}"
                assert st["h2d_bytes"] > 0 and st["host_updates"] > 0
                assert st["cache_slots"] == CACHE_ROWS, f"{where}: the cache allocation grew to {st['cache_slots']}"
                assert 0 < st["device_peak_sum"] <= st["device_bound"], (
                    f"{where}: device peak {st['device_peak_sum']} B over the dry run's bound {st['device_bound']} B")
                if replicas > 1:  # the path for rows only the other replica touched ran
                    assert st["replica_only"] > 0, f"{where}: no row was touched only on the other replica"
