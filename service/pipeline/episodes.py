"""Train RL loops from complete episodes in the database (embedded worker and `dloop learn`).

A bandit learner can learn each joined event as it comes; an RL target needs the whole episode
(later rewards, the next state's value). So RL loops learn from the database: every export tick,
`train_episodes` takes the loop's ended, fully joined, not yet learned episodes, learns them
(learners.rl, in the worker's learning sandbox), and in the same transaction saves the model and
marks them learned. A crash before the commit leaves both as they were, so an episode is
learned exactly once per model; a Postgres advisory lock keeps two `dloop learn` processes from
training one loop at the same time, and a learner whose in-memory model is not the stored one
reloads it first.

An episode VW refuses goes to the dead letters and is marked learned. One that crashes the
learning process cannot say which it was: the caller then learns episodes one at a time
(`limit=1`) and, when that crashes again, gives up on that one episode (`poison_episode`).
"""

from __future__ import annotations

import uuid
import zlib
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from learners.sandbox import NativeCrash, RemoteTrainer, TrainerHost
from service.storage import store
from service.storage.models import Joined, Loop

SOURCE = "learn-episodes"


@dataclass
class EpisodeLearner:
    trainer: RemoteTrainer
    model_id: str


def load_learner(session: Session, loop: Loop, arguments: str, host: TrainerHost) -> EpisodeLearner:
    """The loop's stored model if it was trained with `arguments`, else a blank one."""
    ckpt = store.get_checkpoint(session, loop=loop.name)
    gamma = store.loop_settings(loop).discount
    if ckpt is not None and ckpt.model is not None and ckpt.arguments == arguments:
        trainer = host.open(
            loop.name,
            kind="rl",
            args=arguments,
            model=ckpt.model,
            examples=ckpt.examples,
            gamma=gamma,
        )
    else:
        trainer = host.open(loop.name, kind="rl", args=arguments, gamma=gamma)
    return EpisodeLearner(trainer, ckpt.model_id if ckpt is not None else "N/A")


def _lock(session: Session, loop: str) -> None:
    if session.get_bind().dialect.name == "postgresql":
        key = zlib.crc32(f"dloop-rl/{loop}".encode())
        session.execute(select(func.pg_advisory_xact_lock(key)))


def train_episodes(
    session: Session,
    loop: Loop,
    learner: EpisodeLearner | None,
    *,
    arguments: str,
    now: float,
    host: TrainerHost,
    limit: int = 1000,
) -> tuple[EpisodeLearner, bytes | None]:
    """Learn the loop's complete episodes in the caller's transaction; returns the learner and
    the new model's bytes (None if there was nothing to learn)."""
    _lock(session, loop.name)
    ckpt = store.get_checkpoint(session, loop=loop.name)
    stored_id = ckpt.model_id if ckpt is not None else "N/A"
    if (
        learner is None
        or learner.trainer.lost
        or learner.model_id != stored_id
        or learner.trainer.args != arguments
    ):
        learner = load_learner(session, loop, arguments, host)
    episodes = store.complete_episodes(session, loop=loop.name, limit=limit)
    if not episodes:
        return learner, None
    steps = store.episode_steps(session, loop=loop.name, episodes=[e.episode_id for e in episodes])
    batch = [
        (
            [(row.line, row.reward, store.trainable(row)) for row in steps[e.episode_id]],
            e.terminated,
        )
        for e in episodes
    ]
    errors = learner.trainer.learn_episodes(batch, store.loop_settings(loop).discount)
    for i, reason in errors:
        _dead_letter(session, loop.name, steps[episodes[i].episode_id], reason, now)
    for episode in episodes:
        episode.learned = True
    model = learner.trainer.to_bytes()
    learner.model_id = uuid.uuid4().hex[:16]
    store.save_checkpoint(
        session,
        loop=loop.name,
        model_id=learner.model_id,
        model=model,
        arguments=arguments,
        position=ckpt.position if ckpt is not None else 0,
        examples=learner.trainer.examples,
        now=now,
    )
    store.notify_models(session, [loop.name])
    return learner, model


@dataclass
class Trained:
    learner: EpisodeLearner | None  # None: the loop is gone, or the learning process died
    model: bytes | None  # a new model, if anything was learned
    crashed: bool = False  # the learning process died: every trainer in it is lost


def train_in_turn(
    sessions: sessionmaker[Session],
    *,
    loop: str,
    learner: EpisodeLearner | None,
    now: float,
    host: TrainerHost,
    careful: bool,
) -> Trained:
    """`train_episodes` for a worker, in a transaction of its own. `careful` (the learning
    process died on this loop's episodes before): one episode, and if the process dies on it
    too, that episode is dead-lettered (poison_episode)."""
    try:
        with sessions.begin() as session:
            row = session.get(Loop, loop)
            if row is None:
                return Trained(None, None)
            learner, model = train_episodes(
                session,
                row,
                learner,
                arguments=row.policy["arguments"],
                now=now,
                host=host,
                limit=1 if careful else 1000,
            )
        return Trained(learner, model)
    except NativeCrash as exc:
        if careful:
            with sessions.begin() as session:
                reason = f"native crash while learning the episode: {exc}"
                poison_episode(session, loop=loop, reason=reason, now=now)
        return Trained(None, None, crashed=True)


def poison_episode(session: Session, *, loop: str, reason: str, now: float) -> bool:
    """Give up on the loop's next complete episode (it crashed the learning process on its own):
    dead-letter its steps and mark it learned. False if there was none."""
    _lock(session, loop)
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
