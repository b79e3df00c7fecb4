"""The hot-path requests' bodies, parsed and validated by hand (orjson) so each failure gets
Personalizer's error code and the common case costs as little as possible: rank requests (single-
and multi-slot), event ids, reward values; and how a VW failure in the sandbox is answered."""

from __future__ import annotations

import math
import re
import uuid
from typing import Any, TypeGuard

import orjson
from starlette.requests import Request

from learners.features import FeatureError, FeatureLimits, clean_features
from learners.sandbox import SandboxBusy, SandboxError, SandboxTimeout
from service.api.errors import ApiError, bad_request

MAX_ID = 256


def rank_error(message: str) -> ApiError:
    return bad_request("InvalidRankRequest", message)


async def json_body(request: Request, code: str, *, required: bool = True) -> Any:
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
        raise rank_error(
            f"the request has {count} features; at most {limits.max_features} are allowed"
        )


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_id(value: Any) -> TypeGuard[str]:
    """An id dloop stores (eventId, episodeId, action, slot): 1 to 256 characters, none of them
    a control character (Postgres refuses NUL in text, which used to stop ingestion for every
    loop; a newline at the end of a path made routes match what they should not)."""
    return isinstance(value, str) and 0 < len(value) <= MAX_ID and not _CONTROL.search(value)


ID_RULE = f"a non-empty string of at most {MAX_ID} characters, without control characters"


def check_event_id(event_id: Any, code: str) -> str:
    if not is_id(event_id):
        raise bad_request(code, f"eventId must be {ID_RULE}")
    return event_id


def parse_rank(body: Any, max_actions: int, limits: FeatureLimits) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise rank_error("request body must be a JSON object")
    actions = body.get("actions")
    if not isinstance(actions, list) or not 1 <= len(actions) <= max_actions:
        raise rank_error(f"actions must be a list of 1 to {max_actions} actions")
    ids: list[str] = []
    feats: list[list[dict[str, Any]]] = []
    try:
        context, count = clean_features(
            body.get("contextFeatures"), "contextFeatures", required=False, limits=limits
        )
        for i, action in enumerate(actions):
            if not isinstance(action, dict):
                raise rank_error(f"actions[{i}] must be an object")
            aid = action.get("id")
            if not is_id(aid):
                raise rank_error(f"actions[{i}].id must be {ID_RULE}")
            features, n = clean_features(
                action.get("features"), f"actions[{i}].features", required=True, limits=limits
            )
            feats.append(features)
            ids.append(aid)
            count += n
    except FeatureError as exc:
        raise rank_error(str(exc)) from None
    check_feature_count(count, limits)
    if len(set(ids)) != len(ids):
        raise rank_error("action ids must be unique")
    excluded = body.get("excludedActions") or []
    if not isinstance(excluded, list) or not all(isinstance(x, str) for x in excluded):
        raise rank_error("excludedActions must be a list of action ids")
    eligible = [aid not in excluded for aid in ids]
    if not any(eligible):
        raise rank_error("every action is excluded")
    event_id = body.get("eventId")
    event_id = (
        uuid.uuid4().hex if event_id is None else check_event_id(event_id, "InvalidRankRequest")
    )
    defer = body.get("deferActivation", False)
    if defer is None:
        defer = False
    if not isinstance(defer, bool):
        raise rank_error("deferActivation must be true or false")
    unit = body.get("unitId")  # dloop: the live holdout's sticky key (a user, a session)
    if unit is not None and not is_id(unit):
        raise rank_error(f"unitId must be {ID_RULE}")
    return {
        "ids": ids,
        "features": feats,
        "context": context,
        "eligible": eligible,
        "event_id": event_id,
        "defer": defer,
        "unit": unit,
        "features_count": count,
    }


def sandbox_error(exc: SandboxError) -> ApiError:
    """How serving answers when VW could not handle a request in its sandbox."""
    if isinstance(exc, SandboxBusy):
        return ApiError(503, "ServiceUnavailable", f"{exc}; retry shortly", retry_after=1)
    if isinstance(exc, SandboxTimeout):
        return rank_error(f"ranking this request {exc}: send fewer features")
    return rank_error(f"features could not be parsed: {exc}")


def is_reward(value: Any) -> TypeGuard[int | float]:
    """A reward value dloop accepts: a finite number (not a boolean) in [-1, 1]."""
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and -1 <= value <= 1
    )
