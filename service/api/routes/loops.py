"""Named loops: each with its own keys, configuration, policy, model and logs.

A named loop answers the whole Personalizer API under `/loops/{loop}/personalizer/...`.
Its client keys are managed under `/loops/{loop}/keys` (routes/keys.py).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Body
from starlette.responses import JSONResponse, Response

from learners.dsjson import timestamp
from service.api.deps import AdminState, ViewState
from service.api.errors import ApiError, bad_request
from service.core.kinds import CB, KINDS
from service.storage import store
from service.storage.models import Loop

router = APIRouter()

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _loop_doc(loop: Loop) -> dict[str, Any]:
    return {"name": loop.name, "kind": loop.kind, "createdTime": timestamp(loop.created_at)}


@router.get("/loops")
def list_loops(d: ViewState) -> dict[str, Any]:
    with d.sessions() as session:
        return {"value": [_loop_doc(loop) for loop in store.list_loops(session)]}


@router.put("/loops/{name}")
def create_loop(d: AdminState, name: str, payload: Annotated[Any, Body()] = None) -> Response:
    if not NAME.match(name):
        raise bad_request("InvalidRequest", "loop names are 1-64 letters, digits, '_', '.', '-'")
    kind = payload.get("kind", CB.name) if isinstance(payload, dict) else None
    if not isinstance(kind, str) or kind not in KINDS:
        raise bad_request("InvalidRequest", f"kind must be one of {sorted(KINDS)}")
    with d.sessions.begin() as session:
        existing = session.get(Loop, name)
        if existing is not None and existing.kind != kind:
            raise ApiError(409, "Conflict", f"loop '{name}' exists with kind {existing.kind}")
        loop = store.ensure_loop(
            session, name=name, kind=kind, now=d.clock(), policy=d.settings.default_policy
        )
        doc = _loop_doc(loop)
        store.notify_models(session, [name])  # other replicas reload at once
    with d.sessions() as session:
        d.registry.load(session, [name])
    return JSONResponse(doc, status_code=200 if existing is not None else 201)


@router.delete("/loops/{name}", status_code=204)
def delete_loop(d: AdminState, name: str) -> Response:
    if name == store.DEFAULT_LOOP:
        raise bad_request("InvalidRequest", "the default loop cannot be deleted")
    with d.sessions.begin() as session:
        if session.get(Loop, name) is None:
            raise ApiError(404, "ResourceNotFound", f"loop '{name}' does not exist")
        store.delete_loop(session, name=name)
        store.notify_models(session, [name])
    with d.sessions() as session:
        d.registry.load(session, [name])
    d.reload_keys()
    return Response(status_code=204)
