"""Headers every response carries, whichever layer answered it."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

NOSNIFF = (b"x-content-type-options", b"nosniff")


class NoSniff:
    """Add `X-Content-Type-Options: nosniff`, so a browser never runs an error body or a
    downloaded model as script or HTML. Pure ASGI and outside every other middleware, so the
    hot path that PathStyles answers itself carries it too; the framework's outermost 500
    handler answers outside this one, which is why error bodies carry it as well (errors.py)."""

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
