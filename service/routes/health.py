"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import generate_latest
from sqlalchemy import text
from starlette.responses import JSONResponse, Response

from service import store
from service.auth import authorize
from service.context import dloop

router = APIRouter()


@router.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/readyz")
def readyz(request: Request) -> Response:
    d = dloop(request)
    checks: dict[str, str] = {}
    try:
        with d.sessions() as session:
            session.execute(text("SELECT 1"))
        checks["storage"] = "ok"
    except Exception as exc:  # any failure means not ready
        checks["storage"] = f"error: {exc.__class__.__name__}"
    checks["log"] = "ok" if not d.log.closed else "closed"
    checks["models"] = "ok" if d.registry.loops else "no loops loaded"
    ready = all(v == "ok" for v in checks.values())
    backlog = d.backlog()
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks, "logBacklogBytes": backlog},
        status_code=200 if ready else 503,
    )


@router.get("/metrics")
def metrics(request: Request) -> Response:
    d = dloop(request)
    authorize(d.keys, request, loop="", admin=True)
    lines = [generate_latest(d.metrics.registry).decode()]
    lines.append("# TYPE dloop_log_backlog_bytes gauge")
    lines.append(f"dloop_log_backlog_bytes {d.backlog()}")
    gauges: dict[str, list[str]] = {}
    with d.sessions() as session:
        lines.append("# TYPE dloop_dead_letters gauge")
        lines.append(f"dloop_dead_letters {store.dead_letter_count(session)}")
        for name, rt in d.registry.loops.items():
            for key, value in store.loop_counts(session, loop=name).items():
                gauges.setdefault(f"dloop_{key}", []).append(f'{{loop="{name}"}} {value}')
            ckpt = store.get_checkpoint(session, loop=name)
            examples = ckpt.examples if ckpt else 0
            gauges.setdefault("dloop_model_examples", []).append(f'{{loop="{name}"}} {examples}')
            gauges.setdefault("dloop_model_info", []).append(
                f'{{loop="{name}",model_id="{rt.model_id}"}} 1'
            )
    for metric, samples in sorted(gauges.items()):
        lines.append(f"# TYPE {metric} gauge")
        lines.extend(f"{metric}{s}" for s in samples)
    return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
