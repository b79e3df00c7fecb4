"""Rank, reward and activate: the hot path, with no database access and no waiting on the log.
Also the end of an RL episode, and an event as logged (read from the database).

A rank's body goes whole to a ranking process, which checks it, builds its features, asks the
model and draws (service.core.ranks); this process keeps the key, the retry cache
(service.api.retries tells retries from reused eventIds), the exposure counts and the log.
Other bodies are read by hand (service.api.requests) so each failure gets Personalizer's error
code and the common case costs as little as possible. For the same reason these are plain Starlette
routes: FastAPI's dependency solving would add about a fifth to each call (measured in-process,
118 -> 92 us per rank). They call service.api.deps.loop_for, the function the FastAPI routes'
AdminLoop is built on; service.api.openapi documents them in /openapi.json and /docs.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from learners.dsjson import timestamp
from learners.outcomes import REWARD
from learners.sandbox import RemoteError, SandboxError
from service.api.deps import loop_for
from service.api.errors import ApiError, bad_request
from service.api.requests import (
    ID_RULE,
    check_event_id,
    is_id,
    is_reward,
    json_body,
    read_body,
    sandbox_error,
)
from service.api.retries import earlier, remember, retried
from service.api.state import Dloop
from service.core import ranks, record
from service.core.requests import checked_outcomes, single_slot_only
from service.pipeline.runtime import LoopRuntime
from service.storage import store

router = APIRouter()


async def rank(request: Request) -> Response:
    d, rt = loop_for(request, admin=False)
    return await ranked(d, rt, await read_body(request))


async def ranked(d: Dloop, rt: LoopRuntime, raw: bytes, *, slots: bool = False) -> Response:
    """A rank (`slots`: a multi-slot rank) of the body `raw`. The whole decision runs in a
    ranking process, beside the model (service.core.ranks: the request's checks, features, the
    draw, the response and records); this process keeps the key, the retry cache, the exposure
    counts and the log."""
    now = d.clock()
    exposure = None if slots else rt.exposure
    header = ranks.call_header(
        rt.serving_doc(),
        max_actions=d.settings.max_actions,
        limits=d.feature_limits,
        served=rt.served,
        over=exposure.over(now) if exposure is not None else None,
        now=now,
        slots=slots,
    )
    try:
        value, blob = await d.rankers.exchange("rank", header, raw)
    except RemoteError as exc:  # not VW's refusal (rank_op answers those itself): a bug
        raise RuntimeError(f"the ranking process failed: {exc.kind}: {exc}") from None
    except SandboxError as exc:
        raise sandbox_error(exc) from None
    answer = ranks.read_answer(value, blob)
    # This process's earlier answer to the eventId (a concurrent rank of it may have been
    # answered while this one was in the ranking process).
    seen = earlier(d, rt, answer.ask)
    if (cached := retried(d, rt, seen, answer.ask)) is not None:
        return cached
    reused = seen is not None
    if not reused:
        for line in answer.records:
            d.log.append(line)
        if exposure is not None and answer.online and answer.chosen is not None:
            exposure.record(answer.chosen, now)
    remember(d, rt, answer.ask, answer.response, reused=reused)
    return Response(answer.response, status_code=201, media_type="application/json")


def log_observation(
    d: Dloop,
    rt: LoopRuntime,
    kind: str,
    event_id: str,
    value: float | None,
    *,
    slot: str | None = None,
    name: str | None = None,
) -> None:
    obs = record.Observation(
        kind, rt.name, event_id, d.clock(), uuid.uuid4().hex, value, slot, name
    )
    d.log.append(record.encode(obs))


def log_outcomes(
    d: Dloop, rt: LoopRuntime, event_id: str, values: dict[str, float], slot: str | None = None
) -> None:
    """One observation per outcome (Personalizer's `reward` logged as a reward)."""
    for name, value in values.items():
        kept = None if name == REWARD else name
        log_observation(d, rt, record.REWARD, event_id, value, slot=slot, name=kept)
    d.metrics.rewards.labels(rt.name).inc()


async def outcomes(request: Request) -> Response:
    """dloop: `{"outcomes": {"click": 1, "purchase": 29.9}}`, the named outcomes of an event
    (learners.outcomes); several calls may add to an event's outcomes."""
    event_id = request.path_params["event_id"]
    d, rt = loop_for(request, admin=False)
    single_slot_only(rt.loop_kind.multi_slot, "InvalidOutcomeRequest")
    check_event_id(event_id, "InvalidOutcomeRequest")
    body = await json_body(request, "InvalidOutcomeRequest")
    values = body.get("outcomes") if isinstance(body, dict) else None
    log_outcomes(d, rt, event_id, checked_outcomes(rt.settings.rules.rewards, values))
    return Response(status_code=204)


async def reward(request: Request) -> Response:
    event_id = request.path_params["event_id"]
    d, rt = loop_for(request, admin=False)
    single_slot_only(rt.loop_kind.multi_slot, "InvalidRewardRequest")
    check_event_id(event_id, "InvalidRewardRequest")
    body = await json_body(request, "InvalidRewardRequest")
    value = body.get("value") if isinstance(body, dict) else None
    if not is_reward(value):
        raise bad_request("InvalidRewardRequest", "value must be a finite number between -1 and 1")
    log_observation(d, rt, record.REWARD, event_id, float(value))
    d.metrics.rewards.labels(rt.name).inc()
    return Response(status_code=204)


async def activate(request: Request) -> Response:
    d, rt = loop_for(request, admin=False)
    return await activate_event(request, d, rt)


async def activate_event(request: Request, d: Dloop, rt: LoopRuntime) -> Response:
    """Activate a deferred event (for a multi-slot event: every slot)."""
    event_id = request.path_params["event_id"]
    check_event_id(event_id, "InvalidEventIdToActivate")
    await json_body(request, "InvalidEventIdToActivate", required=False)
    log_observation(d, rt, record.ACTIVATION, event_id, None)
    d.metrics.activations.labels(rt.name).inc()
    return Response(status_code=204)


async def end_episode(request: Request) -> Response:
    """dloop: `{"terminated": true|false}` ends an RL episode (false: truncated, by a time limit
    rather than by the task; learning then bootstraps from its last state). The first end
    counts."""
    episode_id = request.path_params["episode_id"]
    d, rt = loop_for(request, admin=False)
    if not rt.loop_kind.episodic:
        raise bad_request("InvalidRequest", "episodes exist only in loops of kind rl")
    if not is_id(episode_id):
        raise bad_request("InvalidRequest", f"episodeId must be {ID_RULE}")
    body = await json_body(request, "InvalidRequest", required=False)
    if body is None:
        body = {}
    terminated = body.get("terminated", True) if isinstance(body, dict) else None
    if not isinstance(terminated, bool):
        raise bad_request("InvalidRequest", 'body must be {"terminated": true|false}')
    d.log.append(record.encode(record.EpisodeEnd(rt.name, episode_id, d.clock(), terminated)))
    return Response(status_code=204)


def get_event(request: Request) -> Response:
    """dloop: an event as logged (ranking, probabilities, model, explanation if one was made)
    with its observations and, once joined, its reward."""
    event_id = request.path_params["event_id"]
    d, rt = loop_for(request, admin=True, view=True)
    found = None
    if is_id(event_id):  # no other id can have been stored
        with d.sessions() as session:
            found = store.event(session, loop=rt.name, event_id=event_id)
    if found is None:
        raise ApiError(404, "EventNotFound", f"event '{event_id}' is not in the log (yet)")
    decision, joined, observations = found
    r = record.decode(decision.record)
    assert isinstance(r, record.Decision | record.SlotsDecision)
    c = orjson.loads(r.c)
    doc: dict[str, Any] = {
        "eventId": event_id,
        "timestamp": timestamp(decision.created_at),
        "mode": decision.mode,
        "deferActivation": decision.deferred,
        "modelId": r.m,
        # The features as logged (what VW read), context and actions.
        "contextFeatures": c.get("FromUrl", []),
        "actions": [{"id": a["_tag"], "features": a.get("j", [])} for a in c["_multi"]],
        **_logged_rankings(r),
        "joined": joined is not None,
        "observations": [
            {
                "kind": o.kind,
                "value": o.value,
                "receivedTime": timestamp(o.received_at),
                "status": o.status,
                **({"slotId": o.slot} if o.slot is not None else {}),
                **({"outcome": o.name} if o.name is not None else {}),
            }
            for o in observations
        ],
    }
    if decision.episode is not None:
        doc["episodeId"] = decision.episode
    if joined is not None:
        doc["reward"] = joined.reward
        doc["rewarded"] = joined.rewarded
        doc["learnable"] = joined.learnable
        if joined.reward_version:
            doc["rewardDefinitionVersion"] = joined.reward_version
    if isinstance(r, record.Decision) and r.x is not None:
        doc["inferenceExplanation"] = r.x
    if r.ho:
        doc["holdout"] = True
    return Response(orjson.dumps(doc), media_type="application/json")


def _logged_rankings(r: record.Decision | record.SlotsDecision) -> dict[str, Any]:
    """The ranking a decision served, its reward and baseline actions (per slot if multi-slot)."""
    ids = [a["_tag"] for a in orjson.loads(r.c)["_multi"]]

    def ranking(order: list[int], probabilities: list[float]) -> list[dict[str, Any]]:
        return [{"id": ids[i], "probability": p} for i, p in zip(order, probabilities, strict=True)]

    if isinstance(r, record.SlotsDecision):
        return {
            "slots": [
                {
                    "id": slot.id,
                    "rewardActionId": ids[slot.a[0]],
                    "baselineActionId": ids[b],
                    "ranking": ranking(slot.a, slot.p),
                }
                for slot, b in zip(r.s, r.b, strict=True)
            ]
        }
    return {
        "ranking": ranking(r.a, r.p),
        "rewardActionId": ids[r.a[0]],
        "baselineActionId": ids[r.b],
    }


router.add_route("/personalizer/rank", rank, methods=["POST"])
router.add_route("/personalizer/events/{event_id}", get_event, methods=["GET"])
router.add_route("/personalizer/episodes/{episode_id}/end", end_episode, methods=["POST"])
router.add_route("/personalizer/events/{event_id}/reward", reward, methods=["POST"])
router.add_route("/personalizer/events/{event_id}/activate", activate, methods=["POST"])
router.add_route("/personalizer/events/{event_id}/outcomes", outcomes, methods=["POST"])
