"""The `dloop` command."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer

from service.settings import Settings, load_settings

app = typer.Typer(
    help="dloop: a self-hosted decision service that learns live.", no_args_is_help=True
)
logs_app = typer.Typer(help="Decision logs.", no_args_is_help=True)
app.add_typer(logs_app, name="logs")
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

DataDir = Annotated[
    Optional[Path],  # noqa: UP045  (typer needs Optional here)
    typer.Option("--data-dir", help="Where the embedded loop keeps its database and log."),
]


def _settings(data_dir: Path | None, **overrides: object) -> Settings:
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    return load_settings(**overrides)


def _prepare(settings: Settings) -> str | None:
    """Migrate the database and make sure an admin key exists; return a newly generated key."""
    from service import store
    from service.db import make_engine, make_sessionmaker
    from service.migrate import upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    if settings.api_key is not None:
        return None
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            store.ensure_loop(session, name=store.DEFAULT_LOOP, kind="cb", now=time.time())
            if store.has_admin_key(session):
                return None
            key = store.new_key()
            store.add_key(session, key=key, role="admin", loop=None, now=time.time())
            return key
    finally:
        engine.dispose()


@app.command()
def up(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    data_dir: DataDir = None,
) -> None:
    """Run the whole loop in one process: serving, reward join and learning (SQLite + local log)."""
    import uvicorn

    from service.app import create_app

    settings = _settings(data_dir, host=host, port=port)
    key = _prepare(settings)
    typer.echo(f"dloop: data in {settings.data_dir.resolve()}")
    if key is not None:
        typer.echo(f"dloop: admin key (shown once, keep it): {key}")
    elif settings.api_key is None:
        typer.echo("dloop: using the admin key created at first start (or set DLOOP_API_KEY)")
    typer.echo(f"dloop: Personalizer endpoint http://{host}:{port}  (docs at /docs)")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    data_dir: DataDir = None,
) -> None:
    """Serve the API on the production path: decisions and rewards go to Kafka (through a local
    durable buffer under --data-dir, one per replica), models come from the database.
    Needs DLOOP_DB__URL and DLOOP_KAFKA__BOOTSTRAP_SERVERS; run `dloop migrate` first."""
    import uvicorn

    from service.app import create_app

    settings = _settings(data_dir, host=host, port=port)
    _require_production(settings)
    typer.echo(f"dloop: serving on http://{host}:{port}, Kafka {settings.kafka.bootstrap_servers}")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False)


def _require_production(settings: Settings) -> None:
    if not settings.db.url or not settings.kafka.bootstrap_servers:
        raise typer.BadParameter(
            "set DLOOP_DB__URL and DLOOP_KAFKA__BOOTSTRAP_SERVERS (or use `dloop up`)"
        )


def _run_until_signalled(worker: object) -> None:
    import signal

    def stop(*_: object) -> None:
        worker.request_stop()  # type: ignore[attr-defined]

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run()  # type: ignore[attr-defined]


@app.command()
def join() -> None:
    """Join rewards to decisions: consume the events topic into the database (consumer group
    `<prefix>.joiner`; run as many as there are partitions) and publish joined interactions."""
    from learners.join_worker import JoinWorker
    from service import kafka
    from service.db import make_engine, make_sessionmaker

    settings = load_settings()
    _require_production(settings)
    kafka.ensure_topics(settings)
    engine = make_engine(settings.database_url)
    producer = kafka.producer(settings)
    worker = JoinWorker(
        sessions=make_sessionmaker(engine),
        consumer=kafka.consumer(settings, group=f"{settings.kafka.topic_prefix}.joiner"),
        producer=producer,
        events_topic=kafka.events_topic(settings),
        joined_topic=kafka.joined_topic(settings),
        batch_size=settings.learner.batch_size,
    )
    typer.echo("dloop: joiner running")
    try:
        _run_until_signalled(worker)
    finally:
        producer.close(timeout=5)
        engine.dispose()


@app.command()
def learn() -> None:
    """Train every loop's model from the joined topic (consumer group `<prefix>.learner`; one
    learner per loop at a time), checkpointing models with offsets in the database."""
    from learners.learn_worker import LearnWorker
    from service import kafka
    from service.db import make_engine, make_sessionmaker

    settings = load_settings()
    _require_production(settings)
    kafka.ensure_topics(settings)
    engine = make_engine(settings.database_url)
    worker = LearnWorker(
        sessions=make_sessionmaker(engine),
        consumer=kafka.consumer(settings, group=f"{settings.kafka.topic_prefix}.learner"),
        joined_topic=kafka.joined_topic(settings),
        batch_size=settings.learner.batch_size,
    )
    typer.echo("dloop: learner running")
    try:
        _run_until_signalled(worker)
    finally:
        engine.dispose()


@app.command()
def migrate(data_dir: DataDir = None) -> None:
    """Upgrade the database schema to the latest version."""
    from service.migrate import upgrade

    settings = _settings(data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    typer.echo("dloop: database at head")


def _time(value: str | None) -> float | None:
    if value is None:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@logs_app.command("export")
def logs_export(
    out: Annotated[
        Path, typer.Option("--out", help="File to write DSJSON lines to ('-' = stdout).")
    ],
    data_dir: DataDir = None,
    loop: Annotated[str, typer.Option(help="Loop to export.")] = "default",
    since: Annotated[Optional[str], typer.Option(help="ISO-8601 start (inclusive).")] = None,  # noqa: UP045
    until: Annotated[Optional[str], typer.Option(help="ISO-8601 end (exclusive).")] = None,  # noqa: UP045
) -> None:
    """Write the loop's joined interactions as DSJSON that `vw --dsjson` reads directly."""
    import sys

    from sqlalchemy import func, select
    from tqdm import tqdm

    from service import store
    from service.db import make_engine, make_sessionmaker
    from service.models import Joined

    settings = _settings(data_dir)
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            total = session.scalar(select(func.count()).where(Joined.loop == loop)) or 0
            sink = sys.stdout if str(out) == "-" else open(out, "w", encoding="utf-8")  # noqa: SIM115
            n = 0
            with (
                sink,
                tqdm(total=total, unit="ev", disable=str(out) == "-", file=sys.stderr) as bar,
            ):
                for line in store.export_lines(
                    session, loop=loop, since=_time(since), until=_time(until)
                ):
                    sink.write(line + "\n")
                    n += 1
                    bar.update()
    finally:
        engine.dispose()
    if str(out) != "-":
        typer.echo(f"dloop: wrote {n} interactions to {out}", err=True)


@keys_app.command("create")
def keys_create(
    data_dir: DataDir = None,
    loop: Annotated[str, typer.Option(help="Loop a client key is for.")] = "default",
    admin: Annotated[bool, typer.Option("--admin", help="An admin key (every loop).")] = False,
) -> None:
    """Create an API key (for example to replace a lost admin key) and print it once."""
    from service import store
    from service.db import make_engine, make_sessionmaker
    from service.migrate import upgrade
    from service.models import Loop

    settings = _settings(data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            if not admin and session.get(Loop, loop) is None:
                raise typer.BadParameter(f"loop '{loop}' does not exist", param_hint="--loop")
            _, key = store.create_key(
                session,
                role="admin" if admin else "client",
                loop=None if admin else loop,
                now=time.time(),
            )
    finally:
        engine.dispose()
    typer.echo(key)


def main() -> None:
    app()
