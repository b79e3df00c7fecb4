"""The app state (service.api.state.Dloop): its key table and loops are caches of the database.
`reload_keys` brings the keys up to date; `refresh` does so, and loads a named loop, only in
serve mode (other replicas change the database there) and at most every 0.2 s."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from service.api import state
from service.storage import store
from service.storage.models import ApiKey
from tests.support.harness import Harness


def test_reload_keys_takes_a_key_made_elsewhere_and_drops_a_deleted_one(harness: Harness) -> None:
    d = harness.dloop
    with d.sessions.begin() as session:  # as `dloop keys create` or another replica does
        row, key = store.create_key(
            session, role="client", loop="default", now=harness.clock(), source="cli"
        )
        key_id = row.id
    digest = store.hash_key(key)
    assert d.keys.get(digest) is None
    d.reload_keys()
    assert d.keys.get(digest) == ("client", "default")
    with d.sessions.begin() as session:
        session.delete(session.get(ApiKey, key_id))
    d.reload_keys()
    assert d.keys.get(digest) is None


def test_refresh_reloads_only_in_serve_mode_and_at_most_every_fifth_of_a_second(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = harness.dloop
    now = [1000.0]
    monkeypatch.setattr(state, "time", SimpleNamespace(monotonic=lambda: now[0]))

    def made_elsewhere(loop: str) -> str:
        with d.sessions.begin() as session:
            store.ensure_loop(session, name=loop, kind="cb", now=harness.clock())
            _, key = store.create_key(
                session, role="admin", loop=None, now=harness.clock(), source="api"
            )
        return store.hash_key(key)

    first = made_elsewhere("first")
    assert d.refresh("first") is False  # embedded: this process made every change itself
    assert "first" not in d.registry.loops and d.keys.get(first) is None

    monkeypatch.setattr(d, "publisher", object())  # serve mode
    assert d.refresh("first") is True
    assert "first" in d.registry.loops and d.keys.get(first) == ("admin", None)

    second = made_elsewhere("second")
    now[0] += 0.1
    assert d.refresh("second") is False  # too soon after the last one
    assert "second" not in d.registry.loops and d.keys.get(second) is None
    now[0] += 0.2
    assert d.refresh("second") is True
    assert "second" in d.registry.loops and d.keys.get(second) == ("admin", None)
