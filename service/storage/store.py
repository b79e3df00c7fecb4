"""Data access: keyword-only functions taking the session first. Callers own the transaction."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import and_, delete, exists, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from learners.dsjson import timestamp
from learners.features import FeatureError, clean_context, clean_line
from learners.joiner import (
    BACKWARD_WINDOW,
    DecisionView,
    JoinRules,
    Obs,
    SlotDecision,
    in_window,
    is_complete,
    join,
)
from service.core.schemas import LoopSettings, default_config, default_policy
from service.storage.models import (
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

DEFAULT_LOOP = "default"


def _insert(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


# ---- loops and keys -------------------------------------------------------------------------


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
            "config": default_config(now),
            "policy": default_policy(kind, policy),
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
    tables = (Decision, Observation, Joined, Episode, Evaluation, FeatureImportance)
    for table in (*tables, ModelCheckpoint, ApiKey):
        session.execute(delete(table).where(table.loop == name))
    session.execute(delete(LogOffset).where(LogOffset.name == _dropped(name)))
    session.execute(delete(Loop).where(Loop.name == name))


def new_key() -> str:
    return secrets.token_hex(16)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS_LOCK = 0x646C6B6579  # "dlkey": the Postgres advisory lock of install_env_key


def install_env_key(session: Session, *, key: str, now: float) -> None:
    """Make `key` (DLOOP_API_KEY) the one environment admin key: stored with source "env" and
    every other env-sourced key deleted; keys made through the API or CLI stay. Replicas
    starting together run this at once: one at a time (a Postgres advisory lock held until
    commit), so replicas started with different keys leave one of them, never a deadlock."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(KEYS_LOCK)))
    env = {"role": "admin", "loop": None, "source": "env", "label": None, "expires_at": None}
    stmt = _insert(session, ApiKey).values(key_hash=hash_key(key), created_at=now, **env)
    session.execute(stmt.on_conflict_do_update(index_elements=[ApiKey.key_hash], set_=env))
    session.execute(delete(ApiKey).where(ApiKey.source == "env", ApiKey.key_hash != hash_key(key)))


def _valid_admin(now: float) -> Any:
    return and_(ApiKey.role == "admin", or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now))


def has_admin_key(session: Session, *, now: float) -> bool:
    """Whether some admin key is valid (not expired) at `now`."""
    return session.scalar(select(exists().where(_valid_admin(now)))) or False


def key_table(session: Session) -> dict[str, tuple[str, str | None, float | None]]:
    """Every key by hash: (role, loop, expiry or None)."""
    return {k.key_hash: (k.role, k.loop, k.expires_at) for k in session.scalars(select(ApiKey))}


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


@dataclass
class Ingested:
    dead: int  # records that went to the dead letters
    loops: set[str]  # loops that got decisions, observations or episode ends


