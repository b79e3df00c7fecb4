"""The `dloop` command."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from service.core.files import private_dir
from service.core.settings import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

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


@contextmanager
def _database(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """Sessions on the configured database for one command; the engine is closed after."""
    from service.storage.db import make_engine, make_sessionmaker

    engine = make_engine(settings.database_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def _settings(data_dir: Path | None, **overrides: object) -> Settings:
    from pydantic import ValidationError

    from service.core.schemas import validation_message

    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        return load_settings(**overrides)
    except ValidationError as exc:  # a bad DLOOP_* variable: say which, no traceback
        typer.echo(f"dloop: invalid settings: {validation_message(exc)}", err=True)
        raise typer.Exit(2) from None


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
    with _database(settings) as sessions, sessions.begin() as session:
        store.ensure_loop(
            session, name=store.DEFAULT_LOOP, kind="cb", now=now, policy=settings.default_policy
        )
        if store.has_admin_key(session, now=now):
            return None
        _, key = store.create_key(
            session, role="admin", loop=None, now=now, source="cli", label="dloop up"
        )
        return key


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
    uvicorn.run(create_app(settings), **_server_options(settings))


@app.command()
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

    settings = _settings(data_dir, host=host, port=port)
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


@app.command()
def join() -> None:
    """Join rewards to decisions: consume the events topic into the database (consumer group
    `<prefix>.joiner`; run as many as there are partitions) and publish joined interactions."""
    from service.pipeline.join_worker import JoinWorker
    from service.storage import kafka

    settings = _settings(None)
    _require_production(settings)
    kafka.ensure_topics(settings)
    with _database(settings) as sessions:
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


@app.command()
def learn() -> None:
    """Train every loop's model from the joined topic (consumer group `<prefix>.learner`; one
    learner per loop at a time), checkpointing models with offsets in the database."""
    from service.pipeline.learn_worker import LearnWorker
    from service.storage import kafka

    settings = _settings(None)
    _require_production(settings)
    kafka.ensure_topics(settings)
    with _database(settings) as sessions:
        worker = LearnWorker(
            sessions=sessions,
            consumer=kafka.consumer(settings, group=f"{settings.kafka.topic_prefix}.learner"),
            joined_topic=kafka.joined_topic(settings),
            batch_size=settings.learner.batch_size,
        )
        typer.echo("dloop: learner running")
        _run_until_signalled(worker, settings)


@app.command()
def migrate(data_dir: DataDir = None) -> None:
    """Upgrade the database schema to the latest version."""
    from service.storage.migrate import upgrade

    settings = _settings(data_dir)
    private_dir(settings.data_dir)
    upgrade(settings.database_url)
    typer.echo("dloop: database at head")


def _time(value: str | None) -> float | None:
    from learners.dsjson import parse_time

    return None if value is None else parse_time(value)


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

    from service.storage import store
    from service.storage.models import Joined

    settings = _settings(data_dir)
    with _database(settings) as sessions, sessions() as session:
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
    if str(out) != "-":
        typer.echo(f"dloop: wrote {n} interactions to {out}", err=True)


Source = Annotated[
    str,
    typer.Option(help="Where the logs come from: db (default), kafka, or a DSJSON file ('-')."),
]
Since = Annotated[Optional[str], typer.Option(help="ISO-8601 start (inclusive).")]  # noqa: UP045
Until = Annotated[Optional[str], typer.Option(help="ISO-8601 end (exclusive).")]  # noqa: UP045
Offset = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(help="kafka: start at this offset of every partition (instead of --since)."),
]


def _with_lines(
    settings: Settings,
    source: str,
    loop: str,
    since: str | None,
    until: str | None,
    offset: int | None,
    use: Any,
) -> Any:
    """Call `use(lines)` with the loop's logged lines from `source` (learners.sources)."""
    from learners.dsjson import file_lines
    from service.pipeline import sources

    t0, t1 = _time(since), _time(until)
    if source == "kafka":
        if not settings.kafka.bootstrap_servers:
            raise typer.BadParameter("set DLOOP_KAFKA__BOOTSTRAP_SERVERS", param_hint="--source")
        return use(sources.kafka_lines(settings, loop=loop, since=t0, offset=offset, until=t1))
    if source != "db":
        return use(file_lines(source, since=t0, until=t1))
    with _database(settings) as sessions, sessions() as session:
        return use(sources.db_lines(session, loop=loop, since=t0, until=t1))


