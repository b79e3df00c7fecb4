"""Personalizer request features -> the JSON that Vowpal Wabbit's own parser reads.

dloop never hashes features itself. A rank request becomes one JSON object, the DSJSON `c` field:
the whole `contextFeatures` list under `"FromUrl"` and one `_multi` element per action
(`{"_tag": id, "i": {"constant": 1, "id": id}, "j": features}`), exactly as Personalizer's logs
lay it out. Serving parses that text with `--json`, learning parses the logged line (that text
embedded as `c`) with `--dsjson`, so both see the same hashed features by construction; VW applies
Personalizer's semantics (nested objects are namespaces, strings one-hot, numbers valued, numeric
arrays positional, false/0 dropped).

Keys starting with `_` never reach VW. Personalizer ignores them, and VW reserves some of them
inside features (`__aid` segfaults VW 9.11.9's parser, `_multi`, `_labelIndex`, `_text`, `_slots`
make it raise or change the example). dloop drops them rather than rejecting the request: that is
Personalizer's rule, so clients that send `_`-prefixed metadata keep working. A namespace (a key
whose value is an object or an array) named with a non-ASCII first letter segfaults VW 9.11.9
too (found by dloop's fuzzer, tests/unit/learners/test_sandbox.py): that is a 400.
`clean_features` applies these rules to rank requests (with the other rules and the size
limits, so bad input is a 400, not a parser exception), `clean_context`/`clean_line` to logged
decisions and DSJSON files read back (ingestion, replay, evaluation). Its numbers are those the
API's JSON can hold, so that an in-process ranker (service.local) sees what the server would:
NaN and infinities are a 400 wherever they are (orjson would log them as null), and an integer
outside 64 bits is the float orjson, the API's parser, reads for it (orjson cannot write it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

Features = list[dict[str, Any]]


class FeatureError(ValueError):
    """A feature list breaks Personalizer's feature rules; the message says where."""


@dataclass(frozen=True)
class FeatureLimits:
    """How much one rank request may ask VW to parse. `-q ::` crosses every namespace with every
    other, in every action, so the cost of a prediction grows with the square of the features:
    20,000 features took 8.6 s. Values are documented in the README (Security)."""

    max_features: int = 2000  # leaves in the whole request (context, actions, slots)
    max_namespace_features: int = 500  # leaves directly inside one feature object
    max_depth: int = 16  # nested objects (orjson cannot write past 254 levels)


DEFAULT_LIMITS = FeatureLimits()

# The integers orjson reads as integers (and writes): it reads any other as a float.
_INT_LOW, _INT_END = -(2**63), 2**64


def _leaves(obj: dict[str, Any], depth: int, limits: FeatureLimits) -> int:
    """The number of features in `obj`, or -1 if it needs `_clean` (a key starting with `_`,
    a value of the wrong type, a number the API's JSON would not hold as it is, a limit
    reached). Rank runs this on every request, so the common valid case builds nothing and
    formats no message."""
    if depth > limits.max_depth:
        return -1
    total = 0
    here = 0
    for key, value in obj.items():
        if type(key) is not str or not key or key[0] == "_":
            return -1
        kind = type(value)
        if kind is str:
            here += 1
        elif kind is int:
            if not _INT_LOW <= value < _INT_END:
                return -1
            here += 1
        elif kind is float:
            if value - value:  # NaN or infinite (finite: 0.0)
                return -1
            here += 1
        elif kind is bool or value is None:
            here += 1
        elif key[0] >= "\x80":
            return -1  # a namespace VW cannot name (see _clean)
        elif kind is dict:
            inner = _leaves(value, depth + 1, limits)
            if inner < 0:
                return -1
            total += inner
        elif kind is list:
            for item in value:
                kind = type(item)
                if kind is not float and (kind is not int or not _INT_LOW <= item < _INT_END):
                    return -1
            # One sum finds NaN and infinities (it is one too) at C speed, where a test per
            # item would double an embedding's cost; floats whose sum overflows go to _clean
            # as well, which takes them.
            added = sum(value)
            if added - added:
                return -1
            here += len(value)
        else:
            return -1
    if here > limits.max_namespace_features:
        return -1
    return total + here


