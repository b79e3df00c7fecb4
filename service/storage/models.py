"""ORM tables. Times are UNIX seconds (float) in UTC; every row belongs to a loop."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column

from service.storage.db import Base

ID = String(256)
# 64-bit ids on Postgres; SQLite only autoincrements an INTEGER primary key.
BIGINT = BigInteger().with_variant(Integer, "sqlite")


class Loop(Base):
    """A learning loop: its kind, service configuration and policy."""

    __tablename__ = "loops"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[float] = mapped_column(Float)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)


class ApiKey(Base):
    """An API key, stored as its SHA-256. `loop` None with role admin means every loop."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    loop: Mapped[str | None] = mapped_column(
        String(64), ForeignKey("loops.name", ondelete="CASCADE"), nullable=True
    )
    created_at: Mapped[float] = mapped_column(Float)
    # Where the key came from ("env": DLOOP_API_KEY, "api", "cli"), a name to tell keys apart
    # in listings, and an optional expiry (UNIX seconds; None: never).
    source: Mapped[str | None] = mapped_column(String(16), nullable=True)
    label: Mapped[str | None] = mapped_column(String(256), nullable=True)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Decision(Base):
    """A ranked event: the first decision with an eventId wins. `record` is the decision log
    record as written at rank time (context, ranking, probabilities, baseline, model id)."""

    __tablename__ = "decisions"
    loop: Mapped[str] = mapped_column(String(64), primary_key=True)
    event_id: Mapped[str] = mapped_column(ID, primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)
    deferred: Mapped[bool] = mapped_column(Boolean)
    mode: Mapped[str] = mapped_column(String(16))
    record: Mapped[str] = mapped_column(Text)
    joined: Mapped[bool] = mapped_column(Boolean, default=False)
    # RL loops: the episode this decision is a step of.
    episode: Mapped[str | None] = mapped_column(ID, nullable=True)

    __table_args__ = (
        Index("ix_decisions_pending", "loop", "joined", "created_at"),
        Index("ix_decisions_episode", "loop", "episode"),
    )


class Observation(Base):
    """A reward (value) or activation (value None) as received, joined or not."""

    __tablename__ = "observations"
    id: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=True)
    loop: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[str] = mapped_column(ID)
    kind: Mapped[str] = mapped_column(String(8))
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    received_at: Mapped[float] = mapped_column(Float)
    # pending -> joined | late (arrived after its event was joined or outside the window)
    status: Mapped[str] = mapped_column(String(8), default="pending")
    # Unique id given at the API: a record delivered twice (a publisher retry) is stored once.
    uid: Mapped[str | None] = mapped_column(String(32), nullable=True, unique=True)
    # Multi-slot rewards: the slot rewarded.
    slot: Mapped[str | None] = mapped_column(ID, nullable=True)
    # A named outcome's name (None: Personalizer's reward; learners.outcomes).
    name: Mapped[str | None] = mapped_column(String(64), nullable=True)

    __table_args__ = (
        Index("ix_observations_event", "loop", "event_id"),
        Index("ix_observations_status", "loop", "status"),
    )


