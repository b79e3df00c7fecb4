"""The dashboard (/ui): a page served by dloop itself, with no CDN and no build step. Its
script (service/api/ui/app.js) draws from the JSON API (GET /overview, /loops/{loop}/stats,
/loops/{loop}/holdout, the configuration, evaluations and events) with plotly.js as the plotly
package ships it. A person logs in with an admin or viewer key (`POST /ui/login`): the key
becomes a session cookie (service.api.session; HttpOnly, SameSite=Strict, Secure over HTTPS)
that the API accepts in place of the key header, with the session's CSRF token on every change
(service.api.auth). Viewer keys may only look; admins may also change the configuration and
apply an evaluation's policy."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response

from service.api.auth import ADMIN, SESSION_COOKIE, VIEWER, check_csrf, session_of
from service.api.deps import ViewState, dloop
from service.api.errors import ApiError, bad_request
from service.pipeline import stats
from service.storage import store

router = APIRouter()

PAGES = Path(__file__).resolve().parents[1] / "ui"
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
# The page's own files and plotly.js only; plotly draws with inline styles.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)


def _plotly_js() -> Path:
    spec = importlib.util.find_spec("plotly")
    assert spec is not None and spec.submodule_search_locations, "the plotly package is missing"
    return Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"


def _page_headers() -> dict[str, str]:
    return {
        "Content-Security-Policy": CSP,
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
    }


@router.get("/ui", include_in_schema=False)
def ui_root() -> Response:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/", include_in_schema=False)
def ui_page() -> Response:
    return FileResponse(PAGES / "index.html", media_type="text/html", headers=_page_headers())


@router.get("/ui/static/{name}", include_in_schema=False)
def ui_static(name: str) -> Response:
    if name == "plotly.min.js":
        path, media = _plotly_js(), "text/javascript"
    elif name in STATIC:
        path, media = PAGES / name, STATIC[name]
    else:
        raise ApiError(404, "ResourceNotFound", f"no file {name!r}")
    return FileResponse(path, media_type=media, headers={"Cache-Control": "no-cache"})


def _session_doc(role: str, loop: str | None, csrf: str) -> dict[str, Any]:
    return {"role": role, "loop": loop, "csrfToken": csrf}


@router.post("/ui/login", include_in_schema=False)
def ui_login(request: Request, payload: Annotated[Any, Body()] = None) -> Response:
    """`{"key": "..."}`: an admin or viewer key starts a session (client keys may not)."""
    d = dloop(request)
    key = payload.get("key") if isinstance(payload, dict) else None
    if not isinstance(key, str) or not key:
        raise bad_request("InvalidRequest", 'body must be {"key": "<an admin or viewer key>"}')
    key_hash = store.hash_key(key)
    entry = d.keys.get(key_hash)
    if entry is None and d.refresh():
        entry = d.keys.get(key_hash)
    if entry is None:
        raise ApiError(401, "Unauthorized", "Access denied: invalid key")
    role, loop = entry
    if role not in (ADMIN, VIEWER):
        raise ApiError(403, "InvalidApiAccess", "only admin and viewer keys open the dashboard")
    cookie, csrf = d.ui_sessions.issue(key_hash)
    response = JSONResponse(_session_doc(role, loop, csrf))
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=d.ui_sessions.max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("/ui/session", include_in_schema=False)
def ui_session(request: Request) -> Response:
    """The session's role, loop and CSRF token; all null without a valid session (not a 401:
    the page asks this first, and a browser logs every failed request as an error)."""
    d = dloop(request)
    session = session_of(d.keys, request.cookies)
    entry = d.keys.get(session[0]) if session is not None else None
    if session is None or entry is None:
        return JSONResponse(
            {"role": None, "loop": None, "csrfToken": None}, headers={"Cache-Control": "no-store"}
        )
    role, loop = entry
    return JSONResponse(_session_doc(role, loop, session[1]), headers={"Cache-Control": "no-store"})


@router.post("/ui/logout", include_in_schema=False)
def ui_logout(request: Request) -> Response:
    """End the session (its CSRF token is required, like every change)."""
    d = dloop(request)
    session = session_of(d.keys, request.cookies)
    if session is None:
        raise ApiError(401, "Unauthorized", "not logged in")
    check_csrf(request, session[1])
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/overview")
def get_overview(d: ViewState, skip: int = 0, top: int = 50) -> dict[str, Any]:
    """dloop: the loops at a glance (pipeline.stats.summary), by name, `top` (1 to 200) after
    the first `skip`; `count` is how many loops there are."""
    if not 1 <= top <= 200 or skip < 0:
        raise bad_request("InvalidRequest", "top must be 1 to 200 and skip at least 0")
    with d.sessions() as session:
        names = [loop.name for loop in store.list_loops(session)]
        page = store.list_loops(session, names[skip : skip + top])
        now = d.clock()
        return {
            "count": len(names),
            "value": [stats.summary(session, loop=loop, now=now) for loop in page],
        }
