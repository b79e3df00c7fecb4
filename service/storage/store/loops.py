"""Loops: creating, listing and deleting them, the server secret, what each loop counts, and
the notification that tells every replica a loop's model or settings changed."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import and_, delete, func, select
from sqlalchemy.orm import Session

from learners.dsjson import timestamp
from service.core.schemas import LoopSettings, default_config, default_policy
from service.storage.models import (
    ActionStat,
    ApiKey,
    DeadLetter,
    Decision,
    Episode,
    Evaluation,
    FeatureImportance,
    GuardrailState,
    Joined,
    LogOffset,
    Loop,
    LoopStat,
    ModelCheckpoint,
    ModelPublication,
    Observation,
    OutcomeStat,
    RewardDefinition,
    ServerSecret,
)
from service.storage.store.common import dropped_name, insert


def ensure_loop(
    session: Session, *, name: str, kind: str, now: float, policy: str = "dloop-default"
) -> Loop:
    """The loop, created if missing, with the default `policy` of the deployment (Settings.
    default_policy; an existing loop keeps its own). Several processes may do this at once
    (the replicas of `dloop serve --workers N` all make sure the default loop exists as they
    start): the insert yields to a concurrent one, and the loop is read back, whoever created
    it."""
    loop = session.get(Loop, name)
    if loop is None:
        row = {
            "name": name,
            "kind": kind,
            "created_at": now,
            "config": default_config(now, kind),
            "policy": default_policy(kind, policy),
        }
        session.execute(insert(session, Loop).values(**row).on_conflict_do_nothing())
        loop = session.get(Loop, name)
        assert loop is not None
    return loop


def server_secret(session: Session, *, name: str, now: float) -> bytes:
    """The deployment-wide secret `name`, 32 random bytes made on first use. Replicas may ask
    at once: the insert yields to a concurrent one and the stored value is read back, so every
    process uses the same secret."""
    row = session.get(ServerSecret, name)
    if row is None:
        new = {"name": name, "value": secrets.token_bytes(32), "created_at": now}
        session.execute(insert(session, ServerSecret).values(**new).on_conflict_do_nothing())
        row = session.get(ServerSecret, name)
        assert row is not None
    return row.value


def loop_settings(loop: Loop) -> LoopSettings:
    return LoopSettings.from_doc(loop.config)


def list_loops(session: Session, names: Iterable[str] | None = None) -> Sequence[Loop]:
    stmt = select(Loop).order_by(Loop.name)
    if names is not None:
        stmt = stmt.where(Loop.name.in_(list(names)))
    return session.scalars(stmt).all()


def model_ids(session: Session, names: Iterable[str] | None = None) -> dict[str, str]:
    """The id of each loop's current model, for loops that have one (without its bytes)."""
    stmt = select(ModelCheckpoint.loop, ModelCheckpoint.model_id).where(
        ModelCheckpoint.model.is_not(None)
    )
    if names is not None:
        stmt = stmt.where(ModelCheckpoint.loop.in_(list(names)))
    return {loop: model_id for loop, model_id in session.execute(stmt)}


def current_model(session: Session, *, loop: str) -> tuple[str, bytes | None] | None:
    """A loop's current model id and bytes, read together."""
    row = session.execute(
        select(ModelCheckpoint.model_id, ModelCheckpoint.model).where(ModelCheckpoint.loop == loop)
    ).first()
    return None if row is None else (row[0], row[1])


def delete_loop(session: Session, *, name: str) -> None:
    tables = (
        Decision,
        Observation,
        Joined,
        Episode,
        Evaluation,
        FeatureImportance,
        LoopStat,
        ActionStat,
        OutcomeStat,
        ModelPublication,
        RewardDefinition,
        GuardrailState,
    )
    for table in (*tables, ModelCheckpoint, ApiKey):
        session.execute(delete(table).where(table.loop == name))
    session.execute(delete(LogOffset).where(LogOffset.name == dropped_name(name)))
    session.execute(delete(Loop).where(Loop.name == name))


def add_reward_definition(
    session: Session, *, loop: str, version: int, definition: str, now: float
) -> None:
    """Record a new version of a loop's reward definition (learners.reward) and when it was
    set."""
    session.merge(
        RewardDefinition(loop=loop, version=version, definition=definition, created_at=now)
    )


def reward_definitions(session: Session, *, loop: str) -> list[RewardDefinition]:
    """A loop's reward definition versions, oldest first (none: Personalizer's reward)."""
    stmt = select(RewardDefinition).where(RewardDefinition.loop == loop)
    return list(session.scalars(stmt.order_by(RewardDefinition.version)))