class Joined(Base):
    """A joined interaction: the DSJSON line learners and exports read, in join order."""

    __tablename__ = "joined"
    seq: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=True)
    loop: Mapped[str] = mapped_column(String(64))
    event_id: Mapped[str] = mapped_column(ID)
    created_at: Mapped[float] = mapped_column(Float)
    joined_at: Mapped[float] = mapped_column(Float)
    mode: Mapped[str] = mapped_column(String(16))
    learnable: Mapped[bool] = mapped_column(Boolean)
    reward: Mapped[float] = mapped_column(Float)
    rewarded: Mapped[bool] = mapped_column(Boolean)
    imitated: Mapped[bool] = mapped_column(Boolean)
    line: Mapped[str] = mapped_column(Text)
    # Kafka path: gap-free position in the loop's joined stream, assigned by the one publisher
    # before it publishes (so a republished row keeps its position and learners skip it).
    pos: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    published: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    episode: Mapped[str | None] = mapped_column(ID, nullable=True)
    # When the last reward counted in it arrived (None: no reward): a model's freshness.
    observed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The reward definition version its training reward comes from (0: Personalizer's reward).
    reward_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (
        UniqueConstraint("loop", "event_id"),
        Index("ix_joined_outbox", "published", "seq"),
        Index("ix_joined_loop_pos", "loop", "pos"),
        Index("ix_joined_loop_seq", "loop", "seq"),
        Index("ix_joined_episode", "loop", "episode"),
    )


class ModelCheckpoint(Base):
    """A loop's current model: the trainer's bytes, the VW arguments they were trained with, and
    `position`, how far into the loop's joined stream they have learned (the joined rows' `seq`
    in embedded mode, their `pos` in the joined topic on the Kafka path; either counts the
    loop's joined rows in the order they are learned)."""

    __tablename__ = "models"
    loop: Mapped[str] = mapped_column(
        String(64), ForeignKey("loops.name", ondelete="CASCADE"), primary_key=True
    )
    model_id: Mapped[str] = mapped_column(String(64))
    model: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    arguments: Mapped[str] = mapped_column(String(1024))
    # The column keeps its first name (no migration for a rename); it holds a position in both
    # modes.
    position: Mapped[int] = mapped_column("learned_seq", BigInteger)
    examples: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    modified_at: Mapped[float] = mapped_column(Float)


class Episode(Base):
    """An RL episode's end (the first end call wins); `learned` once a model includes it."""

    __tablename__ = "episodes"
    loop: Mapped[str] = mapped_column(String(64), primary_key=True)
    episode_id: Mapped[str] = mapped_column(ID, primary_key=True)
    ended_at: Mapped[float] = mapped_column(Float)
    terminated: Mapped[bool] = mapped_column(Boolean)
    learned: Mapped[bool] = mapped_column(Boolean, default=False)
    # Its return is in the loop's rollups (LoopStat): a relearned episode is not counted again.
    counted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    __table_args__ = (Index("ix_episodes_pending", "loop", "learned", "ended_at"),)


class RewardDefinition(Base):
    """A version of a loop's reward definition (learners.reward): its formula and when it was
    set. Version 0 is Personalizer's reward; joined rows say which version labelled them."""

    __tablename__ = "reward_definitions"
    loop: Mapped[str] = mapped_column(
        String(64), ForeignKey("loops.name", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    definition: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class OfflineJob:
    """What evaluation and feature-importance jobs share: a loop's named job over a time
    window, its status (NotSubmitted, Running, Succeeded, Failed), progress and error."""

    loop: Mapped[str] = mapped_column(
        String(64), ForeignKey("loops.name", ondelete="CASCADE"), primary_key=True
    )
    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(ID)
    start_time: Mapped[float] = mapped_column(Float)
    end_time: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)


class Evaluation(OfflineJob, Base):
    """An offline evaluation job and, once it has run, its result (Personalizer's shape)."""

    __tablename__ = "evaluations"
    evaluation_type: Mapped[str] = mapped_column(String(16))
    policies: Mapped[list[dict[str, str]]] = mapped_column(JSON)
    optimize: Mapped[bool] = mapped_column(Boolean)
    content: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # dloop: evaluate under this reward definition (None: the rewards as logged).
    reward_definition: Mapped[str | None] = mapped_column(Text, nullable=True)
    optimal_policy: Mapped[str | None] = mapped_column(ID, nullable=True)


class FeatureImportance(OfflineJob, Base):
    """A feature-importance job and its scores (Personalizer's /featureImportances)."""

    __tablename__ = "feature_importances"
    scores: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)


class LogOffset(Base):
    """How far the joiner has read a decision log (committed with what it read)."""

    __tablename__ = "log_offsets"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    offset: Mapped[int] = mapped_column(BigInteger)


class DeadLetter(Base):
    """A record dloop could not use, kept with where it came from and why: a log record the
    joiner could not read, or a joined interaction a learner could not learn (`loop` and
    `ref`, its position in the loop's joined stream, so no learner tries it again)."""

    __tablename__ = "dead_letters"
    id: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(128))
    record: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[float] = mapped_column(Float)
    loop: Mapped[str | None] = mapped_column(String(64), nullable=True)
    ref: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    __table_args__ = (Index("ix_dead_letters_ref", "loop", "source", "ref"),)


class ServerSecret(Base):
    """A deployment-wide secret (e.g. the key that signs exported models), created once and
    shared by every process through the database."""

    __tablename__ = "server_secrets"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)


def _sum(kind: Any = Float) -> Any:
    return mapped_column(kind, default=0, server_default="0")


