"""API keys. Admin keys under `/keys`, a loop's client keys (rank, reward and activate on that
loop) under `/loops/{loop}/keys`: list, create (the key is returned once; only its hash is
stored; an optional label and expiry) and revoke. `{"role": "viewer"}` in a creation makes a
read-only viewer key instead: of every loop under `/keys`, of the loop under its own path. The
last valid admin key cannot be revoked, so nobody locks themselves out.

`DLOOP_API_KEY` is stored as the admin key of source "env" at every start, replacing the
previous one; keys created here (source "api") or with `dloop keys` ("cli") stay until revoked
or expired.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.responses import JSONResponse, Response

from learners.dsjson import timestamp
from service.api.deps import AdminState, admin
from service.api.errors import ApiError, bad_request
from service.api.state import Dloop
from service.core.schemas import KeyRequest, validation_message
from service.storage import store
from service.storage.models import ApiKey

router = APIRouter()

Payload = Annotated[Any, Body()]
# Key ids are 32-bit database integers (INTEGER in Postgres): another one is a bad request, not
# a database error. FastAPI checks path parameters after dependencies: routes with a KeyId
# authorize in their body, so a malformed id stays a 400 before a client key's 403.
KeyId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def key_doc(row: ApiKey) -> dict[str, Any]:
    """A key as listed: never the key or its hash."""
    return {
        "id": row.id,
        "role": row.role,
        "label": row.label,
        "source": row.source,
        "createdTime": timestamp(row.created_at),
        "expiresTime": None if row.expires_at is None else timestamp(row.expires_at),
    }


def key_options(payload: Any, now: float) -> tuple[str | None, float | None, str | None]:
    """(label, expiry, role asked for) from a key creation body (None: no body); 400 if it is
    malformed."""
    try:
        request = KeyRequest.model_validate({} if payload is None else payload)
        return request.label, request.expiry(now), request.role
    except ValidationError as exc:
        raise bad_request("InvalidRequest", validation_message(exc)) from None
    except ValueError as exc:
        raise bad_request("InvalidRequest", str(exc)) from None


def created(doc: dict[str, Any]) -> Response:
    # The body holds the only copy of a secret: no cache along the way may keep it.
    return JSONResponse(doc, status_code=201, headers={"Cache-Control": "no-store"})


@router.get("/keys")
def list_admin_keys(d: AdminState) -> dict[str, Any]:
    with d.sessions() as session:
        return {"value": [key_doc(row) for row in store.list_keys(session, loop=None)]}


@router.post("/keys")
def create_admin_key(d: AdminState, payload: Payload = None) -> Response:
    return _create(d, payload, role="admin", loop=None)


def _create(d: Dloop, payload: Any, *, role: str, loop: str | None) -> Response:
    """A new key (201, shown once) with the label and expiry the body asks for."""
    now = d.clock()
    label, expires_at, asked = key_options(payload, now)
    with d.sessions.begin() as session:
        row, key = store.create_key(
            session,
            role=asked or role,
            loop=loop,
            now=now,
            source="api",
            label=label,
            expires_at=expires_at,
        )
        doc = {**(key_doc(row) if loop is None else _client_key_doc(row)), "key": key}
    d.reload_keys()
    return created(doc)


@router.delete("/keys/{key_id}", status_code=204)
def revoke_admin_key(request: Request, key_id: KeyId) -> Response:
    d = admin(request)  # not AdminState: see KeyId
    with d.sessions.begin() as session:
        row = store.get_key(session, key_id=key_id)
        if row is None or row.loop is not None:
            raise ApiError(404, "ResourceNotFound", f"there is no admin or viewer key {key_id}")
        _revoke(session, row, d.clock())
    d.reload_keys()
    return Response(status_code=204)


def _revoke(session: Session, row: ApiKey, now: float) -> None:
    try:
        store.revoke_key(session, row=row, now=now)
    except store.LastAdminKeyError as exc:
        raise ApiError(409, "Conflict", str(exc)) from None


def _existing(d: Dloop, name: str) -> None:
    if d.registry.get(name) is None:
        raise ApiError(404, "ResourceNotFound", f"loop '{name}' does not exist")


def _client_key_doc(row: ApiKey) -> dict[str, Any]:
    return {**key_doc(row), "loop": row.loop}


@router.post("/loops/{name}/keys")
def create_client_key(d: AdminState, name: str, payload: Payload = None) -> Response:
    _existing(d, name)
    return _create(d, payload, role="client", loop=name)


@router.get("/loops/{name}/keys")
def list_client_keys(d: AdminState, name: str) -> dict[str, Any]:
    _existing(d, name)
    with d.sessions() as session:
        return {"value": [_client_key_doc(row) for row in store.list_keys(session, loop=name)]}


@router.delete("/loops/{name}/keys/{key_id}", status_code=204)
def delete_client_key(request: Request, name: str, key_id: KeyId) -> Response:
    d = admin(request)  # not AdminState: see KeyId
    with d.sessions.begin() as session:
        row = store.get_key(session, key_id=key_id)
        if row is None or row.loop != name:
            raise ApiError(404, "ResourceNotFound", f"loop '{name}' has no key {key_id}")
        _revoke(session, row, d.clock())
    d.reload_keys()
    return Response(status_code=204)
