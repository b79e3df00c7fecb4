"""Wire models for the configuration endpoints, and the loop settings derived from them.

Rank, reward and activate bodies are validated by hand in service.api.routes.events: they are on
the hot path and each failure needs its own Personalizer error code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from learners.constraints import Cap
from learners.guardrails import MAX_GUARDRAILS, Guardrail
from learners.joiner import JoinRules
from learners.outcomes import (
    AGGREGATIONS,
    MAX_OUTCOMES,
    REWARD,
    REWARD_RANGE,
    OutcomeRule,
    RewardRules,
)
from learners.reward import NAME, NAME_RULE, Definition, DefinitionError, parse
from learners.tiles import MAX_TILINGS, MIN_WIDTH, TileCoding
from service.core.kinds import loop_kind

MIN_WAIT = timedelta(seconds=1)
MAX_WAIT = timedelta(days=30)
MIN_EXPORT = timedelta(seconds=1)
# The most days logRetentionDays and modelRetrainDays take (about a century, long before any
# event: as long as forever). The worker subtracts them from the clock, in seconds, as floats.
MAX_DAYS = 36_500
# The largest magnitude of an outcome's range: the joiner's rollups sum an outcome's values, their
# squares and their inverse-propensity weightings, which near 1e308 overflow to inf (and inf - inf
# to NaN, which no rollup can store); 1e12 leaves them far from it.
MAX_OUTCOME = 1e12

# dloop's own fields: a configuration update without one keeps its value (an application
# written for Personalizer, whose SDK drops fields it does not know, must not reset them), and
# null sets it back to its default.
DLOOP_FIELDS = (
    "discountFactor",
    "holdoutPercentage",
    "holdoutPolicy",
    "outcomes",
    "rewardDefinition",
    "guardrails",
    "exposureCaps",
    "maxExplorationProbability",
    "tileCoding",
)


class Wire(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        ser_json_timedelta="iso8601",
    )


def iso_duration(value: timedelta) -> str:
    """ISO 8601 in days and time of day, never years: pydantic's own writes 400 days as
    "P1Y35D", which RFC 3339's duration grammar rejects and calendar-aware parsers (the old
    SDK's isodate) read as a calendar year and 35 days."""
    sign, value = ("-", -value) if value < timedelta(0) else ("", value)
    minutes, seconds = divmod(value.seconds, 60)
    hours, minutes = divmod(minutes, 60)
    second = f"{seconds}.{value.microseconds:06d}".rstrip("0") if value.microseconds else seconds
    time = "".join(f"{n}{unit}" for n, unit in ((hours, "H"), (minutes, "M"), (second, "S")) if n)
    days = f"{value.days}D" if value.days or not time else ""
    return f"{sign}P{days}" + (f"T{time}" if time else "")


class OutcomeSpec(Wire):
    """dloop: a named outcome a loop accepts (learners.outcomes): its values' range and how the
    values of one event combine."""

    name: str
    aggregation: str = "earliest"
    # At most MAX_OUTCOME either way (checked when set: ServiceConfiguration.check_limits).
    min: float = Field(json_schema_extra={"minimum": -MAX_OUTCOME, "maximum": MAX_OUTCOME})
    max: float = Field(json_schema_extra={"minimum": -MAX_OUTCOME, "maximum": MAX_OUTCOME})
    # Its value for an event it never arrived for (null: none, see learners.outcomes).
    default: float | None = 0.0

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v):
            raise ValueError(f"outcome names are {NAME_RULE}")
        if v == REWARD:
            raise ValueError("reward is Personalizer's reward, always there: pick another name")
        return v

    @field_validator("aggregation")
    @classmethod
    def _agg(cls, v: str) -> str:
        if v.lower() not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}")
        return v.lower()

    @model_validator(mode="after")
    def _range(self) -> OutcomeSpec:
        if not (math.isfinite(self.min) and math.isfinite(self.max) and self.min < self.max):
            raise ValueError(f"outcome {self.name}: min and max are finite, min below max")
        if self.default is not None and not self.min <= self.default <= self.max:
            raise ValueError(f"outcome {self.name}: its default must lie between min and max")
        return self


