"""dloop: what an in-process ranker (service.local.LocalRanker) needs of the server, on a client
key of its loop: the loop's serving settings, its served model (with a long poll, so a new
publication reaches the application within a second) and the ingest of the decisions and
observations it made, in batches, into the loop's log (joined, learned, evaluated and shown
like the server's own)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from learners.outcomes import REWARD, OutcomeError
from service.api.deps import loop_for
from service.api.errors import bad_request
from service.core import record
from service.pipeline.runtime import LoopRuntime

router = APIRouter()

MAX_WAIT = 30.0  # seconds a model request may wait for a new model
POLL = 0.05  # seconds between two looks at the served model while waiting


def local_settings(request: Request) -> Response:
    d, rt = loop_for(request, admin=False)
    s = rt.serving
    limits = d.feature_limits
    doc: dict[str, Any] = {
        **s.to_doc(),
        "exposureCaps": [
            {"actionId": c.action, "maxShare": c.max_share, "windowSeconds": c.window}
            for c in rt.settings.caps
        ],
        # The outcomes it accepts (`reward` included) and their ranges.
        "outcomes": [
            {"name": o.name, "min": o.low, "max": o.high}
            for o in rt.settings.rules.rewards.outcomes.values()
        ],
        "maxActions": d.settings.max_actions,
        "limits": {
            "maxFeatures": limits.max_features,
            "maxNamespaceFeatures": limits.max_namespace_features,
            "maxDepth": limits.max_depth,
        },
        "modelId": rt.model_id,
    }
    return JSONResponse(doc)


async def local_model(request: Request) -> Response:
    """The served model's bytes with its id (`ETag`, `X-Dloop-Model-Id`); 204 before the first
    model. With `If-None-Match: "<id>"`: 304 while that is still the served model, after
    waiting up to `?wait=` seconds (at most 30) for a new one."""
    _, rt = loop_for(request, admin=False)
    known = request.headers.get("if-none-match", "").strip('"')
    try:
        wait = min(float(request.query_params.get("wait", "0")), MAX_WAIT)
    except ValueError:
        raise bad_request("InvalidRequest", "wait must be a number of seconds") from None
    waited = 0.0
    while rt.served.model_id == known and waited < wait:
        await asyncio.sleep(POLL)
        waited += POLL
        if waited % 1.0 < POLL and await request.is_disconnected():
            return Response(status_code=304)  # the caller left (a shutdown waits for no one)
    served = rt.served  # once: the bytes and the id must match
    headers = {"ETag": f'"{served.model_id}"', "X-Dloop-Model-Id": served.model_id}
    if served.model_id == known:
        return Response(status_code=304, headers=headers)
    if served.path is None:
        return Response(status_code=204, headers=headers)
    body = await asyncio.to_thread(_read, served.path)
    return Response(body, media_type="application/octet-stream", headers=headers)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def local_records(request: Request) -> Response:
    """Decision-log records (service.core.record), one JSON object per line, made by an
    in-process ranker of this loop; all are checked before any is kept (400 names the first
    bad line), then appended to the loop's log in order. The loop's exposure caps count the
    decisions served online, as this process's own ranks count; the answer says which capped
    actions are at or over their cap now (`exposureOver`), so every in-process ranker caps by
    the counts of all the rankers that ship here."""
    d, rt = loop_for(request, admin=False)
    body = await request.body()
    lines = [line for line in body.split(b"\n") if line.strip()]
    if not lines:
        raise bad_request("InvalidRecords", "the body holds no records (one JSON object a line)")
    kept = []
    for i, line in enumerate(lines):
        try:
            r = record.decode(line)
        except record.RecordError as exc:
            raise bad_request("InvalidRecords", f"line {i + 1}: {exc}") from None
        if r.loop != rt.name:
            raise bad_request("InvalidRecords", f"line {i + 1}: a record of loop '{r.loop}'")
        if isinstance(r, record.Observation) and r.k == record.REWARD:
            _check_value(rt, r, i)
        kept.append((r, record.encode(r)))
    now, exposure = d.clock(), rt.exposure
    for r, raw in kept:
        d.log.append(raw)
        if exposure is not None and isinstance(r, record.Decision) and r.mode == "Online":
            served = _served(r)
            if served is not None:
                exposure.record(served, now)
    doc: dict[str, Any] = {"accepted": len(kept)}
    if exposure is not None:
        doc["exposureOver"] = exposure.over(now)
    return JSONResponse(doc, status_code=202)


def _served(r: record.Decision) -> str | None:
    """The id of the action a logged decision served first (None if its context says none)."""
    try:
        tag = orjson.loads(r.c)["_multi"][r.a[0]]["_tag"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None
    return tag if isinstance(tag, str) else None


def _check_value(rt: LoopRuntime, r: record.Observation, i: int) -> None:
    """A reward's or outcome's value, checked as the reward and outcomes calls check it."""
    try:
        rt.settings.rules.rewards.check({r.n or REWARD: r.v})
    except OutcomeError as exc:
        raise bad_request("InvalidRecords", f"line {i + 1}: {exc}") from None


router.add_route("/personalizer/local/settings", local_settings, methods=["GET"])
router.add_route("/personalizer/local/model", local_model, methods=["GET"])
router.add_route("/personalizer/local/records", local_records, methods=["POST"])
