"""The embedded decision log: ordered records, offsets, and repair of a torn last write."""

from __future__ import annotations

from pathlib import Path

from service.log import LocalLog


def test_append_and_read_from_offsets(tmp_path: Path) -> None:
    log = LocalLog(tmp_path / "events.log")
    for i in range(5):
        log.append(f'{{"n":{i}}}'.encode())
    records, offset = log.read(0, max_bytes=20)
    assert records == [b'{"n":0}', b'{"n":1}']
    rest, end = log.read(offset)
    assert rest == [b'{"n":2}', b'{"n":3}', b'{"n":4}']
    assert end == log.size()
    assert log.read(end) == ([], end)
    log.close()


def test_torn_record_is_dropped_on_open(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    path.write_bytes(b'{"n":0}\n{"n":1}\n{"n":')
    log = LocalLog(path)
    log.append(b'{"n":2}')
    assert log.read(0)[0] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
    log.close()
