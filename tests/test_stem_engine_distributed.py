"""The sharded engine on gloo against a replicated full table with plain autograd.

World 2 (G=2), world 4 with DP=4 and shard_size 1, 2, 4, and world 4 with megatron's TP=2 x DP=2:
forward rows bitwise equal, table gradients (summed over all data-parallel ranks, several
micro-batches, ids differing across ranks, an empty micro-batch) equal to rel err <= 1e-6,
byte counters equal to hand or brute-force counts, bad ids fail on every shard rank.
Each spawned function runs several checks: a spawn costs ~8 s of CPU per rank.

Legend: V vocab, L layers, F columns (full), f columns of one TP rank, N tokens.
"""

import torch
import torch.distributed as dist

from stem_megatron.stem.engine import StemIndexError, StemTableEngine, table_grad_sq_norm
from stem_megatron.stem.groups import build_stem_groups_from_ranks
from stem_megatron.stem.reference import ReferenceTable, toy_loss, toy_micro_batches, toy_weights
from stem_megatron.testing.distributed import run_distributed

V, LAYERS, F, STD, SEED = 37, [1, 4], 8, 0.5, 7


def _rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check_against_reference(engine, dp_rank, dp_size, tp_rank, tp_size):
    """One step of toy micro-batches on `engine`; compare rows and reduced grads with the full table."""
    w_LF = toy_weights(len(LAYERS), F)
    f = F // tp_size
    cols = slice(tp_rank * f, (tp_rank + 1) * f)
    ref = ReferenceTable(V, LAYERS, F, init_std=STD, seed=SEED)
    assert torch.equal(engine.full_table(), ref.table_VLF.detach()[..., cols])
    for ids in toy_micro_batches(0, dp_rank, V):
        lk = engine.lookup(ids)
        for s in range(len(LAYERS)):
            assert torch.equal(lk.gather(s), ref.table_VLF.detach()[ids][..., s, cols])
        toy_loss(lk.gather, w_LF[:, cols]).backward()
    engine.reduce_grads()
    touched = set()
    for r in range(dp_size):
        for ids in toy_micro_batches(0, r, V):
            touched |= set(ids.flatten().tolist())
            # Every TP column block contributes its own loss term (what the TP ranks compute).
            for t in range(tp_size):
                c = slice(t * f, (t + 1) * f)
                toy_loss(lambda s, ids=ids, c=c: ref.table_VLF[ids][..., s, c], w_LF[:, c]).backward()
    lay = engine.layout
    expected = sorted(i // lay.shard_size for i in touched if i % lay.shard_size == lay.shard_rank)
    assert engine.grad_index.tolist() == expected
    ref_grad = ref.table_VLF.grad[engine.global_rows()[engine.grad_index]][..., cols]
    err = _rel_err(engine.grad_values, ref_grad)
    assert err <= 1e-6, err
    return ref.table_VLF.grad.pow(2).sum().item()


def _expect_bad_id(engine, bad_rank_in_world, me):
    ids = torch.tensor([1, 2, 3]) if me != bad_rank_in_world else torch.tensor([1, V + 5, -2])
    try:
        engine.lookup(ids)
    except StemIndexError as err:
        return str(err)
    return None


def _world2(rank, world_size):
    engine = StemTableEngine(
        vocab_size=V,
        layer_ids=LAYERS,
        ffn_hidden_size=F,
        shard_group=dist.group.WORLD,
        init_std=STD,
        seed=SEED,
    )
    assert engine.layout.rows_local == 19 and engine.layout.padded_vocab_size == 38
    _check_against_reference(engine, rank, world_size, 0, 1)

    # Byte counters, by hand (row = L x F x 4 = 64 bytes, id 8, C1 vector 6 x 8 = 48 bytes):
    # rank 0 ids [0 0 1 2 2 2 3]: unique {0,2} own, {1,3} at rank 1; tokens 5 own, 2 remote.
    # rank 1 ids [5 5 5 4]: unique {4} at rank 0, {5} own; tokens 1 remote, 3 own.
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3]) if rank == 0 else torch.tensor([5, 5, 5, 4])
    for protocol, id_bytes in (("alltoall", None), ("allgather", 4 * 8)):
        e = StemTableEngine(
            vocab_size=V,
            layer_ids=LAYERS,
            ffn_hidden_size=F,
            shard_group=dist.group.WORLD,
            init_std=STD,
            seed=SEED,
            id_exchange=protocol,
        )
        lk = e.lookup(ids)
        assert torch.equal(lk.gather(0), e.full_table()[ids, 0])
        s = lk.stats
        sent_ids = (2 * 8 if rank == 0 else 8) if id_bytes is None else id_bytes
        recv_ids = (8 if rank == 0 else 2 * 8) if id_bytes is None else id_bytes
        assert s["bytes_sent"] == 48 + sent_ids + (1 if rank == 0 else 2) * 64, s
        assert s["bytes_received"] == 48 + recv_ids + (2 if rank == 0 else 1) * 64, s
        assert s["naive_bytes"] == 3 * (8 + 64), s  # (2 out + 1 in) tokens on either rank
        assert s["rows_per_owner"] == [3, 3] and s["rows_per_owner_max"] == 3
        assert s["unique_fraction"] == (4 / 7 if rank == 0 else 2 / 4)
        lk.gather(0).sum().backward()
        e.reduce_grads()
        # reduce: counts (1 x 2 x 8 = 16) + remote rows x (8 + 64): rank 0 sends {1,3}, rank 1 sends {4}.
        assert e.stats["reduce_bytes_sent"] == 16 + (2 if rank == 0 else 1) * 72
        assert e.stats["reduce_bytes_received"] == 16 + (1 if rank == 0 else 2) * 72
        expected = [[0, 2, 4], [1, 3, 5]][rank]  # global ids whose rows rank owns
        assert (e.global_rows()[e.grad_index]).tolist() == expected
        counts = torch.bincount(torch.tensor([0, 0, 1, 2, 2, 2, 3, 5, 5, 5, 4]), minlength=6)
        assert e.grad_values[:, 0, 0].tolist() == counts[expected].float().tolist()

    # Bad id on rank 1: both ranks raise the same message, and the group stays usable.
    msgs = _expect_bad_id(engine, 1, rank)
    assert (
        msgs is not None
        and "token id 42 is outside the vocabulary [0, 37) on STEM shard rank 1 (global rank 1" in msgs
    )
    engine.discard_pending()
    assert torch.equal(engine.lookup(torch.tensor([rank])).rows.detach()[0], engine.full_table()[rank])
    return msgs


