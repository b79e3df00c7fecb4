"""Body reads under a deadline (service.api.guard.BodyReads), one timer per event loop."""

from __future__ import annotations

import asyncio

import pytest

from service.api.guard import BodyReads, BodyTimeout, BodyTooLarge


async def _stalled() -> dict[str, object]:
    await asyncio.Event().wait()  # a client that never sends its body
    raise AssertionError("unreachable")


def test_a_stalled_body_is_cut_in_every_event_loop_the_app_runs_in() -> None:
    """The same guard (an app's) in two event loops one after the other (tests restart apps):
    the second loop's stalled read is cut too, and a read that completes is left alone."""
    reads = BodyReads(tick=0.05)

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(BodyTimeout):
            async with asyncio.timeout(5):  # fails the test instead of hanging
                await reads.limited(_stalled, cap=100, timeout=0.2)()
        waited = loop.time() - started
        assert not asyncio.current_task().cancelling()  # type: ignore[union-attr]
        # a read that completes; the loop then ends with the guard's timer still pending
        whole = reads.limited(_complete, cap=100, timeout=0.2)
        assert (await whole())["body"] == b"{}"
        return waited

    for _ in range(2):
        waited = asyncio.run(scenario())
        assert 0.2 <= waited < 1.0, waited


async def _complete() -> dict[str, object]:
    return {"type": "http.request", "body": b"{}", "more_body": False}


def test_a_body_past_its_cap_is_refused_as_it_arrives() -> None:
    async def chunks() -> dict[str, object]:
        return {"type": "http.request", "body": b"x" * 60, "more_body": True}

    async def scenario() -> None:
        receive = BodyReads().limited(chunks, cap=100, timeout=5)
        await receive()
        with pytest.raises(BodyTooLarge):
            await receive()

    asyncio.run(scenario())
