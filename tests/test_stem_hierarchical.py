"""Hierarchical exchange and step scope against the flat per-micro-batch exchange; the scale model.

4 gloo ranks simulated as 2 nodes x 2 (`ranks_per_node=2`), variants flat / hierarchical x
micro-batch / step scope: rows bitwise equal to flat, table gradients and 3 training steps
(RowSparseAdamW) equal to flat in fp32, bitwise in deterministic mode, with uneven unique counts
and an empty micro-batch; inter-node bytes below flat on Zipf ids; `traffic_model` (the scale
model) gives exactly the measured per-rank counters of every variant, and both equal the bytes
counted at the gloo calls themselves (`testing.wire_bytes`: the sizes of the tensors handed to
all_to_all_single / all_gather), which share no code with the counters. TP=2 x DP=2 with
megatron's groups: each shard group then has one rank per node.

Legend: V vocab, L layers, F columns, N tokens.
"""

import contextlib

import pytest
import torch
import torch.distributed as dist

from stem_megatron.stem.engine import StemIndexError, StemTableEngine
from stem_megatron.stem.exchange import owner_major
from stem_megatron.stem.hierarchical import NodeMap, node_map, node_union, owner_sum, route_to_aggregators
from stem_megatron.stem.optimizer import RowSparseAdamW
from stem_megatron.stem.reference import toy_loss, toy_weights
from stem_megatron.stem.traffic_model import sampled_step_bytes, step_traffic_all
from stem_megatron.testing.distributed import run_distributed

V, LAYERS, F, STD, SEED, STEPS = 997, [0, 3], 8, 0.5, 11, 3
KEYS = ("sent_intra", "sent_inter", "recv_intra", "recv_inter")


