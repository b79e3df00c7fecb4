"""`dloop replay`: train a model from a loop's logged interactions alone (offline).

Bandit loops relearn their joined lines in order; RL loops relearn their ended episodes
(learners.rl), several passes over the log since offline data is all there is. Bandit logs
come from any source of service.pipeline.sources (database, joined Kafka topic, DSJSON files);
RL episodes from the loop's database, which keeps how each episode ended. The trainer is the
live learners' (service.pipeline.learning), in a learning process of its own; unlike them, a
replay stops at the first line VW refuses: a model of the log is all it is for.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from sqlalchemy.orm import Session

from learners.policy import with_exploration
from service.core.kinds import CB, RL, loop_kind
from service.pipeline import learning
from service.pipeline.episodes import Batch
from service.storage import store
from service.storage.models import Loop

CHUNK = 1000  # lines (RL: episodes) per call to the learning process

T = TypeVar("T")


def replay_lines(
    lines: Iterable[str], arguments: str, *, passes: int = 1, progress: bool = True
) -> bytes:
    """A bandit model trained from scratch on DSJSON lines (any source)."""
    from tqdm import tqdm

    kept = list(lines)
    with learning.sandbox() as host:
        learner = learning.start(host, None, loop="replay", kind=CB, arguments=arguments)
        for _ in range(passes):
            with tqdm(total=len(kept), desc="replay", unit="ev", disable=not progress) as bar:
                for chunk in _chunks(kept):
                    _refused(learner.trainer.learn_lines(chunk), "line")
                    bar.update(len(chunk))
        return learner.trainer.to_bytes()


def replay_model(
    session: Session,
    *,
    loop: str,
    arguments: str | None = None,
    passes: int = 1,
    progress: bool = True,
) -> bytes:
    """A model trained from scratch on the loop's logs (with its policy or `arguments`)."""
    from tqdm import tqdm

    row = session.get(Loop, loop)
    if row is None:
        raise ValueError(f"loop '{loop}' does not exist")
    settings = store.loop_settings(row)
    args = arguments or row.policy["arguments"]
    if not loop_kind(row.kind).episodic:
        return replay_lines(
            store.export_lines(session, loop=loop),
            with_exploration(args, settings.exploration),
            passes=passes,
            progress=progress,
        )
    episodes = store.ended_episodes(session, loop=loop)
    steps = store.episode_steps(session, loop=loop, episodes=[e.episode_id for e in episodes])
    batch: Batch = [
        ([(r.line, r.reward, store.trainable(r)) for r in steps[e.episode_id]], e.terminated)
        for e in episodes
    ]
    gamma = settings.discount
    with learning.sandbox() as host:
        learner = learning.start(host, None, loop=loop, kind=RL, arguments=args, gamma=gamma)
        bar = tqdm(total=passes * len(batch), desc=f"replay {loop}", disable=not progress)
        for _ in range(passes):
            for chunk in _chunks(batch):
                _refused(learner.trainer.learn_episodes(chunk, gamma), "episode")
                bar.update(len(chunk))
        bar.close()
        return learner.trainer.to_bytes()


def _chunks(items: Sequence[T]) -> Iterator[list[T]]:
    for i in range(0, len(items), CHUNK):
        yield list(items[i : i + CHUNK])


def _refused(refused: list[tuple[int, str]], what: str) -> None:
    if refused:
        i, why = refused[0]
        raise ValueError(f"Vowpal Wabbit refused a {what} of the log ({i} of its batch): {why}")