def ingest(session: Session, *, records: Iterable[bytes], source: str, now: float) -> Ingested:
    """Store decision and observation records. The first decision for an eventId wins.

    An observation for an event that is already joined is stored as late. A record that cannot
    be read goes to the dead-letter table.
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
            for key in ("id", "ep", "slot", "loop"):
                if "\x00" in str(r.get(key) or ""):  # Postgres refuses NUL in text
                    raise ValueError(f"NUL in {key}")
            if kind in ("d", "m"):
                # Features VW must never see (learners.features): the log may hold records
                # from an older version or another producer on the events topic.
                c = orjson.loads(r["c"])
                cleaned = clean_context(c)
                if cleaned != c:
                    r["c"] = orjson.dumps(cleaned).decode()
                    raw = orjson.dumps(r)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as exc:
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
    loops = {str(r["loop"]) for r in (*decisions, *observations, *ends)}
    return Ingested(len(dead), loops)


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


MAX_DANGLING = 10_000


def _dropped(loop: str) -> str:
    # The running count lives beside the log offsets (a name and a 64-bit integer) rather than
    # in a table of its own.
    return f"dropped-dangling/{loop}"


def drop_dangling(session: Session, *, loop: str, keep: int) -> int:
    """Delete a loop's oldest dangling observations beyond the newest `keep` (rewards for
    eventIds that never got a decision would otherwise pile up without limit); returns how
    many, also added to the loop's `observations_dropped` count in loop_counts."""
    # Ids follow ingestion order, which is arrival order up to the spread between partitions.
    newest_dropped = session.scalar(
        select(Observation.id)
        .where(Observation.loop == loop, Observation.status == "dangling")
        .order_by(Observation.id.desc())
        .offset(keep)
        .limit(1)
    )
    if newest_dropped is None:
        return 0
    result = session.execute(
        delete(Observation).where(
            Observation.loop == loop,
            Observation.status == "dangling",
            Observation.id <= newest_dropped,
        )
    )
    n = int(result.rowcount)  # type: ignore[attr-defined]
    stmt = _insert(session, LogOffset).values(name=_dropped(loop), offset=n)
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["name"], set_={"offset": LogOffset.offset + stmt.excluded.offset}
        )
    )
    return n


def join_due(
    session: Session,
    *,
    loop: str,
    rules: JoinRules,
    now: float,
    limit: int,
    max_dangling: int = MAX_DANGLING,
) -> int:
    """Join decisions whose window closed, or that are complete early; returns how many.
    Keeps at most `max_dangling` dangling observations in the loop (drop_dangling)."""
    # Orphans whose decision can no longer arrive are dangling.
    marked = session.execute(
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
    if marked.rowcount:  # type: ignore[attr-defined]
        drop_dangling(session, loop=loop, keep=max_dangling)
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


def next_join_at(session: Session, *, loop: str, wait: float) -> float | None:
    """When `join_due` will next have work in this loop: the end of its oldest open decision's
    window, or when its oldest orphan observation turns dangling (None: nothing is pending).
    A reward that completes a decision early arrives through ingestion, which looks at once."""
    oldest = session.scalar(
        select(func.min(Decision.created_at)).where(
            Decision.loop == loop, Decision.joined.is_(False)
        )
    )
    orphan = session.scalar(
        select(func.min(Observation.received_at)).where(
            Observation.loop == loop, Observation.status == "pending"
        )
    )
    times = [t + w for t, w in ((oldest, wait), (orphan, BACKWARD_WINDOW)) if t is not None]
    return min(times, default=None)


def loops_with_pending(session: Session) -> set[str]:
    """Loops with open decisions or pending observations (the worker's start-up view)."""
    open_ = select(Decision.loop).where(Decision.joined.is_(False)).distinct()
    pending = select(Observation.loop).where(Observation.status == "pending").distinct()
    return set(session.scalars(open_)) | set(session.scalars(pending))


def loops_to_learn(session: Session) -> set[str]:
    """Loops with joined rows their model does not include yet (the worker's start-up view)."""
    newest = select(Joined.loop, func.max(Joined.seq)).group_by(Joined.loop)
    learned = dict(session.execute(select(ModelCheckpoint.loop, ModelCheckpoint.learned_seq)).all())
    return {loop for loop, seq in session.execute(newest).all() if seq > learned.get(loop, 0)}


def dead_letter(
    session: Session, *, source: str, loop: str, ref: int, record: str, reason: str, now: float
) -> None:
    """Keep an interaction a learner could not learn, with why; no learner tries it again."""
    session.add(
        DeadLetter(
            source=source, loop=loop, ref=ref, record=record, reason=reason[:512], created_at=now
        )
    )


def poisoned(session: Session, *, source: str, loop: str, after: int) -> set[int]:
    """Positions past `after` in the loop's joined stream that a learner dead-lettered."""
    stmt = select(DeadLetter.ref).where(
        DeadLetter.loop == loop, DeadLetter.source == source, DeadLetter.ref > after
    )
    return {ref for ref in session.scalars(stmt) if ref is not None}


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


def apply_retention(session: Session, *, loops: Sequence[str], before: float) -> None:
    """Delete these loops' logged events created (or received) before `before`."""
    for i in range(0, len(loops), 500):
        chunk = list(loops[i : i + 500])
        session.execute(
            delete(Decision).where(Decision.loop.in_(chunk), Decision.created_at < before)
        )
        session.execute(delete(Joined).where(Joined.loop.in_(chunk), Joined.created_at < before))
        session.execute(
            delete(Observation).where(Observation.loop.in_(chunk), Observation.received_at < before)
        )
        session.execute(delete(Episode).where(Episode.loop.in_(chunk), Episode.ended_at < before))


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
) -> Iterator[str]:
    """The loop's joined DSJSON lines in join order, for offline tools (export, replay,
    evaluation). Rows written before features were cleaned at ingestion are cleaned here, and
    a line that cannot be is left out."""
    stmt = select(Joined.line).where(Joined.loop == loop)
    if since is not None:
        stmt = stmt.where(Joined.created_at >= since)
    if until is not None:
        stmt = stmt.where(Joined.created_at < until)
    for line in session.scalars(stmt.order_by(Joined.seq).execution_options(yield_per=1000)):
        try:
            yield clean_line(line)
        except FeatureError:
            continue


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
    prefix = _dropped("")
    for name, n in session.execute(
        select(LogOffset.name, LogOffset.offset).where(LogOffset.name.startswith(prefix))
    ):
        put(name[len(prefix) :], "observations_dropped", n)
    position = func.coalesce(Joined.pos, Joined.seq)
    learned = func.coalesce(ModelCheckpoint.learned_seq, 0)
    for loop, n in session.execute(
        select(Joined.loop, func.count())
        .outerjoin(ModelCheckpoint, ModelCheckpoint.loop == Joined.loop)
        .where(position > learned)
        .group_by(Joined.loop)
    ):
        put(loop, "learner_backlog", n)
    return out


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


