"""`dloop keys`: create, list and revoke API keys straight in the database (no server needed)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from service.cli.common import DataDir, database, settings_for
from service.core.files import private_dir
from service.core.settings import Settings

ExpiresInDays = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option("--expires-in-days", help="Refused after this many days (default: never)."),
]


def keys_create(
    data_dir: DataDir = None,
    loop: Annotated[str, typer.Option(help="Loop a client key is for.")] = "default",
    admin: Annotated[bool, typer.Option("--admin", help="An admin key (every loop).")] = False,
    viewer: Annotated[
        bool,
        typer.Option("--viewer", help="A read-only viewer key of --loop ('*': of every loop)."),
    ] = False,
    label: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="A name to tell the key apart in listings."),
    ] = None,
    expires_in_days: ExpiresInDays = None,
) -> None:
    """Create an API key (for example to replace a lost admin key) and print it once."""
    from pydantic import ValidationError

    from service.core.schemas import KeyRequest, validation_message
    from service.storage import store
    from service.storage.models import Loop

    try:
        options = KeyRequest.model_validate({"label": label, "expiresInDays": expires_in_days})
    except ValidationError as exc:
        raise typer.BadParameter(validation_message(exc)) from None
    if admin and viewer:
        raise typer.BadParameter("a key is --admin or --viewer, not both")
    role = "admin" if admin else "viewer" if viewer else "client"
    key_loop = None if admin or (viewer and loop == "*") else loop
    settings = _migrated(data_dir)
    now = time.time()
    with database(settings) as sessions, sessions.begin() as session:
        if key_loop is not None and session.get(Loop, key_loop) is None:
            raise typer.BadParameter(f"loop '{loop}' does not exist", param_hint="--loop")
        _, key = store.create_key(
            session,
            role=role,
            loop=key_loop,
            now=now,
            source="cli",
            label=options.label,
            expires_at=options.expiry(now),
        )
    typer.echo(key)


def keys_list(data_dir: DataDir = None) -> None:
    """List every key: id, role, loop, source, label, created and expiry times (never the key)."""
    from learners.dsjson import timestamp
    from service.storage import store

    settings = _migrated(data_dir)
    now = time.time()
    with database(settings) as sessions, sessions() as session:
        rows = store.all_keys(session)
    typer.echo(
        f"{'id':>6}  {'role':<7}{'loop':<20}{'source':<8}{'created':<22}{'expires':<22}label"
    )
    for row in rows:
        expires = "never" if row.expires_at is None else timestamp(row.expires_at)[:19]
        if row.expires_at is not None and row.expires_at <= now:
            expires += " (expired)"
        typer.echo(
            f"{row.id:>6}  {row.role:<7}{(row.loop or '*')[:19]:<20}{row.source or '?':<8}"
            f"{timestamp(row.created_at)[:19]:<22}{expires:<22}{row.label or ''}"
        )


def keys_revoke(
    key_id: Annotated[int, typer.Argument(help="The key's id (see `dloop keys list`).")],
    data_dir: DataDir = None,
) -> None:
    """Revoke a key at once (serving processes stop accepting it within a second). The last
    valid admin key cannot be revoked; create another first."""
    from service.storage import store

    settings = _migrated(data_dir)
    with database(settings) as sessions, sessions.begin() as session:
        row = store.get_key(session, key_id=key_id)
        if row is None:
            raise typer.BadParameter(f"there is no key {key_id}", param_hint="KEY_ID")
        try:
            store.revoke_key(session, row=row, now=time.time())
        except store.LastAdminKeyError as exc:
            raise typer.BadParameter(str(exc), param_hint="KEY_ID") from None
    typer.echo(f"dloop: revoked key {key_id}")


def _migrated(data_dir: Path | None) -> Settings:
    """Settings for an offline key command, on a database at the latest schema."""
    from service.storage.migrate import upgrade

    settings = settings_for(data_dir)
    private_dir(settings.data_dir)
    upgrade(settings.database_url)
    return settings