class GuardrailSpec(Wire):
    """dloop: an outcome the loop's policy must not push the wrong way (learners.guardrails):
    past `tolerance` (relative: 0.1 is 10%) of the holdout's level, or of the baseline's
    counterfactual one without a holdout; `fallback` serves the holdout policy until it
    recovers."""

    outcome: str
    must_not: Literal["increase", "decrease"]
    tolerance: float = Field(default=0.0, ge=0, le=10)
    action: Literal["alert", "fallback"] = "alert"

    def guardrail(self) -> Guardrail:
        return Guardrail(self.outcome, self.must_not, self.tolerance, self.action)


class ExposureCapSpec(Wire):
    """dloop: an action served first in at most `max_share` of the decisions of the last
    `window` (learners.constraints.ExposureCaps)."""

    action_id: str = Field(min_length=1, max_length=256)
    max_share: float = Field(gt=0, lt=1)
    window: timedelta = timedelta(hours=1)

    @field_serializer("window", when_used="json")
    def _duration(self, value: timedelta) -> str:
        return iso_duration(value)

    @field_validator("window")
    @classmethod
    def _window(cls, v: timedelta) -> timedelta:
        if not MIN_WAIT <= v <= MAX_WAIT:
            raise ValueError("window must be between PT1S and P30D")
        return v


class TileCodingSpec(Wire):
    """dloop: tile coding of numeric context features (learners.tiles): each feature named in
    `widths` ("namespace.feature", or "feature" at the top level of a context object: a number,
    or an array of numbers coded jointly) becomes `tilings` categorical features, the cells
    of grids of those widths (one per element)."""

    tilings: int = Field(default=8, ge=1, le=MAX_TILINGS)
    widths: dict[str, list[float]] = Field(min_length=1, max_length=50)

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: dict[str, list[float]]) -> dict[str, list[float]]:
        for name, widths in v.items():
            if not 0 < len(name) <= 256:
                raise ValueError("feature names must have 1 to 256 characters")
            if not 1 <= len(widths) <= 16:
                raise ValueError(f"{name}: give 1 to 16 tile widths")
        return v

    @model_validator(mode="after")
    def _coding(self) -> TileCodingSpec:
        self.coding()  # TileCoding refuses what is no coding (widths that are not positive)
        return self

    def coding(self) -> TileCoding:
        return TileCoding.from_doc(self.model_dump())


