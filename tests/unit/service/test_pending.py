"""service.local.Pending: the in-process ranker's records waiting to ship."""

from __future__ import annotations

from service.local import Pending


def drain(pending: Pending) -> list[bytes]:
    out = []
    while (taken := pending.take()) is not None:
        view, count = taken
        batch = bytes(view)
        assert len(batch.split(b"\n")) == count
        out.append(batch)
        view.release()
        pending.done()
    return out


def test_records_ship_in_order_in_batches_of_at_most_batch_bytes() -> None:
    pending = Pending(batch_bytes=64, max_bytes=10_000)
    records = [f"record-{i:03d}".encode() for i in range(20)]  # 10 bytes, 11 with a newline
    for raw in records:
        pending.add(raw)
    assert pending.records == 20 and pending.bytes == 220
    batches = drain(pending)
    assert [len(b.split(b"\n")) for b in batches] == [5, 5, 5, 5]
    assert b"\n".join(batches).split(b"\n") == records
    assert pending.records == 0 and pending.bytes == 0 and pending.take() is None


def test_a_record_longer_than_a_batch_is_a_batch_of_its_own() -> None:
    pending = Pending(batch_bytes=16, max_bytes=10_000)
    for raw in (b"a", b"x" * 40, b"b"):
        pending.add(raw)
    assert drain(pending) == [b"a", b"x" * 40, b"b"]


def test_shipped_buffers_are_written_again_not_allocated_again() -> None:
    pending = Pending(batch_bytes=64, max_bytes=10_000)
    buffers: list[object] = [pending._buf]  # held, so no new buffer can take their place
    for i in range(12):
        pending.add(f"record-{i:03d}".encode())
    while (taken := pending.take()) is not None:
        view, _ = taken
        buffers.append(view.obj)
        view.release()
        pending.done()
    for i in range(12):
        pending.add(f"again-{i:04d}".encode())
    while (taken := pending.take()) is not None:
        view, _ = taken
        assert bytes(view).startswith(b"again-")
        assert any(view.obj is b for b in buffers), "a new buffer for the same load"
        view.release()
        pending.done()


def test_a_batch_not_sent_is_the_oldest_again() -> None:
    pending = Pending(batch_bytes=16, max_bytes=10_000)
    for raw in (b"one", b"two", b"three", b"four"):
        pending.add(raw)
    view, count = pending.take() or (memoryview(b""), 0)
    assert bytes(view) == b"one\ntwo\nthree" and count == 3
    view.release()
    pending.untake()
    pending.add(b"five")
    assert pending.records == 5
    assert drain(pending) == [b"one\ntwo\nthree", b"four\nfive"]


def test_beyond_max_bytes_the_oldest_batches_are_dropped_and_counted() -> None:
    pending = Pending(batch_bytes=22, max_bytes=50)
    for i in range(10):
        pending.add(f"r{i}".encode())  # 3 bytes each: 7 to a batch of 22
    assert pending.dropped == 0 and pending.bytes == 30
    for i in range(10, 20):
        pending.add(f"r{i}".encode())
    assert pending.bytes <= 50 and pending.dropped == 7
    assert pending.records == 13
    assert drain(pending)[0].split(b"\n")[0] == b"r7"


def test_the_batch_being_sent_is_never_dropped() -> None:
    pending = Pending(batch_bytes=22, max_bytes=30)
    for i in range(7):
        pending.add(f"r{i}".encode())
    view, count = pending.take() or (memoryview(b""), 0)
    for i in range(7, 30):
        pending.add(f"r{i}".encode())
    assert bytes(view).split(b"\n") == [f"r{i}".encode() for i in range(7)]
    view.release()
    pending.done()
    assert pending.records + pending.dropped == 30 - count
