"""learners.reward: reward definitions parsed with a fixed grammar (never eval), evaluated on an
event's outcomes, and refused with a clear message when they cannot be used."""

from __future__ import annotations

import pytest

from learners.reward import DefinitionError, MissingOutcome, parse

RANGES = {"click": (0.0, 1.0), "purchase": (0.0, 500.0), "unsubscribe": (0.0, 1.0)}


def test_the_issue_s_example() -> None:
    d = parse("min(1, click + purchase / 50) - unsubscribe", ranges=RANGES)
    assert d.names == {"click", "purchase", "unsubscribe"}
    assert d.bounds == (-1.0, 1.0)
    assert d.evaluate({"click": 1, "purchase": 0, "unsubscribe": 0}) == 1.0
    assert d.evaluate({"click": 0, "purchase": 29.9, "unsubscribe": 1}) == pytest.approx(
        29.9 / 50 - 1
    )
    with pytest.raises(MissingOutcome):
        d.evaluate({"click": 1})  # no purchase, no default: the loop's default reward applies


@pytest.mark.parametrize(
    ("text", "outcomes", "expected"),
    [
        ("click", {"click": 1}, 1.0),
        ("0.5 * click - 0.25", {"click": 1}, 0.25),
        ("-click", {"click": 1}, -1.0),
        ("--click", {"click": 1}, 1.0),
        ("(click + unsubscribe) / 2", {"click": 1, "unsubscribe": 0}, 0.5),
        ("clip(purchase / 100, 0, 1)", {"purchase": 250}, 1.0),
        ("abs(click - 1)", {"click": 0}, 1.0),
        ("max(click, unsubscribe, 0.1)", {"click": 0, "unsubscribe": 0}, 0.1),
        ("coalesce(click, 0) + 0 * 1e3", {}, 0.0),
        ("coalesce(click, 0.5)", {"click": 1}, 1.0),
        (".5e0 * click", {"click": 1}, 0.5),
        ("2 * 3 - 4 / 2 - 3.5", {}, 0.5),  # precedence: * and / before + and -
    ],
)
def test_evaluation(text: str, outcomes: dict[str, float], expected: float) -> None:
    assert parse(text, ranges=RANGES).evaluate(outcomes) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "non-empty"),
        ("click +", "ends too early"),
        ("click ** 2", "column 8"),
        ("click; import os", "column 6"),
        ("__import__('os')", "column 1"),
        ("Click", "column 1"),
        ("eval(click)", "unknown function eval"),
        ("min(click)", "two values or more"),
        ("clip(click, 1, 0)", "lower one first"),
        ("clip(click, unsubscribe, 1)", "bounds are numbers"),
        ("coalesce(click)", "an outcome and its default"),
        ("coalesce(click, unsubscribe)", "default is a number"),
        ("min + 1", "is a function"),
        ("purchase", "outside the reward range [-1, 1]"),
        ("click / unsubscribe", "outside the reward range"),  # a division by a range holding 0
        ("revenue", "outside the reward range"),  # no range known: unbounded
        ("x" * 70, "outcome names are"),
        ("1" * 400, "finite"),
        ("click + " * 200 + "click", "at most 1000 characters"),
    ],
)
def test_bad_definitions_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(DefinitionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(text, ranges=RANGES)


def test_unknown_outcomes_are_named() -> None:
    with pytest.raises(DefinitionError, match=r"unknown outcome.*revenue"):
        parse("clip(revenue, 0, 1)", known=["click", "purchase"])
    assert parse("clip(revenue, 0, 1)", known=["revenue"]).bounds == (0.0, 1.0)


def test_a_division_by_zero_is_missing_not_infinite() -> None:
    d = parse("clip(click / purchase, 0, 1)", ranges=RANGES)
    assert d.evaluate({"click": 1, "purchase": 2}) == 0.5
    with pytest.raises(MissingOutcome, match="divides by zero"):
        d.evaluate({"click": 1, "purchase": 0})


def test_nothing_in_a_definition_is_executed() -> None:
    """Only the grammar's numbers, names, operators and five functions exist: attribute access,
    strings, calls of anything else, indexing and lambdas are syntax errors."""
    for text in (
        "click.__class__",
        "'a'",
        "click[0]",
        "lambda: 1",
        "os.system('x')",
        "a if b else c",
    ):
        with pytest.raises(DefinitionError):
            parse(text, ranges=RANGES)