class ServiceConfiguration(Wire):
    reward_wait_time: timedelta
    default_reward: float = Field(ge=-1, le=1)
    reward_aggregation: str
    exploration_percentage: float = Field(ge=0, le=1)
    model_export_frequency: timedelta
    # -1 keeps events forever. Both at most MAX_DAYS (checked when set: check_limits).
    log_retention_days: int = Field(json_schema_extra={"maximum": MAX_DAYS})
    model_retrain_days: int = Field(ge=0, json_schema_extra={"maximum": MAX_DAYS})
    log_mirror_enabled: bool | None = None
    log_mirror_sas_uri: str | None = None
    last_configuration_edit_date: datetime | None = None
    learning_mode: Literal["Online", "Apprentice", "LoggingOnly"] = "Online"
    is_auto_optimization_enabled: bool | None = False
    auto_optimization_frequency: timedelta | None = None
    auto_optimization_start_date: datetime | None = None
    is_inference_explainability_enabled: bool | None = False
    # dloop: the discount of future rewards in RL loops (ignored by bandit loops).
    discount_factor: float = Field(default=0.99, ge=0, le=1)
    # dloop: a live holdout (learners.holdout): the percentage of decisions (0 to 50) served by
    # the holdout policy instead of the model, in Online mode, to measure what the model earns.
    holdout_percentage: float = Field(default=0.0, ge=0, le=50)
    holdout_policy: Literal["baseline", "random"] = "baseline"
    # dloop: named outcomes beside Personalizer's reward, and the training reward as a formula
    # over them (learners.reward; None: the reward). The version counts the formula's changes
    # (set by the server).
    outcomes: list[OutcomeSpec] = Field(default_factory=list, max_length=MAX_OUTCOMES)
    reward_definition: str | None = None
    reward_definition_version: int = 0
    guardrails: list[GuardrailSpec] = Field(default_factory=list, max_length=MAX_GUARDRAILS)
    # dloop: serving-time constraints (learners.constraints), single-slot loops in Online mode:
    # per-action exposure caps and the most probability a decision may put off its top action.
    exposure_caps: list[ExposureCapSpec] = Field(default_factory=list, max_length=50)
    max_exploration_probability: float | None = Field(default=None, ge=0, le=1)
    # dloop: numeric context features tile-coded before the model sees them (and the log holds
    # them): how a linear model learns values that are not linear in a number (learners.tiles).
    tile_coding: TileCodingSpec | None = None
    latest_apprentice_mode_metrics: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _cleared(cls, data: Any) -> Any:
        """null for one of dloop's own fields is its default (README: "send null to clear
        one"): the lists' default is empty, and their type takes no null."""
        if isinstance(data, dict):
            return {
                k: v for k, v in data.items() if v is not None or to_camel(k) not in DLOOP_FIELDS
            }
        return data

    @field_validator("max_exploration_probability")
    @classmethod
    def _finite_or_none(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_serializer(
        "reward_wait_time",
        "model_export_frequency",
        "auto_optimization_frequency",
        when_used="json",
    )
    def _duration(self, value: timedelta | None) -> str | None:
        return None if value is None else iso_duration(value)

    @field_validator("reward_wait_time")
    @classmethod
    def _wait(cls, v: timedelta) -> timedelta:
        if not MIN_WAIT <= v <= MAX_WAIT:
            raise ValueError("rewardWaitTime must be between PT1S and P30D")
        return v

    @field_validator("model_export_frequency")
    @classmethod
    def _export(cls, v: timedelta) -> timedelta:
        if v < MIN_EXPORT:
            raise ValueError("modelExportFrequency must be at least PT1S")
        return v

    @field_validator("reward_aggregation")
    @classmethod
    def _agg(cls, v: str) -> str:
        if v.lower() not in AGGREGATIONS:
            raise ValueError(f"rewardAggregation must be one of {', '.join(AGGREGATIONS)}")
        return v.lower()

    @field_validator(
        "default_reward", "exploration_percentage", "discount_factor", "holdout_percentage"
    )
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("outcomes")
    @classmethod
    def _unique(cls, v: list[OutcomeSpec]) -> list[OutcomeSpec]:
        names = [o.name for o in v]
        if len(set(names)) != len(names):
            raise ValueError("outcome names must be unique")
        return v

    @model_validator(mode="after")
    def _definition(self) -> ServiceConfiguration:
        if self.reward_definition is not None:
            try:
                self.definition()
            except DefinitionError as exc:
                raise ValueError(f"rewardDefinition: {exc}") from None
        known = {REWARD, *(o.name for o in self.outcomes)}
        keys = set()
        for i, g in enumerate(self.guardrails):
            if g.outcome not in known:
                raise ValueError(
                    f"guardrails.{i}.outcome: {g.outcome!r} is not an outcome of this loop "
                    f"({', '.join(sorted(known))})"
                )
            if g.action == "fallback" and self.learning_mode != "Online":
                raise ValueError(f"guardrails.{i}: a fallback needs learningMode Online")
            keys.add(g.guardrail().key)
        if len(keys) != len(self.guardrails):
            raise ValueError("guardrails: one per outcome and direction")
        if len({c.action_id for c in self.exposure_caps}) != len(self.exposure_caps):
            raise ValueError("exposureCaps: one per action")
        return self

    def definition(self) -> Definition | None:
        """The parsed reward definition (None: Personalizer's reward)."""
        if self.reward_definition is None:
            return None
        ranges = {o.name: (o.min, o.max) for o in self.outcomes}
        ranges[REWARD] = REWARD_RANGE
        return parse(self.reward_definition, known=ranges, ranges=ranges)

    def reward_rules(self) -> RewardRules | None:
        """The loop's outcomes and reward definition (None: Personalizer's reward only)."""
        if not self.outcomes and self.reward_definition is None and not self.guardrails:
            return None
        rules = {
            o.name: OutcomeRule(o.name, o.aggregation, o.min, o.max, o.default)
            for o in self.outcomes
        }
        rules[REWARD] = OutcomeRule(REWARD, self.reward_aggregation, *REWARD_RANGE, None)
        return RewardRules(
            self.default_reward, rules, self.definition(), self.reward_definition_version
        )

    def check_limits(self) -> None:
        """What a configuration being set must also meet (parse_config). Not checked when a
        stored one is read (LoopSettings.from_doc): one stored before a limit existed must still
        load, as a loop that cannot load stops the service starting."""
        days = math.ceil(self.reward_wait_time.total_seconds() / 86400) + 1
        if self.log_retention_days != -1 and not days <= self.log_retention_days <= MAX_DAYS:
            raise ValueError(f"logRetentionDays must be -1 (forever) or from {days} to {MAX_DAYS}")
        if self.model_retrain_days > MAX_DAYS:
            raise ValueError(f"modelRetrainDays must be from 0 to {MAX_DAYS}")
        if self.log_retention_days != -1 and self.model_retrain_days > self.log_retention_days:
            raise ValueError("modelRetrainDays cannot exceed logRetentionDays")
        if self.tile_coding is not None:
            for name, widths in self.tile_coding.widths.items():
                if min(widths) < MIN_WIDTH:
                    raise ValueError(
                        f"tileCoding.widths.{name}: tile widths must be at least {MIN_WIDTH:g} "
                        "(a value's cell is value / width)"
                    )
        for i, o in enumerate(self.outcomes):
            if max(abs(o.min), abs(o.max)) > MAX_OUTCOME:
                raise ValueError(
                    f"outcomes.{i}: outcome {o.name}: min and max must lie between "
                    f"-{MAX_OUTCOME:g} and {MAX_OUTCOME:g} (the loop's statistics sum squares "
                    "of its values, which overflow past that)"
                )

    def stored(self) -> dict[str, Any]:
        doc = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        doc.pop("latestApprenticeModeMetrics", None)
        return doc


class PolicyContract(Wire):
    name: str = Field(min_length=1, max_length=256)
    arguments: str = Field(min_length=1, max_length=1024)


class KeyRequest(Wire):
    """The optional body of a key creation: a label and at most one way to say when it expires.
    Unknown fields are refused: a misspelt expiry must not make a key that never expires."""

    model_config = ConfigDict(extra="forbid")

    label: str | None = Field(default=None, max_length=256)
    # dloop: "viewer" makes a read-only key (the dashboard, the GET operations); else the
    # path's own kind of key (admin under /keys, client under /loops/{loop}/keys).
    role: Literal["viewer"] | None = None
    expires_at: AwareDatetime | None = None
    expires_in_days: float | None = Field(default=None, gt=0, le=36_500)

    @model_validator(mode="after")
    def _one_expiry(self) -> KeyRequest:
        if self.expires_at is not None and self.expires_in_days is not None:
            raise ValueError("give expiresAt or expiresInDays, not both")
        return self

    def expiry(self, now: float) -> float | None:
        """When the key expires (UNIX seconds), None for never; ValueError if already past."""
        if self.expires_in_days is not None:
            return now + self.expires_in_days * 86400
        if self.expires_at is None:
            return None
        if self.expires_at.timestamp() <= now:
            raise ValueError("expiresAt: must be in the future")
        return self.expires_at.timestamp()


def offline_rules(config: dict[str, Any] | None, formula: str) -> RewardRules:
    """The rules to relabel logged lines with a reward definition `formula` (evaluate, replay
    and evaluations with another objective): checked against the loop's outcomes when there is
    a loop (`config`), else against none (every name allowed, each unbounded). DefinitionError
    says what is wrong."""
    if config is None:
        return RewardRules(0.0, {}, parse(formula, ranges={REWARD: REWARD_RANGE}))
    cfg = ServiceConfiguration.model_validate(config)
    base = cfg.reward_rules() or RewardRules.personalizer(
        cfg.default_reward, cfg.reward_aggregation
    )
    ranges = {name: (r.low, r.high) for name, r in base.outcomes.items()}
    definition = parse(formula, known=ranges, ranges=ranges)
    return RewardRules(cfg.default_reward, base.outcomes, definition, base.version)


def default_config(now: float, kind: str = "cb") -> dict[str, Any]:
    """A new loop's configuration (Personalizer's defaults; an RL loop explores more)."""
    return ServiceConfiguration(
        reward_wait_time=timedelta(minutes=10),
        default_reward=0.0,
        reward_aggregation="earliest",
        exploration_percentage=loop_kind(kind).exploration,
        model_export_frequency=timedelta(seconds=10),
        log_retention_days=90,
        model_retrain_days=2,
        learning_mode="Online",
        is_auto_optimization_enabled=False,
        log_mirror_enabled=False,
        is_inference_explainability_enabled=False,
        last_configuration_edit_date=datetime.fromtimestamp(now, UTC),
    ).stored()


def default_policy(kind: str, style: str = "dloop-default") -> dict[str, str]:
    """The policy a new loop of `kind` starts with and a reset returns to. `style` is the
    deployment's choice (Settings.default_policy): dloop's defaults, or Personalizer's exact
    arguments for the kinds Personalizer had (single- and multi-slot loops; RL loops keep
    dloop's)."""
    k = loop_kind(kind)
    personalizer = k.personalizer_policy if style == "personalizer-default" else None
    return (personalizer or k.policy).doc()


def parse_config(doc: dict[str, Any]) -> ServiceConfiguration:
    """Validate a configuration; raises ValueError with a readable message."""
    try:
        cfg = ServiceConfiguration.model_validate(doc)
    except ValidationError as exc:
        raise ValueError(validation_message(exc)) from None
    cfg.check_limits()
    return cfg


def validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


@dataclass(frozen=True)
class LoopSettings:
    """What the hot path and the worker need from a loop's configuration, parsed once."""

    rules: JoinRules
    exploration: float
    export_every: float
    mode: str
    retrain_days: int
    retention_days: int
    explain: bool
    discount: float
    holdout: float  # the share of decisions held out (0 to 0.5), in Online mode
    holdout_policy: str
    guardrails: tuple[Guardrail, ...]
    caps: tuple[Cap, ...]
    max_exploration: float | None
    tiles: TileCoding | None
    # The outcomes the joiner rolls up per bucket: the named ones, and `reward` if guarded.
    tracked: tuple[str, ...]
    # Auto-optimisation: on or off, every how many seconds (0: not set), from when (0: not set).
    auto_optimize: bool
    auto_every: float
    auto_start: float

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> LoopSettings:
        cfg = ServiceConfiguration.model_validate(doc)
        return cls(
            rules=JoinRules(
                wait=cfg.reward_wait_time.total_seconds(),
                default_reward=cfg.default_reward,
                aggregation=cfg.reward_aggregation,
                named=cfg.reward_rules(),
            ),
            exploration=cfg.exploration_percentage,
            export_every=cfg.model_export_frequency.total_seconds(),
            mode=cfg.learning_mode,
            # At most MAX_DAYS, as long as forever: one stored before the limit could be too
            # large for a float, and the worker subtracts it from the clock.
            retrain_days=min(cfg.model_retrain_days, MAX_DAYS),
            retention_days=min(cfg.log_retention_days, MAX_DAYS),
            explain=bool(cfg.is_inference_explainability_enabled),
            discount=cfg.discount_factor,
            holdout=cfg.holdout_percentage / 100 if cfg.learning_mode == "Online" else 0.0,
            holdout_policy=cfg.holdout_policy,
            guardrails=tuple(g.guardrail() for g in cfg.guardrails),
            caps=tuple(
                Cap(c.action_id, c.max_share, c.window.total_seconds()) for c in cfg.exposure_caps
            ),
            max_exploration=cfg.max_exploration_probability,
            tiles=cfg.tile_coding.coding() if cfg.tile_coding is not None else None,
            tracked=tuple(
                sorted({o.name for o in cfg.outcomes} | {g.outcome for g in cfg.guardrails})
            ),
            auto_optimize=bool(cfg.is_auto_optimization_enabled),
            auto_every=(
                cfg.auto_optimization_frequency.total_seconds()
                if cfg.auto_optimization_frequency
                else 0.0
            ),
            auto_start=(
                cfg.auto_optimization_start_date.timestamp()
                if cfg.auto_optimization_start_date
                else 0.0
            ),
        )
