"""HostRowStore: asynchronous host-to-device row gathers (CPU here; the CUDA path under `gpu`)."""

import pytest
import torch

from stem_megatron.stem.host_store import HostRowStore, RowTransfer


def _rows(r=257, n_layers=3, f=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, n_layers, f, generator=g)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("n_staging", [1, 2])
def test_gathers_in_flight_equal_index_select(device, n_staging):
    rows = _rows()
    store = HostRowStore(rows, device=device, n_staging=n_staging)
    g = torch.Generator().manual_seed(1)
    idx = [torch.randint(0, rows.shape[0], (int(k),), generator=g) for k in torch.randint(1, 300, (7,), generator=g)]
    transfers = [store.gather(i) for i in idx]  # more in flight than staging buffers
    for i, t in zip(idx, transfers):
        got = t.wait()
        assert got.device.type == device
        assert torch.equal(got.cpu(), rows[i])
        assert t.wait() is got  # a second wait returns the same rows
    assert store.bytes_to_device == sum(i.numel() for i in idx) * 3 * 16 * 4
    store.close()


def test_out_dtype_casts_on_the_host_and_counts_fewer_bytes():
    rows = _rows()
    store = HostRowStore(rows, out_dtype=torch.bfloat16)
    idx = torch.tensor([5, 0, 256, 5])
    got = store.read(idx)
    assert got.dtype == torch.bfloat16 and torch.equal(got, rows[idx].bfloat16())
    assert store.bytes_to_device == 4 * 3 * 16 * 2


def test_write_waits_for_earlier_gathers_and_later_gathers_see_it():
    rows = _rows()
    store = HostRowStore(rows)
    idx = torch.tensor([3, 7, 11])
    before = rows[idx].clone()
    early = store.gather(idx)
    store.write(idx, torch.zeros(3, 3, 16))
    assert torch.equal(early.wait(), before)  # issued before the write: the old rows
    assert torch.equal(store.read(idx), torch.zeros(3, 3, 16))
    assert torch.equal(rows[idx], torch.zeros(3, 3, 16))  # the caller's tensor is the store (no copy on CPU)


def test_bad_ids_and_host_only_rows():
    store = HostRowStore(_rows(r=10))
    with pytest.raises(IndexError, match=r"row ids must be in \[0, 10\), got \[0, 10\]"):
        store.gather(torch.tensor([0, 10]))
    with pytest.raises(IndexError, match="got \\[-1, 2\\]"):
        store.gather(torch.tensor([-1, 2]))
    assert store.read(torch.empty(0, dtype=torch.int64)).shape == (0, 3, 16)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="must be in host memory"):
            HostRowStore(torch.zeros(2, 2, device="cuda"))


def test_wait_orders_the_rows_on_the_callers_current_stream(monkeypatch):
    """The CUDA stream protocol of wait(), with fake streams (runs on CPU; tests/test_gpu_streams.py
    races it for real): the caller's current stream waits for the copy's event, and the rows (allocated
    on the copy stream) are recorded as used on it, so their memory is not reused under its kernels.
    On every call: a later wait() may come from another stream."""
    from concurrent.futures import Future

    calls = []

    class FakeStream:
        def __init__(self, name):
            self.name = name

        def wait_event(self, event):
            calls.append(("wait_event", self.name, event))

    class FakeRows:
        device = torch.device("cuda", 0)

        def record_stream(self, stream):
            calls.append(("record_stream", stream.name))

    current = {"stream": FakeStream("main")}
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current["stream"])
    future, rows, retired = Future(), FakeRows(), []
    future.set_result(rows)
    transfer = RowTransfer(future, "copy-event", retired.append, seq=1)
    assert transfer.wait() is rows
    assert calls == [("wait_event", "main", "copy-event"), ("record_stream", "main")]
    current["stream"], calls[:] = FakeStream("side"), []
    assert transfer.wait() is rows
    assert calls == [("wait_event", "side", "copy-event"), ("record_stream", "side")]
    assert retired == [transfer]  # retired once
