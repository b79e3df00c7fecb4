"""Offline evaluation and feature-importance jobs: they run in a background thread of the
process that accepted them, with progress and results in the database (so every replica
answers GET).

A job reads the loop's joined interactions in [startTime, endTime), evaluates the online policy,
the baseline, uniform random, each custom policy and (with enablePolicyOptimization) a grid of
VW learning settings (learners.evaluation), and stores Personalizer's EvaluationResult. The
optimal policy is the one with the highest lower 95% confidence bound of its doubly robust
estimate, so a policy that merely got lucky on a small log is not preferred.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import orjson
from sqlalchemy.orm import Session, sessionmaker

from learners import episode_evaluation, evaluation
from learners.evaluation import PolicySpec
from learners.importance import feature_importance
from learners.outcomes import relabel_lines
from learners.policy import with_exploration
from learners.sandbox import process_context
from service.core.kinds import loop_kind
from service.core.schemas import LoopSettings, offline_rules
from service.storage import store
from service.storage.models import Evaluation, FeatureImportance, Loop, OfflineJob

log = logging.getLogger("dloop.evaluations")

# enablePolicyOptimization: exploration algorithms x interactions x learning rates.
SEARCH = [
    ("squarecb", "--cb_explore_adf --squarecb -q ::"),
    ("squarecb-linear", "--cb_explore_adf --squarecb"),
    ("squarecb-lr0.1", "--cb_explore_adf --squarecb -q :: -l 0.1"),
    ("epsilon-mtr", "--cb_explore_adf --epsilon 0.2 --cb_type mtr -q ::"),
    ("epsilon-ips", "--cb_explore_adf --epsilon 0.2 --cb_type ips -q ::"),
    ("epsilon-powert0", "--cb_explore_adf --epsilon 0.2 -q :: --power_t 0 -l 0.01"),
    ("bag5", "--cb_explore_adf --bag 5 -q ::"),
    ("cover4", "--cb_explore_adf --cover 4 -q ::"),
    ("regcb", "--cb_explore_adf --regcbopt -q ::"),
    ("squarecb-l2", "--cb_explore_adf --squarecb -q :: --l2 1e-6"),
]


def policy_specs(
    loop: Loop | None, custom: list[dict[str, str]], optimize: bool
) -> list[PolicySpec]:
    """The policies an evaluation compares (a multi-slot loop searches the CCB versions).
    Without a loop (a log file alone) the online policy is known only by its logged choices."""
    online = PolicySpec("Online", "Online")
    if loop is not None:
        exploration = store.loop_settings(loop).exploration
        arguments = with_exploration(loop.policy["arguments"], exploration)
        online = PolicySpec(loop.policy["name"], "Online", arguments)
    specs = [
        online,
        PolicySpec("Baseline", "Baseline"),
        PolicySpec("Random", "Random"),
    ]
    specs += [
        PolicySpec(
            p["name"],
            "Custom",
            p["arguments"],
            # Trained for another objective (checked when the evaluation was asked for).
            offline_rules(loop.config if loop is not None else None, p["rewardDefinition"])
            if p.get("rewardDefinition")
            else None,
        )
        for p in custom
    ]
    if optimize:
        for name, args in SEARCH:
            if loop is not None and loop_kind(loop.kind).multi_slot:
                args = args.replace("--cb_explore_adf", "--ccb_explore_adf")
            specs.append(PolicySpec(name, "OfflineExperimentation", args))
    return specs


Job = TypeVar("Job", bound=OfflineJob)


def _progress(
    sessions: sessionmaker[Session],
    table: type[Job],
    key: tuple[str, str],
    clock: Callable[[], float],
) -> Callable[[float], None]:
    """A callback that stores a job's progress (0 to 1), at most once a second."""
    last = [0.0]

    def write(fraction: float) -> None:
        if clock() - last[0] < 1.0 and fraction < 1.0:
            return
        last[0] = clock()
        with sessions.begin() as session:
            job = session.get(table, key)
            if job is not None:
                job.progress = round(fraction, 4)

    return write


def _finish(
    sessions: sessionmaker[Session], table: type[Job], key: tuple[str, str], **fields: Any
) -> None:
    """Store a job's results: Succeeded (if the job still exists)."""
    with sessions.begin() as session:
        job = session.get(table, key)
        if job is None:
            return
        for name, value in fields.items():
            setattr(job, name, value)
        job.progress = 1.0
        job.status = "Succeeded"


