"""Which RL episodes a loop learns next, and how one is given up on; an episode's return
(the sum of its steps' rewards) goes to the loop's rollups the first time it is learned.

A bandit learner can learn each joined event as it comes; an RL target needs the whole episode
(later rewards, the next state's value). So RL loops learn from the database: every export tick
the worker's learner (service.pipeline.learning.train_episodes) takes the loop's ended, fully
joined, not yet learned episodes (`pending`), learns them in the worker's learning sandbox, and
in the same transaction saves the model and marks them learned (`Pending.learned`). A crash
before the commit leaves both as they were, so an episode is learned exactly once per model; a
Postgres advisory lock (`lock`) keeps two `dloop learn` processes from training one loop at the
same time, and a learner whose in-memory model is not the stored one reloads it first.

An episode VW refuses goes to the dead letters and is marked learned. One that crashes the
learning process cannot say which it was: the worker then learns episodes one at a time
(`limit=1`) and, when that crashes again, gives up on that one episode (`poison_episode`).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from learners import rollups
from learners.rl import MEMORY, WINDOW, recalled
from service.storage import store
from service.storage.models import Episode, Joined

SOURCE = "learn-episodes"

# What a trainer learns (learners.sandbox.RemoteTrainer.learn_episodes): per episode, its
# steps as (line, reward, learnable) and whether it terminated.
Batch = list[tuple[list[tuple[str, float, bool]], bool]]


def lock(session: Session, loop: str) -> None:
    """Hold the loop's episode-training lock until the transaction ends (Postgres only: SQLite
    has one writer, the embedded worker)."""
    if session.get_bind().dialect.name == "postgresql":
        key = zlib.crc32(f"dloop-rl/{loop}".encode())
        session.execute(select(func.pg_advisory_xact_lock(key)))


@dataclass
class Pending:
    """A loop's next complete episodes, with their joined steps."""

    loop: str
    episodes: Sequence[Episode]
    steps: dict[str, list[Joined]]

    def batch(self) -> Batch:
        return [
            (
                [(r.line, r.reward, store.trainable(r)) for r in self.steps[e.episode_id]],
                e.terminated,
            )
            for e in self.episodes
        ]

    def learned(self, session: Session, *, refused: list[tuple[int, str]], now: float) -> None:
        """Mark the episodes learned; those VW refused (index in the batch, why) go to the
        dead letters."""
        for i, reason in refused:
            _dead_letter(session, self.loop, self.steps[self.episodes[i].episode_id], reason, now)
        sums: dict[tuple[int, str], dict[str, float]] = {}
        for episode in self.episodes:
            episode.learned = True
            if not episode.counted:  # relearned after a reset: its return is counted already
                episode.counted = True
                ret = sum(r.reward for r in self.steps[episode.episode_id] if r.learnable)
                row = sums.setdefault((store.bucket_of(episode.ended_at), ""), {})
                rollups.add(row, {"episodes": 1, "return_sum": ret, "return_sq": ret * ret})
        store.add_stats(session, loop=self.loop, sums=sums)


def pending(session: Session, *, loop: str, limit: int) -> Pending | None:
    """The loop's next complete episodes not learned yet (at most `limit`), None if there are
    none; call it holding `lock`."""
    episodes = store.complete_episodes(session, loop=loop, limit=limit)
    if not episodes:
        return None
    steps = store.episode_steps(session, loop=loop, episodes=[e.episode_id for e in episodes])
    return Pending(loop, episodes, steps)


# A reopened trainer is given back its episodes in calls of about this many steps.
RECALL_STEPS = 2000


def recall(
    session: Session,
    *,
    loop: str,
    window: int = WINDOW,
    memory: int = MEMORY,
    chunk: int = RECALL_STEPS,
    page: int = 500,
) -> Iterator[Batch]:
    """The loop's learned episodes a trainer keeps (its replay window and outcome counts,
    learners.rl.recalled), oldest first, in batches of about `chunk` steps: what a
    trainer reopened from the loop's model is given back (RemoteTrainer.remember_episodes).
    Episodes with a step in the dead letters are left out (a learner gave up on them)."""
    kept: list[tuple[str, bool, int]] = []  # latest first
    while True:
        rows = store.learned_episodes(session, loop=loop, offset=len(kept), limit=page, dead=SOURCE)
        kept += rows
        n = recalled([size for _, _, size in kept], window=window, memory=memory)
        if n < len(kept) or len(rows) < page:
            del kept[n:]
            break
    kept.reverse()
    start, size = 0, 0
    for i, (_, _, n) in enumerate(kept):
        size += n
        if size >= chunk or i == len(kept) - 1:
            part = kept[start : i + 1]
            steps = store.episode_steps(session, loop=loop, episodes=[e for e, _, _ in part])
            yield [
                ([(r.line, r.reward, store.trainable(r)) for r in steps[e]], terminated)
                for e, terminated, _ in part
            ]
            start, size = i + 1, 0


def poison_episode(session: Session, *, loop: str, reason: str, now: float) -> bool:
    """Give up on the loop's next complete episode (it crashed the learning process on its own):
    dead-letter its steps and mark it learned. False if there was none."""
    lock(session, loop)
    episodes = store.complete_episodes(session, loop=loop, limit=1)
    if not episodes:
        return False
    episode = episodes[0]
    steps = store.episode_steps(session, loop=loop, episodes=[episode.episode_id])
    _dead_letter(session, loop, steps[episode.episode_id], reason, now)
    episode.learned = True
    return True


def _dead_letter(session: Session, loop: str, rows: list[Joined], reason: str, now: float) -> None:
    for row in rows:
        store.dead_letter(
            session, source=SOURCE, loop=loop, ref=row.seq, record=row.line, reason=reason, now=now
        )
