"""service.storage.store on a real database (SQLite; Postgres where concurrency or its text
rules matter): ingestion, dead letters holding NUL, the join's queries, dangling observations,
the outbox's positions, the last admin key, and replicas racing for the environment key or the
model-signing key."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from learners.features import context_json
from service.core import record
from service.storage import store
from service.storage.db import make_engine, make_sessionmaker
from service.storage.models import DeadLetter, Decision, Joined, Observation
from tests.support.harness import make_settings

KEY_A = "env-key-a-0123456789abcdefghijklmnop"
KEY_B = "env-key-b-0123456789abcdefghijklmnop"
CONTEXT = context_json([{"user": "u"}], [("a", [{"k": 1}]), ("b", [{"k": 2}])]).decode()


def _sessions(url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    yield from _sessions(make_settings(tmp_path / "data").database_url)


def decision(event_id: str, t: float, *, loop: str = "default", c: str = CONTEXT) -> bytes:
    return record.encode(
        record.Decision(loop, event_id, t, False, "Online", c, [0, 1], [0.5, 0.5], 0, "N/A")
    )


def reward(event_id: str, t: float, value: float = 1.0, *, uid: str | None = None) -> bytes:
    r = record.Observation(record.REWARD, "default", event_id, t, uid or f"u-{event_id}-{t}", value)
    return record.encode(r)


def test_ingest_keeps_the_first_decision_and_dead_letters_what_it_cannot_read(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        got = store.ingest(
            session,
            records=[decision("e1", 1.0), decision("e1", 2.0), b'{"k":"d"', reward("e1", 3.0)],
            source="test",
            now=10.0,
        )
    assert (got.dead, got.loops) == (1, {"default"})
    with sessions() as session:
        (d,) = session.query(Decision).all()
        assert d.created_at == 1.0
        (dead,) = session.query(DeadLetter).all()
        assert dead.reason.startswith("RecordError: JSONDecodeError")
        assert [o.status for o in session.query(Observation)] == ["pending"]


def test_ingest_cleans_features_vw_must_never_see(sessions: sessionmaker[Session]) -> None:
    c = orjson.loads(CONTEXT)
    c["_multi"][0]["__aid"] = 5  # VW's JSON parser crashes on this key
    with sessions.begin() as session:
        store.ingest(session, records=[decision("e", 1.0, c=orjson.dumps(c).decode())],
                     source="test", now=2.0)  # fmt: skip
    with sessions() as session:
        stored = record.decode(session.query(Decision).one().record)
    assert isinstance(stored, record.Decision)
    assert "__aid" not in stored.c


def test_ingest_stores_a_decision_without_keys_no_reader_reads(
    sessions: sessionmaker[Session],
) -> None:
    """A decision from another producer on the events topic, with a key of its own: the row
    holds the record without it; dloop's own records are stored as they came."""
    extra = orjson.loads(decision("e1", 1.0))
    extra["trace"] = "x" * 10_000
    with sessions.begin() as session:
        store.ingest(session, records=[orjson.dumps(extra), decision("e2", 1.0)], source="t",
                     now=2.0)  # fmt: skip
    with sessions() as session:
        rows = {d.event_id: d.record for d in session.query(Decision)}
    assert rows["e1"].encode() == decision("e1", 1.0)
    assert rows["e2"].encode() == decision("e2", 1.0)


@pytest.fixture
def postgres_sessions(postgres_url: str) -> Iterator[sessionmaker[Session]]:
    from service.storage.migrate import upgrade

    upgrade(postgres_url)
    yield from _sessions(postgres_url)


def test_a_dead_letter_holding_nul_is_stored_on_postgres(
    postgres_sessions: sessionmaker[Session],
) -> None:
    """Postgres refuses NUL in text: a line an in-process ranker shipped holding one is kept
    with U+FFFD in its place, record and reason, not refused (the ranker sends the batch first
    in line again, and the server answered 500 to it forever)."""
    with postgres_sessions.begin() as session:
        store.dead_letter(session, source="local-records", loop="default", ref=None,
                          record='{"k":"\x00"}', reason="line 1: bad \x00", now=1.0)  # fmt: skip
    with postgres_sessions() as session:
        dead = session.query(DeadLetter).one()
        assert (dead.record, dead.reason) == ('{"k":"\ufffd"}', "line 1: bad \ufffd")


def test_ingest_dead_letters_a_record_holding_nul_on_postgres(
    postgres_sessions: sessionmaker[Session],
) -> None:
    """A garbage record with a NUL on the events topic is kept with U+FFFD in its place and
    the batch goes on (refused, it failed every ingest batch it was in)."""
    with postgres_sessions.begin() as session:
        got = store.ingest(session, records=[b'{"k":"d"\x00', decision("e1", 1.0)], source="t",
                           now=2.0)  # fmt: skip
    assert got.dead == 1
    with postgres_sessions() as session:
        dead = session.query(DeadLetter).one()
        assert dead.record == '{"k":"d"\ufffd'
        assert dead.reason.startswith("RecordError: JSONDecodeError")
        assert session.query(Decision).one().event_id == "e1"


