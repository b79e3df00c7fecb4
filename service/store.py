"""Data access: keyword-only functions taking the session first. Callers own the transaction."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from sqlalchemy import and_, delete, exists, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from learners.joiner import (
    BACKWARD_WINDOW,
    DecisionView,
    JoinRules,
    Obs,
    SlotDecision,
    in_window,
    is_complete,
    join,
    timestamp,
)
from service.models import (
    ApiKey,
    DeadLetter,
    Decision,
    Episode,
    Evaluation,
    FeatureImportance,
    Joined,
    LogOffset,
    Loop,
    ModelCheckpoint,
    Observation,
    ServerSecret,
)
from service.schemas import LoopSettings, default_config, default_policy

DEFAULT_LOOP = "default"


def _insert(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


# ---- loops and keys -------------------------------------------------------------------------


def ensure_loop(session: Session, *, name: str, kind: str, now: float) -> Loop:
    """The loop, created if missing. Several processes may do this at once (the replicas of
    `dloop serve --workers N` all make sure the default loop exists as they start): the insert
    yields to a concurrent one, and the loop is read back, whoever created it."""
    loop = session.get(Loop, name)
    if loop is None:
        row = {
            "name": name,
            "kind": kind,
            "created_at": now,
            "config": default_config(now),
            "policy": default_policy(kind),
        }
        session.execute(_insert(session, Loop).values(**row).on_conflict_do_nothing())
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
        session.execute(_insert(session, ServerSecret).values(**new).on_conflict_do_nothing())
        row = session.get(ServerSecret, name)
        assert row is not None
    return row.value


def loop_settings(loop: Loop) -> LoopSettings:
    return LoopSettings.from_doc(loop.config)


def list_loops(session: Session) -> Sequence[Loop]:
    return session.scalars(select(Loop).order_by(Loop.name)).all()


def delete_loop(session: Session, *, name: str) -> None:
    tables = (Decision, Observation, Joined, Episode, Evaluation, FeatureImportance)
    for table in (*tables, ModelCheckpoint, ApiKey):
        session.execute(delete(table).where(table.loop == name))
    session.execute(delete(Loop).where(Loop.name == name))


def new_key() -> str:
    return secrets.token_hex(16)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def add_key(session: Session, *, key: str, role: str, loop: str | None, now: float) -> None:
    stmt = _insert(session, ApiKey).values(
        key_hash=hash_key(key), role=role, loop=loop, created_at=now
    )
    session.execute(stmt.on_conflict_do_nothing())


def has_admin_key(session: Session) -> bool:
    return session.scalar(select(exists().where(ApiKey.role == "admin"))) or False


def key_table(session: Session) -> dict[str, tuple[str, str | None]]:
    return {k.key_hash: (k.role, k.loop) for k in session.scalars(select(ApiKey))}


# ---- ingestion from the decision log --------------------------------------------------------


def get_offset(session: Session, *, name: str) -> int:
    row = session.get(LogOffset, name)
    return row.offset if row else 0


def stored_offset(session: Session, *, name: str) -> int | None:
    row = session.get(LogOffset, name)
    return row.offset if row else None


def set_offset(session: Session, *, name: str, offset: int) -> None:
    stmt = _insert(session, LogOffset).values(name=name, offset=offset)
    session.execute(
        stmt.on_conflict_do_update(index_elements=["name"], set_={"offset": stmt.excluded.offset})
    )


_OBSERVATION_KEYS = {"loop", "id", "t"}
_DECISION_KEYS = _OBSERVATION_KEYS | {"deferred", "mode", "a", "p", "b", "m", "c"}
_SLOTS_KEYS = _OBSERVATION_KEYS | {"deferred", "mode", "s", "b", "m", "c"}
_EPISODE_KEYS = _OBSERVATION_KEYS | {"term"}


def ingest(session: Session, *, records: Iterable[bytes], source: str, now: float) -> int:
    """Store decision and observation records. The first decision for an eventId wins.

    An observation for an event that is already joined is stored as late. A record that cannot
    be read goes to the dead-letter table; returns how many did.
    """
    decisions: list[dict[str, Any]] = []
    observations: list[dict[str, Any]] = []
    dead: list[dict[str, Any]] = []
    ends: list[dict[str, Any]] = []
    for raw in records:
        try:
            r = orjson.loads(raw)
            kind = r["k"]
            if kind not in ("d", "m", "r", "a", "e") or not isinstance(r["id"], str):
                raise ValueError(f"unknown record kind {kind!r}")
            needed = {"d": _DECISION_KEYS, "m": _SLOTS_KEYS, "e": _EPISODE_KEYS}.get(
                kind, _OBSERVATION_KEYS
            )
            missing = needed - r.keys()
            if missing:
                raise KeyError(", ".join(sorted(missing)))
            float(r["t"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"[:512]
            dead.append(
                {
                    "source": source,
                    "record": raw.decode(errors="replace"),
                    "reason": reason,
                    "created_at": now,
                }
            )
            continue
        if kind in ("d", "m"):
            decisions.append(
                {
                    "loop": r["loop"],
                    "event_id": r["id"],
                    "created_at": r["t"],
                    "deferred": r["deferred"],
                    "mode": r["mode"],
                    "record": raw.decode(),
                    "joined": False,
                    "episode": r.get("ep"),
                }
            )
        elif kind == "e":
            ends.append(
                {
                    "loop": r["loop"],
                    "episode_id": r["id"],
                    "ended_at": r["t"],
                    "terminated": bool(r["term"]),
                    "learned": False,
                }
            )
        else:
            observations.append(
                {
                    "loop": r["loop"],
                    "event_id": r["id"],
                    "kind": "reward" if r["k"] == "r" else "activate",
                    "value": r.get("v"),
                    "received_at": r["t"],
                    "status": "pending",
                    "uid": r.get("u"),
                    "slot": r.get("slot"),
                }
            )
    # Core inserts (the table, not the mapped class): the ORM bulk path costs more per row.
    conn = session.connection()
    if dead:
        conn.execute(_insert(session, DeadLetter.__table__), dead)
    if decisions:
        conn.execute(_insert(session, Decision.__table__).on_conflict_do_nothing(), decisions)
    if ends:
        conn.execute(_insert(session, Episode.__table__).on_conflict_do_nothing(), ends)
    if observations:
        conn.execute(_insert(session, Observation.__table__).on_conflict_do_nothing(), observations)
        late = exists().where(
            Decision.loop == Observation.loop,
            Decision.event_id == Observation.event_id,
            Decision.joined.is_(True),
        )
        session.execute(
            update(Observation).where(Observation.status == "pending", late).values(status="late")
        )
    return len(dead)


# ---- join ------------------------------------------------------------------------------------


def _view(d: Decision) -> DecisionView:
    r = orjson.loads(d.record)
    slots: list[SlotDecision] = []
    if r["k"] == "m":  # multi-slot: the first slot stands for the decision where one is needed
        slots = [
            SlotDecision(s["id"], s["a"], s["p"], b) for s, b in zip(r["s"], r["b"], strict=True)
        ]
        ranking, probabilities, baseline = slots[0].ranking, slots[0].probabilities, r["b"][0]
    else:
        ranking, probabilities, baseline = r["a"], r["p"], r["b"]
    return DecisionView(
        event_id=d.event_id,
        created_at=d.created_at,
        deferred=d.deferred,
        mode=d.mode,
        context=r["c"].encode(),
        ranking=ranking,
        probabilities=probabilities,
        baseline=baseline,
        model_id=r["m"],
        episode=d.episode,
        slots=slots,
    )


def join_due(session: Session, *, loop: str, rules: JoinRules, now: float, limit: int) -> int:
    """Join decisions whose window closed, or that are complete early; returns how many."""
    # Orphans whose decision can no longer arrive are dangling.
    session.execute(
        update(Observation)
        .where(
            Observation.loop == loop,
            Observation.status == "pending",
            Observation.received_at < now - BACKWARD_WINDOW,
            ~exists().where(
                Decision.loop == Observation.loop, Decision.event_id == Observation.event_id
            ),
        )
        .values(status="dangling")
    )
    closed = select(Decision).where(
        Decision.loop == loop, Decision.joined.is_(False), Decision.created_at <= now - rules.wait
    )
    # Several joiners may run at once (Kafka path): each takes rows the others have not locked.
    candidates = list(
        session.scalars(
            closed.order_by(Decision.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True, of=Decision)
        )
    )
    if rules.aggregation == "earliest" and len(candidates) < limit:
        # Driven from the (few) pending rewards, not the (many) open decisions.
        open_ = (
            select(Decision)
            .join(
                Observation,
                and_(Observation.loop == Decision.loop, Observation.event_id == Decision.event_id),
            )
            .where(
                Observation.loop == loop,
                Observation.status == "pending",
                Observation.kind == "reward",
                Decision.joined.is_(False),
                Decision.created_at > now - rules.wait,
            )
        )
        candidates += session.scalars(
            open_.limit(limit - len(candidates)).with_for_update(skip_locked=True, of=Decision)
        )
    if not candidates:
        return 0
    by_event: dict[str, list[Observation]] = {d.event_id: [] for d in candidates}
    for o in session.scalars(
        select(Observation).where(
            Observation.loop == loop, Observation.event_id.in_(list(by_event))
        )
    ):
        by_event[o.event_id].append(o)
    joined_rows: list[dict[str, Any]] = []
    for d in candidates:
        view = _view(d)
        rows = by_event[d.event_id]
        obs = [Obs(o.kind, o.value, o.received_at, o.slot) for o in rows]
        if d.created_at > now - rules.wait and not is_complete(view, obs, rules):
            continue
        result = join(view, obs, rules)
        d.joined = True
        for o in rows:
            o.status = "joined" if in_window(d.created_at, o.received_at, rules.wait) else "late"
        joined_rows.append(
            {
                "loop": loop,
                "event_id": d.event_id,
                "created_at": d.created_at,
                "joined_at": now,
                "mode": d.mode,
                "learnable": result.learnable,
                "reward": result.reward,
                "rewarded": result.rewarded,
                "imitated": result.imitated,
                "line": result.line.decode(),
                "published": False,
                "episode": d.episode,
            }
        )
    if joined_rows:
        session.execute(_insert(session, Joined).on_conflict_do_nothing(), joined_rows)
    return len(joined_rows)


def trainable(row: Joined) -> bool:
    """Whether a joined interaction trains the model: activated (or not deferred) and not
    logged in LoggingOnly mode."""
    return row.learnable and row.mode != "LoggingOnly"


def joined_after(session: Session, *, loop: str, seq: int, limit: int) -> Sequence[Joined]:
    stmt = select(Joined).where(Joined.loop == loop, Joined.seq > seq).order_by(Joined.seq)
    return session.scalars(stmt.limit(limit)).all()


def joined_between(
    session: Session, *, loop: str, since: float, until_seq: int, after_seq: int = 0
) -> Sequence[Joined]:
    stmt = select(Joined).where(
        Joined.loop == loop,
        Joined.created_at >= since,
        Joined.seq > after_seq,
        Joined.seq <= until_seq,
    )
    return session.scalars(stmt.order_by(Joined.seq)).all()


def max_seq(session: Session, *, loop: str) -> int:
    return session.scalar(select(func.max(Joined.seq)).where(Joined.loop == loop)) or 0


def event(
    session: Session, *, loop: str, event_id: str
) -> tuple[Decision, Joined | None, Sequence[Observation]] | None:
    decision = session.get(Decision, (loop, event_id))
    if decision is None:
        return None
    joined = session.scalars(
        select(Joined).where(Joined.loop == loop, Joined.event_id == event_id)
    ).first()
    observations = session.scalars(
        select(Observation)
        .where(Observation.loop == loop, Observation.event_id == event_id)
        .order_by(Observation.received_at)
    ).all()
    return decision, joined, observations


# ---- evaluations ------------------------------------------------------------------------------


def list_evaluations(session: Session, *, loop: str) -> Sequence[Evaluation]:
    stmt = select(Evaluation).where(Evaluation.loop == loop).order_by(Evaluation.created_at)
    return session.scalars(stmt).all()


def list_feature_importances(session: Session, *, loop: str) -> Sequence[FeatureImportance]:
    stmt = select(FeatureImportance).where(FeatureImportance.loop == loop)
    return session.scalars(stmt.order_by(FeatureImportance.created_at)).all()


# ---- RL episodes -----------------------------------------------------------------------------


def complete_episodes(session: Session, *, loop: str, limit: int) -> Sequence[Episode]:
    """Ended episodes not learned yet whose every step is joined, oldest end first."""
    open_step = exists().where(
        Decision.loop == Episode.loop,
        Decision.episode == Episode.episode_id,
        Decision.joined.is_(False),
    )
    stmt = (
        select(Episode)
        .where(Episode.loop == loop, Episode.learned.is_(False), ~open_step)
        .order_by(Episode.ended_at)
        .limit(limit)
    )
    return session.scalars(stmt).all()


def episode_steps(
    session: Session, *, loop: str, episodes: Sequence[str]
) -> dict[str, list[Joined]]:
    """The joined steps of these episodes, each in the order they were ranked."""
    out: dict[str, list[Joined]] = {e: [] for e in episodes}
    stmt = (
        select(Joined)
        .where(Joined.loop == loop, Joined.episode.in_(list(episodes)))
        .order_by(Joined.created_at, Joined.seq)
    )
    for row in session.scalars(stmt):
        out[row.episode or ""].append(row)
    return out


def ended_episodes(session: Session, *, loop: str, since: float | None = None) -> Sequence[Episode]:
    stmt = select(Episode).where(Episode.loop == loop)
    if since is not None:
        stmt = stmt.where(Episode.ended_at >= since)
    return session.scalars(stmt.order_by(Episode.ended_at)).all()


def unlearn_episodes(session: Session, *, loop: str, since: float | None) -> None:
    """Mark a loop's episodes (ended since `since`; None: all) to be learned again."""
    stmt = update(Episode).where(Episode.loop == loop).values(learned=False)
    if since is not None:
        stmt = stmt.where(Episode.ended_at >= since)
    session.execute(stmt)


