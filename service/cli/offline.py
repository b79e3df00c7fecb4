"""The offline commands on a loop's logs: `dloop logs export`, `replay`, `evaluate` and
`features`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from service.cli.common import DataDir, database, settings_for
from service.core.kinds import CB, CCB, loop_kind
from service.core.settings import Settings

if TYPE_CHECKING:
    from learners.evaluation import Logged, PolicySpec

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


def _time(value: str | None) -> float | None:
    from learners.dsjson import parse_time

    return None if value is None else parse_time(value)


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

    settings = settings_for(data_dir)
    with database(settings) as sessions, sessions() as session:
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


def _with_lines(
    settings: Settings,
    source: str,
    loop: str,
    since: str | None,
    until: str | None,
    offset: int | None,
    use: Any,
) -> Any:
    """Call `use(lines)` with the loop's logged lines from `source` (service.pipeline.sources)."""
    from learners.dsjson import file_lines
    from service.pipeline import sources

    t0, t1 = _time(since), _time(until)
    if source == "kafka":
        if not settings.kafka.bootstrap_servers:
            raise typer.BadParameter("set DLOOP_KAFKA__BOOTSTRAP_SERVERS", param_hint="--source")
        return use(sources.kafka_lines(settings, loop=loop, since=t0, offset=offset, until=t1))
    if source != "db":
        return use(file_lines(source, since=t0, until=t1))
    with database(settings) as sessions, sessions() as session:
        return use(sources.db_lines(session, loop=loop, since=t0, until=t1))


def _loop_row(settings: Settings, loop: str) -> Any:
    """The loop's row, or None (also when there is no database: file sources need none)."""
    from sqlalchemy.exc import SQLAlchemyError

    from service.storage.models import Loop

    if settings.db.url is None and not (settings.data_dir / "dloop.db").exists():
        return None
    try:
        with database(settings) as sessions, sessions() as session:
            return session.get(Loop, loop)
    except SQLAlchemyError:
        return None


RewardOption = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--reward",
        help="Another reward definition (a formula over the loop's outcomes, e.g. "
        "'clip(purchase / 50, 0, 1)'): the logs are relabelled with it first.",
    ),
]


def _relabelled(row: Any, reward: str | None, use: Any) -> Any:
    """`use` of the lines relabelled under --reward (learners.outcomes), or as logged."""
    if reward is None:
        return use
    from learners.outcomes import relabel_lines
    from learners.reward import DefinitionError
    from service.core.schemas import offline_rules

    try:
        rules = offline_rules(row.config if row is not None else None, reward)
    except DefinitionError as exc:
        raise typer.BadParameter(str(exc), param_hint="--reward") from None
    return lambda lines: use(relabel_lines(lines, rules))


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
    reward: RewardOption = None,
) -> None:
    """Train a model from scratch on logged interactions (RL loops: on their episodes)."""
    from service.pipeline.replay import replay_lines, replay_model
    from service.pipeline.runtime import trained_arguments
    from service.storage import store

    settings = settings_for(data_dir)
    row = _loop_row(settings, loop)
    if row is None and (apply or source == "db" or arguments is None):
        raise typer.BadParameter(f"loop '{loop}' does not exist", param_hint="--loop")
    # What the loop trains: its policy with its exploration (as its learner does).
    trained = (
        "" if row is None else trained_arguments(row.kind, row.policy, store.loop_settings(row))
    )
    if row is not None and loop_kind(row.kind).episodic:
        if source != "db" or reward is not None:
            raise typer.BadParameter(
                "RL loops replay their episodes from db, with their own reward",
                param_hint="--source/--reward",
            )
        with database(settings) as sessions, sessions() as session:
            model = replay_model(session, loop=loop, arguments=arguments, passes=passes)
    else:
        args = arguments or trained

        model = _with_lines(
            settings,
            source,
            loop,
            since,
            until,
            offset,
            _relabelled(row, reward, lambda lines: replay_lines(lines, args, passes=passes)),
        )
    if out is not None:
        out.write_bytes(model)
        typer.echo(f"dloop: wrote the model ({len(model)} bytes) to {out}", err=True)
    if apply:
        # Recorded as the arguments it was trained with: the loop's learner continues it only
        # if they are the loop's own.
        _apply_model(settings, loop, model, arguments or trained)


def _apply_model(settings: Settings, loop: str, model: bytes, arguments: str) -> None:
    """Make a replayed model the loop's current one (replay --apply)."""
    from service.storage import store

    with database(settings) as sessions, sessions.begin() as session:
        model_id, _ = store.reset_checkpoint(
            session,
            loop=loop,
            model=model,
            arguments=arguments,
            now=time.time(),
            position=store.max_pos(session, loop=loop) if settings.db.url else None,
        )
    typer.echo(f"dloop: loop '{loop}' now serves model {model_id}", err=True)


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
    reward: RewardOption = None,
    policy_reward: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            help="NAME=FORMULA: train the custom policy NAME for another objective "
            "(repeatable); every policy is still evaluated on every outcome."
        ),
    ] = None,
) -> None:
    """Counterfactual evaluation (IPS, SNIPS, doubly robust, 95% intervals) of the online
    policy, the baseline, uniform random and custom policies on logged interactions."""
    from learners import evaluation
    from service.core.schemas import LoopSettings
    from service.pipeline.evaluations import policy_specs

    settings = settings_for(data_dir)
    row = _loop_row(settings, loop)
    if row is not None and loop_kind(row.kind).episodic:
        if policy or optimize or source != "db" or reward is not None:
            raise typer.BadParameter(
                "RL loops evaluate their logged episodes (db) against the online policy, "
                "the current model, baseline and random",
                param_hint="--policy/--optimize/--source",
            )
        _evaluate_rl(settings, loop, since, until, out)
        return
    specs = policy_specs(row, _custom_policies(row, policy or [], policy_reward or []), optimize)
    groups = _with_lines(
        settings, source, loop, since, until, offset, _relabelled(row, reward, evaluation.read_any)
    )
    if not any(groups.values()):
        typer.echo("dloop: no learnable logged interactions in that range", err=True)
        raise typer.Exit(1)
    value: list[Any] = []
    rules = None if row is None else LoopSettings.from_doc(row.config).rules.rewards
    for slot, logged in groups.items():
        value += _evaluate_slot(slot, logged, specs, rules)
    if out is not None:
        _write_evaluation(out, groups, value)


