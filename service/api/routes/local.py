"""dloop: what an in-process ranker (service.local.LocalRanker) needs of the server, on a client
key of its loop: the loop's serving settings, its served model (with a long poll, so a new
publication reaches the application within a second) and the ingest of the decisions and
observations it made, in batches, into the loop's log (joined, learned, evaluated and shown
like the server's own)."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import orjson
from fastapi import APIRouter, Request
from sqlalchemy.exc import OperationalError
from starlette.responses import JSONResponse, Response

from learners.outcomes import REWARD, OutcomeError
from service.api.deps import loop_for
from service.api.errors import bad_request
from service.api.state import Dloop
from service.core import record
from service.core.errors import ApiError
from service.pipeline.runtime import LoopRuntime
from service.storage import store

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
    """The served model's bytes with its id (`ETag`, `X-Dloop-Model-Id`) and SHA-256
    (`X-Dloop-Model-Sha256`); 204 before the first model. With `If-None-Match: "<id>"`: 304
    while that is still the served model, after waiting up to `?wait=` seconds (at most 30)
    for a new one."""
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
    body, digest = await asyncio.to_thread(_read, served.path)
    headers[DIGEST] = digest
    return Response(body, media_type="application/octet-stream", headers=headers)


# The model's SHA-256 (hex, as a signed export's manifest has it): the ranker loads no bytes
# that do not match it.
DIGEST = "X-Dloop-Model-Sha256"


def _read(path: str) -> tuple[bytes, str]:
    with open(path, "rb") as f:
        body = f.read()
    return body, hashlib.sha256(body).hexdigest()


async def local_records(request: Request) -> Response:
    """Decision-log records (service.core.record), one JSON object per line, made by an
    in-process ranker of this loop, appended to the loop's log in order. A line it cannot
    take (unreadable, of another loop, a value the loop's outcomes no longer accept) is kept in
    the dead letters with why (source `local-records`) and the rest are taken: no retry would
    change the answer, and refusing the batch would hold up every record behind it. The loop's
    exposure caps count the decisions served online, as this process's own ranks count; the
    answer says how many were taken and dead-lettered (with the first reasons) and which
    capped actions are at or over their cap now (`exposureOver`), so every in-process ranker
    caps by the counts of all the rankers that ship here."""
    d, rt = loop_for(request, admin=False)
    body = await request.body()
    lines = [line for line in body.split(b"\n") if line.strip()]
    if not lines:
        raise bad_request("InvalidRecords", "the body holds no records (one JSON object a line)")
    kept: list[tuple[record.Record, bytes]] = []
    refused: list[tuple[bytes, str]] = []
    for i, line in enumerate(lines):
        try:
            r, raw = record.decode_kept(line.strip())
            why = _refusal(rt, r)
        except record.RecordError as exc:
            why = str(exc)
        if why is None:
            # As sent when it holds a record's fields alone (every reader of the log reads it
            # with the same record.decode), else without what no reader reads.
            kept.append((r, raw))
        else:
            refused.append((line, f"line {i + 1}: {why}"))
    now, exposure = d.clock(), rt.exposure
    if refused:
        # Kept before anything is appended: if the database is away the batch is refused whole
        # (503) and sent again, so a record is never appended twice.
        try:
            await asyncio.to_thread(_dead_letter, d, rt.name, refused, now)
        except OperationalError:
            raise ApiError(
                503,
                "ServiceUnavailable",
                "the database is unavailable; retry shortly",
                retry_after=1,
            ) from None
    d.log.append_many([raw for _, raw in kept])
    if exposure is not None:
        for r, _ in kept:
            if isinstance(r, record.Decision) and r.mode == "Online":
                served = _served(r)
                if served is not None:
                    exposure.record(served, now)
    doc: dict[str, Any] = {"accepted": len(kept)}
    if refused:
        doc["deadLettered"] = len(refused)
        doc["refusals"] = [why for _, why in refused[:MAX_REASONS]]
    if exposure is not None:
        doc["exposureOver"] = exposure.over(now)
    return JSONResponse(doc, status_code=202)


# Where the records the server refused are kept (DeadLetter.source), and how many of a batch's
# reasons its answer repeats.
SOURCE = "local-records"
MAX_REASONS = 10


def _refusal(rt: LoopRuntime, r: record.Record) -> str | None:
    """Why a shipped record cannot be taken, or None."""
    if r.loop != rt.name:
        return f"a record of loop '{r.loop}'"
    if isinstance(r, record.Observation) and r.k == record.REWARD:
        try:  # its value, checked as the reward and outcomes calls check it
            rt.settings.rules.rewards.check({r.n or REWARD: r.v})
        except OutcomeError as exc:
            return str(exc)
    return None


def _dead_letter(d: Dloop, loop: str, refused: list[tuple[bytes, str]], now: float) -> None:
    with d.sessions.begin() as session:
        for line, why in refused:
            store.dead_letter(
                session,
                source=SOURCE,
                loop=loop,
                ref=None,
                record=line.decode(errors="replace"),
                reason=why,
                now=now,
            )


def _served(r: record.Decision) -> str | None:
    """The id of the action a logged decision served first (None if its context says none)."""
    try:
        tag = orjson.loads(r.c)["_multi"][r.a[0]]["_tag"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None
    return tag if isinstance(tag, str) else None


router.add_route("/personalizer/local/settings", local_settings, methods=["GET"])
router.add_route("/personalizer/local/model", local_model, methods=["GET"])
router.add_route("/personalizer/local/records", local_records, methods=["POST"])
