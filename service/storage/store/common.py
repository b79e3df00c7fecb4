"""What every part of the store shares: the default loop's name and dialect-aware inserts."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

DEFAULT_LOOP = "default"


def insert(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def dropped_name(loop: str) -> str:
    # The running count lives beside the log offsets (a name and a 64-bit integer) rather than
    # in a table of its own.
    return f"dropped-dangling/{loop}"
