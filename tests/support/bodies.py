"""Request bodies the API tests send: a rank of three news actions (`rank_body`), and a rank of
any context over three topic actions (`body`, the actions of tests.support.records.dsjson)."""

from __future__ import annotations

from typing import Any

ACTIONS = [
    {"id": "news", "features": [{"topic": "politics"}]},
    {"id": "sports", "features": [{"topic": "football"}]},
    {"id": "tech", "features": [{"topic": "ai"}]},
]


def rank_body(event_id: str = "e1", **kw: Any) -> dict[str, Any]:
    body = {"contextFeatures": [{"time": "morning"}], "actions": ACTIONS, "eventId": event_id}
    body.update(kw)
    return body


TOPIC_ACTIONS = [{"id": f"a{i}", "features": [{"topic": f"t{i}"}]} for i in range(3)]


def body(event_id: str, context: list[dict[str, Any]], actions: Any = None) -> dict[str, Any]:
    return {"eventId": event_id, "contextFeatures": context, "actions": actions or TOPIC_ACTIONS}
