"""What no policy may do to the files of the `files` fixture (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path


def assert_untouched(existing: Path, fresh: Path) -> None:
    assert existing.read_bytes() == b"precious bytes"
    assert sorted(existing.parent.iterdir()) == [existing]
    assert not fresh.exists()
