"""Alembic (service.storage.migrate): upgrade head on an empty database (SQLite and Postgres),
no drift, downgrade works."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from service.storage.db import Base
from service.storage.migrate import downgrade, upgrade


def check_round_trip(url: str) -> None:
    upgrade(url)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
            assert diff == [], diff
        assert {"loops", "decisions", "observations", "joined", "models"} <= set(
            inspect(engine).get_table_names()
        )
        downgrade(url, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(url)
    finally:
        engine.dispose()


def test_sqlite_migrations(tmp_path: Path) -> None:
    check_round_trip(f"sqlite:///{tmp_path / 'm.db'}")


def test_postgres_migrations(postgres_url: str) -> None:
    check_round_trip(postgres_url)