# ---- models ----------------------------------------------------------------------------------


def get_checkpoint(session: Session, *, loop: str) -> ModelCheckpoint | None:
    return session.get(ModelCheckpoint, loop)


def save_checkpoint(
    session: Session,
    *,
    loop: str,
    model_id: str,
    model: bytes | None,
    arguments: str,
    learned_seq: int,
    examples: int,
    now: float,
    reset: bool = False,
) -> None:
    row = session.get(ModelCheckpoint, loop)
    if row is None:
        row = ModelCheckpoint(loop=loop, created_at=now)
        session.add(row)
    if reset:
        row.created_at = now
    row.model_id = model_id
    row.model = model
    row.arguments = arguments
    row.learned_seq = learned_seq
    row.examples = examples
    row.modified_at = now


# ---- logs and metrics ------------------------------------------------------------------------


CHANGES_CHANNEL = "dloop_changes"


def notify_models(session: Session, loops: Sequence[str]) -> None:
    """Tell serving replicas (Postgres LISTEN) that these loops changed (a new model, loop,
    configuration or policy), at commit; they reload at once."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_notify(CHANGES_CHANNEL, ",".join(loops)[:7000])))


def apply_retention(session: Session, *, loop: str, before: float) -> None:
    """Delete the loop's logged events created (or received) before `before`."""
    session.execute(delete(Decision).where(Decision.loop == loop, Decision.created_at < before))
    session.execute(delete(Joined).where(Joined.loop == loop, Joined.created_at < before))
    session.execute(
        delete(Observation).where(Observation.loop == loop, Observation.received_at < before)
    )
    session.execute(delete(Episode).where(Episode.loop == loop, Episode.ended_at < before))


