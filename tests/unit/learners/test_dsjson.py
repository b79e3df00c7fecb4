"""DSJSON helpers (learners.dsjson): timestamps print as ISO 8601 across years 1 to 9999, and
instants that cannot print are refused."""

from __future__ import annotations

import pytest


def test_timestamps_are_iso_8601_across_the_whole_range() -> None:
    from learners.dsjson import parse_time, timestamp

    for text in ("0001-01-01T00:00:00.000000Z", "0999-12-31T23:59:59.500000Z"):
        assert timestamp(parse_time(text)) == text
    assert timestamp(parse_time("2026-05-01T12:00:00+02:00")) == "2026-05-01T10:00:00.000000Z"
    for text in ("0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59.999999Z"):
        with pytest.raises(ValueError):
            parse_time(text)  # no float of seconds for it prints as a year from 1 to 9999
