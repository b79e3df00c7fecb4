"""The embedded decision log (service.storage.log): ordered records, offsets across segments,
torn-write repair."""

from __future__ import annotations

from pathlib import Path

from service.storage.log import LocalLog


def test_append_and_read_from_offsets(tmp_path: Path) -> None:
    log = LocalLog(tmp_path)
    for i in range(5):
        log.append(f'{{"n":{i}}}'.encode())
    records, offset = log.read(0, max_bytes=20)
    assert records == [b'{"n":0}', b'{"n":1}']
    rest, end = log.read(offset)
    assert rest == [b'{"n":2}', b'{"n":3}', b'{"n":4}']
    assert end == log.end()
    assert log.read(end) == ([], end)
    log.close()


def test_segments_roll_and_ingested_ones_are_released(tmp_path: Path) -> None:
    log = LocalLog(tmp_path, segment_bytes=30)
    for i in range(10):
        log.append(f'{{"n":{i}}}'.encode())  # 8 bytes each: a new segment every 4 records
    assert len(list(tmp_path.glob("events-*.log"))) == 3
    seen, offset = [], 0
    while offset < log.end():
        records, offset = log.read(offset)
        seen += records
    assert seen == [f'{{"n":{i}}}'.encode() for i in range(10)]
    log.release(32)
    assert len(list(tmp_path.glob("events-*.log"))) == 2
    log.close()
    reopened = LocalLog(tmp_path, segment_bytes=30)
    assert reopened.end() == offset
    reopened.append(b'{"n":10}')
    assert reopened.read(offset)[0] == [b'{"n":10}']
    reopened.close()


def test_a_batch_is_appended_in_order_in_one_write(tmp_path: Path) -> None:
    """append_many (a shipped batch): the records in order, a segment rolled after the batch
    that filled it (a batch is never split across segments), offsets as for single appends."""
    log = LocalLog(tmp_path, segment_bytes=30)
    log.append(b'{"n":0}')
    log.append_many([f'{{"n":{i}}}'.encode() for i in range(1, 6)])  # 8 + 40 bytes: rolls
    log.append_many([])
    log.append_many([b'{"n":6}'])
    assert len(list(tmp_path.glob("events-*.log"))) == 2
    assert log.end() == 7 * 8
    records, offset = log.read(0)
    more, end = log.read(offset)
    assert records + more == [f'{{"n":{i}}}'.encode() for i in range(7)]
    assert end == log.end()
    log.close()


def test_torn_record_is_dropped_on_open(tmp_path: Path) -> None:
    (tmp_path / f"events-{0:020d}.log").write_bytes(b'{"n":0}\n{"n":1}\n{"n":')
    log = LocalLog(tmp_path)
    log.append(b'{"n":2}')
    assert log.read(0)[0] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
    log.close()
