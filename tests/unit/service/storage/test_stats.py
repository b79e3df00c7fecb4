"""service.storage.store.stats on real databases (SQLite and Postgres): rollups add up, the
running totals follow every addition, and compaction into hours changes no figure an hourly
(or coarser) query gives, however late a join adds to an old bucket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.storage import store
from service.storage.db import make_engine, make_sessionmaker
from service.storage.migrate import upgrade
from service.storage.models import ActionStat, LoopStat, OutcomeStat
from tests.support.harness import make_settings

T0 = 1_790_000_000 - 1_790_000_000 % 3600  # an hour's start


@pytest.fixture(params=["sqlite", "postgres"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = make_settings(tmp_path / "data").database_url
    else:
        url = request.getfixturevalue("postgres_url")
        upgrade(url)
    engine = make_engine(url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def _fill(sessions: sessionmaker[Session], start: int, seconds: int, loop: str = "L") -> None:
    """One decision every 10 s from `start`, reward 1 on every third; actions a/b alternate."""
    sums, actions = {}, {}
    for i, t in enumerate(range(start, start + seconds, 10)):
        sums[t, ""] = {"decisions": 1, "reward_n": 1, "reward_sum": float(i % 3 == 0)}
        actions[t, "", "ab"[i % 2]] = 1
    with sessions.begin() as s:
        store.add_stats(s, loop=loop, sums=sums)
        store.add_actions(s, loop=loop, counts=actions)


def _hourly(sessions: sessionmaker[Session]) -> tuple[list[tuple[int, float, float]], list]:
    with sessions() as s:
        rows = store.stat_rows(s, loop="L", since=0, until=2e9, size=3600)
        acts = store.action_rows(s, loop="L", since=0, until=2e9, size=3600)
    return [(r["bucket"], r["decisions"], r["reward_sum"]) for r in rows], acts


def test_compaction_into_hours_changes_no_hourly_figure(sessions: sessionmaker[Session]) -> None:
    _fill(sessions, T0, 3 * 3600)  # three hours, 1,080 rows
    _fill(sessions, T0, 600, loop="other")
    before = _hourly(sessions)
    with sessions() as s:
        totals = store.totals(s, loop="L")
        fine = s.scalar(select(func.count()).select_from(LoopStat).where(LoopStat.loop == "L"))
    assert before[0] == [(T0, 360, 120), (T0 + 3600, 360, 120), (T0 + 7200, 360, 120)]
    assert totals["decisions"] == 1080 and fine == 1080 + 1  # and the running totals' row

    with sessions.begin() as s:  # the first two hours are old enough
        assert store.compact(s, before=T0 + 2 * 3600 + 5) == 3  # two hours of L, one of other
    with sessions() as s:
        rows = s.scalars(
            select(LoopStat.bucket).where(LoopStat.loop == "L", LoopStat.bucket >= 0)
        ).all()
        assert sorted(rows)[:3] == [T0, T0 + 3600, T0 + 7200]  # two hours, then 10-s rows
        assert len(rows) == 2 + 360
        assert store.totals(s, loop="L") == totals  # the running totals did not move
        assert (
            s.scalar(
                select(func.count())
                .select_from(ActionStat)
                .where(ActionStat.loop == "L", ActionStat.bucket < T0 + 7200)
            )
            == 4
        )  # a and b per hour
    assert _hourly(sessions) == before
    with sessions.begin() as s:
        assert store.compact(s, before=T0 + 2 * 3600 + 5) == 0  # nothing left to merge
    # A late join adds to a compacted hour: the next pass merges it in.
    _fill(sessions, T0 + 30, 20)
    with sessions.begin() as s:
        assert store.compact(s, before=T0 + 2 * 3600 + 5) == 1
    hourly, _ = _hourly(sessions)
    assert hourly[0] == (T0, 362, 121)
    # Another loop's rows were merged too, and are its own.
    with sessions() as s:
        other = store.stat_rows(s, loop="other", since=0, until=2e9, size=3600)
    assert [(r["bucket"], r["decisions"]) for r in other] == [(T0, 60)]


def test_running_totals_and_the_extent_leave_out_nothing(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        assert store.extent(s, loop="L") is None and store.mean_reward(s, loop="L") == 0.0
    _fill(sessions, T0, 100)
    _fill(sessions, T0 + 7200, 100)
    with sessions() as s:
        assert store.extent(s, loop="L") == (T0, T0 + 7290)  # not the totals' bucket -1
        assert store.mean_reward(s, loop="L") == pytest.approx(8 / 20)
        recent = store.totals(s, loop="L", since=T0 + 3600)
        assert recent["decisions"] == 10
        # A range from before 1970 does not take the running totals for a bucket.
        rows = store.stat_rows(s, loop="L", since=-1e9, until=2e9, size=3600)
        assert sum(r["decisions"] for r in rows) == 20


def test_compaction_keeps_the_outcome_rollups_behind_the_guardrails(
    sessions: sessionmaker[Session],
) -> None:
    """Outcome rollups merge into hours with the rest: every window sum the guardrails read
    from an hour's start is unchanged."""
    _fill(sessions, T0, 2 * 3600)
    outcome = {
        (t, "click"): {"n": 1.0, "y_sum": float(t % 30 == 0), "ht_a": 0.5, "ht_a2": 0.25}
        for t in range(T0, T0 + 2 * 3600, 10)
    }
    with sessions.begin() as s:
        store.add_outcome_stats(s, loop="L", sums=outcome)
    with sessions() as s:
        before = [
            store.outcome_sums(s, loop="L", outcome="click", since=T0 + h * 3600) for h in (0, 1)
        ]
    with sessions.begin() as s:
        assert store.compact(s, before=T0 + 2 * 3600 + 5) == 2
    with sessions() as s:
        after = [
            store.outcome_sums(s, loop="L", outcome="click", since=T0 + h * 3600) for h in (0, 1)
        ]
        means = store.outcome_means(s, loop="L", since=0, until=2e9, size=3600)
        rows = s.scalar(select(func.count()).select_from(OutcomeStat))
    assert rows == 2  # one per hour
    assert after == before
    assert before[0]["n"] == 720 and before[0]["y_sum"] == 240
    assert [(b, o, n) for b, o, n, _ in means] == [
        (T0, "click", 360.0),
        (T0 + 3600, "click", 360.0),
    ]
