"""One Settings object, read from the environment (prefix DLOOP_, nested with `__`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, SecretStr
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
    # Rank responses remembered per loop for idempotent retries of the same eventId.
    dedup_cache_size: int = 100_000
    # Worker processes (join, learn) log at this level to stderr; kafka-python's own chatter
    # shows only at DEBUG.
    log_level: str = "INFO"
    db: DbSettings = DbSettings()
    kafka: KafkaSettings = KafkaSettings()
    learner: LearnerSettings = LearnerSettings()

    @property
    def database_url(self) -> str:
        return self.db.url or f"sqlite:///{(self.data_dir / 'dloop.db').resolve()}"


def load_settings(**overrides: object) -> Settings:
    """The only place that reads the environment."""
    return Settings(**overrides)  # type: ignore[arg-type]
