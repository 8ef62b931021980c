"""RowCache: pins beat every policy, each policy evicts what it says, the slot count never grows (misses bypass)."""

import pytest
import torch

from stem_megatron.stem.row_cache import RowCache


def _rows(*ids):
    return torch.tensor(ids, dtype=torch.int64)


@pytest.mark.parametrize("policy", ["lfu", "lru", "lookahead"])
def test_pinned_rows_are_never_evicted_and_the_cache_never_grows(policy):
    cache = RowCache(3, 100, policy)
    held = []
    g = torch.Generator().manual_seed(0)
    bypassed = 0
    for mb in range(12):  # several reads in flight, each with more rows than the cache holds
        rows = torch.randperm(100, generator=g)[:5]
        a = cache.admit(rows)
        assert bool(a.miss_K[a.slots_K < 0].all())  # only misses go without a slot
        bypassed += int((a.slots_K < 0).sum())
        held.append((rows, a.slots_K))
        for r, s in held:  # every row of every read in flight that got a slot keeps it
            kept = s >= 0
            assert torch.equal(cache.slot_of_R[r[kept]], s[kept]) and torch.equal(cache.row_of_C[s[kept]], r[kept])
        assert cache.num_slots == 3 and int((cache.pins_C > 0).sum()) <= 3
        if mb % 4 == 3:  # the reads are served: their pins are released
            for _, s in held:
                cache.unpin(s)
            held = []
            assert int(cache.pins_C.sum()) == 0
    assert cache.evicted_pinned == 0 and cache.evictions > 0
    assert bypassed == cache.bypassed > 0  # it had to bypass for the rows in flight


def test_policies_pick_their_victims():
    def filled(policy):
        c = RowCache(3, 10, policy)
        c.unpin(c.admit(_rows(1), torch.tensor([5.0])).slots_K)  # row 1: oldest, most frequent
        c.unpin(c.admit(_rows(2), torch.tensor([1.0])).slots_K)  # row 2: least frequent
        c.unpin(c.admit(_rows(3), torch.tensor([3.0])).slots_K)  # row 3: newest
        return c

    assert filled("lfu").admit(_rows(4)).evicted.tolist() == [2]
    assert filled("lru").admit(_rows(4)).evicted.tolist() == [1]
    c = filled("lookahead")
    c.announce([_rows(4), _rows(2), _rows(1)])  # row 3 has no known use: it goes, not the rare row 2
    assert c.admit(_rows(4)).evicted.tolist() == [3]
    assert c.admit(_rows(2)).miss_K.tolist() == [False]


def test_hits_misses_and_clear():
    c = RowCache(4, 10, "lru")
    a = c.admit(_rows(1, 2))
    assert a.miss_K.tolist() == [True, True]
    b = c.admit(_rows(2, 3))
    assert b.miss_K.tolist() == [False, True] and b.slots_K[0] == a.slots_K[1]
    with pytest.raises(RuntimeError, match="in flight"):
        c.clear()
    c.unpin(a.slots_K)
    c.unpin(b.slots_K)
    c.clear()
    assert c.admit(_rows(1)).miss_K.tolist() == [True]
    with pytest.raises(ValueError, match="policy"):
        RowCache(4, 10, "fifo")
