"""Rank, reward and activate: the hot path, with no database access and no waiting on the log.
Also the end of an RL episode, and an event as logged (read from the database).

Bodies are parsed and validated by hand (orjson) so each failure gets Personalizer's error code
and the common case costs as little as possible. For the same reason these are plain Starlette
routes: FastAPI's dependency solving would add about a fifth to each call (measured in-process,
118 -> 92 us per rank). They call service.api.deps.loop_for, the function the FastAPI routes'
AdminLoop is built on; service.api.openapi documents them in /openapi.json and /docs.
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from learners.dsjson import timestamp
from learners.features import FeatureError, FeatureLimits, clean_features, context_json
from learners.rl import epsilon_greedy
from learners.sampling import restrict, sample
from learners.sandbox import NO_MODEL, SandboxBusy, SandboxError, SandboxTimeout
from service.api.deps import loop_for
from service.api.errors import ApiError, bad_request
from service.api.state import Dloop
from service.core import record
from service.pipeline.runtime import Answered, LoopRuntime
from service.storage import store

router = APIRouter()

MAX_ID = 256


def _rank_error(message: str) -> ApiError:
    return bad_request("InvalidRankRequest", message)


async def _json_body(request: Request, code: str, *, required: bool = True) -> Any:
    body = await request.body()  # at most max_body_bytes: service.api.guard counts them
    if not body.strip():
        if required:
            raise bad_request(code, "request body is required")
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(code, f"request body is not valid JSON: {exc}") from None


def check_feature_count(count: int, limits: FeatureLimits) -> None:
    if count > limits.max_features:
        raise _rank_error(
            f"the request has {count} features; at most {limits.max_features} are allowed"
        )


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_id(value: Any) -> TypeGuard[str]:
    """An id dloop stores (eventId, episodeId, action, slot): 1 to 256 characters, none of them
    a control character (Postgres refuses NUL in text, which used to stop ingestion for every
    loop; a newline at the end of a path made routes match what they should not)."""
    return isinstance(value, str) and 0 < len(value) <= MAX_ID and not _CONTROL.search(value)


ID_RULE = f"a non-empty string of at most {MAX_ID} characters, without control characters"


def _check_event_id(event_id: Any, code: str) -> str:
    if not is_id(event_id):
        raise bad_request(code, f"eventId must be {ID_RULE}")
    return event_id


def _parse_rank(body: Any, max_actions: int, limits: FeatureLimits) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _rank_error("request body must be a JSON object")
    actions = body.get("actions")
    if not isinstance(actions, list) or not 1 <= len(actions) <= max_actions:
        raise _rank_error(f"actions must be a list of 1 to {max_actions} actions")
    ids: list[str] = []
    feats: list[list[dict[str, Any]]] = []
    try:
        context, count = clean_features(
            body.get("contextFeatures"), "contextFeatures", required=False, limits=limits
        )
        for i, action in enumerate(actions):
            if not isinstance(action, dict):
                raise _rank_error(f"actions[{i}] must be an object")
            aid = action.get("id")
            if not is_id(aid):
                raise _rank_error(f"actions[{i}].id must be {ID_RULE}")
            features, n = clean_features(
                action.get("features"), f"actions[{i}].features", required=True, limits=limits
            )
            feats.append(features)
            ids.append(aid)
            count += n
    except FeatureError as exc:
        raise _rank_error(str(exc)) from None
    check_feature_count(count, limits)
    if len(set(ids)) != len(ids):
        raise _rank_error("action ids must be unique")
    excluded = body.get("excludedActions") or []
    if not isinstance(excluded, list) or not all(isinstance(x, str) for x in excluded):
        raise _rank_error("excludedActions must be a list of action ids")
    eligible = [aid not in excluded for aid in ids]
    if not any(eligible):
        raise _rank_error("every action is excluded")
    event_id = body.get("eventId")
    event_id = (
        uuid.uuid4().hex if event_id is None else _check_event_id(event_id, "InvalidRankRequest")
    )
    defer = body.get("deferActivation", False)
    if defer is None:
        defer = False
    if not isinstance(defer, bool):
        raise _rank_error("deferActivation must be true or false")
    return {
        "ids": ids,
        "features": feats,
        "context": context,
        "eligible": eligible,
        "event_id": event_id,
        "defer": defer,
        "features_count": count,
    }


def sandbox_error(exc: SandboxError) -> ApiError:
    """How serving answers when VW could not handle a request in its sandbox."""
    if isinstance(exc, SandboxBusy):
        return ApiError(503, "ServiceUnavailable", f"{exc}; retry shortly", retry_after=1)
    if isinstance(exc, SandboxTimeout):
        return _rank_error(f"ranking this request {exc}: send fewer features")
    return _rank_error(f"features could not be parsed: {exc}")


async def _policy_pmf(
    d: Dloop, rt: LoopRuntime, req: dict[str, Any], context: bytes
) -> tuple[list[float], str]:
    """The policy's probabilities for every action (0 for excluded ones) and the model id.
    VW parses the request in a ranking sandbox even before the first model (which ranks
    uniformly), so a request VW cannot read is refused before it is logged. (With a model and
    exclusions only the eligible actions are parsed here; the learner, in its own sandbox,
    dead-letters what it cannot read.)"""
    eligible: list[bool] = req["eligible"]
    served = rt.served
    scored = context
    if served.path is not None and not all(eligible):
        scored = context_json(
            req["context"],
            [(a, f) for a, f, ok in zip(req["ids"], req["features"], eligible, strict=True) if ok],
        )
    try:
        scores = await d.rankers.predict(rt.name, rt.kind, served, scored)
    except SandboxError as exc:
        raise sandbox_error(exc) from None
    if served.path is None:
        return restrict([1.0] * len(eligible), eligible), served.model_id
    if not rt.loop_kind.explores_in_vw:  # VW only scored them: explore here (learners.rl)
        scores = epsilon_greedy(scores, rt.settings.exploration)
    it = iter(scores)
    return restrict([next(it) if ok else 0.0 for ok in eligible], eligible), served.model_id


@dataclass(frozen=True, slots=True)
class Asked:
    """What a rank asks, for telling a retry from a reuse of its eventId: digests of the whole
    request (its JSON normalised: keys sorted, no whitespace) and of its `what` (the actions),
    which a repeat of the eventId may not change."""

    event_id: str
    request: bytes
    actions: bytes
    what: str


def _digest(value: Any) -> bytes:
    return hashlib.blake2b(
        orjson.dumps(value, option=orjson.OPT_SORT_KEYS), digest_size=16
    ).digest()


def asked(body: Any, event_id: str, actions: Any, what: str) -> Asked:
    return Asked(event_id, _digest(body), _digest(actions), what)


def earlier(d: Dloop, rt: LoopRuntime, ask: Asked) -> Answered | None:
    """This process's earlier answer to the eventId, if it still remembers one; a repeat that
    asks about other actions is refused (400)."""
    seen = d.retries.get(rt.name, ask.event_id)
    if seen is not None and seen.actions != ask.actions:
        raise _rank_error(f"eventId {ask.event_id} was already ranked with different {ask.what}")
    return seen


def retried(d: Dloop, rt: LoopRuntime, seen: Answered | None, ask: Asked) -> Response | None:
    """The original response byte for byte if this request repeats the one answered (a
    client's retry, e.g. after a 5xx); None for a new eventId or one reused for another
    request, which is ranked for its own content."""
    if seen is None or seen.request != ask.request:
        return None
    d.metrics.rank_retries.labels(rt.name).inc()
    return Response(seen.response, status_code=201, media_type="application/json")


def remember(d: Dloop, rt: LoopRuntime, ask: Asked, response: bytes, *, reused: bool) -> None:
    """Keep a logged decision's answer for retries; count a reused eventId's (not logged: the
    first decision of an eventId is the one its rewards join)."""
    if reused:
        d.metrics.event_id_reused.labels(rt.name).inc()
    else:
        d.retries.put(rt.name, ask.event_id, Answered(ask.request, ask.actions, response))
    d.metrics.ranks.labels(rt.name).inc()


async def _explain(d: Dloop, rt: LoopRuntime, req: dict[str, Any]) -> list[dict[str, Any]]:
    """Per action, the context features that moved its probability most (learners.importance),
    computed in a ranking sandbox."""
    ids: list[str] = req["ids"]
    if rt.served.path is None:
        return [{"id": a, "features": []} for a in ids]
    eligible: list[bool] = req["eligible"]
    actions = [(a, f) for a, f, ok in zip(ids, req["features"], eligible, strict=True) if ok]
    try:
        return await d.rankers.explain(
            rt.name,
            rt.kind,
            rt.served,
            context=req["context"],
            actions=actions,
            eligible=eligible,
            ids=ids,
            epsilon=rt.settings.exploration,
        )
    except SandboxError as exc:
        raise sandbox_error(exc) from None


async def rank(request: Request) -> Response:
    d, rt = loop_for(request, admin=False)
    if rt.loop_kind.multi_slot:
        raise _rank_error("this is a multi-slot loop: rank with /multislot/rank")
    body = await _json_body(request, "InvalidRankRequest")
    req = _parse_rank(body, d.settings.max_actions, d.feature_limits)
    event_id: str = req["event_id"]
    ids: list[str] = req["ids"]
    ask = asked(body, event_id, [ids, body.get("excludedActions")], "actions")
    seen = earlier(d, rt, ask)
    if (answer := retried(d, rt, seen, ask)) is not None:
        return answer
    episode = _episode_of(body, rt)
    now = d.clock()
    mode = rt.settings.mode
    context = context_json(req["context"], list(zip(ids, req["features"], strict=True)))
    order, pmf, model_id = await _decide(d, rt, req, context, mode)
    explanation = None
    if rt.settings.explain and mode != "LoggingOnly":
        explanation = await _explain(d, rt, req)
    decision = record.Decision(
        loop=rt.name,
        id=event_id,
        t=now,
        deferred=req["defer"],
        mode=mode,
        c=context.decode(),
        a=order,
        p=[pmf[i] for i in order],
        b=req["eligible"].index(True),
        m=model_id,
        # A step of an episode; a rank without episodeId is an episode of one step.
        ep=(episode or event_id) if rt.loop_kind.episodic else None,
        x=explanation,
    )
    # A concurrent rank of this eventId may have been answered while this one awaited VW.
    later = earlier(d, rt, ask)
    if (answer := retried(d, rt, later, ask)) is not None:
        return answer
    reused = seen is not None or later is not None
    if not reused:
        d.log.append(record.encode(decision))
        if rt.loop_kind.episodic and episode is None:
            d.log.append(record.encode(record.EpisodeEnd(rt.name, event_id, now, term=True)))
    response = orjson.dumps(_rank_document(decision, ids, pmf))
    remember(d, rt, ask, response, reused=reused)
    return Response(response, status_code=201, media_type="application/json")


def _episode_of(body: dict[str, Any], rt: LoopRuntime) -> str | None:
    episode = body.get("episodeId")
    if episode is not None:
        if not rt.loop_kind.episodic:
            raise _rank_error("episodeId is only accepted by loops of kind rl")
        if not is_id(episode):
            raise _rank_error(f"episodeId must be {ID_RULE}")
    return episode


async def _decide(
    d: Dloop, rt: LoopRuntime, req: dict[str, Any], context: bytes, mode: str
) -> tuple[list[int], list[float], str]:
    """The served order of the actions, each one's probability and the deciding model's id."""
    eligible: list[bool] = req["eligible"]
    n = len(eligible)
    if mode == "LoggingOnly":
        # Serve and log the input order: the baseline is the chosen action.
        baseline = eligible.index(True)
        order = [i for i, ok in enumerate(eligible) if ok] + [
            i for i, ok in enumerate(eligible) if not ok
        ]
        model_id = rt.model_id
        try:
            await d.rankers.predict(rt.name, rt.kind, NO_MODEL, context)  # only parses
        except SandboxError as exc:
            raise sandbox_error(exc) from None
        return order, [1.0 if i == baseline else 0.0 for i in range(n)], model_id
    pmf, model_id = await _policy_pmf(d, rt, req, context)
    chosen = sample(pmf, f"{rt.name}/{req['event_id']}")
    rest = sorted((i for i in range(n) if i != chosen), key=lambda i: -pmf[i])
    return [chosen, *rest], pmf, model_id


def _rank_document(decision: record.Decision, ids: list[str], pmf: list[float]) -> dict[str, Any]:
    if decision.mode == "Apprentice":
        # The model's choice is logged (to learn imitation); the baseline is served.
        baseline = decision.b
        served = [baseline] + [i for i in range(len(ids)) if i != baseline]
        ranking = [{"id": ids[i], "probability": 1.0 if i == baseline else 0.0} for i in served]
    else:
        ranking = [{"id": ids[i], "probability": pmf[i]} for i in decision.a]
    doc: dict[str, Any] = {
        "ranking": ranking,
        "eventId": decision.id,
        "rewardActionId": ranking[0]["id"],
    }
    if decision.x is not None:
        doc["inferenceExplanation"] = decision.x
    return doc


def log_observation(
    d: Dloop,
    rt: LoopRuntime,
    kind: str,
    event_id: str,
    value: float | None,
    *,
    slot: str | None = None,
) -> None:
    obs = record.Observation(kind, rt.name, event_id, d.clock(), uuid.uuid4().hex, value, slot)
    d.log.append(record.encode(obs))


async def reward(request: Request) -> Response:
    event_id = request.path_params["event_id"]
    d, rt = loop_for(request, admin=False)
    if rt.loop_kind.multi_slot:
        raise bad_request("InvalidRewardRequest", "multi-slot loop: use /multislot/events/..")
    _check_event_id(event_id, "InvalidRewardRequest")
    body = await _json_body(request, "InvalidRewardRequest")
    value = body.get("value") if isinstance(body, dict) else None
    if not is_reward(value):
        raise bad_request("InvalidRewardRequest", "value must be a finite number between -1 and 1")
    log_observation(d, rt, record.REWARD, event_id, float(value))
    d.metrics.rewards.labels(rt.name).inc()
    return Response(status_code=204)


def is_reward(value: Any) -> TypeGuard[int | float]:
    """A reward value dloop accepts: a finite number (not a boolean) in [-1, 1]."""
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and -1 <= value <= 1
    )


async def activate(request: Request) -> Response:
    d, rt = loop_for(request, admin=False)
    return await activate_event(request, d, rt)


async def activate_event(request: Request, d: Dloop, rt: LoopRuntime) -> Response:
    """Activate a deferred event (for a multi-slot event: every slot)."""
    event_id = request.path_params["event_id"]
    _check_event_id(event_id, "InvalidEventIdToActivate")
    await _json_body(request, "InvalidEventIdToActivate", required=False)
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
    body = await _json_body(request, "InvalidRequest", required=False)
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
    d, rt = loop_for(request, admin=True)
    found = None
    if is_id(event_id):  # no other id can have been stored
        with d.sessions() as session:
            found = store.event(session, loop=rt.name, event_id=event_id)
    if found is None:
        raise ApiError(404, "EventNotFound", f"event '{event_id}' is not in the log (yet)")
    decision, joined, observations = found
    r = record.decode(decision.record)
    assert isinstance(r, record.Decision | record.SlotsDecision)
    doc: dict[str, Any] = {
        "eventId": event_id,
        "timestamp": timestamp(decision.created_at),
        "mode": decision.mode,
        "deferActivation": decision.deferred,
        "modelId": r.m,
        **_logged_rankings(r),
        "joined": joined is not None,
        "observations": [
            {
                "kind": o.kind,
                "value": o.value,
                "receivedTime": timestamp(o.received_at),
                "status": o.status,
                **({"slotId": o.slot} if o.slot is not None else {}),
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
    if isinstance(r, record.Decision) and r.x is not None:
        doc["inferenceExplanation"] = r.x
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
