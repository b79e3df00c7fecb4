"""Decision-log records of a simple synthetic loop, for tests and benchmarks of the pipeline."""

from __future__ import annotations

import uuid

from learners.features import context_json
from service.core import record

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