def dead_letter_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(DeadLetter)) or 0


def log_range(session: Session, *, loop: str) -> tuple[float, float] | None:
    lo, hi = session.execute(
        select(func.min(Decision.created_at), func.max(Decision.created_at)).where(
            Decision.loop == loop
        )
    ).one()
    return None if lo is None else (lo, hi)


def delete_logs(session: Session, *, loop: str) -> None:
    for table in (Decision, Observation, Joined, Episode):
        session.execute(delete(table).where(table.loop == loop))


def export_lines(
    session: Session, *, loop: str, since: float | None = None, until: float | None = None
) -> Iterable[str]:
    stmt = select(Joined.line).where(Joined.loop == loop)
    if since is not None:
        stmt = stmt.where(Joined.created_at >= since)
    if until is not None:
        stmt = stmt.where(Joined.created_at < until)
    return session.scalars(stmt.order_by(Joined.seq).execution_options(yield_per=1000))


def loop_counts(session: Session, *, loop: str) -> dict[str, int]:
    """Counts for /metrics: decisions by state and observations by status."""
    out = {"decisions_pending": 0, "decisions_joined": 0}
    for joined, n in session.execute(
        select(Decision.joined, func.count()).where(Decision.loop == loop).group_by(Decision.joined)
    ):
        out["decisions_joined" if joined else "decisions_pending"] = n
    for status, n in session.execute(
        select(Observation.status, func.count())
        .where(Observation.loop == loop)
        .group_by(Observation.status)
    ):
        out[f"observations_{status}"] = n
    return out


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