def _clean(
    obj: dict[str, Any], where: str, depth: int, limits: FeatureLimits
) -> tuple[dict[str, Any], int]:
    """`obj` without the keys Personalizer ignores (starting with `_`, at any depth) and its
    number of features; FeatureError (saying where) for what VW would choke on or misread."""
    if depth > limits.max_depth:
        raise FeatureError(f"{where}: features are nested more than {limits.max_depth} deep")
    out: dict[str, Any] = {}
    total = 0
    here = 0
    for key, value in obj.items():
        if not isinstance(key, str):  # (only an in-process caller can send one)
            raise FeatureError(f"{where}: feature names must be strings, not {key!r}")
        if key == "":
            raise FeatureError(f"{where}: empty string is not allowed as a feature name")
        if key[0] == "_":
            continue  # Personalizer ignores them; VW reserves some (`__aid`, `_multi`, ...)
        if isinstance(value, _NESTED) and key[0] >= "\x80":
            raise FeatureError(_namespace_message(f"{where}.{key}"))
        if isinstance(value, dict):
            out[key], inner = _clean(value, f"{where}.{key}", depth + 1, limits)
            total += inner
            continue
        if isinstance(value, list):
            numbers = value
            for i, item in enumerate(value):
                if isinstance(item, bool) or not isinstance(item, int | float):
                    raise FeatureError(f"{where}.{key}: feature arrays may only contain numbers")
                number = _number(item, f"{where}.{key}")
                if number is not item:
                    if numbers is value:
                        numbers = list(value)  # (the caller's list stays as it was)
                    numbers[i] = number
            value = numbers
            here += len(value)
        elif value is None or isinstance(value, str | bool):
            here += 1
        elif isinstance(value, int | float):
            value = _number(value, f"{where}.{key}")
            here += 1
        else:
            raise FeatureError(f"{where}.{key}: unsupported feature value")
        out[key] = value
    if here > limits.max_namespace_features:
        raise FeatureError(
            f"{where}: more than {limits.max_namespace_features} features in one object"
        )
    return out, total + here


def _number(value: int | float, where: str) -> int | float:
    """A feature's number as the API's parser would read it from JSON: an integer outside
    orjson's 64 bits its float (what orjson reads for it); FeatureError for NaN and infinities
    (JSON has none) and an integer past a double's range (orjson refuses it)."""
    if isinstance(value, int):
        if _INT_LOW <= value < _INT_END:
            return value
        try:
            value = float(value)
        except OverflowError:
            raise FeatureError(_not_finite(where)) from None
    if not math.isfinite(value):
        raise FeatureError(_not_finite(where))
    if type(value) is not float and type(value) is not int:  # (numpy.float64, an IntEnum)
        return int(value) if isinstance(value, int) else float(value)  # what orjson writes
    return value


def _not_finite(where: str) -> str:
    return (
        f"{where}: feature values must be finite numbers (not NaN, infinite or past a double's "
        "range)"
    )


def clean_features(
    features: Any, where: str, *, required: bool, limits: FeatureLimits = DEFAULT_LIMITS
) -> tuple[Features, int]:
    """Personalizer's feature rules for one feature list: returns what VW may see (keys starting
    with `_` dropped at every depth) and how many features it holds, or raises FeatureError
    saying what is wrong and where. `required`: at least one non-null feature (actions)."""
    if type(features) is list:
        count = 0
        for f in features:
            n = _leaves(f, 1, limits) if type(f) is dict else -1
            if n < 0:
                break
            count += n
        else:
            if not required or any(_has_value(f) for f in features):
                return features, count
    if features is None:
        if required:
            raise FeatureError(f"{where} must be a list of feature objects")
        return [], 0
    if not isinstance(features, list):
        raise FeatureError(f"{where} must be a list of feature objects")
    out: Features = []
    count = 0
    for i, item in enumerate(features):
        if not isinstance(item, dict):
            raise FeatureError(
                f"{where}[{i}] must be a key/value object, not {type(item).__name__}"
            )
        cleaned, n = _clean(item, f"{where}[{i}]", 1, limits)
        out.append(cleaned)
        count += n
    if required and not any(_has_value(f) for f in out):
        raise FeatureError(f"{where} needs at least one non-null feature")
    return out, count