def list_keys(session: Session, *, loop: str | None) -> Sequence[ApiKey]:
    """A loop's client keys, or with loop None the admin keys."""
    where = ApiKey.loop == loop if loop is not None else ApiKey.role == "admin"
    return session.scalars(select(ApiKey).where(where).order_by(ApiKey.id)).all()


def create_key(
    session: Session,
    *,
    role: str,
    loop: str | None,
    now: float,
    source: str,
    label: str | None = None,
    expires_at: float | None = None,
) -> tuple[ApiKey, str]:
    """A new random key: the row (hash only) and the key itself, which is not stored."""
    key = new_key()
    row = ApiKey(
        key_hash=hash_key(key),
        role=role,
        loop=loop,
        created_at=now,
        source=source,
        label=label,
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return row, key


def all_keys(session: Session) -> Sequence[ApiKey]:
    return session.scalars(select(ApiKey).order_by(ApiKey.id)).all()


def get_key(session: Session, *, key_id: int) -> ApiKey | None:
    # Ids are 32-bit (INTEGER in Postgres): anything else names no key (and would overflow).
    if not 0 < key_id < 1 << 31:
        return None
    return session.get(ApiKey, key_id)


class LastAdminKeyError(Exception):
    """Revoking this key would leave no valid admin key."""


def revoke_key(session: Session, *, row: ApiKey, now: float) -> None:
    """Delete a key. Raises LastAdminKeyError rather than delete the last valid admin key
    (nobody could manage the deployment after that)."""
    if row.role == "admin":
        # Locking every valid admin key makes two concurrent revocations of the last two wait
        # for each other: the second then sees only its own key left.
        valid = session.scalars(select(ApiKey.id).where(_valid_admin(now)).with_for_update())
        if list(valid) == [row.id]:
            raise LastAdminKeyError("this is the last valid admin key: create another one first")
    session.delete(row)
    session.flush()


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
