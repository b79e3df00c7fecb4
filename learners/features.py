"""Personalizer request features -> the JSON that Vowpal Wabbit's own parser reads.

dloop never hashes features itself. A rank request becomes one JSON object, the DSJSON `c` field:
the whole `contextFeatures` list under `"FromUrl"` and one `_multi` element per action
(`{"_tag": id, "i": {"constant": 1, "id": id}, "j": features}`), exactly as Personalizer's logs
lay it out. Serving parses that text with `--json`, learning parses the logged line (that text
embedded as `c`) with `--dsjson`, so both see the same hashed features by construction; VW applies
Personalizer's semantics (nested objects are namespaces, strings one-hot, numbers valued, numeric
arrays positional, false/0 dropped, `_` keys ignored).

`validate_features` rejects what VW would choke on or silently misread, with Personalizer's rules,
so bad input is a 400 rather than a parser exception.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

Features = list[dict[str, Any]]


class FeatureError(ValueError):
    """A feature list breaks Personalizer's feature rules; the message says where."""


def _check_value(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            if key == "":
                raise FeatureError(f"{where}: empty string is not allowed as a feature name")
            _check_value(inner, f"{where}.{key}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int | float):
                raise FeatureError(f"{where}: feature arrays may only contain numbers")
    elif value is not None and not isinstance(value, str | int | float | bool):
        raise FeatureError(f"{where}: unsupported feature value")


_SCALARS = {str, int, float, bool, type(None)}
_NUMBERS = {int, float}


def _ok(obj: dict[str, Any]) -> bool:
    """Fast path of _check_value for the (common) valid input: no messages, no recursion on
    scalars. Rank validation runs this on every request."""
    for key, value in obj.items():
        kind = type(value)
        if kind in _SCALARS:
            pass
        elif kind is dict:
            if not _ok(value):
                return False
        elif kind is list:
            for item in value:
                if type(item) not in _NUMBERS:
                    return False
        else:
            return False
        if not key:
            return False
    return True


def features_ok(features: Any, *, required: bool) -> bool:
    """True if `features` is a list of key/value objects Personalizer accepts."""
    if type(features) is not list:
        return features is None and not required
    for f in features:
        if type(f) is not dict or not _ok(f):
            return False
    if required:
        for f in features:
            for v in f.values():
                if v is not None:
                    return True
        return False
    return True


def validate_features(features: Any, where: str, *, required: bool) -> Features:
    """Return `features` if it is a list of key/value objects Personalizer accepts, else raise
    FeatureError saying what is wrong and where."""
    if features_ok(features, required=required):
        return features or []
    if features is None:
        if required:
            raise FeatureError(f"{where} must be a list of feature objects")
        return []
    if not isinstance(features, list):
        raise FeatureError(f"{where} must be a list of feature objects")
    for i, item in enumerate(features):
        if not isinstance(item, dict):
            raise FeatureError(
                f"{where}[{i}] must be a key/value object, not {type(item).__name__}"
            )
        _check_value(item, f"{where}[{i}]")
    if required and not any(any(v is not None for v in f.values()) for f in features):
        raise FeatureError(f"{where} needs at least one non-null feature")
    return features


def action_json(action_id: str, features: Features) -> dict[str, Any]:
    return {"_tag": action_id, "i": {"constant": 1, "id": action_id}, "j": features}


def context_json(context: Features, actions: Sequence[tuple[str, Features]]) -> bytes:
    """The DSJSON `c` object for a decision, as compact JSON bytes."""
    return orjson.dumps(
        {"FromUrl": context, "_multi": [action_json(aid, feats) for aid, feats in actions]}
    )


def cb_line(
    *,
    event_id: str,
    timestamp: str,
    context: bytes,
    ranking: Sequence[int],
    probabilities: Sequence[float],
    model_id: str,
    cost: float | None,
    original_cost: float | None,
    observations: Sequence[dict[str, Any]] = (),
    skip_learn: bool = False,
    deferred: bool = False,
    episode_id: str | None = None,
) -> bytes:
    """One DSJSON CB interaction line (no newline).

    `ranking` holds 0-based action indices, chosen first. The label keys are written before `c`:
    VW attaches a label that follows `c` to the shared example and learns nothing from it.
    """
    chosen = ranking[0]
    head: dict[str, Any] = {}
    if cost is not None:
        head = {
            "_label_cost": cost,
            "_label_probability": probabilities[0],
            "_label_Action": chosen + 1,
            "_labelIndex": chosen,
        }
    if skip_learn:
        head["_skipLearn"] = True
    head.update(
        {
            "o": list(observations),
            "Timestamp": timestamp,
            "Version": "1",
            "EventId": event_id,
        }
    )
    if episode_id is not None:
        head["EpisodeId"] = episode_id  # dloop, RL loops (VW ignores it)
    if deferred:
        head["DeferredAction"] = True
    head["a"] = [i + 1 for i in ranking]
    tail: dict[str, Any] = {"p": list(probabilities), "VWState": {"m": model_id}}
    if original_cost is not None:
        tail["_original_label_cost"] = original_cost
    return b"".join((orjson.dumps(head)[:-1], b',"c":', context, b",", orjson.dumps(tail)[1:]))
