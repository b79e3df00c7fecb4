"""The decision log: every decision, reward and activation, in arrival order.

Embedded mode writes newline-delimited JSON records to one append-only file; the joiner reads
it from a byte offset that it commits in the same database transaction as what it read, so each
record is ingested exactly once across restarts. (The Kafka log of the production path has the
same shape: append on the hot path, consume from a committed offset.)

Records (`k` is the kind):
    {"k":"d","loop","id","t","deferred","mode","c","a","p","b","m"}   a decision
    {"k":"r","loop","id","t","v"}                                      a reward
    {"k":"a","loop","id","t"}                                          an activation
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


class LocalLog:
    """Append-only record file. `append` is thread-safe and survives a process crash once it
    returns (the bytes are in the OS); `close` fsyncs."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._repair()
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115  (closed in close())

    def _repair(self) -> None:
        """Drop a torn last record left by a crash in the middle of a write."""
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(max(0, size - 65536))
            tail = f.read()
            if tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n")
            f.truncate(size - len(tail) + cut + 1 if cut >= 0 else 0)

    def append(self, record: bytes) -> None:
        with self._lock:
            self._file.write(record + b"\n")

    def size(self) -> int:
        return self.path.stat().st_size

    def read(self, offset: int, max_bytes: int = 4 << 20) -> tuple[list[bytes], int]:
        """Complete records from `offset`, and the offset after the last one returned."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            chunk = f.read(max_bytes)
        end = chunk.rfind(b"\n")
        if end < 0:
            return [], offset
        return chunk[:end].split(b"\n"), offset + end + 1

    def close(self) -> None:
        with self._lock:
            os.fsync(self._file.fileno())
            self._file.close()