def _loop_row(settings: Settings, loop: str) -> Any:
    """The loop's row, or None (also when there is no database: file sources need none)."""
    from sqlalchemy.exc import SQLAlchemyError

    from service.storage.models import Loop

    if settings.db.url is None and not (settings.data_dir / "dloop.db").exists():
        return None
    try:
        with _database(settings) as sessions, sessions() as session:
            return session.get(Loop, loop)
    except SQLAlchemyError:
        return None


@app.command()
def replay(
    loop: Annotated[str, typer.Option(help="Loop whose logs to learn from.")] = "default",
    data_dir: DataDir = None,
    source: Source = "db",
    since: Since = None,
    until: Until = None,
    offset: Offset = None,
    arguments: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="VW arguments (default: the loop's policy)."),
    ] = None,
    passes: Annotated[int, typer.Option(min=1, help="Passes over the logs.")] = 1,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Write the model here (import it with PUT .../model)."),
    ] = None,
    apply: Annotated[
        bool, typer.Option("--apply", help="Make it the loop's model (warm start).")
    ] = False,
) -> None:
    """Train a model from scratch on logged interactions (RL loops: on their episodes)."""
    from learners.vw import with_exploration
    from service.pipeline.replay import replay_lines, replay_model
    from service.storage import store

    settings = _settings(data_dir)
    row = _loop_row(settings, loop)
    if row is None and (apply or source == "db" or arguments is None):
        raise typer.BadParameter(f"loop '{loop}' does not exist", param_hint="--loop")
    if row is not None and row.kind == "rl":
        if source != "db":
            raise typer.BadParameter(
                "RL loops replay their episodes from db", param_hint="--source"
            )
        with _database(settings) as sessions, sessions() as session:
            model = replay_model(session, loop=loop, arguments=arguments, passes=passes)
    else:
        args = arguments or with_exploration(
            row.policy["arguments"], store.loop_settings(row).exploration
        )
        model = _with_lines(
            settings,
            source,
            loop,
            since,
            until,
            offset,
            lambda lines: replay_lines(lines, args, passes=passes),
        )
    if out is not None:
        out.write_bytes(model)
        typer.echo(f"dloop: wrote the model ({len(model)} bytes) to {out}", err=True)
    if apply:
        with _database(settings) as sessions, sessions.begin() as session:
            model_id, _ = store.reset_checkpoint(
                session,
                loop=loop,
                model=model,
                arguments=arguments or row.policy["arguments"],
                now=time.time(),
                position=store.max_pos(session, loop=loop) if settings.db.url else None,
            )
        typer.echo(f"dloop: loop '{loop}' now serves model {model_id}", err=True)


