"""Decision log management (Personalizer's /logs)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from learners.dsjson import timestamp
from service.api.deps import AdminLoop, State, ViewLoop
from service.storage import store

router = APIRouter()


@router.delete("/personalizer/logs", status_code=204)
def delete_logs(d: State, rt: AdminLoop) -> Response:
    with d.sessions.begin() as session:
        store.delete_logs(session, loop=rt.name)
    return Response(status_code=204)


@router.get("/personalizer/logs/properties")
def get_log_properties(d: State, rt: ViewLoop) -> dict[str, Any]:
    """The logged events' date range; `{}` when the loop has none, as Personalizer answered
    (its SDK raises on the 404 `LogsPropertiesNotFound` that its error list suggests)."""
    with d.sessions() as session:
        span = store.log_range(session, loop=rt.name)
    if span is None:
        return {}
    return {"dateRange": {"from": timestamp(span[0]), "to": timestamp(span[1])}}
