"""Fixtures of the in-process ranker's API tests (tests/api/test_local*.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service.local import LocalRanker
from tests.support.harness import AUTH, Harness


@pytest.fixture
def client_key(harness: Harness) -> str:
    """A client key of the default loop."""
    r = harness.client.post("/loops/default/keys", headers=AUTH)
    assert r.status_code == 201, r.text
    key: str = r.json()["key"]
    return key


@pytest.fixture
def local(harness: Harness, client_key: str) -> Iterator[LocalRanker]:
    """An in-process ranker of the default loop on the harness's app, no background threads."""
    ranker = LocalRanker(key=client_key, http=harness.client, background=False, clock=harness.clock)
    yield ranker
    ranker.close()