@app.command()
def evaluate(
    loop: Annotated[str, typer.Option(help="Loop whose logs to evaluate on.")] = "default",
    data_dir: DataDir = None,
    source: Source = "db",
    since: Since = None,
    until: Until = None,
    offset: Offset = None,
    policy: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(help="A custom policy NAME=VW_ARGUMENTS (repeatable)."),
    ] = None,
    optimize: Annotated[
        bool, typer.Option("--optimize", help="Also search VW learning settings.")
    ] = False,
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Write Personalizer's EvaluationResult JSON here."),
    ] = None,
) -> None:
    """Counterfactual evaluation (IPS, SNIPS, doubly robust, 95% intervals) of the online
    policy, the baseline, uniform random and custom policies on logged interactions."""
    import orjson
    from tqdm import tqdm

    from learners import estimators, evaluation
    from learners.vw import PolicyError, algorithm, check_policy
    from service.pipeline.evaluations import policy_specs

    settings = _settings(data_dir)
    row = _loop_row(settings, loop)
    if row is not None and row.kind == "rl":
        if policy or optimize or source != "db":
            raise typer.BadParameter(
                "RL loops evaluate their logged episodes (db) against the online policy, "
                "the current model, baseline and random",
                param_hint="--policy/--optimize/--source",
            )
        _evaluate_rl(settings, loop, since, until, out)
        return
    # A file with no loop behind it may hold single- or multi-slot lines.
    algorithms = [algorithm(row.kind)] if row is not None else [algorithm(k) for k in ("cb", "ccb")]
    custom = []
    for item in policy or []:
        name, sep, args = item.partition("=")
        errors = []
        for algo in algorithms:
            try:
                check_policy(args, algorithm=algo)
            except PolicyError as exc:
                errors.append(str(exc))
        if not sep or not name or len(errors) == len(algorithms):
            raise typer.BadParameter(
                f"NAME=VW_ARGUMENTS ({'; '.join(errors) or 'no name'})", param_hint="--policy"
            )
        custom.append({"name": name, "arguments": args})
    specs = policy_specs(row, custom, optimize)
    groups = _with_lines(settings, source, loop, since, until, offset, evaluation.read_any)
    if not any(groups.values()):
        typer.echo("dloop: no learnable logged interactions in that range", err=True)
        raise typer.Exit(1)
    value: list[Any] = []
    for slot, logged in groups.items():
        with tqdm(total=len(logged), unit="ev", desc=f"evaluate {slot}".strip()) as bar:

            def advance(fraction: float, bar: Any = bar, n: int = len(logged)) -> None:
                bar.update(round(fraction * n) - bar.n)

            results = evaluation.evaluate(logged, specs, progress=advance)
        where = f" in slot {slot}" if slot else ""
        typer.echo(f"{len(logged)} logged decisions{where}; 95% confidence intervals")
        typer.echo(f"{'policy':<28}{'source':<24}{'DR':>24}{'IPS':>8}{'SNIPS':>8}{'ESS':>8}")
        for r in sorted(results, key=lambda r: -r.estimates["dr"].value):
            e = r.estimates
            dr = f"{e['dr'].value:.4f} [{e['dr'].low:.3f}, {e['dr'].high:.3f}]"
            ess = estimators.effective_sample_size(r.weights)
            typer.echo(
                f"{r.spec.name[:27]:<28}{r.spec.source:<24}{dr:>24}"
                f"{e['ips'].value:>8.4f}{e['snips'].value:>8.4f}{ess:>8.0f}"
            )
        start, end = logged[0].t, logged[-1].t + 1
        value += evaluation.content(results, start=start, end=end, slot=slot)["value"]
    if out is not None:
        times = [d.t for g in groups.values() for d in g]
        doc = evaluation.content([], start=min(times), end=max(times) + 1)
        doc["value"] = value
        out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))


def _evaluate_rl(
    settings: Settings, loop: str, since: str | None, until: str | None, out: Path | None
) -> None:
    import orjson

    from learners import evaluation
    from service.pipeline.evaluations import evaluate_rl

    start, end = _time(since) or 0.0, _time(until) or time.time() + 1
    with _database(settings) as sessions:
        results = evaluate_rl(sessions, loop, start, end)
    episodes = len(results[0].returns) if results else 0
    if not episodes:
        typer.echo("dloop: no ended episodes in that range", err=True)
        raise typer.Exit(1)
    typer.echo(f"{episodes} logged episodes; per-decision importance sampling, 95% intervals")
    typer.echo(f"{'policy':<28}{'source':<12}{'discounted return':>28}{'ESS':>8}  usable")
    for r in sorted(results, key=lambda r: -r.estimate.value):
        e = r.estimate
        ret = f"{e.value:.4f} [{e.low:.3f}, {e.high:.3f}]"
        typer.echo(
            f"{r.spec.name[:27]:<28}{r.spec.source:<12}{ret:>28}{r.effective_sample_size:>8.1f}"
            f"  {'yes' if r.usable else 'no: weights too uneven'}"
        )
    if out is not None:
        doc = evaluation.episode_content(results, start=start, end=end)
        out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))