def test_world2_matches_full_table_bytes_and_bad_ids():
    msgs = run_distributed(_world2, world_size=2, timeout=180)
    assert msgs[0] == msgs[1]


def _brute_force_bytes(all_ids, me, g, row_bytes):
    meta = (g - 1) * (2 + 2 * g) * 8
    sent = recv = meta
    naive = 0
    for i in set(all_ids[me].tolist()):
        if i % g != me:
            sent, recv = sent + 8, recv + row_bytes
    for s, ids in enumerate(all_ids):
        if s == me:
            continue
        for i in set(ids.tolist()):
            if i % g == me:
                recv, sent = recv + 8, sent + row_bytes
        naive += sum(1 for i in ids.tolist() if i % g == me) * (8 + row_bytes)
    naive += sum(1 for i in all_ids[me].tolist() if i % g != me) * (8 + row_bytes)
    return sent, recv, naive


def _world4(rank, world_size):
    out = {}
    for shard_size in (1, 2, 4):
        groups = build_stem_groups_from_ranks([[0, 1, 2, 3]], shard_size)
        for deterministic in (False, True):
            engine = StemTableEngine(
                vocab_size=V,
                layer_ids=LAYERS,
                ffn_hidden_size=F,
                shard_group=groups.shard_group,
                replica_group=groups.replica_group,
                init_std=STD,
                seed=SEED,
                deterministic=deterministic,
            )
            _check_against_reference(engine, rank, world_size, 0, 1)
        # Bad id on global rank 3: every rank of the data-parallel group raises (its shard group
        # with the exact message, the replicas too, since they would hang in the step's reduce).
        out[shard_size] = _expect_bad_id(engine, 3, rank)
        engine.discard_pending()

    # Byte counters at G = 4 against a brute-force count over every rank's ids (bf16 rows: 2 x 8 x 2).
    groups = build_stem_groups_from_ranks([[0, 1, 2, 3]], 4)
    engine = StemTableEngine(
        vocab_size=V,
        layer_ids=LAYERS,
        ffn_hidden_size=F,
        shard_group=groups.shard_group,
        init_std=STD,
        seed=SEED,
        compute_dtype=torch.bfloat16,
    )
    all_ids = [torch.tensor([r, r, 4 + r, 8, 8, 9, 13 + 2 * r, 36][: 5 + r]) for r in range(4)]
    lk = engine.lookup(all_ids[rank])
    sent, recv, naive = _brute_force_bytes(all_ids, rank, 4, 2 * 8 * 2)
    assert (lk.stats["bytes_sent"], lk.stats["bytes_received"], lk.stats["naive_bytes"]) == (
        sent,
        recv,
        naive,
    )
    per_owner = [sum(1 for ids in all_ids for i in set(ids.tolist()) if i % 4 == o) for o in range(4)]
    assert lk.stats["rows_per_owner"] == per_owner
    return out


def test_world4_dp4_shard_sizes_1_2_4():
    results = run_distributed(_world4, world_size=4, timeout=240)
    for out in results:
        assert out[1] is not None and out[2] is not None and out[4] is not None
    assert results[0][4] == results[1][4] == results[2][4] == results[3][4]
    assert "on STEM shard rank 3 (global rank 3" in results[0][4]
    assert results[2][2] == results[3][2] and "on STEM shard rank 1 (global rank 3" in results[2][2]
    assert (
        "token id 42 is outside the vocabulary [0, 37) on STEM shard rank 0 (global rank 3" in results[3][1]
    )
    for r in range(3):  # shard size 1: the other replicas name the rank that had it
        assert "token id 42 is outside the vocabulary [0, 37) on global rank 3" in results[r][1]
    assert "on global rank 3 (another STEM shard group" in results[0][2]


def _tp2_dp2(rank, world_size):
    from megatron.core import parallel_state

    from stem_megatron.stem.groups import build_stem_groups

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, create_gloo_process_groups=False)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    norms = []
    for shard_size in (None, 1):
        groups = build_stem_groups(shard_size)
        engine = StemTableEngine(
            vocab_size=V,
            layer_ids=LAYERS,
            ffn_hidden_size=F,
            tp_rank=tp_rank,
            tp_size=2,
            shard_group=groups.shard_group,
            replica_group=groups.replica_group,
            init_std=STD,
            seed=SEED,
        )
        ref_sq = _check_against_reference(engine, dp_rank, 2, tp_rank, 2)
        got = table_grad_sq_norm([engine]).item()
        assert abs(got - ref_sq) <= 1e-5 * ref_sq, (got, ref_sq)
        norms.append(got)
    # A rank without engines (e.g. a pipeline stage with no STEM layer) still joins the reduction.
    assert table_grad_sq_norm([], device=torch.device("cpu")).item() == 0.0
    return norms


def test_tp2_dp2_with_megatron_groups():
    norms = run_distributed(_tp2_dp2, world_size=4, timeout=240)
    assert all(n == norms[0] for n in norms)
