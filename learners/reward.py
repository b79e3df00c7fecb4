"""Reward definitions (issue 15): the training reward as a formula over named outcomes, read by a
real parser with a fixed grammar (lark), never `eval`.

    min(1, click + purchase / 50) - unsubscribe
    clip(0.2 * coalesce(click, 0) + purchase / 100, -1, 1)

Numbers, outcome names (`NAME_RULE`), + - * /, unary minus, parentheses and the functions
min(a, b, ...), max(a, b, ...), clip(x, lo, hi), abs(x) and coalesce(name, default): the
default an outcome that never arrived takes (learners.outcomes fills in the outcomes' declared
defaults before evaluating). A name without a value that did not arrive makes
the whole definition missing (`MissingOutcome`), and so does a division by zero: the joiner then
uses the loop's default reward.

`parse` checks a definition once, when it is set: its syntax (with where it failed), that every
name is a known outcome when the caller gives the list, and, given each outcome's range, that
the result always fits the reward range (interval arithmetic; a division by a range holding 0
cannot be bounded). `Definition.evaluate` computes it for one event's outcomes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import (
    LarkError,
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)

NAME_RULE = "a lower-case letter, then up to 63 lower-case letters, digits or _"
NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
FUNCTIONS = {"min", "max", "clip", "abs", "coalesce"}
MAX_LENGTH = 1000

GRAMMAR = r"""
?start: sum
?sum: product
    | sum "+" product   -> add
    | sum "-" product   -> sub
?product: unary
    | product "*" unary -> mul
    | product "/" unary -> div
?unary: atom
    | "-" unary         -> neg
    | "+" unary
?atom: NUMBER           -> number
    | NAME              -> outcome
    | NAME "(" [sum ("," sum)*] ")" -> call
    | "(" sum ")"