@app.command()
def features(
    loop: Annotated[str, typer.Option(help="Loop whose logs to analyse.")] = "default",
    data_dir: DataDir = None,
    source: Source = "db",
    since: Since = None,
    until: Until = None,
    offset: Offset = None,
    top: Annotated[int, typer.Option(help="Show this many features.")] = 20,
    quick: Annotated[
        bool,
        typer.Option("--quick", help="Ask the loop's current model instead of retraining."),
    ] = False,
) -> None:
    """Feature importance: how much leaving each feature out hurts a reward model (or, with
    --quick, moves the current model's output)."""
    from tqdm import tqdm

    from learners.importance import feature_importance, model_importance

    settings = _settings(data_dir)
    if quick:
        from learners.cb import CBRanker
        from learners.rl import RLRanker
        from service.storage import store

        row = _loop_row(settings, loop)
        with _database(settings) as sessions, sessions() as session:
            ckpt = store.get_checkpoint(session, loop=loop)
        if row is None or ckpt is None or ckpt.model is None:
            raise typer.BadParameter(f"loop '{loop}' has no model yet", param_hint="--loop")
        predict = (
            RLRanker(ckpt.model, 0.0).values if row.kind == "rl" else CBRanker(ckpt.model).predict
        )
        scores = _with_lines(
            settings,
            source,
            loop,
            since,
            until,
            offset,
            lambda lines: model_importance(predict, lines),
        )
        _print_scores(scores, top)
        return
    with tqdm(total=100, unit="%", desc="features") as bar:

        def progress(f: float) -> None:
            bar.update(round(f * 100) - bar.n)

        scores = _with_lines(
            settings,
            source,
            loop,
            since,
            until,
            offset,
            lambda lines: feature_importance(lines, progress=progress),
        )
    _print_scores(scores, top)


def _print_scores(scores: list[dict[str, Any]], top: int) -> None:
    for s in scores[:top]:
        name = f"{s['namespace']}.{s['featureName']}" if s["namespace"] else s["featureName"]
        typer.echo(f"{s['score']:>8.3f}  {name}")


