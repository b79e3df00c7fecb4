"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter
from prometheus_client import generate_latest
from sqlalchemy import text
from starlette.responses import JSONResponse, Response

from learners.dsjson import timestamp
from service.api.deps import State, ViewState
from service.api.state import Dloop
from service.storage import store

router = APIRouter()


@router.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/readyz")
def readyz(d: State) -> Response:
    """200 `ready` when storage, log, loops, ranking processes and learner are fine; 200
    `degraded` when some loops fail to learn (the others learn, serving is fine); 503 `not
    ready` when a dependency is down, no ranking process runs, or the embedded learner stopped
    making passes."""
    checks: dict[str, str] = {}
    try:
        with d.sessions() as session:
            session.execute(text("SELECT 1"))
        checks["storage"] = "ok"
    except Exception as exc:  # any failure means not ready
        checks["storage"] = f"error: {exc.__class__.__name__}"
    checks["log"] = "ok" if not d.log.closed else "closed"
    checks["models"] = "ok" if d.registry.loops else "no loops loaded"
    checks["ranking"] = "ok" if d.rankers.alive else "no ranking process is running"
    learner, failing = learner_health(d)
    checks["learner"] = learner
    ready = all(v == "ok" for v in checks.values())
    doc: dict[str, object] = {
        "status": "ready" if ready else "not ready",
        "checks": checks,
        "logBacklogBytes": backlog(d),
    }
    if ready and failing:
        doc["status"] = "degraded"
        doc["failingLoops"] = failing
    return JSONResponse(doc, status_code=200 if ready else 503)


def backlog(d: Dloop) -> int:
    """Bytes of the local log not yet ingested (embedded) or published to Kafka (serve)."""
    consumed = d.worker.offset if d.worker else d.publisher.offset if d.publisher else 0
    return d.log.end() - consumed


def learner_health(d: Dloop) -> tuple[str, list[dict[str, object]]]:
    """The embedded learner's state for /readyz: "ok", or why it is not (it stopped, or
    made no pass for two minutes), and the loops whose last pass failed. The Kafka path's
    learners are processes of their own: /metrics shows their backlog per loop."""
    worker = d.worker
    if worker is None:
        return "ok", []
    if worker.started and not worker.running and not worker.stopping:
        return "the learner thread stopped", []
    stalled = time.monotonic() - worker.passed_at
    if worker.running and stalled > 120:
        return f"no learner pass for {stalled:.0f} s", []
    failing: list[dict[str, object]] = [
        {"loop": name, "since": timestamp(h.since), "failures": h.failures, "error": h.error}
        for name, h in sorted(worker.failing.items())
    ]
    return "ok", failing


def _gauge(lines: list[str], name: str, value: float, help_: str) -> None:
    lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {value:g}"]


@router.get("/metrics")
def metrics(d: ViewState) -> Response:
    lines = [generate_latest(d.metrics.registry).decode().rstrip("\n")]
    _gauge(lines, "dloop_log_backlog_bytes", backlog(d), "Log bytes not yet ingested/published")
    stats = d.rankers.stats
    _gauge(lines, "dloop_rankers_alive", d.rankers.alive, "Ranking processes running")
    _gauge(lines, "dloop_ranker_crashes", stats.crashes, "Ranking processes VW crashed")
    _gauge(lines, "dloop_ranker_timeouts", stats.timeouts, "Ranks stopped at their deadline")
    _gauge(lines, "dloop_ranker_busy", stats.busy, "Ranks refused: no ranking process free")
    _gauge(lines, "dloop_ranker_refused", stats.refused, "Repeats of inputs that crashed VW")
    gauges: dict[str, list[str]] = {}

    def sample(metric: str, labels: str, value: float) -> None:
        gauges.setdefault(metric, []).append(f"{{{labels}}} {value:g}")

    worker = d.worker
    if worker is not None:
        since = time.monotonic() - worker.passed_at
        _gauge(lines, "dloop_learner_seconds_since_pass", since, "Since the learner's last pass")
        _gauge(lines, "dloop_learner_crashes", worker.crashes, "Learning processes VW crashed")
        for name, health in worker.failing.items():
            sample("dloop_learner_failing", f'loop="{name}"', health.failures)
    with d.sessions() as session:
        _gauge(lines, "dloop_dead_letters", store.dead_letter_count(session), "Dead letters")
        counts = store.loop_counts(session)
        examples = store.model_examples(session)
        guarded = store.all_guardrail_states(session)
    for name, rt in d.registry.loops.items():
        for key, value in counts.get(name, {}).items():
            sample(f"dloop_{key}", f'loop="{name}"', value)
        sample("dloop_model_examples", f'loop="{name}"', examples.get(name, 0))
        sample("dloop_model_info", f'loop="{name}",model_id="{rt.model_id}"', 1)
        sample("dloop_fallback", f'loop="{name}"', int(rt.fallback))
    # Guardrails (service.pipeline.guardrails): 1 while breached.
    for g in guarded:
        sample(
            "dloop_guardrail_breached",
            f'loop="{g.loop}",guardrail="{g.guardrail}"',
            int(g.state == "breached"),
        )
    for metric, samples in sorted(gauges.items()):
        lines.append(f"# TYPE {metric} gauge")
        lines.extend(f"{metric}{s}" for s in samples)
    return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