def _has_value(obj: dict[str, Any]) -> bool:
    """Whether a feature object holds a feature VW will see (not only nulls or empty objects)."""
    for value in obj.values():
        if type(value) is dict:
            if _has_value(value):
                return True
        elif value is not None and value != []:
            return True
    return False


def validate_features(features: Any, where: str, *, required: bool) -> Features:
    """The features VW may see (see clean_features), without the count."""
    return clean_features(features, where, required=required)[0]


def _namespace_message(where: str) -> str:
    # VW takes a namespace's first byte as a signed char: one past ASCII (a non-ASCII first
    # letter) indexes out of its tables and VW 9.11.9 segfaults (found by dloop's fuzzer).
    return (
        f"{where}: an object or array value is a namespace, and namespace names must start with "
        "an ASCII character"
    )


_MAX_LOGGED_DEPTH = 64
_NESTED = (dict, list)  # (a tuple: `dict | list` builds a union object at every test)


def _clean_value(value: Any, where: str, depth: int = 0) -> Any:
    """A logged namespace value with the keys Personalizer ignores dropped at every depth;
    `value` itself (not a copy) when nothing is dropped. Every decision a learner ingests
    passes here, so scalars are not visited one call each."""
    if depth > _MAX_LOGGED_DEPTH:
        raise FeatureError(f"{where}: nested more than {_MAX_LOGGED_DEPTH} deep")
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, _NESTED) and k[:1] >= "\x80":
                raise FeatureError(_namespace_message(f"{where}.{k}"))
        out: dict[str, Any] = {}
        changed = False
        for k, v in value.items():
            if k[:1] == "_":
                changed = True
            elif isinstance(v, _NESTED):
                cleaned = _clean_value(v, f"{where}.{k}", depth + 1)
                changed |= cleaned is not v
                out[k] = cleaned
            elif depth == _MAX_LOGGED_DEPTH:
                raise FeatureError(f"{where}.{k}: nested more than {_MAX_LOGGED_DEPTH} deep")
            else:
                out[k] = v
        return out if changed else value
    if isinstance(value, list):
        items: list[Any] = []
        changed = False
        for v in value:
            if isinstance(v, _NESTED):
                cleaned = _clean_value(v, where, depth + 1)
                changed |= cleaned is not v
                items.append(cleaned)
            elif depth == _MAX_LOGGED_DEPTH:
                raise FeatureError(f"{where}: nested more than {_MAX_LOGGED_DEPTH} deep")
            else:
                items.append(v)
        return items if changed else value
    return value


def clean_context(c: Any, text: str | None = None) -> dict[str, Any]:
    """A logged decision's `c` object (from the decision log, a Kafka record, a DSJSON file),
    with the keys Personalizer ignores dropped from every feature, keeping only the structure
    dloop and Personalizer write: namespaces, `_multi` actions (`_tag` and features) and
    `_slots` (`_id`, `_inc` and features). FeatureError if it is not shaped like that. `c`
    itself (not a copy) when it was clean already. `text`, the JSON `c` was read from, if
    the caller has it: the check of a catalogue's actions is then remembered by their text."""
    if not isinstance(c, dict):
        raise FeatureError("c must be an object")
    return c if _clean_already(c, text) else _cleaned_context(c)


