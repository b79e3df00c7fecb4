"""Rank, reward and event-id rules, checked by hand (orjson bodies, no framework) so each
failure gets Personalizer's error code and message and the common case costs little. The API
(service.api.requests reads the bodies) and the in-process ranker (service.local) share them,
so both refuse the same input the same way."""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeGuard

import orjson

from learners.features import (
    FeatureError,
    FeatureLimits,
    Features,
    actions_json,
    clean_features,
)
from learners.outcomes import OutcomeError, RewardRules
from service.core.errors import ApiError, bad_request

MAX_ID = 256


def rank_error(message: str) -> ApiError:
    return bad_request("InvalidRankRequest", message)


def load_json(body: bytes, code: str, *, required: bool = True) -> Any:
    """A request body's JSON (None for an empty body that is not `required`), or a 400."""
    if not body.strip():
        if required:
            raise bad_request(code, "request body is required")
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(code, f"request body is not valid JSON: {exc}") from None


@dataclass(frozen=True, slots=True)
class Asked:
    """What a rank asks, for telling a retry from a reuse of its eventId (service.api.retries):
    digests of the whole request (its JSON normalised: keys sorted, no whitespace) and of its
    `what` (the actions), which a repeat of the eventId may not change."""

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


def new_event_id() -> str:
    """A random (version 4) UUID's 32 hex digits, what Personalizer gives a rank without an
    eventId: uuid.uuid4().hex's format at a third of its cost (0.5 against 1.5 us)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.hex()


def parse_rank(body: Any, max_actions: int, limits: FeatureLimits) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise rank_error("request body must be a JSON object")
    actions = body.get("actions")
    if not isinstance(actions, list) or not 1 <= len(actions) <= max_actions:
        raise rank_error(f"actions must be a list of 1 to {max_actions} actions")
    try:
        context, count = clean_features(
            body.get("contextFeatures"), "contextFeatures", required=False, limits=limits
        )
    except FeatureError as exc:
        raise rank_error(str(exc)) from None
    ids, feats, n, multi = _parse_actions(actions, limits)
    count += n
    check_feature_count(count, limits)
    excluded = body.get("excludedActions")
    if not excluded:
        eligible = [True] * len(ids)
    else:
        if not isinstance(excluded, list) or not all(isinstance(x, str) for x in excluded):
            raise rank_error("excludedActions must be a list of action ids")
        eligible = [aid not in excluded for aid in ids]
        if not any(eligible):
            raise rank_error("every action is excluded")
    event_id = body.get("eventId")
    event_id = (
        new_event_id() if event_id is None else check_event_id(event_id, "InvalidRankRequest")
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
        # The actions' part of the context's JSON (learners.features.actions_json), when the
        # checks were remembered: the `_multi` every rank of the same list writes.
        "multi": multi,
    }


def _parse_actions(
    actions: list[Any], limits: FeatureLimits
) -> tuple[list[str], list[Features], int, bytes | None]:
    """The actions' ids, features (as clean_features returns them), feature count and, for a
    list whose checks are remembered, its encoded `_multi` (else None). An app ranks over the
    same actions again and again (its catalogue, with the context changing), so the checks of
    a list seen recently are remembered by its JSON (10 actions: about a fifth of an
    in-process rank's time), with the JSON VW and the log get for them; a list that fails the
    checks is checked every time."""
    raw: bytes | None
    try:
        raw = orjson.dumps(actions)
    except TypeError:  # (what JSON cannot hold: the checks say what is wrong with it)
        raw = None
    # orjson writes NaN and the infinities as null: a list holding a null is checked as it is
    # (the checks refuse them), never remembered by its JSON.
    if raw is None or len(raw) > CACHED_ACTIONS_BYTES or b"null" in raw:
        return (*_check_actions(actions, limits), None)
    ids, feats, count, multi = _checked_actions(raw, limits)
    return list(ids), list(feats), count, multi


# At most 256 lists of at most 16 KiB each are remembered (a few MB at worst).
CACHED_ACTIONS_BYTES = 16 * 1024


@lru_cache(maxsize=256)
def _checked_actions(
    raw: bytes, limits: FeatureLimits
) -> tuple[tuple[str, ...], tuple[Features, ...], int, bytes]:
    ids, feats, count = _check_actions(orjson.loads(raw), limits)
    return tuple(ids), tuple(feats), count, actions_json(list(zip(ids, feats, strict=True)))


def _check_actions(
    actions: list[Any], limits: FeatureLimits
) -> tuple[list[str], list[Features], int]:
    ids: list[str] = []
    feats: list[Features] = []
    count = 0
    try:
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
    if len(set(ids)) != len(ids):
        raise rank_error("action ids must be unique")
    return ids, feats, count


def parse_slots(
    body: dict[str, Any], ids: list[str], limits: FeatureLimits
) -> tuple[list[dict[str, Any]], int]:
    """A multi-slot rank's slots (id, features, allowed action indexes, baseline index), and
    how many features they add to the request."""
    slots = body.get("slots")
    limit = min(50, len(ids))
    if not isinstance(slots, list) or not 1 <= len(slots) <= limit:
        raise rank_error(f"slots must be a list of 1 to {limit} slots (at most one per action)")
    index = {aid: i for i, aid in enumerate(ids)}
    out: list[dict[str, Any]] = []
    count = 0
    seen: set[str] = set()
    baselines: set[int] = set()
    for k, slot in enumerate(slots):
        if not isinstance(slot, dict):
            raise rank_error(f"slots[{k}] must be an object")
        sid = slot.get("id")
        if not is_id(sid) or sid in seen:
            raise rank_error(f"slots[{k}].id must be a unique non-empty string")
        seen.add(sid)
        baseline = slot.get("baselineAction")
        if not isinstance(baseline, str) or baseline not in index:
            raise rank_error(f"slots[{k}].baselineAction must be one of the action ids")
        if index[baseline] in baselines:
            raise rank_error(f"slots[{k}].baselineAction is already another slot's baseline")
        baselines.add(index[baseline])
        excluded = slot.get("excludedActions") or []
        if not isinstance(excluded, list) or not all(
            isinstance(x, str) and x in index for x in excluded
        ):
            raise rank_error(f"slots[{k}].excludedActions must list existing action ids")
        if baseline in excluded:
            raise rank_error(f"slots[{k}].baselineAction must not be excluded")
        try:
            features, n = clean_features(
                slot.get("features"), f"slots[{k}].features", required=False, limits=limits
            )
        except FeatureError as exc:
            raise rank_error(str(exc)) from None
        count += n
        allowed = [i for i, aid in enumerate(ids) if aid not in excluded]
        out.append(
            {"id": sid, "features": features, "allowed": allowed, "baseline": index[baseline]}
        )
    return out, count


def is_reward(value: Any) -> TypeGuard[int | float]:
    """A reward value dloop accepts: a finite number (not a boolean) in [-1, 1]."""
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and -1 <= value <= 1
    )


# ---- observations on single- and multi-slot loops ----------------------------------------------


def single_slot_only(multi_slot: bool, code: str) -> None:
    """A single-slot observation (reward, outcomes) on a multi-slot loop: the 400 saying where
    its observations go."""
    if multi_slot:
        raise bad_request(code, "multi-slot loop: use /multislot/events/..")


def multi_slot_only(multi_slot: bool, loop: str) -> None:
    if not multi_slot:
        raise bad_request(
            "InvalidMultiSlotApiAccess",
            f"loop '{loop}' is single-slot; multi-slot needs a loop of kind ccb",
        )


def checked_outcomes(rules: RewardRules, values: Any, where: str = "outcomes") -> dict[str, float]:
    """Named outcome values checked against the loop's outcomes (learners.outcomes), or a 400."""
    try:
        return rules.check(values)
    except OutcomeError as exc:
        raise bad_request("InvalidOutcomeRequest", f"{where}: {exc}") from None


def slot_rewards(body: Any) -> list[tuple[str, float]]:
    """A multi-slot reward's `{"reward": [{"slotId", "value"}]}`: (slot, value) pairs, or a
    400 for the first thing wrong."""
    rewards = body.get("reward") if isinstance(body, dict) else None
    if not isinstance(rewards, list) or not rewards:
        raise bad_request("InvalidRewardRequest", 'body must be {"reward": [{slotId, value}]}')
    checked = []
    for i, item in enumerate(rewards):
        slot = item.get("slotId") if isinstance(item, dict) else None
        value = item.get("value") if isinstance(item, dict) else None
        if not is_id(slot):
            raise bad_request("InvalidRewardRequest", f"reward[{i}].slotId must be a slot id")
        if not is_reward(value):
            raise bad_request(
                "InvalidRewardRequest", f"reward[{i}].value must be a finite number in [-1, 1]"
            )
        checked.append((slot, float(value)))
    return checked


def slot_outcomes(rules: RewardRules, body: Any) -> list[tuple[str, dict[str, float]]]:
    """Multi-slot outcomes, `{"outcomes": [{"slotId", "outcomes": {"click": 1, ...}}]}`: per
    slot its checked outcomes, or a 400 for the first thing wrong."""
    items = body.get("outcomes") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise bad_request(
            "InvalidOutcomeRequest", 'body must be {"outcomes": [{slotId, outcomes: {...}}]}'
        )
    checked = []
    for i, item in enumerate(items):
        slot = item.get("slotId") if isinstance(item, dict) else None
        if not is_id(slot):
            raise bad_request("InvalidOutcomeRequest", f"outcomes[{i}].slotId must be a slot id")
        values = item.get("outcomes") if isinstance(item, dict) else None
        checked.append((slot, checked_outcomes(rules, values, f"outcomes[{i}].outcomes")))
    return checked
