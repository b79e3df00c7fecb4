"""The path-style middleware: every request's way in, outside the framework's routing.

Every supported path style is rewritten to the one route table (remembering the loop and the
API version), every request is guarded (service.api.guard), and rank, reward and activate are
answered here, without the framework's layers.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import errors
from service.api.guard import (
    BodyReads,
    BodyTimeout,
    BodyTooLarge,
    RateLimiter,
    is_public,
    key_hash,
    scope_key,
)
from service.api.middleware import count_error, send_response, with_nosniff
from service.api.routes import events
from service.api.state import Dloop
from service.core.settings import Settings
from service.storage import store

# /personalizer/v1.0/..., /personalizer/v1.1-preview.N/..., /personalizer/...?api-version=,
# each optionally under /loops/{loop}: all served by the routes at /personalizer/...
# Matched whole (fullmatch, DOTALL): `$` also matches before a trailing newline, and `.` would
# stop at one, so "/personalizer/rank\n" was served as a rank.
_PATH = re.compile(
    r"(?:/loops/([^/]+))?/personalizer(?:/(v1\.0|v1\.1-preview\.[0-9]+))?(/.*)?", re.S
)
_HOT = re.compile(r"/personalizer/(?:(rank)|events/([^/]+)/(reward|activate))", re.S)
_HOT_HANDLERS = {"rank": events.rank, "reward": events.reward, "activate": events.activate}


class PathStyles:
    """Rewrite every supported path style to one route table, remembering the loop; guard every
    request (service.api.guard: a valid key before any body is read, the key's rate limit, a body
    counted as it arrives); answer rank, reward and activate directly; give every answer nosniff
    and count the errors (service.api.middleware).

    The hot path skips the framework's middleware and routing layers (about 40 us of a rank's
    130 us in-process, measured with the same handlers): the handlers are the ones the router
    also serves, and errors get the same Personalizer body as everywhere else.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.max_body = settings.max_body_bytes
        self.max_model = settings.max_model_bytes
        # An in-process ranker's records of the largest rank a request may ask: a decision
        # holds its context escaped into a JSON string, at most twice as long (every character
        # a quote or a backslash), with its order and probabilities beside it.
        self.max_records = 4 * settings.max_body_bytes
        self.body_timeout = settings.limits.body_timeout
        self.rate = settings.limits.rate_per_key
        self.burst = settings.limits.burst_per_key
        self.limiter: RateLimiter | None = None
        self.reads = BodyReads()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = _PATH.fullmatch(scope["path"])
        if m:
            scope = dict(scope)
            scope["path"] = "/personalizer" + (m.group(3) or "")
            scope["dloop.loop"] = m.group(1) or store.DEFAULT_LOOP
            scope["dloop.version"] = m.group(2)
        path, method = scope["path"], scope["method"]
        refused = None if is_public(path) else self._admit(scope)
        if refused is None and path.endswith(("\n", "\r")):
            # No route or id ends with one, but the router's `$` would match before it: not
            # found (for a client key, an operation it may not call, as elsewhere).
            admin = scope.get("dloop.role") == "admin"
            refused = errors.error_response(
                404 if admin else 403,
                "ResourceNotFound" if admin else "InvalidApiAccess",
                "no such path" if admin else "This key may not call this operation",
            )
        # Only the exact model import route takes bodies beyond max_body (it caps them itself),
        # and the exact route of an in-process ranker's records up to max_records.
        if method == "PUT" and path == "/personalizer/model":
            cap = self.max_model
        elif method == "POST" and path == "/personalizer/local/records":
            cap = self.max_records
        else:
            cap = self.max_body
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if refused is None and length is not None and length.isdigit() and int(length) > cap:
            refused = errors.error_response(
                413, "PayloadSizeExceeded", f"request body exceeds {cap} bytes"
            )
        if refused is not None:
            await _answer(scope, refused, send)
            return
        receive = self.reads.limited(receive, cap=cap, timeout=self.body_timeout)
        if method == "POST" and (hot := _HOT.fullmatch(path)):
            try:
                response = await self._hot(hot, scope, receive)
            except (BodyTooLarge, BodyTimeout) as exc:
                response = errors.http_error_response(exc)
            await _answer(scope, response, send)
            return
        status = 0

        async def answered(message: Message) -> None:  # the framework's answers
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = with_nosniff(message)
            await send(message)

        try:
            await self.app(scope, receive, answered)
        except (BodyTooLarge, BodyTimeout) as exc:
            if status:  # too late for an error answer
                raise
            response = errors.http_error_response(exc)
            await send_response(response, send)
            status = response.status_code
        except Exception:
            status = status or 500  # unanswered: the framework's handler answers 500
            raise
        finally:
            count_error(scope, status)

    def _admit(self, scope: Scope) -> Response | None:
        """401 without a valid key, 429 past its rate; None to let the request in. Roles and
        loops are the routes' to check."""
        d: Dloop = scope["app"].state.dloop
        digest = key_hash(d.keys, scope)
        if digest is None and d.refresh():  # a key created through another replica?
            digest = key_hash(d.keys, scope)
        if digest is None:
            if scope_key(scope) is None:
                message = "Access denied: missing Ocp-Apim-Subscription-Key header"
            else:
                message = "Access denied: invalid subscription key"
            return errors.error_response(401, "Unauthorized", message)
        entry = d.keys.get(digest)
        scope["dloop.role"] = entry[0] if entry is not None else None
        if scope_key(scope) is not None:  # the routes' check reuses it (service.api.auth)
            scope["dloop.key_hash"] = digest
        if self.limiter is None:
            self.limiter = RateLimiter(self.rate, self.burst, d.clock)
        wait = self.limiter.check(digest)
        if wait:
            message = f"this key is limited to {self.rate:g} requests a second"
            return errors.respond(
                errors.ApiError(429, "TooManyRequests", message, retry_after=wait)
            )
        return None

    async def _hot(self, hot: re.Match[str], scope: Scope, receive: Receive) -> Response:
        if hot.group(2) is not None:
            scope["path_params"] = {"event_id": hot.group(2)}
        try:
            return await _HOT_HANDLERS[hot.group(1) or hot.group(3)](Request(scope, receive))
        except errors.ApiError as exc:
            return errors.respond(exc)
        except (BodyTooLarge, BodyTimeout):
            raise
        except Exception:
            errors.log.exception("unhandled error")
            return errors.error_response(500, "InternalServerError", "internal error")


async def _answer(scope: Scope, response: Response, send: Send) -> None:
    """An answer the front door gives itself: sent with nosniff, and counted if an error."""
    await send_response(response, send)
    count_error(scope, response.status_code)
