"""dloop's files hold decisions, keys and models: the directories and files it creates are its
owner's alone (0700 and 0600) whatever the umask. Existing ones keep the mode they have."""

from __future__ import annotations

import os
from pathlib import Path


def private_dir(path: Path) -> Path:
    """`path` and its missing parents; `path` itself, if new, readable by its owner only."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def private_opener(path: str, flags: int) -> int:
    """For `open(..., opener=private_opener)`: a file it creates is 0600."""
    return os.open(path, flags, 0o600)
