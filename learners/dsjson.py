"""DSJSON, the format of dloop's logs (as Personalizer exported them and VW's `--dsjson` reads
them): the timestamps they carry and reading interaction lines from a file.

Every line read goes through learners.features.clean_line: keys Personalizer ignores never
reach VW.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson

from learners.features import FeatureError, clean_line


def timestamp(t: float) -> str:
    """ISO-8601 in UTC with microseconds and a four-digit year (strftime's %Y writes year 1 as
    "1"); ValueError for an instant outside years 1 to 9999."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def parse_time(value: str) -> float:
    """Seconds since the epoch of an ISO-8601 date-time ("Z" or an offset), as `timestamp`
    writes them and as API callers send them; ValueError unless `timestamp` can print it back
    (an offset, or float rounding, can push an instant out of years 1 to 9999)."""
    t = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    timestamp(t)
    return t


def line_in_range(line: str, since: float | None, until: float | None) -> bool:
    if since is None and until is None:
        return True
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return _stamp_in_range(doc.get("Timestamp"), since, until)


def _stamp_in_range(stamp: object, since: float | None, until: float | None) -> bool:
    if since is None and until is None:
        return True
    if not isinstance(stamp, str):
        return False
    try:
        t = parse_time(stamp)
    except ValueError:
        return False
    return (since is None or t >= since) and (until is None or t < until)


def file_lines(
    path: str, *, since: float | None = None, until: float | None = None
) -> Iterator[str]:
    stream = sys.stdin if path == "-" else open(Path(path), encoding="utf-8-sig")  # noqa: SIM115
    try:
        for raw in stream:
            line = raw.strip()
            if not line or not line.startswith("{"):
                continue
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if "_multi" not in doc.get("c", {}) or not ("a" in doc or "_outcomes" in doc):
                continue  # not an interaction (a header, a model record, ...)
            if _stamp_in_range(doc.get("Timestamp"), since, until):
                try:
                    yield clean_line(line)
                except FeatureError:
                    continue  # features VW cannot read: not an interaction dloop can use
    finally:
        if stream is not sys.stdin:
            stream.close()
