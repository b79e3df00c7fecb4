"""Changes to a loop's policy and model that every learner and replica must follow: saving a
new configuration or policy (a change of the trained VW arguments resets the model and retrains
it on recent history), and replacing the model (an import, a reset).

Used by the configuration and model routes and by auto-optimisation alike, so a policy applied
by either takes the same path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.core.schemas import LoopSettings
from service.pipeline import learning
from service.pipeline.embedded import EmbeddedWorker
from service.pipeline.learner_process import LearnerProcess
from service.pipeline.runtime import LoopRuntime, Registry
from service.storage import store
from service.storage.models import Loop


@dataclass
class LoopControl:
    """What a policy or model change touches: the database (every replica and learner reads
    it), this process's registry of served models and, embedded, the learner thread."""

    sessions: sessionmaker[Session]
    registry: Registry
    worker: EmbeddedWorker | LearnerProcess | None
    clock: Callable[[], float]
    database_url: str

    def save(self, rt: LoopRuntime, *, config: dict[str, Any], policy: dict[str, str]) -> None:
        """Store a loop's configuration and policy; a change of the trained VW arguments
        resets the model and retrains it on the last modelRetrainDays of joined events, and so
        does a new reward definition (its version is recorded with when it was set)."""
        before = rt.arguments
        version = rt.config.get("rewardDefinitionVersion", 0)
        changed = config.get("rewardDefinitionVersion", 0) != version
        with self.sessions.begin() as session:
            loop = session.get(Loop, rt.name)
            assert loop is not None
            loop.config, loop.policy = config, policy
            guarded = LoopSettings.from_doc(config).guardrails
            if guarded:  # a new guardrail's window starts when it is set
                keys = [g.key for g in guarded]
                store.start_guardrails(session, loop=rt.name, keys=keys, now=self.clock())
            if changed:
                store.add_reward_definition(
                    session,
                    loop=rt.name,
                    version=config.get("rewardDefinitionVersion", 0),
                    definition=config.get("rewardDefinition") or "reward",
                    now=self.clock(),
                )
            store.notify_models(session, [rt.name])  # other replicas reload at once
        self.registry.update(rt.name, config=config, policy=policy)
        if rt.arguments != before or changed:
            days = rt.settings.retrain_days
            since = self.clock() - days * 86400 if days else None
            self.reset_model(rt.name, model=None, retrain_since=since)

    def save_policy(self, rt: LoopRuntime, policy: dict[str, str]) -> None:
        self.save(rt, config=rt.config, policy=policy)

    def reset_model(
        self, name: str, *, model: bytes | None, retrain_since: float | None = None
    ) -> None:
        """Replace a loop's model (None: blank) from the next event on; with `retrain_since`
        the blank model is first trained on the loop's joined events since then."""
        if self.worker is not None:
            self.worker.reset(name, model=model, retrain_since=retrain_since)
            return
        # Kafka path: the model covers the loop's joined stream up to its newest position (the
        # learner learns what follows from there); a retrain trains it on those rows here.
        rt = self.registry.loops[name]
        now = self.clock()
        with self.sessions.begin() as session:
            position = store.max_pos(session, loop=name)
            model_id, _ = store.reset_checkpoint(
                session, loop=name, model=model, arguments=rt.arguments, now=now, position=position
            )
            if retrain_since is not None and model is None:
                if rt.loop_kind.episodic:
                    # RL loops learn episodes from the database: the learner retrains them.
                    store.unlearn_episodes(session, loop=name, since=retrain_since)
                else:
                    rows = store.joined_by_pos(
                        session, loop=name, after=0, until=position, since=retrain_since
                    )
                    rules = rt.settings.rules.rewards
                    lines = [learning.labelled(r, rules) for r in rows if store.trainable(r)]
                    retrained = learning.retrain(
                        session,
                        loop=name,
                        kind=rt.loop_kind,
                        arguments=rt.arguments,
                        lines=lines,
                        now=now,
                    )
                    if retrained is not None:
                        model, model_id = retrained
        self.registry.publish(name, model, model_id)