def _cleaned_context(c: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    actions = c.get("_multi")
    if not isinstance(actions, list) or not all(isinstance(a, dict) for a in actions):
        raise FeatureError("c._multi must be a list of action objects")
    changed = False
    for key, value in c.items():
        if key == "_multi":
            out[key] = [_clean_element(a, "_tag", f"c._multi[{i}]") for i, a in enumerate(value)]
            changed |= any(x is not a for x, a in zip(out[key], value, strict=True))
        elif key == "_slots":
            if not isinstance(value, list) or not all(isinstance(s, dict) for s in value):
                raise FeatureError("c._slots must be a list of slot objects")
            out[key] = [_clean_slot(s, len(actions), i) for i, s in enumerate(value)]
            changed = True  # (rare: compared by value below)
        elif key and key[0] != "_":
            _check_namespace(key, value, f"c.{key}")
            out[key] = _clean_value(value, f"c.{key}")
            changed |= out[key] is not value
        else:
            changed = True
    if changed and out == c:
        changed = False
    return out if changed else c


def _clean_already(c: dict[str, Any], text: str | None = None) -> bool:
    """Whether clean_context would return `c` itself without a word, checked without building
    anything (every decision a learner or joiner ingests passes here, and dloop's own are
    clean: 17 against 38 us for 10 actions, 4.7 when their check is remembered). False
    whenever in doubt: the full path then decides, and says what is wrong."""
    actions = c.get("_multi")
    if type(actions) is not list:
        return False
    for key, value in c.items():
        if key == "_multi":
            if not _actions_clean(actions, text):
                return False
        elif not _clean_named(key, value, -1):
            return False  # `_slots` too: the full path compares it by value
    return True


def _actions_clean(actions: list[Any], text: str | None) -> bool:
    """Whether the actions `_multi` holds are clean. An application ranks the same catalogue
    again and again, so the answer is remembered by the text of `_multi` onwards in the
    context's JSON `text`, when that names it once and escapes nothing (so that one
    occurrence is the key of `actions`, and the same text is the same actions)."""
    if text is None or "\\" in text or text.count('"_multi"') != 1:
        return _walk_actions(actions)
    part = text[text.index('"_multi"') :]
    if len(part) > _REMEMBERED_BYTES:
        return _walk_actions(actions)
    return _remembered(_Actions(part, actions))


# At most 256 catalogues of at most 32 KiB of text each are remembered (8 MB at worst).
_REMEMBERED_BYTES = 32 * 1024


class _Actions:
    """`_multi`'s actions, known to the cache by their text alone."""

    __slots__ = ("actions", "text")

    def __init__(self, text: str, actions: list[Any] | None) -> None:
        self.text, self.actions = text, actions

    def __hash__(self) -> int:
        return hash(self.text)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Actions) and other.text == self.text


@lru_cache(maxsize=256)
def _remembered(key: _Actions) -> bool:
    clean = _walk_actions(key.actions or [])
    key.actions = None  # the cache keeps the text only
    return clean


def _walk_actions(actions: list[Any]) -> bool:
    for action in actions:
        if type(action) is not dict or type(action.get("_tag", "")) is not str:
            return False
        for k, v in action.items():
            if k != "_tag" and not _clean_named(k, v, -1):
                return False
    return True


def _clean_named(key: str, value: Any, depth: int) -> bool:
    """Whether `key: value` (a value _clean_value visits at `depth` + 1) is kept as it is."""
    if not key or key[0] == "_":
        return False
    kind = type(value)
    if kind is dict or kind is list:
        return key[0] < "\x80" and _clean_nested(value, depth + 1)
    return True


def _clean_nested(value: dict[str, Any] | list[Any], depth: int) -> bool:
    if depth >= _MAX_LOGGED_DEPTH - 1:
        return False  # near the depth limit: the full path's checks
    if isinstance(value, dict):
        for k, v in value.items():
            if not k or k[0] == "_":
                return False
            kind = type(v)
            if (kind is dict or kind is list) and (
                k[0] >= "\x80" or not _clean_nested(v, depth + 1)
            ):
                return False
        return True
    for v in value:
        kind = type(v)
        if (kind is dict or kind is list) and not _clean_nested(v, depth + 1):
            return False
    return True


def _check_namespace(key: str, value: Any, where: str) -> None:
    """A context's or an action's own key naming a namespace (an object or array value) must
    start with an ASCII character, as keys inside namespaces must (_clean_value): VW 9.11.9
    corrupts its memory on one that does not."""
    if isinstance(value, _NESTED) and key[:1] >= "\x80":
        raise FeatureError(_namespace_message(where))


