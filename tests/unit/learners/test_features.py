"""Features (learners.features): Personalizer's rules, and identical hashed features online and
from the log."""

from __future__ import annotations

import json
import math
import random
import re
from typing import Any

import orjson
import pytest
import vowpalwabbit

from learners.features import (
    FeatureError,
    _clean_already,
    _cleaned_context,
    _remembered,
    action_json,
    actions_json,
    cb_line,
    clean_context,
    clean_features,
    context_json,
    validate_features,
    with_actions,
    with_json,
    with_json_string,
)

CONTEXT = [
    {"timeOfDay": "morning", "device": {"mobile": True, "tablet": False, "screen": [1680, 1050]}},
    {"age": 31, "zero": 0, "_ignored": "x", "user": {"country": "fr", "tags": {"vip": True}}},
    {"spaced key": "a b|c:d", "nothing": None},
]
ACTIONS = [
    ("news", [{"topic": "politics", "minutes": 3}]),
    ("sports", [{"topic": "football", "minutes": 5.5, "meta": {"live": True}}]),
    ("tech", [{"topic": "ai", "scores": [0.1, 0, 2]}]),
]


def features(examples: list[Any]) -> list[list[tuple[int, int, float]]]:
    """Every example's (namespace, hash, value) triples, in order."""
    out = []
    for ex in examples:
        feats = []
        for ns_index in range(ex.num_namespaces()):
            ns = ex.namespace(ns_index)
            for i in range(ex.num_features_in(ns_index)):
                weight = round(ex.feature_weight(ns_index, i), 6)
                feats.append((ns, ex.feature(ns_index, i), weight))
        out.append(sorted(feats))
    return out


@pytest.mark.parametrize(
    "context",
    [CONTEXT, [], None, [{"ünïcode": '\u2028 "quoted" \\ é', "f": 1e-300, "big": 2**53}]],
)
def test_actions_encoded_once_give_the_same_context_bytes(context: Any) -> None:
    """A rank joins its context to the remembered actions' JSON (service.core.requests): the
    bytes VW parses and the log keeps must be context_json's, byte for byte."""
    whole = {"FromUrl": context, "_multi": [action_json(a, f) for a, f in ACTIONS]}
    assert with_actions(context, actions_json(ACTIONS)) == orjson.dumps(whole)
    assert context_json(context, ACTIONS) == orjson.dumps(whole)


def test_online_and_logged_features_are_identical() -> None:
    context = context_json(CONTEXT, ACTIONS)
    online = vowpalwabbit.Workspace("--cb_explore_adf -q :: --json --quiet")
    logged = vowpalwabbit.Workspace("--cb_explore_adf -q :: --dsjson --quiet")
    live = online.parse(context.decode())
    line = cb_line(
        event_id="e1",
        timestamp="2026-01-01T00:00:00.000000Z",
        context=context,
        ranking=[1, 0, 2],
        probabilities=[0.8, 0.1, 0.1],
        model_id="N/A",
        cost=-1.0,
        original_cost=-1.0,
    )
    replay = logged.parse(line.decode())
    assert len(live) == len(replay) == 4  # shared + three actions
    assert features(live) == features(replay)
    # The features carry Personalizer's semantics.
    shared = features(live)[0]
    assert len(shared) >= 6  # timeOfDay, mobile, screen[0..1], age, country, vip, spaced key...
    online.finish_example(live)
    logged.finish_example(replay)


@pytest.mark.parametrize("chosen", [0, 1, 2])
def test_label_lands_on_the_chosen_action(chosen: int) -> None:
    ws = vowpalwabbit.Workspace("--cb_explore_adf --dsjson --quiet")
    ranking = [chosen] + [i for i in range(3) if i != chosen]
    line = cb_line(
        event_id="e",
        timestamp="t",
        context=context_json(CONTEXT, ACTIONS),
        ranking=ranking,
        probabilities=[0.6, 0.2, 0.2],
        model_id="m",
        cost=-0.5,
        original_cost=-0.5,
    )
    examples = ws.parse(line.decode())
    labels = [ex.get_label() for ex in examples[1:]]
    labelled = [i for i, lab in enumerate(labels) if lab.costs]
    assert labelled == [chosen]
    cost = labels[chosen].costs[0]
    assert (cost.action, cost.cost, cost.probability) == (chosen + 1, -0.5, pytest.approx(0.6))
    assert not examples[0].get_label().costs or examples[0].get_label().costs[0].cost > 1e30
    ws.finish_example(examples)


def test_label_keys_precede_c() -> None:
    line = cb_line(
        event_id="e",
        timestamp="t",
        context=b'{"FromUrl":[],"_multi":[]}',
        ranking=[0],
        probabilities=[1.0],
        model_id="m",
        cost=0.0,
        original_cost=0.0,
    )
    keys = list(orjson.loads(line))
    assert keys.index("_labelIndex") < keys.index("c")
    assert keys.index("_label_cost") < keys.index("c")


