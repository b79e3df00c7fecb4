"""The long-running commands: `dloop up` (the whole loop in one process), `serve`, `join` and
`learn` (the production path), and `migrate`."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from service.cli.common import DataDir, database, settings_for
from service.core.files import private_dir
from service.core.kinds import CB
from service.core.settings import Settings


def _prepare(settings: Settings) -> str | None:
    """Migrate the database and make sure a valid admin key exists; return a newly generated
    key."""
    from service.storage import store
    from service.storage.migrate import upgrade

    private_dir(settings.data_dir)
    upgrade(settings.database_url)
    if settings.api_key is not None:
        return None
    now = time.time()
    with database(settings) as sessions, sessions.begin() as session:
        store.ensure_loop(
            session, name=store.DEFAULT_LOOP, kind=CB.name, now=now, policy=settings.default_policy
        )
        if store.has_admin_key(session, now=now):
            return None
        _, key = store.create_key(
            session, role="admin", loop=None, now=now, source="cli", label="dloop up"
        )
        return key


def up(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    data_dir: DataDir = None,
) -> None:
    """Run the whole loop in one process: serving, reward join and learning (SQLite + local log)."""
    import uvicorn

    from service.app import create_app

    settings = settings_for(data_dir, host=host, port=port)
    key = _prepare(settings)
    typer.echo(f"dloop: data in {settings.data_dir.resolve()}")
    if key is not None:
        typer.echo(f"dloop: admin key (shown once, keep it): {key}")
    elif settings.api_key is None:
        typer.echo("dloop: using the admin key created at first start (or set DLOOP_API_KEY)")
    typer.echo(f"dloop: Personalizer endpoint http://{host}:{port}  (docs at /docs)")
    typer.echo(f"dloop: dashboard http://{host}:{port}/ui/  (log in with an admin or viewer key)")
    uvicorn.run(create_app(settings), **_server_options(settings))


def demo(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    data_dir: DataDir = None,
    rate: Annotated[float, typer.Option(min=0, help="Decisions a second (0: flat out).")] = 20.0,
    holdout: Annotated[
        float, typer.Option(min=0, max=50, help="Percent of users held out.")
    ] = 10.0,
) -> None:
    """`dloop up` with simulated traffic on built-in worlds: open the printed address, log in
    with the printed key and watch the default loop learn, and the shop loop trade clicks and
    purchases against unsubscribes under a guardrail (service.pipeline.demo)."""
    import threading

    import uvicorn

    from service.app import create_app
    from service.pipeline import demo as traffic
    from service.storage import store

    settings = settings_for(data_dir, host=host, port=port)
    _prepare(settings)
    with database(settings) as sessions, sessions.begin() as session:
        _, key = store.create_key(
            session, role="admin", loop=None, now=time.time(), source="cli", label="dloop demo"
        )
    url = f"http://{host}:{port}"
    typer.echo(f"dloop demo: data in {settings.data_dir.resolve()}")
    typer.echo(f"dloop demo: open {url}/ui/ and log in with this admin key: {key}")
    typer.echo(
        f"dloop demo: {rate:g} decisions a second on the loops default and shop (simulated "
        f"worlds), {holdout:g}% held out"
    )
    stop = threading.Event()
    thread = threading.Thread(
        target=traffic.traffic,
        args=(url, key),
        kwargs={"rate": rate, "holdout": holdout, "stop": stop, "shop": True},
        daemon=True,
    )
    thread.start()
    try:
        uvicorn.run(create_app(settings), **_server_options(settings))
    finally:
        stop.set()


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Serving processes on this port.")] = 1,
    data_dir: DataDir = None,
) -> None:
    """Serve the API on the production path: decisions and rewards go to Kafka (through a local
    durable buffer under --data-dir/replica-N, one per process), models come from the database.
    Needs DLOOP_DB__URL and DLOOP_KAFKA__BOOTSTRAP_SERVERS; run `dloop migrate` first."""
    import os

    import uvicorn

    from service.app import create_app
    from service.pipeline.background import configure_logging

    settings = settings_for(data_dir, host=host, port=port)
    _require_production(settings)
    typer.echo(
        f"dloop: serving on http://{host}:{port} ({workers} process(es)),"
        f" Kafka {settings.kafka.bootstrap_servers}"
    )
    options = _server_options(settings)
    if workers == 1:
        configure_logging(settings.log_level)
        uvicorn.run(create_app(settings), **options)
        return
    # Worker processes read their settings from the environment.
    os.environ["DLOOP_DATA_DIR"] = str(settings.data_dir)
    uvicorn.run("service.app:from_environment", factory=True, workers=workers, **options)


def _server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's settings: connections held at once (503 beyond), idle keep-alive, and a bound
    on how long a shutdown waits for requests in flight."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": "warning",
        "access_log": False,
        "limit_concurrency": settings.limits.max_connections,
        "timeout_keep_alive": settings.limits.keep_alive,
        "timeout_graceful_shutdown": 10,
    }


def _require_production(settings: Settings) -> None:
    if not settings.db.url or not settings.kafka.bootstrap_servers:
        raise typer.BadParameter(
            "set DLOOP_DB__URL and DLOOP_KAFKA__BOOTSTRAP_SERVERS (or use `dloop up`)"
        )


def _run_until_signalled(worker: object, settings: Settings) -> None:
    import signal

    from service.pipeline.background import configure_logging

    configure_logging(settings.log_level)

    def stop(*_: object) -> None:
        worker.request_stop()  # type: ignore[attr-defined]

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run()  # type: ignore[attr-defined]


def join() -> None:
    """Join rewards to decisions: consume the events topic into the database (consumer group
    `<prefix>.joiner`; run as many as there are partitions) and publish joined interactions."""
    from service.pipeline.join_worker import JoinWorker
    from service.storage import kafka

    settings = settings_for(None)
    _require_production(settings)
    kafka.ensure_topics(settings)
    with database(settings) as sessions:
        producer = kafka.producer(settings)
        worker = JoinWorker(
            sessions=sessions,
            consumer=kafka.consumer(settings, group=f"{settings.kafka.topic_prefix}.joiner"),
            producer=producer,
            events_topic=kafka.events_topic(settings),
            joined_topic=kafka.joined_topic(settings),
            batch_size=settings.learner.batch_size,
            max_dangling=settings.max_dangling,
        )
        typer.echo("dloop: joiner running")
        try:
            _run_until_signalled(worker, settings)
        finally:
            producer.close(timeout=5)


def learn() -> None:
    """Train every loop's model from the joined topic (consumer group `<prefix>.learner`; one
    learner per loop at a time), checkpointing models with offsets in the database."""
    from service.pipeline.learn_worker import LearnWorker
    from service.storage import kafka

    settings = settings_for(None)
    _require_production(settings)
    kafka.ensure_topics(settings)
    with database(settings) as sessions:
        worker = LearnWorker(
            sessions=sessions,
            consumer=kafka.consumer(settings, group=f"{settings.kafka.topic_prefix}.learner"),
            joined_topic=kafka.joined_topic(settings),
            batch_size=settings.learner.batch_size,
        )
        typer.echo("dloop: learner running")
        _run_until_signalled(worker, settings)


def migrate(data_dir: DataDir = None) -> None:
    """Upgrade the database schema to the latest version."""
    from service.storage.migrate import upgrade

    settings = settings_for(data_dir)
    private_dir(settings.data_dir)
    upgrade(settings.database_url)
    typer.echo("dloop: database at head")