def _zipf_batches(step: int, rank: int) -> list[torch.Tensor]:
    """Three micro-batches of Zipf-like ids; sizes differ by rank; rank 1's second one is empty."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    weights_V = 1.0 / torch.arange(1, V + 1, dtype=torch.float64)
    out = []
    for mb, n in enumerate([60 + 25 * rank, 40 + 7 * rank, 90]):
        n = 0 if (rank, mb) == (1, 1) else n
        out.append(torch.multinomial(weights_V, n, replacement=True, generator=gen).view(-1, 1) if n else
                   torch.empty(0, 1, dtype=torch.int64))
    return out


def test_node_map_and_routing_unit():
    assert node_map([0, 1, 2, 3], 2) == NodeMap(4, 2)
    assert node_map([0, 2], 2) == NodeMap(2, 1)  # TP=2: one shard rank per node
    assert node_map([4, 5, 6, 7], 8) == NodeMap(4, 4)
    for ranks, p in (([0, 2, 1, 3], 2), ([0, 1, 2], 2), ([1, 2, 3, 4], 2)):
        with pytest.raises(ValueError, match="does not sit on nodes"):
            node_map(ranks, p)
    with pytest.raises(ValueError, match="ranks_per_node"):
        node_map([0, 1], 0)
    # Routing: every id reaches an aggregator on the sender's node with the owner's local index,
    # and the aggregator's union sends each id once, to its owner.
    nm = NodeMap(8, 4)
    ids = torch.unique(torch.randint(0, 500, (300,), generator=torch.Generator().manual_seed(0)))
    perm, send = route_to_aggregators(ids, 5, nm)
    assert send[:4] == [0, 0, 0, 0] and sum(send) == ids.numel()
    routed, start = ids[perm], 0
    for dest in range(8):
        seg = routed[start : start + send[dest]]
        assert torch.all((seg % 8) % 4 == dest % 4) and (seg.numel() == 0 or dest // 4 == 1)
        start += send[dest]
    union, inverse, per_owner = node_union(torch.cat([routed, routed[:7]]), 8)
    assert torch.equal(union[inverse], torch.cat([routed, routed[:7]]))
    assert per_owner == torch.bincount(union % 8, minlength=8).tolist()
    assert torch.equal(union, union[owner_major(union, 8)[0]])


def test_owner_sum_two_level_association_is_node_first():
    # id 4 from sources 1 (node 0), 2 and 3 (node 1); fp32 rounding tells the association apart
    nm = NodeMap(4, 2)
    vals = torch.tensor([[1e8], [-1e8], [1.0]], dtype=torch.float32)
    ids = torch.full((3,), 4)
    index, det = owner_sum(ids, vals, [0, 1, 1, 1], nm, True)
    assert index.tolist() == [1] and det.item() == 0.0  # 1e8 + (-1e8 + 1): node 1 summed first
    _, single = owner_sum(ids, vals, [0, 1, 1, 1], None, True)
    assert single.item() == 1.0  # (1e8 - 1e8) + 1: the flat pairwise tree over sources


def test_sampled_scale_model_over_all_nodes_equals_the_full_model():
    gen = torch.Generator().manual_seed(5)
    nm = NodeMap(8, 2)
    weights_V = 1.0 / torch.arange(1, 301, dtype=torch.float64)
    batches = [[torch.multinomial(weights_V, 50 + 9 * r, True, generator=gen) for _ in range(3)] for r in range(8)]
    for exchange in ("flat", "hierarchical"):
        for scope in ("microbatch", "step"):
            full = step_traffic_all(batches, nm, 48, 96, exchange, scope)
            sampled = sampled_step_bytes(batches, nm, [0, 1, 2, 3], 48, 96, exchange, scope)
            for where in ("intra", "inter"):
                mean = sum(r[f"lookup_sent_{where}"] + r[f"reduce_sent_{where}"] for r in full) / 8
                assert sampled[where] == mean, (exchange, scope, where)
            one = sampled_step_bytes(batches, nm, [2], 48, 96, exchange, scope)  # a sample: close, not equal
            assert 0.5 * sampled["inter"] < one["inter"] < 2 * sampled["inter"]


def _engine(exchange, deterministic, shard_group=None, tp_rank=0, tp_size=1, replica_group=None):
    return StemTableEngine(
        vocab_size=V,
        layer_ids=LAYERS,
        ffn_hidden_size=F,
        tp_rank=tp_rank,
        tp_size=tp_size,
        shard_group=dist.group.WORLD if shard_group is None else shard_group,
        replica_group=replica_group,
        init_std=STD,
        seed=SEED,
        deterministic=deterministic,
        exchange=exchange,
        ranks_per_node=2,
    )


VARIANTS = {  # name: (exchange, scope); "flat" is the reference
    "flat": ("flat", "microbatch"),
    "hierarchical": ("hierarchical", "microbatch"),
    "flat_step": ("flat", "step"),
    "hierarchical_step": ("hierarchical", "step"),
}


def _train_all(dp_rank, deterministic, wire=None, **engine_kwargs):
    """STEPS steps on every variant; checks each equals flat; returns step 0's byte counters.

    `wire` (a WireBytes): step 0's collectives of variant x are counted under (x, "lookup"/"reduce").
    """
    engines = {x: _engine(ex, deterministic, **engine_kwargs) for x, (ex, _) in VARIANTS.items()}

    def counted(x, phase, fn, *args):
        with wire.label((x, phase)) if wire is not None and step == 0 else contextlib.nullcontext():
            return fn(*args)

    opts = {x: RowSparseAdamW([e], weight_decay=0.1) for x, e in engines.items()}
    ref = engines["flat"]
    cols = slice(ref.layout.col_start, ref.layout.col_start + ref.layout.cols_local)
    w_LF = toy_weights(len(LAYERS), F)[:, cols]
    counters = {}
    for step in range(STEPS):
        batches = _zipf_batches(step, dp_rank)
        handles = {x: counted(x, "lookup", e.prefetch_step, batches) for x, e in engines.items()
                   if VARIANTS[x][1] == "step"}
        lookups = {x: [] for x in engines}
        for i, ids in enumerate(batches):
            lk = {x: handles[x][i].wait() if x in handles else counted(x, "lookup", e.lookup, ids)
                  for x, e in engines.items()}
            for x in engines:
                for s in range(len(LAYERS)):  # rows: bitwise the same while the weights are
                    a, b = lk["flat"].gather(s), lk[x].gather(s)
                    if deterministic or step == 0:
                        assert torch.equal(a, b), x
                    else:
                        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
                toy_loss(lk[x].gather, w_LF).backward()
                lookups[x].append(lk[x].stats)
        for x, e in engines.items():
            counted(x, "reduce", e.reduce_grads)
        for x, e in engines.items():
            assert torch.equal(ref.grad_index, e.grad_index), x
            if deterministic:
                assert torch.equal(ref.grad_values, e.grad_values), x
            else:
                torch.testing.assert_close(e.grad_values, ref.grad_values, rtol=1e-5, atol=1e-6)
        if step == 0:
            for x, e in engines.items():
                per_exchange = lookups[x][:1] if x in handles else lookups[x]  # step: one exchange
                counters[x] = {
                    "lookup": {k: sum(st[f"bytes_{k}"] for st in per_exchange) for k in KEYS},
                    "reduce": {k: e.stats[f"reduce_bytes_{k}"] for k in KEYS},
                }
                if x in handles:
                    assert lookups[x][0]["step_rows"] == len(set(torch.cat(batches).flatten().tolist()))
        for o in opts.values():
            o.step(lr=0.05)
            o.zero_grad()
        for x, e in engines.items():
            if deterministic:
                assert torch.equal(ref.weight, e.weight), (x, step)
            else:
                torch.testing.assert_close(e.weight, ref.weight, rtol=1e-5, atol=1e-6)
    return counters


def _world4_two_nodes(rank, world_size):
    from stem_megatron.testing.wire_bytes import WireBytes

    out = {}
    out[False] = _train_all(rank, False)
    with WireBytes(node_of=lambda r: r // 2) as wire:  # shard rank = global rank; 2 ranks per node
        out[True] = _train_all(rank, True, wire=wire)
    out["wire"] = {x: {phase: wire.totals[(x, phase)] for phase in ("lookup", "reduce")} for x in VARIANTS}
    out["uncounted"] = wire.uncounted
    # a bad id on rank 3: every rank raises the same one-line error before any variable-size collective
    engine = _engine("hierarchical", False)
    try:
        engine.lookup(torch.tensor([1, V + 4]) if rank == 3 else torch.tensor([1, 2]))
    except StemIndexError as err:
        out["bad_id"] = str(err)
    return out


def test_hierarchical_equals_flat_2x2_and_counters_match_the_scale_model():
    results = run_distributed(_world4_two_nodes, world_size=4, timeout=300)
    nm = NodeMap(4, 2)
    row_bytes, grad_row_bytes = len(LAYERS) * F * 4, len(LAYERS) * F * 4  # fp32 rows, fp32 grads
    batches = [_zipf_batches(0, r) for r in range(4)]
    assert len({r["bad_id"] for r in results}) == 1
    assert f"token id {V + 4} is outside the vocabulary [0, {V}) on STEM shard rank 3" in results[0]["bad_id"]
    for variant, (exchange, scope) in VARIANTS.items():
        model = step_traffic_all(batches, nm, row_bytes, grad_row_bytes, exchange, scope)
        for r in range(4):
            measured = results[r][True][variant]
            assert measured == results[r][False][variant]
            assert not results[r]["uncounted"], results[r]["uncounted"]
            assert measured == results[r]["wire"][variant], (variant, r)  # counters = bytes at the gloo calls
            for k in KEYS:
                assert model[r][f"lookup_{k}"] == measured["lookup"][k], (variant, r, k)
                assert model[r][f"reduce_{k}"] == measured["reduce"][k], (variant, r, k)
    inter = {
        x: sum(results[r][True][x][p]["sent_inter"] for r in range(4) for p in ("lookup", "reduce"))
        for x in ("flat", "hierarchical")
    }
    assert inter["hierarchical"] < 0.85 * inter["flat"], inter
    lookup_inter = {
        x: sum(results[r][True][x]["lookup"]["sent_inter"] for r in range(4)) for x in VARIANTS
    }
    assert lookup_inter["flat_step"] < lookup_inter["flat"], lookup_inter
    assert lookup_inter["hierarchical_step"] < lookup_inter["hierarchical"], lookup_inter


def _tp2_dp2(rank, world_size):
    from megatron.core import parallel_state

    from stem_megatron.stem.groups import build_stem_groups

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, create_gloo_process_groups=False)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    groups = build_stem_groups(None)
    assert dist.get_process_group_ranks(groups.shard_group) == [tp_rank, tp_rank + 2]
    for deterministic in (False, True):
        _train_all(dp_rank, deterministic, shard_group=groups.shard_group, tp_rank=tp_rank, tp_size=2)
    return True


def test_hierarchical_equals_flat_tp2_dp2():
    assert all(run_distributed(_tp2_dp2, world_size=4, timeout=300))


def _train_steps(rank, world_size, exchange, scope, steps):
    from stem_megatron.testing.models import TokenDataset, reference_model, tiny_config
    from stem_megatron.training.trainer import Trainer

    cfg = tiny_config(micro_batch_size=1, global_batch_size=12)  # 3 micro-batches per DP rank
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.train_steps = 3e-3, 1, steps
    cfg.stem.lr, cfg.stem.deterministic = 1e-2, True
    cfg.stem.exchange, cfg.stem.exchange_scope, cfg.stem.ranks_per_node = exchange, scope, 2
    trainer = Trainer(cfg)
    trainer.setup(datasets=(TokenDataset(64, cfg.model.seq_length, 60, seed=3), None))
    trainer.load_full_weights(reference_model(cfg, seed=0).state_dict())
    out = []
    for _ in range(steps):
        r = trainer.train_step()
        tables = [e.weight.clone() for e in trainer.engines]
        out.append((r.loss, r.grad_norm, tables, sum(c.stem_prefetch_hits for c in trainer.chunks)))
    return out


@pytest.mark.slow  # ~28 s at 4 ranks; the default suite keeps the exchange-level equality tests
def test_training_steps_equal_hierarchical_step_scope_vs_flat_2x2():
    """3 trainer steps at DP=4 as 2 nodes x 2, deterministic: losses, norms and tables bitwise equal."""
    runs = {
        v: run_distributed(_train_steps, world_size=4, args=(*v, 3), timeout=400)
        for v in (("flat", "microbatch"), ("hierarchical", "step"))
    }
    flat, hier = runs[("flat", "microbatch")], runs[("hierarchical", "step")]
    for rank in range(4):
        for step, (a, b) in enumerate(zip(flat[rank], hier[rank])):
            assert a[:2] == b[:2], (rank, step, a[:2], b[:2])
            assert all(torch.equal(x, y) for x, y in zip(a[2], b[2])), (rank, step)
        assert hier[rank][-1][3] == 3 * 3  # every micro-batch was served by the step exchange
    assert flat[0][-1][0] < flat[0][0][0]