@pytest.mark.parametrize(
    "bad",
    [
        "notalist",
        [1, 2],
        [None],
        [{"tags": ["a", "b"]}],
        [{"nested": {"tags": [1, "x"]}}],
        [{"": 1}],
        [{"flags": [True]}],
    ],
)
def test_invalid_features_are_rejected(bad: Any) -> None:
    with pytest.raises(FeatureError):
        validate_features(bad, "contextFeatures", required=False)


def test_action_features_need_a_value() -> None:
    with pytest.raises(FeatureError):
        validate_features([{"a": None}], "actions[0].features", required=True)
    with pytest.raises(FeatureError):
        validate_features(None, "actions[0].features", required=True)
    assert validate_features([{"a": 1}], "f", required=True) == [{"a": 1}]


@pytest.mark.parametrize("required", [False, True])  # (context and slots; actions)
def test_integers_past_64_bits_become_the_floats_the_api_reads(required: bool) -> None:
    """The API's parser (orjson) reads an integer outside [-2**63, 2**64) as a float, and
    orjson cannot write one: an in-process caller's is that float, wherever it is (a value, in
    a namespace, in a numeric array), so both rankers see the same feature."""
    features = [
        {"big": 2**70, "ns": {"low": -(2**63) - 1, "top": 2**64 - 1, "bottom": -(2**63)}},
        {"v": [1, 2**64, -(2**64)], "flag": True, "deep": {"er": {"n": 10**30}}},
    ]
    read = orjson.loads(json.dumps(features))  # what the API's parser makes of the same JSON
    assert isinstance(read[0]["big"], float) and isinstance(read[0]["ns"]["top"], int)
    cleaned, count = clean_features(features, "actions[0].features", required=required)
    assert orjson.dumps(cleaned) == orjson.dumps(read)
    assert count == clean_features(read, "f", required=required)[1] == 9
    assert cleaned[1]["flag"] is True
    assert clean_features(read, "f", required=required)[0] is read  # (the fast path's)


@pytest.mark.parametrize(
    ("features", "where"),
    [
        ([{"x": math.nan}], "x"),
        ([{"u": "a"}, {"x": math.inf}], "x"),
        ([{"x": -math.inf, "y": 1}], "x"),
        ([{"ns": {"x": math.nan}}], "ns.x"),
        ([{"v": [1.0, math.nan]}], "v"),
        ([{"ns": {"v": [math.inf, 2]}}], "ns.v"),
        ([{"x": 10**400}], "x"),  # a float() of it overflows (orjson: "number is infinity")
        ([{"v": [1, -(10**400)]}], "v"),
    ],
)
@pytest.mark.parametrize(
    ("at", "required"),
    [("contextFeatures", False), ("actions[1].features", True), ("slots[0].features", False)],
)
def test_numbers_that_are_not_finite_are_refused_alike_everywhere(
    features: Any, where: str, at: str, required: bool
) -> None:
    """JSON has no NaN or Infinity, so only an in-process caller can send one: refused the
    same way wherever it is (orjson writes it as null: the feature was silently dropped, or
    refused for another reason)."""
    item = len(features) - 1  # (the last holds the bad number)
    message = f"{at}[{item}].{where}: feature values must be finite numbers"
    with pytest.raises(FeatureError, match=re.escape(message)):
        clean_features(features, at, required=required)


def test_finite_numbers_are_taken_whatever_their_sum() -> None:
    """The fast check sums a numeric array to find NaN and infinities; finite floats whose sum
    overflows are still features (the full check takes them)."""
    features = [{"v": [1e308, 1e308, -(2**63), 2**64 - 1]}, {"x": -1e308}]
    assert clean_features(features, "contextFeatures", required=True) == (features, 5)


def test_string_arrays_do_break_vw_so_validation_matters() -> None:
    ws = vowpalwabbit.Workspace("--cb_explore_adf --json --quiet")
    bad = context_json([{"tags": ["a", "b"]}], ACTIONS)
    with pytest.raises(Exception):  # noqa: B017  (VW raises its own error types)
        ws.parse(bad.decode())


def test_the_context_as_a_json_string_is_orjson_s_escape_of_the_whole() -> None:
    """with_json_string escapes the actions' part once per list and joins the parts' escapes:
    the same bytes as escaping the whole text, whatever the features hold."""
    contexts = [
        [],
        [{"u": {"f": 'quote " and back\\slash', "n": 1.5}}],
        [{"t": "tab\tnew\nline\x01\x1f", "é": "ünïcode ✓", "emoji": "🙂"}],
    ]
    lists = [
        actions_json([("a", [{"k": "x"}])]),
        actions_json([('q"1', [{"k": "a\\b\n"}]), ("ü", [{"n": 2}])]),
    ]
    for context in contexts:
        for multi in lists:
            features = orjson.dumps(context)
            whole = orjson.dumps(with_json(features, multi).decode())
            assert with_json_string(features, multi) == whole
            assert orjson.loads(whole) == with_json(features, multi).decode()


