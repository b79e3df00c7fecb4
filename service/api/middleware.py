"""What every answer gets, whichever layer gave it: the nosniff header, and a count of errors.

Both are pure ASGI and outside every other middleware, so the hot path that PathStyles answers
itself (service.api.paths) is covered too. The framework's own 500 handler answers outside them all:
error bodies carry nosniff themselves (service.api.errors), and CountErrors counts the
exception that reaches it unanswered as the 500 it becomes.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

NOSNIFF = (b"x-content-type-options", b"nosniff")


class NoSniff:
    """Add `X-Content-Type-Options: nosniff`, so a browser never runs an error body or a
    downloaded model as script or HTML."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if NOSNIFF[0] not in (k.lower() for k, _ in headers):
                    headers.append(NOSNIFF)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)


class CountErrors:
    """Count every 4xx and 5xx answer by status in `dloop_http_errors` (the app state's
    Metrics.errors)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            status = status or 500  # unanswered: the framework's handler answers 500
            raise
        finally:
            if status >= 400:
                scope["app"].state.dloop.metrics.errors.labels(str(status)).inc()