CHANGES_CHANNEL = "dloop_changes"


def notify_models(session: Session, loops: Sequence[str]) -> None:
    """Tell serving replicas (Postgres LISTEN) that these loops changed (a new model, loop,
    configuration or policy), at commit; they reload at once."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_notify(CHANGES_CHANNEL, ",".join(loops)[:7000])))


def dead_letter_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(DeadLetter)) or 0


def loop_counts(session: Session) -> dict[str, dict[str, int]]:
    """Counts for /metrics, by loop, in a few grouped queries whatever the number of loops:
    decisions by state, observations by status, dangling observations dropped (drop_dangling),
    and the learner's backlog (joined rows its model does not include yet; by joined seq on the
    embedded path, by stream position on the Kafka path)."""
    out: dict[str, dict[str, int]] = {}

    def put(loop: str, key: str, value: int) -> None:
        out.setdefault(loop, {"decisions_pending": 0, "decisions_joined": 0})[key] = value

    for loop, joined, n in session.execute(
        select(Decision.loop, Decision.joined, func.count()).group_by(
            Decision.loop, Decision.joined
        )
    ):
        put(loop, "decisions_joined" if joined else "decisions_pending", n)
    for loop, status, n in session.execute(
        select(Observation.loop, Observation.status, func.count()).group_by(
            Observation.loop, Observation.status
        )
    ):
        put(loop, f"observations_{status}", n)
    prefix = dropped_name("")
    for name, n in session.execute(
        select(LogOffset.name, LogOffset.offset).where(LogOffset.name.startswith(prefix))
    ):
        put(name[len(prefix) :], "observations_dropped", n)
    position = func.coalesce(Joined.pos, Joined.seq)
    learned = func.coalesce(ModelCheckpoint.position, 0)
    for loop, n in session.execute(
        select(Joined.loop, func.count())
        .outerjoin(ModelCheckpoint, ModelCheckpoint.loop == Joined.loop)
        .where(position > learned)
        .group_by(Joined.loop)
    ):
        put(loop, "learner_backlog", n)
    return out


def learner_backlog(session: Session, *, loop: str) -> int:
    """Joined rows of the loop its model does not include yet (an index range: cheap while
    the backlog is small, whatever the loop's history)."""
    learned = session.scalar(select(ModelCheckpoint.position).where(ModelCheckpoint.loop == loop))
    kafka = session.scalar(
        select(Joined.pos).where(Joined.loop == loop, Joined.pos.is_not(None)).limit(1)
    )
    column = Joined.pos if kafka is not None else Joined.seq
    return (
        session.scalar(select(func.count()).where(Joined.loop == loop, column > (learned or 0)))
        or 0
    )


def dead_letters_of(session: Session, *, loop: str) -> int:
    return (
        session.scalar(select(func.count()).select_from(DeadLetter).where(DeadLetter.loop == loop))
        or 0
    )


def model_examples(session: Session) -> dict[str, int]:
    """Examples in each loop's current model."""
    return dict(session.execute(select(ModelCheckpoint.loop, ModelCheckpoint.examples)).all())


def apprentice_metrics(session: Session, *, loop: str, batch: int = 1000) -> dict[str, Any] | None:
    """Personalizer's latestApprenticeModeMetrics over the loop's Apprentice-mode events."""
    base = and_(Joined.loop == loop, Joined.mode == "Apprentice")
    total = session.execute(
        select(
            func.count(),
            func.min(Joined.created_at),
            func.max(Joined.created_at),
            func.coalesce(func.sum(Joined.reward), 0.0),
        ).where(base)
    ).one()
    if not total[0]:
        return None
    rows = session.execute(
        select(Joined.reward, Joined.imitated).where(base).order_by(Joined.seq.desc()).limit(batch)
    ).all()
    imitated_total = session.execute(
        select(func.count(), func.coalesce(func.sum(Joined.reward), 0.0)).where(
            base, Joined.imitated.is_(True)
        )
    ).one()
    return {
        "startTime": timestamp(total[1]),
        "lastProcessedEventTime": timestamp(total[2]),
        "numberOfEvents": total[0],
        "sumOfRewards": float(total[3]),
        "numberOfImitatedEvents": imitated_total[0],
        "sumOfImitatedRewards": float(imitated_total[1]),
        "lastBatchMetrics": {
            "numberOfEvents": len(rows),
            "sumOfRewards": float(sum(r for r, _ in rows)),
            "numberOfImitatedEvents": sum(1 for _, i in rows if i),
            "sumOfImitatedRewards": float(sum(r for r, i in rows if i)),
        },
    }