def list_keys(session: Session, *, loop: str) -> Sequence[ApiKey]:
    return session.scalars(select(ApiKey).where(ApiKey.loop == loop).order_by(ApiKey.id)).all()


def create_key(session: Session, *, role: str, loop: str | None, now: float) -> tuple[ApiKey, str]:
    """A new random key: the row (hash only) and the key itself, which is not stored."""
    key = new_key()
    row = ApiKey(key_hash=hash_key(key), role=role, loop=loop, created_at=now)
    session.add(row)
    session.flush()
    return row, key


def delete_key(session: Session, *, loop: str, key_id: int) -> bool:
    result = session.execute(delete(ApiKey).where(ApiKey.loop == loop, ApiKey.id == key_id))
    return bool(result.rowcount)  # type: ignore[attr-defined]


# ---- Kafka path: joined-stream outbox --------------------------------------------------------

OUTBOX_LOCK = 0x646C6F6F70  # "dloop": the Postgres advisory lock of the position assigner


def assign_positions(session: Session, *, limit: int) -> int:
    """Give unpublished joined rows gap-free per-loop positions, in seq order. One assigner at
    a time (a Postgres advisory lock held until commit); returns how many got one."""
    if session.get_bind().dialect.name == "postgresql":
        got = session.scalar(select(func.pg_try_advisory_xact_lock(OUTBOX_LOCK)))
        if not got:
            return 0
    rows = session.scalars(
        select(Joined)
        .where(Joined.published.is_(False), Joined.pos.is_(None))
        .order_by(Joined.seq)
        .limit(limit)
    ).all()
    last: dict[str, int] = {}
    for row in rows:
        if row.loop not in last:
            last[row.loop] = max_pos(session, loop=row.loop)
        last[row.loop] += 1
        row.pos = last[row.loop]
    return len(rows)


