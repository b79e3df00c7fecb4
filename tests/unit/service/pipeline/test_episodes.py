"""What a reopened RL trainer is given back (service.pipeline.episodes.recall): the loop's
learned episodes it keeps, oldest first, without those a learner gave up on; on SQLite and on
Postgres (the query groups and counts across an outer join). And which of several learners
learns an RL loop (service.pipeline.learning.train_episodes' `fleet`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.pipeline import episodes
from service.pipeline.learning import Learners, handover
from service.storage import store
from service.storage.db import make_engine, make_sessionmaker
from service.storage.migrate import upgrade
from service.storage.models import Episode, Joined
from tests.unit.learners.test_rl import _line


@pytest.fixture(params=["sqlite", "postgres"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'dloop.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def test_a_reopened_trainer_is_given_back_the_episodes_its_model_learned(
    sessions: sessionmaker[Session],
) -> None:
    """Learned episodes, latest end first: e4 (1 step), e3 (3, one of them dead-lettered: left
    out), e2 (1), e1 (2), e0 (1); e5 is not learned yet. A trainer keeping 2 episodes and 3
    steps of memory keeps e4 and e2 (e1 would make 4 steps beyond a window of 2)."""
    sizes = {"e0": 1, "e1": 2, "e2": 1, "e3": 3, "e4": 1, "e5": 1}
    with sessions.begin() as session:
        for i, (episode, n) in enumerate(sizes.items()):
            session.add(
                Episode(
                    loop="rl",
                    episode_id=episode,
                    ended_at=100.0 + i,
                    terminated=episode != "e2",
                    learned=episode != "e5",
                )
            )
            for t in range(n):
                session.add(
                    Joined(
                        loop="rl",
                        event_id=f"{episode}-{t}",
                        created_at=100.0 + i + t / 10,
                        joined_at=100.0 + i,
                        mode="Online",
                        learnable=True,
                        reward=float(t),
                        rewarded=True,
                        imitated=False,
                        line=f"{episode}/{t}",
                        episode=episode,
                    )
                )
        session.flush()
        bad = session.query(Joined).filter(Joined.event_id == "e3-1").one()
        store.dead_letter(
            session, source=episodes.SOURCE, loop="rl", ref=bad.seq, record="", reason="", now=0
        )
        # Another loop's episode of the same id is not this loop's.
        session.add(Episode(loop="other", episode_id="e9", ended_at=200.0, terminated=True))
    with sessions() as session:
        kept = list(episodes.recall(session, loop="rl", window=2, memory=3, page=2))
        assert kept == [[([("e2/0", 0.0, True)], False), ([("e4/0", 0.0, True)], True)]]
        everything = list(episodes.recall(session, loop="rl", chunk=2, page=2))
    assert [[[line for line, _, _ in steps] for steps, _ in batch] for batch in everything] == [
        [["e0/0"], ["e1/0", "e1/1"]],  # batches of about 2 steps, oldest first
        [["e2/0"], ["e4/0"]],
    ]


def add_episodes(sessions: sessionmaker[Session], names: list[str], at: float) -> None:
    """Ended, fully joined episodes of loop "rl" (one step each), not learned yet."""
    with sessions.begin() as session:
        for i, name in enumerate(names):
            session.add(Episode(loop="rl", episode_id=name, ended_at=at, terminated=True))
            session.add(
                Joined(
                    loop="rl",
                    event_id=name,
                    created_at=at,
                    joined_at=at,
                    mode="Online",
                    learnable=True,
                    reward=1.0,
                    rewarded=True,
                    imitated=False,
                    line=_line(str(i), 0, 1.0),
                    episode=name,
                )
            )


def test_a_fleet_of_learners_leaves_a_loop_to_the_one_that_keeps_its_model(
    postgres_url: str,
) -> None:
    """Two `dloop learn` processes (fleet learners) both try the RL loop every tick: the one
    that did not save its model leaves it to the one that did (else each turn would reopen and
    recall), and takes it over once that one has not saved it for `handover` (3 export
    intervals, at most 30 s: it stopped). A learner alone in its deployment (`dloop up`) never
    waits, nor does any for a model that learned nothing yet."""
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        loop = store.ensure_loop(session, name="rl", kind="rl", now=0.0)
        wait = handover(store.loop_settings(loop).export_every)
    a, b, alone = (
        Learners(sessions, source="x", stream="pos", fleet=f) for f in (True, True, False)
    )
    try:
        add_episodes(sessions, ["e0", "e1"], 1000.0)
        assert a.train_episodes("rl", now=1000.0).model is not None
        add_episodes(sessions, ["e2"], 1001.0)
        assert b.train_episodes("rl", now=1001.0).model is None  # a keeps it
        assert a.train_episodes("rl", now=1002.0).model is not None
        later = 1002.0 + wait + 0.5  # a saved nothing since: it stopped
        add_episodes(sessions, ["e3"], later)
        assert b.train_episodes("rl", now=later - 1).model is None
        assert b.train_episodes("rl", now=later).model is not None  # taken over
        add_episodes(sessions, ["e4"], later + 1)
        assert a.train_episodes("rl", now=later + 1).model is None  # now b keeps it
        assert alone.train_episodes("rl", now=later + 1).model is not None
        with sessions() as session:
            learned = session.scalars(select(Episode.learned).where(Episode.loop == "rl")).all()
        assert len(learned) == 5 and all(learned)
    finally:
        for learners in (a, b, alone):
            learners.close()
        engine.dispose()
