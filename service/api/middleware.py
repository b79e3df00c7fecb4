"""What every answer gets, whichever layer gave it: the nosniff header, and a count of errors.

The path-style middleware (service.api.paths), outside every other layer, applies both: to the
answers it gives itself (the hot path, refusals) as it sends them, and to the framework's through
one wrapper of `send`. The framework's own 500 handler answers outside them all: error bodies
carry nosniff themselves (service.api.errors), and the exception that reaches the front door
unanswered is counted as the 500 it becomes.
"""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import Message, Scope, Send

NOSNIFF = (b"x-content-type-options", b"nosniff")


def with_nosniff(start: Message) -> Message:
    """An `http.response.start` message with `X-Content-Type-Options: nosniff`, so a browser
    never runs an error body or a downloaded model as script or HTML."""
    headers = list(start.get("headers", ()))
    if NOSNIFF[0] not in (k.lower() for k, _ in headers):
        headers.append(NOSNIFF)
    return {**start, "headers": headers}


async def send_response(response: Response, send: Send) -> None:
    """Send a complete in-memory response (no background task, no stream) with nosniff: what
    Response.__call__ does, without its extra layers."""
    headers = response.raw_headers
    if NOSNIFF[0] not in (k for k, _ in headers):  # raw header names are lower case
        headers = [*headers, NOSNIFF]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


def count_error(scope: Scope, status: int) -> None:
    """Count a 4xx or 5xx answer by status in `dloop_http_errors` (the app state's
    Metrics.errors)."""
    if status >= 400:
        scope["app"].state.dloop.metrics.errors.labels(str(status)).inc()
