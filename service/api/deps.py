"""What routes declare to get the app state and an authorized loop (FastAPI dependencies).

    State       the app state (service.api.state.Dloop); no key checked (health checks)
    AdminState  the app state, for a caller with an admin key (else 401/403)
    ViewState   ... or a viewer key of every loop (read-only operations)
    AdminLoop   the request's loop (the default one, or `/loops/{loop}/personalizer/...`), for
                a caller with an admin key (else 401/403); 404 if the loop does not exist
    ViewLoop    ... or a viewer key of that loop (read-only operations)
    ViewNamed   the loop `/loops/{name}/...` names, for an admin key or a viewer key of it

The hot-path routes (routes/events.py, routes/multislot.py) are plain Starlette routes, where
FastAPI's dependency solving would cost a fifth of a rank: they call `loop_for`, the function
AdminLoop is built on, with `admin=False` (a client key of the loop may call them).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import Request

from service.api.auth import authorize
from service.api.errors import ApiError
from service.api.state import Dloop
from service.pipeline.runtime import LoopRuntime
from service.storage import store


def dloop(request: Request) -> Dloop:
    d: Dloop = request.app.state.dloop
    return d


def loop_name(request: Request) -> str:
    """The loop a Personalizer path names (service.api.paths.PathStyles put it in the scope)."""
    return str(request.scope.get("dloop.loop", store.DEFAULT_LOOP))


def admin(request: Request, *, view: bool = False) -> Dloop:
    """The state, once the caller is known to hold an admin key (with `view`, or a viewer key
    of every loop); 401/403 otherwise."""
    d = dloop(request)
    _authorize(d, request, loop="", admin=True, view=view)
    return d


def _authorize(d: Dloop, request: Request, *, loop: str, admin: bool, view: bool) -> None:
    try:
        authorize(d.keys, request, loop=loop, admin=admin, view=view)
    except ApiError:
        if not d.refresh():  # a key created through another replica?
            raise
        authorize(d.keys, request, loop=loop, admin=admin, view=view)


def loop_for(
    request: Request, *, admin: bool, view: bool = False, name: str | None = None
) -> tuple[Dloop, LoopRuntime]:
    """Authorize the caller for the request's loop, or loop `name` (any admin key; with
    `view` a viewer key of the loop; with `admin=False` a client key of it), then return the
    loop: 404 if it does not exist."""
    d = dloop(request)
    name = name if name is not None else loop_name(request)
    _authorize(d, request, loop=name, admin=admin, view=view)
    rt = d.registry.get(name)
    if rt is None and d.refresh(name):  # a loop created through another replica?
        rt = d.registry.get(name)
    if rt is None:
        raise ApiError(404, "ResourceNotFound", f"loop '{name}' does not exist")
    return d, rt


# Coroutines where nothing blocks (FastAPI runs a plain function in a thread); the others stay
# functions because `refresh` may read the database.
async def _state(request: Request) -> Dloop:
    return dloop(request)


def _admin(request: Request) -> Dloop:
    return admin(request)


def _view(request: Request) -> Dloop:
    return admin(request, view=True)


def _admin_loop(request: Request) -> LoopRuntime:
    return loop_for(request, admin=True)[1]


def _view_loop(request: Request) -> LoopRuntime:
    return loop_for(request, admin=True, view=True)[1]


def _view_named(request: Request, name: str) -> LoopRuntime:
    return loop_for(request, admin=True, view=True, name=name)[1]


State = Annotated[Dloop, Depends(_state)]
AdminState = Annotated[Dloop, Depends(_admin)]
ViewState = Annotated[Dloop, Depends(_view)]
AdminLoop = Annotated[LoopRuntime, Depends(_admin_loop)]
ViewLoop = Annotated[LoopRuntime, Depends(_view_loop)]
ViewNamed = Annotated[LoopRuntime, Depends(_view_named)]
