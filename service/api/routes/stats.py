"""dloop: a loop's live numbers, from the rollups the joiner keeps (service.pipeline.stats): the
live holdout's uplift and per-bucket statistics, the data behind every chart of the dashboard."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter
from pydantic import TypeAdapter, ValidationError

from learners.dsjson import parse_time
from service.api.deps import State, ViewNamed
from service.api.errors import bad_request
from service.pipeline import stats

router = APIRouter()

_DURATION = TypeAdapter(timedelta)


@router.get("/loops/{name}/holdout")
def get_holdout(d: State, rt: ViewNamed) -> dict[str, Any]:
    """The live holdout: online against holdout decisions and the uplift, with a 95% interval
    and an always-valid one (learners.holdout)."""
    with d.sessions() as session:
        return stats.holdout(session, loop=rt.name, settings=rt.settings)


@router.get("/loops/{name}/guardrails")
def get_guardrails(d: State, rt: ViewNamed) -> dict[str, Any]:
    """The loop's guardrails: each one's state (ok or breached, since when), the outcome under
    the loop's policy and its comparator (the holdout, or the baseline's counterfactual
    value), and the always-valid interval of the excess over the tolerated level; and whether
    the loop is in fallback."""
    with d.sessions() as session:
        return stats.guardrails(
            session,
            loop=rt.name,
            settings=rt.settings,
            fallback=rt.fallback,
            share=rt.holdout_share,
        )


# The times a bucket can be shown with (datetime's years 1 to 9999).
_EARLIEST = datetime(1, 1, 1, tzinfo=UTC).timestamp()
_LATEST = datetime(9999, 12, 31, tzinfo=UTC).timestamp()


def _time(value: str | None, name: str, default: float) -> float:
    if value is None:
        return default
    try:
        return parse_time(value)
    except (ValueError, OverflowError):
        raise bad_request("InvalidRequest", f"{name} must be an ISO 8601 date-time") from None


@router.get("/loops/{name}/stats")
def get_stats(
    d: State,
    rt: ViewNamed,
    since: str | None = None,
    until: str | None = None,
    bucket: str | None = None,
) -> dict[str, Any]:
    """Per time bucket in [since, until) (default: the last 24 hours): decisions, joins,
    rewards, online and holdout mean reward, baseline and random counterfactuals, exploration
    and action shares (per slot for multi-slot loops, episode returns for RL loops); model
    publications and their freshness. `bucket`: an ISO 8601 duration or seconds, a multiple of
    10 seconds (default: the range in at most 200 buckets)."""
    now = d.clock()
    end = _time(until, "until", now)
    start = _time(since, "since", end - 86400)
    if start >= end:
        raise bad_request("InvalidRequest", "since must be before until")
    if start < _EARLIEST or end > _LATEST:  # (the buckets' times must be dates to be shown)
        raise bad_request(
            "InvalidRequest",
            "since and until must lie from 0001-01-01 to 9999-12-31 (since: until less a day, "
            "when not given)",
        )
    asked = None
    if bucket is not None:
        try:
            asked = _DURATION.validate_python(
                float(bucket) if bucket.replace(".", "", 1).isdigit() else bucket
            ).total_seconds()
        except (ValidationError, ValueError, OverflowError):
            raise bad_request(
                "InvalidRequest", "bucket must be an ISO 8601 duration (PT5M) or seconds"
            ) from None
        if asked <= 0:
            raise bad_request("InvalidRequest", "bucket must be positive")
    with d.sessions() as session:
        try:
            size = stats.bucket_size(session, loop=rt.name, since=start, until=end, asked=asked)
        except ValueError as exc:
            raise bad_request("InvalidRequest", str(exc)) from None
        return stats.loop_stats(
            session, loop=rt.name, kind=rt.kind, since=start, until=end, size=size
        )
