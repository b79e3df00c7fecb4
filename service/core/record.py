"""The decision log's records: the only place they are built (`encode`) and read (`decode`).

Every decision, reward, activation and episode end is one JSON object, appended on the hot path
to the local log (embedded) or the events topic (Kafka path) and ingested by the joiner. `k` is
the kind; every record has `loop`, `id` (the eventId, or the episodeId of an episode end) and
`t` (seconds since the epoch, the server's clock when the call was answered):

    {"k":"d", "deferred","mode","c","a","p","b","m", ["ep"], ["x"], ["h","ho"]}  a decision
    {"k":"m", "deferred","mode","c","s","b","m", ["h","ho"]}          a multi-slot decision
    {"k":"r", "u", ["v"], ["slot"], ["n"]}                            a reward or outcome
    {"k":"a", "u", ["slot"]}                                          an activation
    {"k":"e", "term"}                                                 an RL episode's end

- `c`: the context as VW reads it (Personalizer JSON, `_multi` holding the actions), a string;
- `a`, `p`: the served order of action indexes and each one's probability; `b`: the baseline
  action's index; `m`: the id of the model that decided ("N/A" before the first);
- `s` (multi-slot): per slot `{"id", "a", "p"}`, and `b` one baseline index per slot;
- `ep`: the episode of an RL step; `x`: the inference explanation, when the loop makes them;
- `h`: the loop's holdout share (0 to 0.5) when a holdout was on, `ho`: true if this decision
  was held out (served by the holdout policy; `a`/`p` are what it really drew);
- `u`: a unique id for an observation (a retried call is stored once), `v`: a reward's value,
  `slot`: the slot a multi-slot observation is for, `n`: the outcome a value is for (absent:
  Personalizer's reward, the outcome `reward`; learners.outcomes); `term`: false if the episode
  was truncated.

A record the joiner cannot read (`decode` raises RecordError) goes to the dead letters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

DECISION, SLOTS, REWARD, ACTIVATION, EPISODE_END = "d", "m", "r", "a", "e"

_COMMON = {"loop", "id", "t"}
_NEEDED = {
    DECISION: _COMMON | {"deferred", "mode", "a", "p", "b", "m", "c"},
    SLOTS: _COMMON | {"deferred", "mode", "s", "b", "m", "c"},
    REWARD: _COMMON,
    ACTIVATION: _COMMON,
    EPISODE_END: _COMMON | {"term"},
}


# What else a kind's record may hold (encode writes these when set).
_OPTIONAL = {
    DECISION: {"ep", "x", "h", "ho"},
    SLOTS: {"h", "ho"},
    REWARD: {"u", "v", "slot", "n"},
    ACTIVATION: {"u", "slot"},
    EPISODE_END: set(),
}
_FIELDS = {kind: {"k"} | needed | _OPTIONAL[kind] for kind, needed in _NEEDED.items()}


class RecordError(ValueError):
    """A record that is not one of the kinds above, or lacks what its kind needs."""


# A decision record is built on every rank: not frozen, since a frozen dataclass's __init__
# (object.__setattr__ per field) costs about three times a plain one's (1.8 against 0.7 us).
@dataclass(slots=True)
class Decision:
    loop: str
    id: str
    t: float
    deferred: bool
    mode: str
    c: str
    a: list[int]
    p: list[float]
    b: int
    m: str
    ep: str | None = None
    x: Any = None
    h: float = 0.0
    ho: bool = False


@dataclass(frozen=True, slots=True)
class SlotChoice:
    id: str
    a: list[int]
    p: list[float]


@dataclass(frozen=True, slots=True)
class SlotsDecision:
    loop: str
    id: str
    t: float
    deferred: bool
    mode: str
    c: str
    s: list[SlotChoice]
    b: list[int]
    m: str
    h: float = 0.0
    ho: bool = False


@dataclass(frozen=True, slots=True)
class Observation:
    """A reward (`k` "r", with a value) or an activation (`k` "a", without)."""

    k: str
    loop: str
    id: str
    t: float
    u: str | None = None
    v: float | None = None
    slot: str | None = None
    n: str | None = None  # a named outcome (None: Personalizer's reward)

    @property
    def kind(self) -> str:
        return "reward" if self.k == REWARD else "activate"


@dataclass(frozen=True, slots=True)
class EpisodeEnd:
    loop: str
    id: str
    t: float
    term: bool


Record = Decision | SlotsDecision | Observation | EpisodeEnd


def encode(record: Record, *, c_literal: bytes | None = None) -> bytes:
    """The record as the log stores it (optional fields only when set). `c_literal`: a
    decision's `c` already written as its JSON string (learners.features.with_json_string)."""
    if isinstance(record, Decision):
        doc: dict[str, Any] = {
            "k": DECISION,
            "loop": record.loop,
            "id": record.id,
            "t": record.t,
            "deferred": record.deferred,
            "mode": record.mode,
            "a": record.a,
            "p": record.p,
            "b": record.b,
            "m": record.m,
            "c": record.c if c_literal is None else orjson.Fragment(c_literal),
        }
        if record.ep is not None:
            doc["ep"] = record.ep
        if record.x is not None:
            doc["x"] = record.x
        _holdout(doc, record)
    elif isinstance(record, SlotsDecision):
        doc = {
            "k": SLOTS,
            "loop": record.loop,
            "id": record.id,
            "t": record.t,
            "deferred": record.deferred,
            "mode": record.mode,
            "s": [{"id": s.id, "a": s.a, "p": s.p} for s in record.s],
            "b": record.b,
            "m": record.m,
            "c": record.c,
        }
        _holdout(doc, record)
    elif isinstance(record, Observation):
        doc = {"k": record.k, "loop": record.loop, "id": record.id, "t": record.t, "u": record.u}
        if record.v is not None:
            doc["v"] = record.v
        if record.slot is not None:
            doc["slot"] = record.slot
        if record.n is not None:
            doc["n"] = record.n
    else:
        doc = {
            "k": EPISODE_END,
            "loop": record.loop,
            "id": record.id,
            "t": record.t,
            "term": record.term,
        }
    return orjson.dumps(doc)


