"""What every request passes before any handler runs: a valid key (before a byte of its body is
read), its key's rate limit, and a body counted as it arrives (size cap and deadline).

These run in the path-style middleware (service.api.paths.PathStyles), before the framework's
routing, so its body parsing (FastAPI reads `Body()` parameters before the handler could check a
key) and the hot path are covered alike. Roles and loops are still checked by each route
(service.api.deps).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import cookie_parser
from starlette.types import Message, Receive, Scope

from service.api.auth import KeyTable, session_of
from service.storage.store import hash_key

# Paths anyone may call: liveness, readiness, the API's description, and the dashboard's page,
# files and login (its data comes from the API, which needs a key or a session).
PUBLIC = ("/healthz", "/readyz", "/openapi.json", "/ui")
PUBLIC_PREFIXES = ("/docs", "/ui/")


class BodyTooLarge(HTTPException):
    def __init__(self, cap: int) -> None:
        super().__init__(413, f"request body exceeds {cap} bytes")


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body did not arrive within {seconds:g} s")


def is_public(path: str) -> bool:
    return path in PUBLIC or path.startswith(PUBLIC_PREFIXES)


def scope_key(scope: Scope) -> str | None:
    """The key a request presents (`Ocp-Apim-Subscription-Key` or `Authorization: Bearer`)."""
    bearer = None
    for name, value in scope["headers"]:
        if name == b"ocp-apim-subscription-key" and value:
            return str(value.decode("latin-1"))
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            bearer = value[7:].strip().decode("latin-1")
    return bearer or None


def key_hash(keys: KeyTable, scope: Scope) -> str | None:
    """The hash of a valid presented key (or of the key a dashboard session stands for), or
    None."""
    key = scope_key(scope)
    digest = hash_key(key) if key else session_hash(keys, scope)
    return digest if digest is not None and keys.get(digest) is not None else None


def session_hash(keys: KeyTable, scope: Scope) -> str | None:
    """The key hash of a valid dashboard session cookie (service.api.session), or None."""
    for name, value in scope["headers"]:
        if name == b"cookie":
            session = session_of(keys, cookie_parser(value.decode("latin-1")))
            if session is not None:
                return session[0]
    return None


class BodyReads:
    """Every request's body read, capped and under a deadline: `limited(receive, ...)` is the
    `receive` for a request whose body may hold at most `cap` bytes and must have arrived
    `timeout` seconds after the first read. BodyTooLarge / BodyTimeout as soon as either is
    broken, so nothing past the cap is ever buffered.

    One timer per event loop checks the deadlines of the reads in flight, every `tick` seconds
    while there are any (a timer per read cost a rank ~6 us); an overdue read is cancelled and
    its cancellation turned into BodyTimeout, as asyncio.timeout does.
    """

    def __init__(self, tick: float = 0.1) -> None:
        self.tick = tick
        self._reads: dict[asyncio.Task[Any], float] = {}  # waiting in receive: its deadline
        self._overdue: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def limited(self, receive: Receive, *, cap: int, timeout: float) -> Receive:
        read = 0
        deadline = 0.0
        done = False

        async def guarded() -> Message:
            nonlocal read, deadline, done
            if done:
                return await receive()
            if not deadline:
                deadline = time.monotonic() + timeout
            elif time.monotonic() >= deadline:
                raise BodyTimeout(timeout)
            task = asyncio.current_task()
            assert task is not None
            self._reads[task] = deadline
            self._watch()
            try:
                message = await receive()
            except asyncio.CancelledError:
                if task not in self._overdue:
                    raise
                self._overdue.discard(task)
                task.uncancel()
                raise BodyTimeout(timeout) from None
            finally:
                self._reads.pop(task, None)
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > cap:
                    raise BodyTooLarge(cap)
                if not message.get("more_body", False):
                    done = True
            return message

        return guarded

    def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        if self._timer_loop is not loop:  # the app runs in a new loop: forget the old loop's
            self._reads = {t: d for t, d in self._reads.items() if t.get_loop() is loop}
            self._overdue.clear()
            self._timer_loop, self._timer = loop, None
        if self._timer is None:
            self._timer = loop.call_later(self.tick, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        now = time.monotonic()
        for task, deadline in list(self._reads.items()):
            if deadline <= now:
                del self._reads[task]
                self._overdue.add(task)
                task.cancel()
        if self._reads:
            self._watch()


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per key: `rate` requests a second on average, `burst` at once. `check`
    returns 0 if the request may go on, else the seconds until it may (Retry-After)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.time) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def check(self, key: str) -> int:
        if self.rate <= 0:
            return 0
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0
        return max(1, math.ceil((1.0 - bucket.tokens) / self.rate))
