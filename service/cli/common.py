"""What every `dloop` command module uses: --data-dir, settings, a database for one command."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from service.core.settings import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

DataDir = Annotated[
    Optional[Path],  # noqa: UP045  (typer needs Optional here)
    typer.Option("--data-dir", help="Where the embedded loop keeps its database and log."),
]


@contextmanager
def database(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """Sessions on the configured database for one command; the engine is closed after."""
    from service.storage.db import make_engine, make_sessionmaker

    engine = make_engine(settings.database_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def settings_for(data_dir: Path | None, **overrides: object) -> Settings:
    """The command's settings (--data-dir and options over DLOOP_* variables); exit 2 if
    they are invalid."""
    from pydantic import ValidationError

    from service.core.schemas import validation_message

    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        return load_settings(**overrides)
    except ValidationError as exc:  # a bad DLOOP_* variable: say which, no traceback
        typer.echo(f"dloop: invalid settings: {validation_message(exc)}", err=True)
        raise typer.Exit(2) from None
