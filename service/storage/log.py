"""The local decision log: every decision, reward, activation and episode end, in arrival order.

Embedded mode writes newline-delimited JSON records to append-only segment files
(`events-<first offset>.log`); offsets are global byte positions across segments. The joiner
reads from an offset that it commits in the same database transaction as what it read, so each
record is ingested exactly once across restarts, and segments wholly before that offset are
deleted (their records live on in the database). The Kafka log of the production path has the
same shape: append on the hot path, consume from a committed offset.

The log holds bytes; what a record is, and the only code that builds or reads one, is
service.core.record.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from service.core.files import private_dir, private_opener

_SEGMENT = re.compile(r"^events-(\d{20})\.log$")


class LocalLog:
    """Append-only record log in a directory. `append` is thread-safe and survives a process
    crash once it returns (the bytes are in the OS); `close` fsyncs."""

    def __init__(self, directory: Path, *, segment_bytes: int = 64 << 20) -> None:
        self.directory = private_dir(directory)
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        bases = self._bases()
        self._base = bases[-1] if bases else 0
        self._repair(self._path(self._base))
        self._file = self._open(self._base)
        self._size = self._file.seek(0, os.SEEK_END)

    def _path(self, base: int) -> Path:
        return _path(self.directory, base)

    def _open(self, base: int) -> BinaryIO:
        return open(self._path(base), "ab", buffering=0, opener=private_opener)

    def _bases(self) -> list[int]:
        return _bases(self.directory)

    @staticmethod
    def _repair(path: Path) -> None:
        """Drop a torn last record left by a crash in the middle of a write."""
        if not path.exists():
            return
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(max(0, size - 65536))
            tail = f.read()
            if tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n")
            f.truncate(size - len(tail) + cut + 1 if cut >= 0 else 0)

    @property
    def closed(self) -> bool:
        return self._file.closed

    def append(self, record: bytes) -> None:
        self._write(record + b"\n")

    def append_many(self, records: Sequence[bytes]) -> None:
        """Append records in order, in one write (a shipped batch: one system call, not one
        per record)."""
        if records:
            self._write(b"\n".join(records) + b"\n")

    def _write(self, data: bytes) -> None:
        with self._lock:
            self._file.write(data)
            self._size += len(data)
            if self._size >= self.segment_bytes:
                self._file.close()
                self._base += self._size
                self._size = 0
                self._file = self._open(self._base)

    def end(self) -> int:
        """The offset after the last record."""
        with self._lock:
            return self._base + self._size

    def read(self, offset: int, max_bytes: int = 4 << 20) -> tuple[list[bytes], int]:
        """Complete records from `offset`, and the offset after the last one returned."""
        return _read(self.directory, self._bases(), offset, max_bytes)

    def release(self, offset: int) -> None:
        """Delete finished segments that lie wholly before `offset` (already ingested)."""
        _release(self.directory, self._bases(), offset, keep=self._base)

    def close(self) -> None:
        with self._lock:
            os.fsync(self._file.fileno())
            self._file.close()


class LogReader:
    """The log as the embedded learner's process reads it while the serving process appends:
    `read`, `end` and `release` as LocalLog's, from the files alone (the writer's newest segment
    is never deleted, even before the reader sees a newer one)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def read(self, offset: int, max_bytes: int = 4 << 20) -> tuple[list[bytes], int]:
        return _read(self.directory, _bases(self.directory), offset, max_bytes)

    def end(self) -> int:
        bases = _bases(self.directory)
        if not bases:
            return 0
        try:
            return bases[-1] + _path(self.directory, bases[-1]).stat().st_size
        except FileNotFoundError:
            return bases[-1]

    def release(self, offset: int) -> None:
        bases = _bases(self.directory)
        if bases:
            _release(self.directory, bases, offset, keep=bases[-1])


def _path(directory: Path, base: int) -> Path:
    return directory / f"events-{base:020d}.log"


def _bases(directory: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _SEGMENT.match(p.name)))


def _read(
    directory: Path, bases: list[int], offset: int, max_bytes: int
) -> tuple[list[bytes], int]:
    base = max((b for b in bases if b <= offset), default=None)
    if base is None:
        return [], offset
    try:
        with open(_path(directory, base), "rb") as f:
            f.seek(offset - base)
            chunk = f.read(max_bytes)
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset
    return chunk[:end].split(b"\n"), offset + end + 1


def _release(directory: Path, bases: list[int], offset: int, *, keep: int) -> None:
    for base, following in itertools.pairwise(bases):
        if following <= offset and base != keep:
            _path(directory, base).unlink(missing_ok=True)
