"""One Settings object, read from the environment (prefix DLOOP_, nested with `__`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class DbSettings(BaseModel):
    # None: SQLite under data_dir (the embedded default).
    url: str | None = None


class KafkaSettings(BaseModel):
    # None: the local decision log under data_dir (the embedded default).
    bootstrap_servers: str | None = None
    topic_prefix: str = "dloop"
    partitions: int = 8
    # Consumer group liveness: a short max_poll_interval makes rebalances fast (seconds).
    max_poll_interval_ms: int = 10_000
    session_timeout_ms: int = 10_000


class LearnerSettings(BaseModel):
    # How often the embedded worker looks for new log records, due joins and model exports.
    tick_seconds: float = 0.2
    # Joined events read per learning batch.
    batch_size: int = 2000
    # `dloop up` runs the embedded learner in a process of its own beside the serving process
    # (service.pipeline.learner_process); false runs it as a thread of the serving process.
    separate_process: bool = True


class LimitSettings(BaseModel):
    """What one request may cost (README, Security)."""

    # Features in one rank request, in one feature object, and how deep objects nest
    # (learners.features.FeatureLimits): `-q ::` makes a prediction cost the square of them.
    max_features: int = 2000
    max_namespace_features: int = 500
    max_feature_depth: int = 16
    # Seconds a client may take to send a request body (408 after), counted from its first read.
    body_timeout: float = 30.0
    # Requests a second per API key in each serving process, and the burst above that rate
    # (429 with Retry-After beyond; 0: no limit).
    rate_per_key: float = 1000.0
    burst_per_key: int = 2000
    # Connections a serving process holds at once (503 beyond) and seconds an idle keep-alive
    # connection stays open. Slow headers need the reverse proxy (README, Security).
    max_connections: int = 1000
    keep_alive: float = 5.0


class SandboxSettings(BaseModel):
    """Where VW runs on untrusted input (learners.sandbox): child processes of the server."""

    # Ranking processes per serving process, and how many loops' models each keeps loaded.
    # 0 ranks in the serving process itself: no isolation (for benchmarks and trusted input).
    rankers: int = 2
    cached_models: int = 64
    # Calls a ranking process holds at once: it finds the next one waiting when it finishes
    # one, rather than sleeping until the serving process writes it (measured in README).
    depth: int = 4
    # Seconds VW may take to parse and predict one request before its process is stopped
    # (the request gets a 400), and seconds a request may wait for a free process (503).
    rank_timeout: float = 5.0
    wait_timeout: float = 5.0


# An operator-chosen admin key must be as hard to guess as the ones dloop generates (32 hex
# characters, 128 bits): keys are checked against an unsalted SHA-256, so a short or repetitive
# key falls to online guessing or, if the database leaks, to an offline search.
MIN_KEY_LENGTH = 32
MIN_KEY_DISTINCT = 8


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DLOOP_", env_nested_delimiter="__")

    data_dir: Path = Path("dloop-data")
    api_key: SecretStr | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 256 * 1024
    # PUT /model reads at most this many bytes, and a signed archive may inflate to no more.
    max_model_bytes: int = 256 << 20
    # Serve /docs (Swagger UI, from the swagger-ui-bundle-v2 package) and /openapi.json.
    docs: bool = True
    max_actions: int = 50
    # The policy a new loop starts with and DELETE .../configurations/policy returns to:
    # dloop's (SquareCB) or Personalizer's exact default arguments (service.core.kinds).
    default_policy: Literal["dloop-default", "personalizer-default"] = "dloop-default"
    # Bytes of rank responses remembered (all loops together) to answer retries of an eventId.
    dedup_cache_bytes: int = 64 << 20
    # Worker processes (join, learn) log at this level to stderr; kafka-python's own chatter
    # shows only at DEBUG.
    log_level: str = "INFO"
    # Rewards and activations whose eventId never got a decision are kept as "dangling"
    # observations (counted in /metrics); beyond this many per loop the oldest are deleted.
    max_dangling: int = Field(default=10_000, ge=0)
    db: DbSettings = DbSettings()
    kafka: KafkaSettings = KafkaSettings()
    learner: LearnerSettings = LearnerSettings()
    limits: LimitSettings = LimitSettings()
    sandbox: SandboxSettings = SandboxSettings()

    @field_validator("api_key")
    @classmethod
    def _strong_key(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None:
            value = key.get_secret_value()
            if len(value) < MIN_KEY_LENGTH or len(set(value)) < MIN_KEY_DISTINCT:
                raise ValueError(
                    f"DLOOP_API_KEY must be at least {MIN_KEY_LENGTH} characters with at least "
                    f"{MIN_KEY_DISTINCT} different ones (e.g. `openssl rand -hex 16`)"
                )
        return key

    @property
    def database_url(self) -> str:
        return self.db.url or f"sqlite:///{(self.data_dir / 'dloop.db').resolve()}"


def load_settings(**overrides: object) -> Settings:
    """The only place that reads the environment."""
    return Settings(**overrides)  # type: ignore[arg-type]