def _fail(
    sessions: sessionmaker[Session], table: type[Job], key: tuple[str, str], exc: Exception
) -> None:
    log.exception("%s %s/%s failed", table.__name__, *key)
    with sessions.begin() as session:
        job = session.get(table, key)
        if job is not None:
            job.status = "Failed"
            job.description = f"{type(exc).__name__}: {exc}"[:2000]


def run(
    sessions: sessionmaker[Session], loop: str, evaluation_id: str, clock: Callable[[], float]
) -> None:
    """Run one evaluation job to completion (status Succeeded or Failed)."""
    key = (loop, evaluation_id)
    try:
        with sessions.begin() as session:
            ev = session.get(Evaluation, key)
            row = session.get(Loop, loop)
            if ev is None or row is None or ev.status != "NotSubmitted":
                return  # deleted, or taken by another run
            ev.status = "Running"
            kind = row.kind
            specs = policy_specs(row, ev.policies, ev.optimize)
            start, end = ev.start_time, ev.end_time
            reward = ev.reward_definition
            config = dict(row.config)
        if loop_kind(kind).episodic:
            _run_rl(sessions, loop, key, start, end)
            return
        with sessions() as session:
            lines = list(store.export_lines(session, loop=loop, since=start, until=end))
        if reward is not None:  # evaluate under another objective (learners.outcomes)
            lines = list(relabel_lines(lines, offline_rules(config, reward)))
        # Bandit loops: one group; multi-slot loops: one group per slot, each evaluated.
        groups = evaluation.read_any(lines)
        done = [0]
        total = sum(len(g) for g in groups.values()) or 1
        progress = _progress(sessions, Evaluation, key, clock)
        value: list[dict[str, Any]] = []
        lows: dict[str, list[float]] = {}
        for slot, logged in groups.items():
            if not logged:
                continue
            size = len(logged)

            def slot_progress(fraction: float, size: int = size) -> None:
                progress((done[0] + fraction * size) / total)

            results = evaluation.evaluate(
                logged,
                specs,
                progress=slot_progress,
                rules=LoopSettings.from_doc(config).rules.rewards,
            )
            done[0] += len(logged)
            value += evaluation.content(results, start=start, end=end, slot=slot)["value"]
            for r in results:
                if r.spec.source in ("Online", "Custom", "OfflineExperimentation"):
                    lows.setdefault(r.spec.name, []).append(r.estimates["dr"].low)
        doc = evaluation.content([], start=start, end=end)
        doc["value"] = value
        # The optimal policy: best mean lower bound over the slots (one slot for bandits).
        best = max(lows, key=lambda name: sum(lows[name]) / len(lows[name]), default=None)
        _finish(
            sessions,
            Evaluation,
            key,
            content=doc,
            optimal_policy=best,
            description=f"{total if value else 0} logged decisions evaluated",
        )
    except Exception as exc:
        _fail(sessions, Evaluation, key, exc)


def evaluate_rl(
    sessions: sessionmaker[Session], loop: str, start: float, end: float
) -> list[episode_evaluation.EpisodeResult]:
    """RL loops: per-decision importance sampling of the online policy, baseline, random and
    the current model (epsilon-greedy) over the episodes that ended in [start, end)."""
    from learners.rl import RLRanker

    with sessions() as session:
        row = session.get(Loop, loop)
        assert row is not None
        settings = store.loop_settings(row)
        ended = [
            e for e in store.ended_episodes(session, loop=loop, since=start) if e.ended_at < end
        ]
        steps = store.episode_steps(session, loop=loop, episodes=[e.episode_id for e in ended])
        ckpt = store.get_checkpoint(session, loop=loop)
        model = ckpt.model if ckpt is not None else None
    episodes = episode_evaluation.read_episodes(
        [[r.line for r in steps[e.episode_id]] for e in ended]
    )
    specs = [
        PolicySpec("Online", "Online"),
        PolicySpec("Baseline", "Baseline"),
        PolicySpec("Random", "Random"),
    ]
    values = None
    if model is not None:
        ranker = RLRanker(model, 0.0)

        def values(d: evaluation.Logged) -> list[float]:
            return ranker.values(orjson.dumps(orjson.loads(d.line)["c"]))

        specs.append(PolicySpec("current-model", "Custom", row.policy["arguments"]))
    return episode_evaluation.evaluate_episodes(
        episodes,
        specs,
        gamma=settings.discount,
        greedy_values=values,
        epsilon=settings.exploration,
    )


