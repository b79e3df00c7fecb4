"""`make bench`: how fast GET /loops/{loop}/stats and /holdout answer on a loop with 1,000,000
joined decisions (issue 14: under 1 s). The rollups are made by the joiner's own code
(service.pipeline.join.Rollup, store.add_stats/add_actions) from 1,000,000 synthetic joined
decisions spread over 7 days, 10% held out; then `dloop up` serves that database and the
endpoints are timed over HTTP (median of 5), beside the same server's /healthz."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

from learners.joiner import JoinResult
from service.core import record
from service.core.settings import load_settings
from service.pipeline.join import Rollup
from service.storage import store
from service.storage.db import make_engine, make_sessionmaker
from service.storage.migrate import upgrade

ACTIONS = [f"a{i}" for i in range(6)]
CONTEXT = orjson.dumps(
    {"FromUrl": [{"u": "x"}], "_multi": [{"_tag": a, "f": {"k": a}} for a in ACTIONS]}
).decode()


def fill(data: Path, decisions: int, days: float, seed: int = 0) -> float:
    """Rollups of `decisions` joined decisions over `days` days ending now; returns seconds."""
    settings = load_settings(data_dir=data)
    data.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    rng = np.random.default_rng(seed)
    now = time.time()
    times = np.sort(rng.uniform(now - days * 86400, now, decisions))
    chosen = rng.integers(len(ACTIONS), size=decisions)
    held = rng.random(decisions) < 0.1
    rewards = (rng.random(decisions) < np.where(held, 0.2, 0.3)).astype(float)
    started = time.perf_counter()
    with sessions.begin() as session:
        store.ensure_loop(
            session, name="default", kind="cb", now=now, policy=settings.default_policy
        )
    batch = 20_000
    for start in range(0, decisions, batch):
        rollup = Rollup(center=0.25)
        for i in range(start, min(start + batch, decisions)):
            a = int(chosen[i])
            order = [a] + [j for j in range(len(ACTIONS)) if j != a]
            p = 1.0 if held[i] else 0.5
            rest = (1 - p) / (len(ACTIONS) - 1)
            r = record.Decision(
                "default", f"e{i}", float(times[i]), False, "Online", CONTEXT, order,
                [p] + [rest] * (len(ACTIONS) - 1), 0, "m", h=0.1, ho=bool(held[i]),
            )  # fmt: skip
            rollup.add(r, JoinResult(b"", True, float(rewards[i]), True, False))
        with sessions.begin() as session:
            store.add_stats(session, loop="default", sums=rollup.sums)
            store.add_actions(session, loop="default", counts=rollup.actions)
        print(f"  rollups of {min(start + batch, decisions):,} decisions", flush=True)
    engine.dispose()
    return time.perf_counter() - started


def timed(client: httpx.Client, path: str, rounds: int = 5) -> float:
    """Median seconds of `rounds` GETs of `path` (after one warm-up)."""
    client.get(path).raise_for_status()
    took = []
    for _ in range(rounds):
        start = time.perf_counter()
        client.get(path).raise_for_status()
        took.append(time.perf_counter() - start)
    return statistics.median(took)


def stats_at_scale(decisions: int = 1_000_000, days: float = 7.0) -> list[tuple[str, str]]:
    from benchmarks.run import KEY, start_server

    port = 19000 + int(time.time()) % 500
    server = start_server(port, fill=lambda data: fill(data, decisions, days))
    try:
        with httpx.Client(
            base_url=server.base, headers={"Ocp-Apim-Subscription-Key": KEY}, timeout=60
        ) as client:
            health = timed(client, "/healthz")
            day = timed(client, "/loops/default/stats")
            week = timed(client, "/loops/default/stats?since=2000-01-01T00:00:00Z&bucket=PT1H")
            fine = timed(client, "/loops/default/stats?bucket=PT1M")
            holdout = timed(client, "/loops/default/holdout")
            overview = timed(client, "/overview")
            doc = client.get("/loops/default/holdout").json()
    finally:
        server.stop()
    joined = doc["online"]["decisions"] + doc["holdout"]["decisions"]
    return [
        ("joined decisions in the loop", f"{joined:,} over {days:g} days"),
        ("/healthz (ms)", f"{health * 1000:.1f}"),
        ("stats, last 24 h, default buckets (ms)", f"{day * 1000:.0f}  (target < 1000)"),
        ("stats, last 24 h, 1-minute buckets (ms)", f"{fine * 1000:.0f}"),
        (f"stats, all {days:g} days, hourly buckets (ms)", f"{week * 1000:.0f}"),
        ("holdout uplift over all (ms)", f"{holdout * 1000:.0f}"),
        ("overview (ms)", f"{overview * 1000:.0f}"),
    ]
