"""Stream ordering of the host row store (stem/host_store.py), raced on a GPU.

Each test holds one stream back with a slow kernel (`torch.cuda._sleep`) so that, without the
right `record_stream` or event, the other stream overwrites memory before it has been read.
Training's host tables (row_storage.py) and generation's (inference/rows.py) read gathered rows
only through `RowTransfer.wait()` and then on the caller's stream, so these cover their ordering.

Marked `gpu`: skipped with that reason on machines without CUDA. Not yet run on a GPU (written on a
CPU-only machine); tests/test_stem_host_store.py checks wait()'s stream protocol with fake streams.

Legend: R rows of the store, K rows of one gather, D columns.
"""

import pytest
import torch

from stem_megatron.stem.host_store import HostRowStore

pytestmark = pytest.mark.gpu

SLEEP_CYCLES = 500_000_000  # ~0.2-0.5 s of one spinning kernel: far longer than a 1 MiB copy


def _rows(r, d, seed=0):
    return torch.randn(r, d, generator=torch.Generator().manual_seed(seed))


def test_dropped_rows_are_not_reused_while_the_main_stream_still_reads_them():
    """Rows come from the copy stream's memory pool. Dropped by the caller while a queued kernel on
    the main stream still reads them, they must not serve the next gather's copy (record_stream)."""
    rows_RD = _rows(4096, 512)  # 2 KiB rows: a gather of 1,024 is 2 MiB (the allocator's large pool)
    store = HostRowStore(rows_RD, device="cuda", n_staging=1)
    first_K, second_K = torch.arange(0, 1024), torch.arange(2048, 3072)
    transfer = store.gather(first_K)
    got_KD = transfer.wait()
    torch.cuda._sleep(SLEEP_CYCLES)  # the main stream is busy ...
    copy_KD = got_KD * 1.0  # ... so this read runs after the sleep
    del got_KD, transfer  # the store's ring drops its reference at the next gather
    later = store.gather(second_K)  # the copy stream runs now, not after the sleep
    assert torch.equal(later.wait().cpu(), rows_RD[second_K])  # synchronizes the host with both
    torch.cuda.synchronize()
    assert torch.equal(copy_KD.cpu(), rows_RD[first_K]), "the next gather overwrote rows still being read"
    store.close()


def test_staging_buffer_is_not_refilled_before_its_copy_has_run():
    """One staging buffer: the next gather's worker must wait for the copy that reads it (its event),
    here held back by a slow kernel on the copy stream itself."""
    rows_RD = _rows(4096, 512, seed=1)
    store = HostRowStore(rows_RD, device="cuda", n_staging=1)
    first_K, second_K = torch.arange(0, 1024), torch.arange(1024, 2048)
    with torch.cuda.stream(store._stream):
        torch.cuda._sleep(SLEEP_CYCLES)  # the first copy queues behind this
    first = store.gather(first_K)
    second = store.gather(second_K)  # same staging buffer
    assert torch.equal(first.wait().cpu(), rows_RD[first_K]), "the staging buffer was refilled under its copy"
    assert torch.equal(second.wait().cpu(), rows_RD[second_K])
    store.close()