def _run_rl(
    sessions: sessionmaker[Session], loop: str, key: tuple[str, str], start: float, end: float
) -> None:
    results = evaluate_rl(sessions, loop, start, end)
    doc = episode_evaluation.episode_content(results, start=start, end=end)
    usable = [r for r in results if r.usable and r.spec.source in ("Online", "Custom")]
    best = max(usable, key=lambda r: r.estimate.low, default=None)
    _finish(
        sessions,
        Evaluation,
        key,
        content=doc,
        optimal_policy=best.spec.name if best is not None else None,
        description=f"{len(results[0].returns) if results else 0} logged episodes evaluated",
    )


def run_importance(
    sessions: sessionmaker[Session], loop: str, job_id: str, clock: Callable[[], float]
) -> None:
    """Run one feature-importance job (learners.importance) to completion."""
    key = (loop, job_id)
    try:
        with sessions.begin() as session:
            job = session.get(FeatureImportance, key)
            if job is None or job.status != "NotSubmitted":
                return
            job.status = "Running"
            start, end = job.start_time, job.end_time
        with sessions() as session:
            lines = list(store.export_lines(session, loop=loop, since=start, until=end))
        progress = _progress(sessions, FeatureImportance, key, clock)
        scores = feature_importance(lines, progress=progress)
        _finish(
            sessions,
            FeatureImportance,
            key,
            scores=scores,
            description=f"{len(lines)} logged decisions, {len(scores)} features",
        )
    except Exception as exc:
        _fail(sessions, FeatureImportance, key, exc)


def _in_child(url: str, job: str, loop: str, job_id: str) -> None:
    """Run one job in this (child) process, on its own connection to the database."""
    from service.storage.db import make_engine, make_sessionmaker

    os.nice(10)  # ranking comes first
    engine = make_engine(url)
    try:
        JOBS[job](make_sessionmaker(engine), loop, job_id, time.time)
    finally:
        engine.dispose()


JOBS: dict[str, Callable[[sessionmaker[Session], str, str, Callable[[], float]], None]] = {
    "evaluation": run,
    "importance": run_importance,
}


def run_isolated(
    sessions: sessionmaker[Session],
    url: str,
    job: str,
    loop: str,
    job_id: str,
    started: Callable[[Any], None] = lambda process: None,
) -> None:
    """Run a job in a child process: it trains and scores VW policies on logged input, so a
    crash in VW ends the job (status Failed, saying so), never the server."""
    table: type[OfflineJob] = Evaluation if job == "evaluation" else FeatureImportance
    process = process_context().Process(
        target=_in_child, args=(url, job, loop, job_id), daemon=True, name=f"dloop-{job}"
    )
    process.start()
    started(process)
    process.join()
    if process.exitcode == 0:
        return
    how = process.exitcode
    with contextlib.suppress(ValueError, TypeError):
        how = signal.Signals(-process.exitcode).name
    log.error("%s %s/%s: its process ended with %s", job, loop, job_id, how)
    with sessions.begin() as session:
        row = session.get(table, (loop, job_id))
        if row is not None and row.status in ("NotSubmitted", "Running"):
            row.status = "Failed"
            row.description = f"the job's process ended with {how} (Vowpal Wabbit crashed?)"


class Jobs:
    """One background thread for evaluation jobs, each run in a process of its own
    (run_isolated)."""

    def __init__(self, sessions: sessionmaker[Session], url: str):
        self.sessions = sessions
        self.url = url
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dloop-jobs")
        self._running: Any = None  # the process of the job running now

    def submit(self, loop: str, evaluation_id: str) -> Any:
        return self._pool.submit(self._run, "evaluation", loop, evaluation_id)

    def submit_importance(self, loop: str, job_id: str) -> Any:
        return self._pool.submit(self._run, "importance", loop, job_id)

    def _run(self, job: str, loop: str, job_id: str) -> None:
        try:
            run_isolated(self.sessions, self.url, job, loop, job_id, self._started)
        finally:
            self._running = None

    def _started(self, process: Any) -> None:
        self._running = process

    def close(self) -> None:
        """Stop: queued jobs are dropped and a running one is stopped (it stays Running in the
        database, as a job whose server stopped does)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        process = self._running
        if process is not None and process.is_alive():
            process.kill()
