"""service.core.record: every kind survives encode -> decode; what cannot be read says why."""

from __future__ import annotations

import orjson
import pytest

from service.core import record

DECISION = record.Decision(
    loop="default",
    id="e1",
    t=1.5,
    deferred=False,
    mode="Online",
    c='{"_multi":[{"a":1}]}',
    a=[1, 0],
    p=[0.9, 0.1],
    b=0,
    m="N/A",
)


@pytest.mark.parametrize(
    "r",
    [
        DECISION,
        record.Decision(
            "rl", "s1", 2.0, True, "Apprentice", "{}", [0], [1.0], 0, "m1", ep="ep1", x=[]
        ),
        record.SlotsDecision(
            "ccb", "e2", 3.0, False, "Online", "{}", [record.SlotChoice("s", [2, 1], [0.5, 0.5])],
            [1], "m2",
        ),
        record.Observation(record.REWARD, "default", "e1", 4.0, "u1", 0.5),
        record.Observation(record.REWARD, "ccb", "e2", 4.0, "u2", 1.0, slot="s"),
        record.Observation(record.ACTIVATION, "default", "e1", 5.0, "u3"),
        record.EpisodeEnd("rl", "ep1", 6.0, term=False),
    ],
)  # fmt: skip
def test_every_kind_round_trips(r: record.Record) -> None:
    assert record.decode(record.encode(r)) == r


def test_optional_fields_are_written_only_when_set() -> None:
    doc = orjson.loads(record.encode(DECISION))
    assert list(doc) == ["k", "loop", "id", "t", "deferred", "mode", "a", "p", "b", "m", "c"]
    obs = orjson.loads(record.encode(record.Observation(record.ACTIVATION, "l", "e", 1.0, "u")))
    assert obs == {"k": "a", "loop": "l", "id": "e", "t": 1.0, "u": "u"}


def test_an_observation_names_its_kind() -> None:
    assert record.Observation(record.REWARD, "l", "e", 1.0, "u", 1.0).kind == "reward"
    assert record.Observation(record.ACTIVATION, "l", "e", 1.0, "u").kind == "activate"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"k":"d","loop"', "JSONDecodeError"),
        (b"[1]", "JSON object"),
        (b'{"k":"x","loop":"l","id":"e","t":1}', "unknown record kind 'x'"),
        (b'{"k":"r","loop":"l","id":7,"t":1}', "unknown record kind"),
        (b'{"k":"d","loop":"l","id":"e","t":1}', "missing a, b, c, deferred, m, mode, p"),
        (b'{"k":"r","loop":"l","id":"e","t":"soon"}', "bad time"),
        (b'{"k":"r","loop":"l","id":"a\\u0000b","t":1}', "NUL in id"),
        (b'{"k":"m","loop":"l","id":"e","t":1,"deferred":false,"mode":"Online","c":"{}",'
         b'"s":[{"id":"s"}],"b":[0],"m":"N/A"}', "KeyError"),
    ],
)  # fmt: skip
def test_what_cannot_be_read_raises_with_the_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(record.RecordError, match=reason):
        record.decode(raw)


def test_partition_key_and_time() -> None:
    raw = record.encode(DECISION)
    assert record.partition_key(raw) == b"default/e1"
    assert record.time_of(raw) == 1.5
    assert record.time_of(b"not json") == 0.0