def _random_value(rng: random.Random, depth: int) -> Any:
    keys = ["a", "b", "ns", "_x", "_tag", "_multi", "", "é", "\u00e9x", "_"]
    roll = rng.random()
    if (depth > 3 and roll < 0.6) or roll < 0.3:
        return rng.choice([1, "s", True, None, 0.5, "_x"])
    if roll < 0.65:
        return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]


def _deep(depth: int, key: str) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {key: value} if depth % 2 else [value]
    return value


def test_a_context_found_clean_is_one_the_full_cleaning_leaves_as_it_is() -> None:
    """clean_context first checks, building nothing, whether the context is clean (dloop's
    own are: a tenth of the cost of building them again); whenever the check says so, the full
    cleaning returns the context itself without a word. Random contexts with reserved keys at
    every depth, namespaces past ASCII, empty keys, bad tags, slots and nesting at the limit."""
    rng = random.Random(11)
    own = orjson.loads(context_json([{"u": {"c": "fr"}}], [("a", [{"t": "x"}]), ("b", [])]))
    assert _clean_already(own) and clean_context(own) is own
    quick = 0
    for i in range(6000):
        actions: list[Any] = [
            {
                "_tag": rng.choice(["a", "b", 1]),
                **{rng.choice(["i", "j", "_x", "é", ""]): _random_value(rng, 1) for _ in "ab"},
            }
            if rng.random() < 0.9
            else "not an action"
            for _ in range(rng.randint(0, 3))
        ]
        c: dict[str, Any] = {"FromUrl": [_random_value(rng, 1)], "_multi": actions}
        if rng.random() < 0.2:
            c[rng.choice(["ns", "_x", "", "é"])] = _deep(rng.choice([62, 63, 64, 65]), "k")
        if rng.random() < 0.05:
            c["_slots"] = [{"_id": "s"}]
        try:
            full: Any = _cleaned_context(c)
        except FeatureError as exc:
            full = exc
        if _clean_already(c):
            quick += 1
            assert full is c, (i, c)
        # The actions' verdict remembered by their text is the verdict (a catalogue's actions
        # come back with another context).
        text = orjson.dumps(c).decode()
        assert _clean_already(c, text) == _clean_already(c), (i, c)
        again = {**c, "FromUrl": [{"other": i}]}
        assert _clean_already(again, orjson.dumps(again).decode()) == _clean_already(again)
        if isinstance(full, FeatureError):
            with pytest.raises(FeatureError, match=re.escape(str(full))):
                clean_context(c)
        else:
            assert clean_context(c) == full
    assert 500 < quick < 5500  # both ways taken
    # A text with escapes is never a key: here `_multi` is written escaped, and the one
    # "_multi" its text holds comes after the actions (the two texts would share a key).
    clean = '{"\\u005fmulti":[{"_tag":"a","ok":1}],"z":"_multi"}'
    dirty = '{"\\u005fmulti":[{"_tag":"a","_x":1}],"z":"_multi"}'
    assert _clean_already(orjson.loads(clean), clean)
    assert not _clean_already(orjson.loads(dirty), dirty)
    # A catalogue of more than 32 KiB of text is walked every time, never kept.
    big = {"FromUrl": [], "_multi": [{"_tag": f"a{i}", "n": {"x": "y" * 100}} for i in range(400)]}
    misses = _remembered.cache_info().misses
    assert _clean_already(big, orjson.dumps(big).decode())
    assert _remembered.cache_info().misses == misses


@pytest.mark.parametrize(
    "c",
    [
        {"é": {"a": 1}, "_multi": [{"_tag": "a", "n": {"b": 1}}]},
        {"n": {"a": 1}, "_multi": [{"_tag": "a", "é": {"b": 1}}]},
        {"n": {"a": 1}, "_multi": [{"_tag": "a", "ü": [1, 2]}]},
    ],
)
def test_a_logged_namespace_named_past_ascii_is_refused_at_every_level(c: Any) -> None:
    """A logged context's namespaces (its own keys and its actions') may not start past ASCII
    either: VW 9.11.9 corrupts its memory on them (munmap_chunk: invalid pointer when the
    workspace finishes, seen here). The rank path never writes one (features sit inside
    FromUrl's objects and each action's `j`), a record from elsewhere may."""
    with pytest.raises(FeatureError, match="must start with an ASCII character"):
        clean_context(c)


def test_numbers_of_other_types_are_the_json_numbers_they_stand_for() -> None:
    """A numpy float or an int subclass from an in-process caller is the number orjson writes
    for it (orjson writes neither as it is)."""
    import enum

    import numpy as np

    class Size(enum.IntEnum):
        LARGE = 3

    cleaned, count = clean_features(
        [{"x": np.float64(1.5), "n": Size.LARGE, "v": [np.float64(2.0), 1]}], "f", required=True
    )
    assert orjson.dumps(cleaned) == b'[{"x":1.5,"n":3,"v":[2.0,1]}]' and count == 4
