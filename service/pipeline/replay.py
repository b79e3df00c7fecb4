"""`dloop replay`: train a model from a loop's logged interactions alone (offline).

Bandit loops relearn their joined lines in order; RL loops relearn their ended episodes
(learners.rl), several passes over the log since offline data is all there is. Bandit logs
come from any source of learners.sources (database, joined Kafka topic, DSJSON files); RL
episodes from the loop's database, which keeps how each episode ended.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy.orm import Session

from learners.cb import CBTrainer
from learners.policy import with_exploration
from learners.rl import RLTrainer, Step
from service.storage import store
from service.storage.models import Loop


def replay_lines(
    lines: Iterable[str], arguments: str, *, passes: int = 1, progress: bool = True
) -> bytes:
    """A bandit model trained from scratch on DSJSON lines (any source)."""
    from tqdm import tqdm

    cb = CBTrainer(arguments)
    kept = list(lines)
    for _ in range(passes):
        for line in tqdm(kept, desc="replay", unit="ev", disable=not progress):
            cb.learn_text(line)
    return cb.to_bytes()


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
    if row.kind == "rl":
        episodes = store.ended_episodes(session, loop=loop)
        steps = store.episode_steps(session, loop=loop, episodes=[e.episode_id for e in episodes])
        trainer = RLTrainer(args, gamma=settings.discount)
        bar = tqdm(total=passes * len(episodes), desc=f"replay {loop}", disable=not progress)
        for _ in range(passes):
            for episode in episodes:
                rows = steps[episode.episode_id]
                trainer.learn_episode(
                    [Step(r.line, r.reward, store.trainable(r)) for r in rows], episode.terminated
                )
                bar.update()
        bar.close()
        return trainer.to_bytes()
    return replay_lines(
        store.export_lines(session, loop=loop),
        with_exploration(args, settings.exploration),
        passes=passes,
        progress=progress,
    )