def test_an_observation_for_a_joined_event_is_late(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        store.ingest(session, records=[decision("e", 1.0)], source="test", now=1.0)
        session.query(Decision).one().joined = True
    with sessions.begin() as session:
        store.ingest(session, records=[reward("e", 2.0)], source="test", now=2.0)
    with sessions() as session:
        assert session.query(Observation).one().status == "late"


def test_decisions_to_join_are_those_whose_window_closed_or_earliest_rewarded(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        records = [decision("old", 0.0), decision("open", 50.0), decision("rewarded", 60.0)]
        store.ingest(session, records=[*records, reward("rewarded", 61.0)], source="t", now=62.0)
    with sessions.begin() as session:
        closed = store.decisions_to_join(
            session, loop="default", wait=30.0, now=70.0, limit=10, earliest=False
        )
        assert [d.event_id for d in closed] == ["old"]
        early = store.decisions_to_join(
            session, loop="default", wait=30.0, now=70.0, limit=10, earliest=True
        )
        assert [d.event_id for d in early] == ["old", "rewarded"]
        found = store.observations_of(session, loop="default", event_ids=["old", "rewarded"])
        assert {k: len(v) for k, v in found.items()} == {"old": 0, "rewarded": 1}


def test_the_early_join_is_driven_by_the_pending_rewards_not_the_open_decisions(
    sessions: sessionmaker[Session],
) -> None:
    """Every pass looks for open decisions a pending reward may complete early: SQLite must
    find them from the (few) pending rewards, by key, never by walking the (many) open
    decisions (it did, and the learner's pass cost grew with the reward wait: a fifth of its
    CPU under load); they come in time order, ties in the order their rewards came."""
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, sql: str, params: Any, context: Any, many: bool) -> None:
        statements.append((sql, params))

    with sessions.begin() as session:
        # One clock tick, ranked in this order (an RL episode's steps, say), rewarded in turn.
        steps = [f"step-{i}" for i in (3, 1, 20, 2)]
        records = [decision(e, 60.0) for e in steps] + [decision("other", 59.0)]
        records += [decision(f"open-{i}", 50.0 + i) for i in range(50)]
        rewards = [reward(e, 61.0) for e in [*steps, "other"]]
        store.ingest(session, records=[*records, *rewards], source="t", now=62.0)
    with sessions.begin() as session:
        engine = session.get_bind()
        event.listen(engine, "before_cursor_execute", capture)
        try:
            early = store.decisions_to_join(
                session, loop="default", wait=30.0, now=70.0, limit=10, earliest=True
            )
        finally:
            event.remove(engine, "before_cursor_execute", capture)
        assert [d.event_id for d in early] == ["other", *steps]
        _closed, *rest = statements  # the first finds the closed windows (by time, indexed)
        plans = [
            " | ".join(
                row[-1]
                for row in session.connection().exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params)
            )
            for sql, params in rest
        ]
    for plan in plans:
        assert "ix_decisions_pending" not in plan and "SCAN decisions" not in plan, plan
    assert any(
        "SEARCH decisions USING INDEX sqlite_autoindex_decisions_1 (loop=? AND event_id=?)" in p
        for p in plans
    ), plans


