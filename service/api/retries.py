"""Rank retries: a client's retry of a rank (e.g. after a 5xx) gets the original answer byte for
byte from this process's cache (service.pipeline.runtime.RetryCache); a reuse of its eventId
for another request is ranked afresh and not logged; a repeat that changes the actions is a
400."""

from __future__ import annotations

from starlette.responses import Response

from service.api.requests import rank_error
from service.api.state import Dloop
from service.core.requests import Asked, asked

__all__ = ["Asked", "asked", "earlier", "remember", "retried"]
from service.pipeline.runtime import Answered, LoopRuntime


def earlier(d: Dloop, rt: LoopRuntime, ask: Asked) -> Answered | None:
    """This process's earlier answer to the eventId, if it still remembers one; a repeat that
    asks about other actions is refused (400)."""
    seen = d.retries.get(rt.name, ask.event_id)
    if seen is not None and seen.actions != ask.actions:
        raise rank_error(f"eventId {ask.event_id} was already ranked with different {ask.what}")
    return seen


def retried(d: Dloop, rt: LoopRuntime, seen: Answered | None, ask: Asked) -> Response | None:
    """The original response byte for byte if this request repeats the one answered (a
    client's retry, e.g. after a 5xx); None for a new eventId or one reused for another
    request, which is ranked for its own content."""
    if seen is None or seen.request != ask.request:
        return None
    d.metrics.rank_retries.labels(rt.name).inc()
    return Response(seen.response, status_code=201, media_type="application/json")


def remember(d: Dloop, rt: LoopRuntime, ask: Asked, response: bytes, *, reused: bool) -> None:
    """Keep a logged decision's answer for retries; count a reused eventId's (not logged: the
    first decision of an eventId is the one its rewards join)."""
    if reused:
        d.metrics.event_id_reused.labels(rt.name).inc()
    else:
        d.retries.put(rt.name, ask.event_id, Answered(ask.request, ask.actions, response))
    d.metrics.ranks.labels(rt.name).inc()
