"""A ranking process's `rank` with the feature cleaner switched off, as if a new VW parser bug
slipped past it (tests/api/test_events.py): a module-level function, so the server's ranking
processes receive it by name (learners.sandbox.host.Op)."""

from __future__ import annotations

from typing import Any

from learners.sandbox.host import Host
from service.core import requests
from service.core.ranks import rank_op


def rank_without_cleaner(host: Host, header: dict[str, Any], blob: bytes) -> tuple[Any, bytes]:
    requests.clean_features = lambda features, where, **_: (features or [], 1)  # type: ignore[assignment]
    return rank_op(host, header, blob)