def unpublished(session: Session, *, limit: int) -> Sequence[Joined]:
    stmt = (
        select(Joined)
        .where(Joined.published.is_(False), Joined.pos.is_not(None))
        .order_by(Joined.loop, Joined.pos)
    )
    return session.scalars(stmt.limit(limit)).all()


def mark_published(session: Session, *, seqs: Sequence[int]) -> None:
    session.execute(update(Joined).where(Joined.seq.in_(list(seqs))).values(published=True))


def max_pos(session: Session, *, loop: str) -> int:
    """The newest position assigned in a loop's joined stream (0: none yet)."""
    return session.scalar(select(func.max(Joined.pos)).where(Joined.loop == loop)) or 0


def joined_by_pos(
    session: Session, *, loop: str, after: int, until: int, since: float | None = None
) -> Sequence[Joined]:
    """A loop's joined rows with stream positions in (after, until], created since `since`."""
    stmt = select(Joined).where(Joined.loop == loop, Joined.pos > after, Joined.pos <= until)
    if since is not None:
        stmt = stmt.where(Joined.created_at >= since)
    return session.scalars(stmt.order_by(Joined.pos)).all()


def reset_checkpoint(
    session: Session,
    *,
    loop: str,
    model: bytes | None,
    arguments: str,
    now: float,
    position: int | None = None,
    examples: int = 0,
) -> tuple[str, int]:
    """Replace a loop's model from the next event on; returns (model id, position it covers).

    Learners notice the new model id and rebuild from it. The embedded learner's position is a
    joined seq (moved to the newest); the Kafka path passes a stream `position` instead."""
    # A fresh id even for a blank model, so every learner notices the reset.
    model_id = uuid.uuid4().hex[:16]
    ckpt = get_checkpoint(session, loop=loop)
    if position is not None:
        seq = position
    else:
        seq = max(max_seq(session, loop=loop), ckpt.learned_seq if ckpt else 0)
    save_checkpoint(
        session,
        loop=loop,
        model_id=model_id,
        model=model,
        arguments=arguments,
        learned_seq=seq,
        examples=examples,
        now=now,
        reset=True,
    )
    return model_id, seq