def _clean_element(element: dict[str, Any], id_key: str, where: str) -> dict[str, Any]:
    """An action's (or a slot's) object, cleaned like a namespace; `element` itself when
    nothing is dropped."""
    out: dict[str, Any] = {}
    changed = False
    for key, value in element.items():
        if key == id_key:
            if not isinstance(value, str):
                raise FeatureError(f"{where}.{id_key} must be a string")
            out[key] = value
        elif key and key[0] != "_":
            _check_namespace(key, value, f"{where}.{key}")
            cleaned = _clean_value(value, f"{where}.{key}") if isinstance(value, _NESTED) else value
            changed |= cleaned is not value
            out[key] = cleaned
        else:
            changed = True
    return out if changed else element


def _clean_slot(slot: dict[str, Any], actions: int, i: int) -> dict[str, Any]:
    out = _clean_element(slot, "_id", f"c._slots[{i}]")
    if "_inc" in slot:
        allowed = slot["_inc"]
        if not isinstance(allowed, list) or not all(
            type(a) is int and 0 <= a < actions for a in allowed
        ):
            raise FeatureError(f"c._slots[{i}]._inc must list action indices")
        out["_inc"] = allowed
    return out


def clean_line(line: str) -> str:
    """A DSJSON line whose `c` went through clean_context (unchanged if it was clean, so
    dloop's own lines come back byte for byte); FeatureError if it cannot be read."""
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise FeatureError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise FeatureError("a DSJSON line must be an object")
    c = doc.get("c")
    cleaned = clean_context(c)
    if cleaned == c:
        return line
    doc["c"] = cleaned
    return orjson.dumps(doc).decode()


def action_json(action_id: str, features: Features) -> dict[str, Any]:
    return {"_tag": action_id, "i": {"constant": 1, "id": action_id}, "j": features}


def context_json(context: Features, actions: Sequence[tuple[str, Features]]) -> bytes:
    """The DSJSON `c` object for a decision, as compact JSON bytes."""
    return with_actions(context, actions_json(actions))


def actions_json(actions: Sequence[tuple[str, Features]]) -> bytes:
    """The `_multi` array of context_json, alone: `with_actions` joins it to a context."""
    return orjson.dumps([action_json(aid, feats) for aid, feats in actions])


def with_actions(context: Features, multi: bytes) -> bytes:
    """The `c` object of `context` and its actions' `actions_json`: what orjson writes for
    {"FromUrl": context, "_multi": [...]} (compact, keys in order), for actions encoded once
    and ranked often."""
    return with_json(orjson.dumps(context), multi)


def with_json(context: bytes, multi: bytes) -> bytes:
    """with_actions of a context already encoded (its JSON)."""
    return _HEAD + context + b',"_multi":' + multi + b"}"


_HEAD = b'{"FromUrl":'


def with_json_string(context: bytes, multi: bytes) -> bytes:
    """orjson.dumps(with_json(context, multi).decode()): the text as a JSON string (how a
    decision's log record holds it), with the actions' part escaped once per list (an app ranks
    the same list again and again; escaping is per character, so the parts' escapes joined are
    the whole's)."""
    return b"".join((_QUOTED_HEAD, _escaped(context), _escaped_tail(multi), b'"'))


def _escaped(text: bytes) -> bytes:
    return orjson.dumps(text.decode())[1:-1]


_QUOTED_HEAD = b'"' + _escaped(_HEAD)


@lru_cache(maxsize=256)
def _escaped_tail(multi: bytes) -> bytes:
    return _escaped(b',"_multi":' + multi + b"}")


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
    outcomes: dict[str, float] | None = None,
    version: int = 0,
) -> bytes:
    """One DSJSON CB interaction line (no newline). `outcomes`: the aggregated named outcomes
    and `version` the reward definition's (learners.outcomes; keys VW ignores).

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
    if outcomes is not None:
        head["Outcomes"] = outcomes
    if version:
        head["RewardVersion"] = version
    if deferred:
        head["DeferredAction"] = True
    head["a"] = [i + 1 for i in ranking]
    tail: dict[str, Any] = {"p": list(probabilities), "VWState": {"m": model_id}}
    if original_cost is not None:
        tail["_original_label_cost"] = original_cost
    return b"".join((orjson.dumps(head)[:-1], b',"c":', context, b",", orjson.dumps(tail)[1:]))