@app.command()
def simulate(
    env: Annotated[str, typer.Option("--env", help="Gymnasium environment id.")],
    episodes: Annotated[int, typer.Option(min=1, help="Episodes to play.")] = 200,
    url: Annotated[str, typer.Option(help="dloop endpoint.")] = "http://127.0.0.1:8000",
    loop: Annotated[str, typer.Option(help="Loop to drive (created if missing).")] = "sim",
    kind: Annotated[str, typer.Option(help="Loop kind: rl or cb.")] = "rl",
    key: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(envvar="DLOOP_API_KEY", help="Admin key (or DLOOP_API_KEY)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory for curve.csv and curve.png.")] = Path(
        "simulate"
    ),
    seed: Annotated[int, typer.Option(help="First episode's environment seed.")] = 0,
    max_steps: Annotated[int, typer.Option(min=1, help="Truncate episodes here.")] = 200,
    reward_scale: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="Divide rewards by this (dloop takes [-1, 1]; known envs preset)."),
    ] = None,
    eval_every: Annotated[int, typer.Option(help="Greedy evaluation every N episodes.")] = 25,
    tabular: Annotated[
        Optional[bool],  # noqa: UP045
        typer.Option(
            "--tabular/--generic",
            help="RL policy: state x action table (default for discrete observations).",
        ),
    ] = None,
) -> None:
    """Drive a gymnasium environment with a discrete action space through the HTTP API and
    plot its learning curve (return per episode, moving average, greedy return)."""
    import gymnasium as gym

    from learners.rl import DEFAULT_RL_POLICY, TABULAR_RL_POLICY
    from service.client import Client, DloopError
    from service.pipeline import simulate as sim

    if key is None:
        raise typer.BadParameter("an admin key is needed (--key or DLOOP_API_KEY)")
    if kind not in ("rl", "cb"):
        raise typer.BadParameter("rl or cb", param_hint="--kind")
    probe = sim.make_env(env, max_steps)
    if tabular is None:
        tabular = isinstance(probe.observation_space, gym.spaces.Discrete)
    with Client(url, key=key, loop=loop) as client:
        try:
            client.create_loop(kind)
        except DloopError as exc:
            raise typer.BadParameter(f"cannot create loop '{loop}': {exc}") from None
        client.configure(modelExportFrequency="PT1S", rewardWaitTime="PT10S")
        if kind == "rl":
            client.set_policy(
                "dloop-rl-tabular" if tabular else "dloop-rl",
                TABULAR_RL_POLICY if tabular else DEFAULT_RL_POLICY,
            )
        curve = sim.run(
            client,
            env,
            episodes,
            seed=seed,
            max_steps=max_steps,
            reward_scale=reward_scale,
            eval_every=eval_every,
            kind=kind,
        )
    out.mkdir(parents=True, exist_ok=True)
    curve.write_csv(out / "curve.csv")
    curve.plot(out / "curve.png")
    last = max(curve.greedy)
    typer.echo(
        f"dloop: {episodes} episodes; mean return of the last 20 "
        f"{sum(curve.returns[-20:]) / len(curve.returns[-20:]):.2f}; greedy return "
        f"{curve.greedy[last]:.2f}"
        + ("" if curve.optimal is None else f" (optimal {curve.optimal:.2f})")
        + f"; wrote {out / 'curve.csv'} and {out / 'curve.png'}"
    )


ExpiresInDays = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option("--expires-in-days", help="Refused after this many days (default: never)."),
]


@keys_app.command("create")
def keys_create(
    data_dir: DataDir = None,
    loop: Annotated[str, typer.Option(help="Loop a client key is for.")] = "default",
    admin: Annotated[bool, typer.Option("--admin", help="An admin key (every loop).")] = False,
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
    settings = _migrated(data_dir)
    now = time.time()
    with _database(settings) as sessions, sessions.begin() as session:
        if not admin and session.get(Loop, loop) is None:
            raise typer.BadParameter(f"loop '{loop}' does not exist", param_hint="--loop")
        _, key = store.create_key(
            session,
            role="admin" if admin else "client",
            loop=None if admin else loop,
            now=now,
            source="cli",
            label=options.label,
            expires_at=options.expiry(now),
        )
    typer.echo(key)


@keys_app.command("list")
def keys_list(data_dir: DataDir = None) -> None:
    """List every key: id, role, loop, source, label, created and expiry times (never the key)."""
    from learners.dsjson import timestamp
    from service.storage import store

    settings = _migrated(data_dir)
    now = time.time()
    with _database(settings) as sessions, sessions() as session:
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


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[int, typer.Argument(help="The key's id (see `dloop keys list`).")],
    data_dir: DataDir = None,
) -> None:
    """Revoke a key at once (serving processes stop accepting it within a second). The last
    valid admin key cannot be revoked; create another first."""
    from service.storage import store

    settings = _migrated(data_dir)
    with _database(settings) as sessions, sessions.begin() as session:
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

    settings = _settings(data_dir)
    private_dir(settings.data_dir)
    upgrade(settings.database_url)
    return settings


def main() -> None:
    app()