def test_orphans_turn_dangling_and_only_the_newest_are_kept(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        orphans = [reward(f"x{i}", float(i)) for i in range(6)]
        store.ingest(session, records=orphans, source="t", now=6.0)
    with sessions.begin() as session:
        store.mark_dangling(session, loop="default", now=1000.0, keep=4)
    with sessions() as session:
        kept = sorted(o.event_id for o in session.query(Observation))
        assert kept == ["x2", "x3", "x4", "x5"]
        assert store.loop_counts(session)["default"]["observations_dropped"] == 2


def test_the_outbox_gives_gap_free_positions_per_loop(sessions: sessionmaker[Session]) -> None:
    row = {"created_at": 1.0, "joined_at": 2.0, "mode": "Online", "learnable": True,
           "reward": 1.0, "rewarded": True, "imitated": False, "line": "{}", "published": False,
           "episode": None}  # fmt: skip
    with sessions.begin() as session:
        store.add_joined(
            session,
            [{**row, "loop": loop, "event_id": f"e{i}"} for i, loop in enumerate("abab")],
        )
    with sessions.begin() as session:
        assert store.assign_positions(session, limit=10) == 4
    with sessions.begin() as session:
        assert store.max_pos(session, loop="a") == store.max_pos(session, loop="b") == 2
        rows = store.unpublished(session, limit=10)
        assert [(r.loop, r.pos) for r in rows] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
        store.mark_published(session, seqs=[r.seq for r in rows])
    with sessions() as session:
        assert store.unpublished(session, limit=10) == []
        assert session.query(Joined).filter(Joined.published.is_(False)).count() == 0


def test_the_last_valid_admin_key_cannot_be_revoked(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        first, _ = store.create_key(session, role="admin", loop=None, now=1.0, source="api")
        second, _ = store.create_key(session, role="admin", loop=None, now=1.0, source="api")
    with sessions.begin() as session:
        store.revoke_key(session, row=session.merge(first), now=2.0)
    with sessions.begin() as session, pytest.raises(store.LastAdminKeyError):
        store.revoke_key(session, row=session.merge(second), now=2.0)


def test_replicas_installing_the_environment_key_together_leave_one(postgres_url: str) -> None:
    """Every serving process stores DLOOP_API_KEY as it starts; those starting at once wait for
    each other and end with that one env key (the previous one gone), none failing."""
    from sqlalchemy import select, text

    from service.storage import store
    from service.storage.db import make_engine, make_sessionmaker
    from service.storage.migrate import upgrade
    from service.storage.models import ApiKey

    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    sessions = make_sessionmaker(engine)
    try:
        with sessions.begin() as session:
            store.install_env_key(session, key=KEY_A, now=1.0)
        first = sessions()
        first.begin()
        store.install_env_key(first, key=KEY_B, now=2.0)  # not committed yet
        failures: list[BaseException] = []

        def replica() -> None:
            try:
                with sessions.begin() as session:
                    store.install_env_key(session, key=KEY_B, now=3.0)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=replica) for _ in range(2)]
        for t in threads:
            t.start()
        waiting = text(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event = 'advisory'"
        )
        deadline = time.monotonic() + 10
        with engine.connect() as probe:
            while probe.execute(waiting).scalar() != 2:
                assert time.monotonic() < deadline, "the replicas never waited for the first"
                probe.rollback()
                time.sleep(0.01)
        first.commit()
        first.close()
        for t in threads:
            t.join(10)
        assert not failures
        with sessions() as session:
            env = session.scalars(select(ApiKey.key_hash).where(ApiKey.source == "env")).all()
        assert env == [store.hash_key(KEY_B)]
    finally:
        engine.dispose()


def test_replicas_racing_for_the_signing_key_agree_on_one(postgres_url: str) -> None:
    """Two processes asking for the key of a new deployment at once: the second insert waits
    for the first transaction and then reads its key back."""
    from sqlalchemy import text

    from service.storage import store
    from service.storage.db import make_engine, make_sessionmaker
    from service.storage.migrate import upgrade

    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    sessions = make_sessionmaker(engine)
    try:
        first = sessions()
        first.begin()
        key = store.server_secret(first, name="model-signing", now=1.0)  # not committed yet
        found: list[bytes] = []

        def second() -> None:
            with sessions.begin() as session:
                found.append(store.server_secret(session, name="model-signing", now=2.0))

        t = threading.Thread(target=second)
        t.start()
        deadline = time.monotonic() + 10
        with engine.connect() as conn:  # wait until the second insert waits on the first
            waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted"
            while conn.execute(text(waiting)).scalar_one() == 0:
                assert time.monotonic() < deadline, "the second insert never waited"
                conn.rollback()
        first.commit()
        first.close()
        t.join(10)
        assert found == [key] and len(key) == 32
    finally:
        engine.dispose()


def test_a_step_is_late_by_its_time_not_by_when_it_is_ingested(
    sessions: sessionmaker[Session],
) -> None:
    """On the Kafka path an episode's end and its steps travel on different partitions: a step
    ingested after the end but ranked before it is stored; one ranked after it, and one after
    an end earlier in the same batch, go to the dead letters."""

    def step(event_id: str, t: float) -> bytes:
        return record.encode(
            record.Decision(
                "default", event_id, t, False, "Online", CONTEXT, [0, 1], [0.5, 0.5], 0, "N/A",
                ep="ep1",
            )
        )  # fmt: skip

    end = record.encode(record.EpisodeEnd("default", "ep1", 10.0, True))
    with sessions.begin() as session:
        store.ingest(session, records=[step("s0", 1.0), end], source="t", now=10.0)
    with sessions.begin() as session:
        got = store.ingest(
            session,
            records=[step("s1", 5.0), step("late", 11.0), step("s0", 12.0)],
            source="t",
            now=12.0,
        )
    assert got.dead == 1
    with sessions.begin() as session:
        store.ingest(
            session,
            records=[
                record.encode(record.EpisodeEnd("default", "ep2", 20.0, True)),
                record.encode(
                    record.Decision(
                        "default", "after", 21.0, False, "Online", CONTEXT, [0, 1], [0.5, 0.5],
                        0, "N/A", ep="ep2",
                    )
                ),
            ],
            source="t",
            now=21.0,
        )  # fmt: skip
    with sessions() as session:
        stored = {d.event_id for d in session.query(Decision)}
        dead = [(d.loop, d.reason[:30]) for d in session.query(DeadLetter)]
    assert stored == {"s0", "s1"}
    assert dead == [
        ("default", "a step of episode 'ep1' ranked"),
        ("default", "a step of episode 'ep2' ranked"),
    ]