class LoopStat(Base):
    """A loop's rollups for 10 seconds (`bucket`: their start) and one slot ("": the whole
    decision), kept by the joiner as it joins and by ingestion (learners.rollups says what each
    sum is); bucket -1 holds the running totals since the loop's first decision (store.stats.
    ALL_TIME). Decisions count in the bucket they were made in, observations in the one they
    arrived."""

    __tablename__ = "loop_stats"
    loop: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    slot: Mapped[str] = mapped_column(ID, primary_key=True)
    ranked: Mapped[int] = _sum(BigInteger)  # decisions ingested
    late: Mapped[int] = _sum(BigInteger)  # observations after their event was joined
    dangling: Mapped[int] = _sum(BigInteger)  # observations whose decision never came
    decisions: Mapped[float] = _sum()
    learnable: Mapped[float] = _sum()
    rewarded: Mapped[float] = _sum()
    explored: Mapped[float] = _sum()
    reward_n: Mapped[float] = _sum()
    reward_sum: Mapped[float] = _sum()
    reward_sq: Mapped[float] = _sum()
    holdout_n: Mapped[float] = _sum()
    holdout_sum: Mapped[float] = _sum()
    holdout_sq: Mapped[float] = _sum()
    trial_n: Mapped[float] = _sum()
    trial_sum: Mapped[float] = _sum()
    trial_sq: Mapped[float] = _sum()
    effect_n: Mapped[float] = _sum()
    effect_sum: Mapped[float] = _sum()
    effect_sq: Mapped[float] = _sum()
    baseline_w: Mapped[float] = _sum()
    baseline_w2: Mapped[float] = _sum()
    baseline_wr: Mapped[float] = _sum()
    baseline_wr2: Mapped[float] = _sum()
    random_w: Mapped[float] = _sum()
    random_w2: Mapped[float] = _sum()
    random_wr: Mapped[float] = _sum()
    random_wr2: Mapped[float] = _sum()
    # RL loops (slot ""): episodes that ended in this bucket and their undiscounted returns.
    episodes: Mapped[float] = _sum()
    return_sum: Mapped[float] = _sum()
    return_sq: Mapped[float] = _sum()


class OutcomeStat(Base):
    """A loop's rollups of each tracked outcome (learners.guardrails.sums) per 10 seconds, for
    the per-outcome figures and the guardrails: an outcome that never arrived counts as its
    default (learners.outcomes.RewardRules.value). Multi-slot decisions count once, with the
    mean over their slots."""

    __tablename__ = "outcome_stats"
    loop: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    outcome: Mapped[str] = mapped_column(String(64), primary_key=True)
    n: Mapped[float] = _sum()
    y_sum: Mapped[float] = _sum()
    y_sq: Mapped[float] = _sum()
    holdout_n: Mapped[float] = _sum()
    holdout_sum: Mapped[float] = _sum()
    trial_n: Mapped[float] = _sum()
    trial_sum: Mapped[float] = _sum()
    ht_a: Mapped[float] = _sum()
    ht_a2: Mapped[float] = _sum()
    ht_b: Mapped[float] = _sum()
    ht_b2: Mapped[float] = _sum()
    bw_y: Mapped[float] = _sum()
    bw_y2: Mapped[float] = _sum()
    y_bw_y: Mapped[float] = _sum()


class GuardrailState(Base):
    """Where a loop's guardrail (learners.guardrails) stands: `ok` or `breached` since
    `changed_at`, judged on the decisions since `since` (its window restarts at each change),
    and the figures of its last check."""

    __tablename__ = "guardrail_states"
    loop: Mapped[str] = mapped_column(
        String(64), ForeignKey("loops.name", ondelete="CASCADE"), primary_key=True
    )
    guardrail: Mapped[str] = mapped_column(String(80), primary_key=True)  # outcome:direction
    state: Mapped[str] = mapped_column(String(16))
    fallback: Mapped[bool] = mapped_column(Boolean, default=False)  # serving the holdout policy
    since: Mapped[float] = mapped_column(Float)
    changed_at: Mapped[float] = mapped_column(Float)
    checked_at: Mapped[float] = mapped_column(Float)
    figures: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class ActionStat(Base):
    """How often each action was served (chosen first) per 10 seconds and slot, once joined."""

    __tablename__ = "action_stats"
    loop: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    slot: Mapped[str] = mapped_column(ID, primary_key=True)
    action: Mapped[str] = mapped_column(ID, primary_key=True)
    n: Mapped[int] = _sum(BigInteger)


class ModelPublication(Base):
    """A model a loop's learner saved and published: when, how many examples it has learned,
    and its freshness: how long after their rewards arrived the rewards it newly includes were
    in a published model (p50, p95 over them; None when it includes no new reward)."""

    __tablename__ = "model_publications"
    id: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=True)
    loop: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str] = mapped_column(String(64))
    published_at: Mapped[float] = mapped_column(Float)
    examples: Mapped[int] = mapped_column(BigInteger)
    rewards: Mapped[int] = mapped_column(BigInteger, default=0)
    freshness_p50: Mapped[float | None] = mapped_column(Float, nullable=True)
    freshness_p95: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (Index("ix_model_publications_loop", "loop", "published_at"),)
