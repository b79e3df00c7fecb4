"""Decision-log records of a simple synthetic loop, for tests and benchmarks of the pipeline,
and joined DSJSON lines (`dsjson`) as learners read them."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from learners.features import context_json
from service.core import record
from tests.support.bodies import TOPIC_ACTIONS

ACTIONS = [(f"a{i}", [{"kind": f"k{i % 3}", "rank": i}]) for i in range(10)]


def records(n: int, start: float, prefix: str = "b") -> list[tuple[bytes, bytes]]:
    """n decisions and their rewards in the decision-log record format, keyed as the API does."""
    out = []
    for i in range(n):
        context = context_json([{"user": f"u{i % 50}", "time": i % 24}], ACTIONS).decode()
        event = f"{prefix}{i}"
        decision = record.Decision(
            loop="default",
            id=event,
            t=start + i * 1e-3,
            deferred=False,
            mode="Online",
            c=context,
            a=list(range(10)),
            p=[0.1] * 10,
            b=0,
            m="N/A",
        )
        reward = record.Observation(
            record.REWARD, "default", event, start + i * 1e-3 + 0.5, uuid.uuid4().hex, float(i % 2)
        )
        key = record.partition_key(record.encode(decision))
        out += [(key, record.encode(decision)), (key, record.encode(reward))]
    return out


def dsjson(context: list[dict[str, Any]], event_id: str = "p1") -> str:
    """A joined line of the default loop (reward 1 for the first of the three topic actions)."""
    c = {
        "FromUrl": context,
        "_multi": [
            {"_tag": a["id"], "i": {"constant": 1, "id": a["id"]}, "j": a["features"]}
            for a in TOPIC_ACTIONS
        ],
    }
    head = {"_label_cost": -1, "_label_probability": 0.5, "_label_Action": 1, "_labelIndex": 0}
    tail = {
        "o": [],
        "Timestamp": "2026-12-02T00:00:00.000Z",
        "Version": "1",
        "EventId": event_id,
        "a": [1, 2, 3],
        "c": c,
        "p": [0.5, 0.25, 0.25],
        "VWState": {"m": "N/A"},
    }
    return orjson.dumps({**head, **tail}).decode()