NAME: /[a-z][a-z0-9_]*/
NUMBER: /(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?/
%import common.WS
%ignore WS
"""

_PARSER = Lark(GRAMMAR, parser="lalr", maybe_placeholders=False)


class DefinitionError(ValueError):
    """A definition that cannot be used: bad syntax (with where), an unknown outcome, a result
    that may leave the reward range."""


class MissingOutcome(LookupError):
    """An outcome the definition needs (without a coalesce default) did not arrive."""


Value = Callable[[Mapping[str, float]], float]
Range = tuple[float, float]


@dataclass(frozen=True)
class Definition:
    text: str
    names: frozenset[str]  # the outcomes it reads
    bounds: Range  # what it can give, from the outcomes' ranges
    _value: Value

    def evaluate(self, outcomes: Mapping[str, float]) -> float:
        """The reward of one event's outcomes; MissingOutcome if one it needs did not arrive."""
        value = self._value(outcomes)
        if not math.isfinite(value):
            raise MissingOutcome("the definition has no finite value for these outcomes")
        return value


def parse(
    text: str,
    *,
    known: Iterable[str] | None = None,
    ranges: Mapping[str, Range] | None = None,
    reward_range: Range = (-1.0, 1.0),
) -> Definition:
    """The definition `text`, checked (module docstring); DefinitionError says what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise DefinitionError("a reward definition is a non-empty formula")
    if len(text) > MAX_LENGTH:
        raise DefinitionError(f"a reward definition has at most {MAX_LENGTH} characters")
    try:
        tree = _PARSER.parse(text)
    except UnexpectedInput as exc:
        raise DefinitionError(_where(text, exc)) from None
    except LarkError as exc:  # pragma: no cover - lark's other errors
        raise DefinitionError(f"syntax error: {exc}") from None
    builder = _Build(ranges or {})
    try:
        value, bounds = builder.transform(tree)
    except VisitError as exc:  # lark wraps what the builder raises
        if isinstance(exc.orig_exc, DefinitionError):
            raise exc.orig_exc from None
        raise
    unknown = sorted(builder.names - set(known)) if known is not None else []
    if unknown:
        raise DefinitionError(f"unknown outcome(s): {', '.join(unknown)}")
    lo, hi = reward_range
    if not (lo <= bounds[0] and bounds[1] <= hi):
        raise DefinitionError(
            f"the result may be anywhere in [{_num(bounds[0])}, {_num(bounds[1])}], outside the "
            f"reward range [{_num(lo)}, {_num(hi)}]: clip it, e.g. clip(<formula>, {_num(lo)}, "
            f"{_num(hi)})"
        )
    return Definition(text, frozenset(builder.names), bounds, value)


def _num(x: float) -> str:
    return f"{x:g}"


def _where(text: str, exc: UnexpectedInput) -> str:
    column = getattr(exc, "column", None)
    at_end = isinstance(exc, UnexpectedToken) and exc.token.type == "$END"
    if at_end or isinstance(exc, UnexpectedEOF) or column is None or column < 1:
        return "syntax error: the formula ends too early"
    found = text[column - 1 : column + 9]
    what = "character" if isinstance(exc, UnexpectedCharacters) else "token"
    return f"syntax error at column {column}: unexpected {what} {found!r}"


Node = tuple[Value, Range]
UNBOUNDED: Range = (-math.inf, math.inf)


@v_args(inline=True)
class _Build(Transformer[Token, Node]):
    """Turns the parse tree into a function of the outcomes and the range of its values."""

    def __init__(self, ranges: Mapping[str, Range]) -> None:
        super().__init__()
        self.ranges = ranges
        self.names: set[str] = set()

    def number(self, token: Token) -> Node:
        x = float(token)
        if not math.isfinite(x):
            raise DefinitionError(f"{token} is not a finite number")
        return (lambda _: x), (x, x)

    def outcome(self, token: Token) -> Node:
        name = str(token)
        if name in FUNCTIONS:
            raise DefinitionError(f"{name} is a function: call it, {name}(...)")
        if not NAME.match(name):
            raise DefinitionError(f"outcome names are {NAME_RULE}: {name!r}")
        self.names.add(name)

        def value(outcomes: Mapping[str, float]) -> float:
            if name not in outcomes:
                raise MissingOutcome(f"outcome {name} did not arrive")
            return float(outcomes[name])

        return value, self.ranges.get(name, UNBOUNDED)

    def neg(self, a: Node) -> Node:
        f, (lo, hi) = a
        return (lambda o: -f(o)), (-hi, -lo)

    def add(self, a: Node, b: Node) -> Node:
        return (lambda o: a[0](o) + b[0](o)), (a[1][0] + b[1][0], a[1][1] + b[1][1])

    def sub(self, a: Node, b: Node) -> Node:
        return (lambda o: a[0](o) - b[0](o)), (a[1][0] - b[1][1], a[1][1] - b[1][0])

    def mul(self, a: Node, b: Node) -> Node:
        corners = [_times(x, y) for x in a[1] for y in b[1]]
        return (lambda o: a[0](o) * b[0](o)), (min(corners), max(corners))

    def div(self, a: Node, b: Node) -> Node:
        lo, hi = b[1]
        if lo <= 0 <= hi:
            bounds = UNBOUNDED
        else:
            corners = [_times(x, 1 / y) for x in a[1] for y in (lo, hi)]
            bounds = (min(corners), max(corners))

        def value(o: Mapping[str, float]) -> float:
            d = b[0](o)
            if d == 0:
                raise MissingOutcome("the definition divides by zero for these outcomes")
            return a[0](o) / d

        return value, bounds

    def call(self, name: Token, *args: Any) -> Node:
        fn = str(name)
        nodes: list[Node] = [a for a in args if a is not None]
        if fn == "coalesce":
            return self._coalesce(nodes)
        if fn in ("min", "max"):
            if len(nodes) < 2:
                raise DefinitionError(f"{fn} takes two values or more")
            pick = min if fn == "min" else max
            return (
                (lambda o: pick(f(o) for f, _ in nodes)),
                (pick(r[0] for _, r in nodes), pick(r[1] for _, r in nodes)),
            )
        if fn == "abs":
            if len(nodes) != 1:
                raise DefinitionError("abs takes one value")
            f, (lo, hi) = nodes[0]
            low = 0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))
            return (lambda o: abs(f(o))), (low, max(abs(lo), abs(hi)))
        if fn == "clip":
            if len(nodes) != 3:
                raise DefinitionError("clip takes a value, a lower and an upper bound")
            (f, r), (_, lo_r), (_, hi_r) = nodes
            if lo_r[0] != lo_r[1] or hi_r[0] != hi_r[1] or lo_r[0] > hi_r[0]:
                raise DefinitionError("clip's bounds are numbers, the lower one first")
            lo, hi = lo_r[0], hi_r[0]
            return (
                (lambda o: min(hi, max(lo, f(o)))),
                (min(hi, max(lo, r[0])), min(hi, max(lo, r[1]))),
            )
        raise DefinitionError(f"unknown function {fn}: use {', '.join(sorted(FUNCTIONS))}")

    def _coalesce(self, nodes: list[Node]) -> Node:
        if len(nodes) != 2:
            raise DefinitionError("coalesce takes an outcome and its default")
        (f, r), (d, dr) = nodes
        if dr[0] != dr[1]:
            raise DefinitionError("coalesce's default is a number")

        def value(o: Mapping[str, float]) -> float:
            try:
                return f(o)
            except MissingOutcome:
                return d(o)

        return value, (min(r[0], dr[0]), max(r[1], dr[1]))

    def __default__(self, data: Any, children: Any, meta: Any) -> Any:  # pragma: no cover
        raise DefinitionError(f"unexpected {data}")


def _times(x: float, y: float) -> float:
    if x == 0 or y == 0:  # 0 * inf is 0 here: a zero weight bounds nothing
        return 0.0
    return x * y


def tree_of(text: str) -> Tree[Token]:
    """The parse tree (for tests and error reports)."""
    return _PARSER.parse(text)