def _custom_policies(row: Any, policy: list[str], rewards: list[str]) -> list[dict[str, str]]:
    """The --policy NAME=VW_ARGUMENTS items, each checked against the loop's algorithm, with
    the objective --policy-reward NAME=FORMULA trains it for (else the evaluation's)."""
    from learners.policy import PolicyError, algorithm
    from learners.reward import DefinitionError
    from service.core.schemas import offline_rules

    objectives = {}
    for item in rewards:
        name, sep, formula = item.partition("=")
        try:
            offline_rules(row.config if row is not None else None, formula)
        except DefinitionError as exc:
            raise typer.BadParameter(f"{name}: {exc}", param_hint="--policy-reward") from None
        objectives[name] = formula
    names = {item.partition("=")[0] for item in policy}
    if set(objectives) - names:
        unknown = ", ".join(sorted(set(objectives) - names))
        raise typer.BadParameter(f"no --policy named {unknown}", param_hint="--policy-reward")
    from learners.vw import check_policy

    # A file with no loop behind it may hold single- or multi-slot lines.
    algorithms = (
        [algorithm(row.kind)] if row is not None else [algorithm(k.name) for k in (CB, CCB)]
    )
    custom = []
    for item in policy:
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
        spec = {"name": name, "arguments": args}
        if name in objectives:
            spec["rewardDefinition"] = objectives[name]
        custom.append(spec)
    return custom


def _evaluate_slot(
    slot: str, logged: list[Logged], specs: list[PolicySpec], rules: Any = None
) -> list[Any]:
    """Evaluate the policies on one slot's logged decisions ("" for single-slot logs), print
    the table and return the slot's part of the EvaluationResult's "value"."""
    from tqdm import tqdm

    from learners import estimators, evaluation

    with tqdm(total=len(logged), unit="ev", desc=f"evaluate {slot}".strip()) as bar:

        def advance(fraction: float) -> None:
            bar.update(round(fraction * len(logged)) - bar.n)

        results = evaluation.evaluate(logged, specs, progress=advance, rules=rules)
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
    table = evaluation.outcome_table(results)
    if len(table[0]) > 2:  # named outcomes: every one per policy
        typer.echo("\nOutcomes per policy (training reward: DR; outcomes: IPS), 95% intervals")
        widths = [max(len(row[i]) for row in table) + 2 for i in range(len(table[0]))]
        for row in table:
            typer.echo("".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    start, end = logged[0].t, logged[-1].t + 1
    value: list[Any] = evaluation.content(results, start=start, end=end, slot=slot)["value"]
    return value


def _write_evaluation(out: Path, groups: dict[str, list[Logged]], value: list[Any]) -> None:
    """evaluate --out: one EvaluationResult document over every slot's time range."""
    import orjson

    from learners import evaluation

    times = [d.t for g in groups.values() for d in g]
    doc = evaluation.content([], start=min(times), end=max(times) + 1)
    doc["value"] = value
    out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))


def _evaluate_rl(
    settings: Settings, loop: str, since: str | None, until: str | None, out: Path | None
) -> None:
    import orjson

    from learners import episode_evaluation
    from service.pipeline.evaluations import evaluate_rl

    start, end = _time(since) or 0.0, _time(until) or time.time() + 1
    with database(settings) as sessions:
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
        doc = episode_evaluation.episode_content(results, start=start, end=end)
        out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))


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

    settings = settings_for(data_dir)
    if quick:
        predict = _current_model(settings, loop)
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


def _current_model(settings: Settings, loop: str) -> Any:
    """The loop's current model as a function of a decision's lines (features --quick)."""
    from learners.cb import CBRanker
    from learners.rl import RLRanker
    from service.storage import store

    row = _loop_row(settings, loop)
    with database(settings) as sessions, sessions() as session:
        ckpt = store.get_checkpoint(session, loop=loop)
    if row is None or ckpt is None or ckpt.model is None:
        raise typer.BadParameter(f"loop '{loop}' has no model yet", param_hint="--loop")
    return (
        RLRanker(ckpt.model, 0.0).values
        if loop_kind(row.kind).episodic
        else CBRanker(ckpt.model).predict
    )


def _print_scores(scores: list[dict[str, Any]], top: int) -> None:
    for s in scores[:top]:
        name = f"{s['namespace']}.{s['featureName']}" if s["namespace"] else s["featureName"]
        typer.echo(f"{s['score']:>8.3f}  {name}")