def _holdout(doc: dict[str, Any], record: Decision | SlotsDecision) -> None:
    if record.h > 0:
        doc["h"] = record.h
        if record.ho:
            doc["ho"] = True


def decode(raw: bytes | str) -> Record:
    """The record `raw` holds; RecordError (a ValueError) if it is not a readable record."""
    return _read(_load(raw))


def decode_kept(raw: bytes) -> tuple[Record, bytes]:
    """The record `raw` holds, and what a log keeps of it: `raw` itself when it holds its
    kind's fields and nothing else, with a number for its time (as every dloop writer's record
    does: encoding it again would cost a fifth of ingesting it), else the record encoded again,
    so keys no reader reads are never stored. RecordError as `decode`."""
    r = _load(raw)
    record = _read(r)
    if r.keys() <= _FIELDS[r["k"]] and type(r["t"]) in (float, int):
        return record, raw
    return record, encode(record)


def _load(raw: bytes | str) -> dict[str, Any]:
    try:
        r = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RecordError(f"JSONDecodeError: {exc}") from None
    if not isinstance(r, dict):
        raise RecordError("a record must be a JSON object")
    return r


def _read(r: dict[str, Any]) -> Record:
    kind = r.get("k")
    if kind not in _NEEDED or not isinstance(r.get("id"), str):
        raise RecordError(f"unknown record kind {kind!r}")
    missing = _NEEDED[kind] - r.keys()
    if missing:
        raise RecordError(f"missing {', '.join(sorted(missing))}")
    try:
        t = float(r["t"])
    except (TypeError, ValueError):
        raise RecordError(f"bad time {r['t']!r}") from None
    for key in ("id", "ep", "slot", "loop", "n"):
        if "\x00" in str(r.get(key) or ""):  # Postgres refuses NUL in text
            raise RecordError(f"NUL in {key}")
    try:
        return _typed(kind, r, t)
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordError(f"{type(exc).__name__}: {exc}") from None


def _typed(kind: str, r: dict[str, Any], t: float) -> Record:
    loop, id_ = str(r["loop"]), r["id"]
    if kind == DECISION:
        return Decision(
            loop, id_, t, r["deferred"], r["mode"], r["c"], r["a"], r["p"], r["b"], r["m"],
            ep=r.get("ep"), x=r.get("x"), h=float(r.get("h", 0.0)), ho=r.get("ho") is True,
        )  # fmt: skip
    if kind == SLOTS:
        slots = [SlotChoice(s["id"], s["a"], s["p"]) for s in r["s"]]
        return SlotsDecision(
            loop, id_, t, r["deferred"], r["mode"], r["c"], slots, r["b"], r["m"],
            h=float(r.get("h", 0.0)), ho=r.get("ho") is True,
        )  # fmt: skip
    if kind == EPISODE_END:
        return EpisodeEnd(loop, id_, t, bool(r["term"]))
    name = r.get("n")
    if name is not None and not isinstance(name, str):
        raise RecordError(f"bad outcome name {name!r}")
    return Observation(kind, loop, id_, t, r.get("u"), r.get("v"), r.get("slot"), name)


def partition_key(raw: bytes) -> bytes:
    """The events topic's key of a record: its loop and id, so a decision and its observations
    share a partition (and reach the same joiner)."""
    r = orjson.loads(raw)
    return f"{r['loop']}/{r['id']}".encode()


def time_of(raw: bytes) -> float:
    """A record's time `t` (0 for a record that cannot be read: it goes to the dead letters)."""
    try:
        return float(orjson.loads(raw)["t"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return 0.0
