"""Train RL loops from complete episodes in the database (embedded worker and `dloop learn`).

A bandit learner can learn each joined event as it comes; an RL target needs the whole episode
(later rewards, the next state's value). So RL loops learn from the database: every export tick,
`train_episodes` takes the loop's ended, fully joined, not yet learned episodes, learns them
(learners.rl), and in the same transaction saves the model and marks them learned. A crash
before the commit leaves both as they were, so an episode is learned exactly once per model; a
Postgres advisory lock keeps two `dloop learn` processes from training one loop at the same
time, and a learner whose in-memory model is not the stored one reloads it first.
"""

from __future__ import annotations

import uuid
import zlib
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from learners.rl import RLTrainer, Step
from service import store
from service.models import Loop


@dataclass
class EpisodeLearner:
    trainer: RLTrainer
    model_id: str


def load_learner(session: Session, loop: Loop, arguments: str) -> EpisodeLearner:
    """The loop's stored model if it was trained with `arguments`, else a blank one."""
    ckpt = store.get_checkpoint(session, loop=loop.name)
    gamma = store.loop_settings(loop).discount
    if ckpt is not None and ckpt.model is not None and ckpt.arguments == arguments:
        trainer = RLTrainer(arguments, ckpt.model, ckpt.examples, gamma=gamma)
    else:
        trainer = RLTrainer(arguments, gamma=gamma)
    return EpisodeLearner(trainer, ckpt.model_id if ckpt is not None else "N/A")


def train_episodes(
    session: Session,
    loop: Loop,
    learner: EpisodeLearner | None,
    *,
    arguments: str,
    now: float,
    limit: int = 1000,
) -> tuple[EpisodeLearner, bytes | None]:
    """Learn the loop's complete episodes in the caller's transaction; returns the learner and
    the new model's bytes (None if there was nothing to learn)."""
    if session.get_bind().dialect.name == "postgresql":
        key = zlib.crc32(f"dloop-rl/{loop.name}".encode())
        session.execute(select(func.pg_advisory_xact_lock(key)))
    ckpt = store.get_checkpoint(session, loop=loop.name)
    stored_id = ckpt.model_id if ckpt is not None else "N/A"
    if learner is None or learner.model_id != stored_id or learner.trainer.args != arguments:
        learner = load_learner(session, loop, arguments)
    learner.trainer.gamma = store.loop_settings(loop).discount
    episodes = store.complete_episodes(session, loop=loop.name, limit=limit)
    if not episodes:
        return learner, None
    steps = store.episode_steps(session, loop=loop.name, episodes=[e.episode_id for e in episodes])
    for episode in episodes:
        rows = steps[episode.episode_id]
        learner.trainer.learn_episode(
            [Step(row.line, row.reward, store.trainable(row)) for row in rows],
            episode.terminated,
        )
        episode.learned = True
    model = learner.trainer.to_bytes()
    learner.model_id = uuid.uuid4().hex[:16]
    store.save_checkpoint(
        session,
        loop=loop.name,
        model_id=learner.model_id,
        model=model,
        arguments=arguments,
        learned_seq=ckpt.learned_seq if ckpt is not None else 0,
        examples=learner.trainer.examples,
        now=now,
    )
    store.notify_models(session, [loop.name])
    return learner, model
