"""The numbers behind the dashboard, from the rollups the joiner keeps (store.stats,
learners.rollups): the live holdout's uplift (`holdout`) and a loop's statistics per time bucket
(`loop_stats`). Neither reads raw decisions, so both answer in constant time per bucket."""

from __future__ import annotations

import math
import statistics
from typing import Any

from sqlalchemy.orm import Session

from learners.dsjson import timestamp
from learners.holdout import MIN_DECISIONS, Moments, uplift, z_value
from service.core.schemas import LoopSettings
from service.storage import store
from service.storage.models import Loop

Z95 = z_value(0.05)
MAX_BUCKETS = 2000


def _moments(row: dict[str, Any], name: str) -> Moments:
    return Moments(float(row[f"{name}_n"]), float(row[f"{name}_sum"]), float(row[f"{name}_sq"]))


def _online(row: dict[str, Any]) -> Moments:
    """Every learnable decision not held out."""
    return Moments(
        float(row["reward_n"] - row["holdout_n"]),
        float(row["reward_sum"] - row["holdout_sum"]),
        float(row["reward_sq"] - row["holdout_sq"]),
    )


def _mean(m: Moments) -> float | None:
    return m.mean if m.n else None


def holdout(session: Session, *, loop: str, settings: LoopSettings) -> dict[str, Any]:
    """`GET /loops/{loop}/holdout`: online against holdout decisions, over the decisions made
    while a holdout was on (learners.holdout); `uplift` null until each side has
    MIN_DECISIONS joined decisions."""
    t = store.totals(session, loop=loop)
    online, held, effects = _moments(t, "trial"), _moments(t, "holdout"), _moments(t, "effect")
    u = uplift(online, held, effects)
    return {
        "holdoutPercentage": settings.holdout * 100,
        "holdoutPolicy": settings.holdout_policy,
        "online": {"decisions": int(online.n), "meanReward": _mean(online)},
        "holdout": {"decisions": int(held.n), "meanReward": _mean(held)},
        "uplift": None
        if u is None
        else {
            "estimate": u.estimate,
            "interval95": list(u.interval95),
            "alwaysValid95": list(u.always_valid95),
        },
        "status": _status(online, held, u),
    }


def _status(online: Moments, held: Moments, u: Any) -> str:
    if online.n + held.n == 0:
        return "no holdout decisions yet"
    if u is None:
        return f"not enough data yet: {MIN_DECISIONS} joined decisions are needed on each side"
    lo, hi = u.always_valid95
    if lo > 0:
        return "the online policy earns more than the holdout"
    if hi < 0:
        return "the online policy earns less than the holdout"
    return "no difference shown yet"


def _ips(row: dict[str, Any], name: str) -> dict[str, Any] | None:
    """A counterfactual policy's value by IPS: estimate, 95% interval, effective sample size."""
    n = float(row["learnable"])
    w, w2 = float(row[f"{name}_w"]), float(row[f"{name}_w2"])
    if n == 0:
        return None
    m = Moments(n, float(row[f"{name}_wr"]), float(row[f"{name}_wr2"]))
    return {
        "estimate": m.mean,
        "interval95": _interval(m),
        "effectiveSampleSize": (w * w / w2) if w2 > 0 else 0.0,
    }


def _bucket_doc(row: dict[str, Any], actions: dict[str, int]) -> dict[str, Any]:
    learnable = float(row["learnable"])
    online, held = _online(row), _moments(row, "holdout")
    total = sum(actions.values())
    doc: dict[str, Any] = {
        "joined": int(row["decisions"]),
        "rewarded": int(row["rewarded"]),
        "defaulted": int(learnable - row["rewarded"]),
        "meanReward": {
            "all": _mean(_moments(row, "reward")),
            "online": _mean(online),
            "holdout": _mean(held),
        },
        "onlineInterval95": _interval(online),
        "holdoutInterval95": _interval(held),
        "counterfactual": {"baseline": _ips(row, "baseline"), "random": _ips(row, "random")},
        "explorationShare": float(row["explored"]) / learnable if learnable else None,
        "actionShares": {a: n / total for a, n in sorted(actions.items())} if total else {},
    }
    return doc


def _interval(m: Moments) -> list[float] | None:
    if m.n < 2:
        return None
    half = Z95 * math.sqrt(m.variance / m.n)
    return [m.mean - half, m.mean + half]


def bucket_size(
    session: Session, *, loop: str, since: float, until: float, asked: float | None
) -> int:
    """The bucket in seconds: a multiple of 10 seconds; by default the smallest of 10 or 30
    seconds, 1, 5 or 15 minutes, 1 or 6 hours or a day that keeps the range in 200 buckets. The
    range counts from the loop's first data to its last (a range asked from year 2000 costs
    nothing); ValueError if it would take more than MAX_BUCKETS buckets."""
    span = store.extent(session, loop=loop)
    if span is not None:
        since, until = max(since, span[0]), min(until, span[1] + store.BUCKET)
    if asked is not None:
        size = max(store.BUCKET, int(asked // store.BUCKET) * store.BUCKET)
    else:
        sizes = (10, 30, 60, 300, 900, 3600, 21600, 86400)
        size = next((s for s in sizes if (until - since) / s <= 200), sizes[-1])
    if (until - since) / size > MAX_BUCKETS:
        raise ValueError(f"at most {MAX_BUCKETS} buckets: ask for a larger bucket")
    return size


def loop_stats(
    session: Session, *, loop: str, kind: str, since: float, until: float, size: int
) -> dict[str, Any]:
    """`GET /loops/{loop}/stats`: per bucket of `size` seconds in [since, until)."""
    rows = store.stat_rows(session, loop=loop, since=since, until=until, size=size)
    actions: dict[tuple[int, str], dict[str, int]] = {}
    for b, slot, action, n in store.action_rows(
        session, loop=loop, since=since, until=until, size=size
    ):
        actions.setdefault((b, slot), {})[action] = n
    buckets: dict[int, dict[str, Any]] = {}
    for row in rows:
        b, slot = int(row["bucket"]), row["slot"]
        doc = _bucket_doc(row, actions.get((b, slot), {}))
        if slot:
            whole = buckets.setdefault(b, _empty(b))
            whole.setdefault("slots", []).append({"id": slot, **doc})
            continue
        whole = buckets.setdefault(b, _empty(b))
        whole.update(doc)
        whole["decisions"] = int(row["ranked"])
        whole["late"] = int(row["late"])
        whole["dangling"] = int(row["dangling"])
        if row["episodes"]:
            returns = Moments(row["episodes"], row["return_sum"], row["return_sq"])
            whole["episodes"] = {"count": int(returns.n), "meanReturn": returns.mean}
    # Named outcomes (learners.outcomes): each one's mean per bucket (its default where none came).
    for start, name, count, mean in store.outcome_means(
        session, loop=loop, since=since, until=until, size=size
    ):
        whole = buckets.setdefault(start, _empty(start))
        whole.setdefault("outcomes", {})[name] = {"decisions": int(count), "mean": mean}
    models = store.publications(session, loop=loop, since=since, until=until)
    p50s = [m.freshness_p50 for m in models if m.freshness_p50 is not None]
    p95s = [m.freshness_p95 for m in models if m.freshness_p95 is not None]
    return {
        "loop": loop,
        "kind": kind,
        "since": timestamp(since),
        "until": timestamp(until),
        "bucketSeconds": size,
        "buckets": [buckets[b] for b in sorted(buckets)],
        "models": [
            {
                "time": timestamp(m.published_at),
                "modelId": m.model_id,
                "examples": m.examples,
                "freshnessP50": m.freshness_p50,
                "freshnessP95": m.freshness_p95,
            }
            for m in models
        ],
        "freshness": {
            "p50": statistics.median(p50s) if p50s else None,
            "p95": statistics.median(p95s) if p95s else None,
        },
        # Every version of the reward definition and when it was set (the charts mark them).
        "rewardDefinitions": [
            {"version": v.version, "definition": v.definition, "time": timestamp(v.created_at)}
            for v in store.reward_definitions(session, loop=loop)
        ],
    }


def _empty(bucket: int) -> dict[str, Any]:
    return {"start": timestamp(bucket), "decisions": 0, "late": 0, "dangling": 0}


def summary(session: Session, *, loop: Loop, now: float) -> dict[str, Any]:
    """One loop at a glance (the dashboard's overview): kind, learning mode, policy, model id
    and age, decisions per minute (last 5 minutes), reward rate and join coverage (last hour),
    holdout uplift, the learner's backlog and the loop's dead letters. Rollups and indexed
    counts only."""
    settings = store.loop_settings(loop)
    recent = store.totals(session, loop=loop.name, since=now - 300)
    hour = store.totals(session, loop=loop.name, since=now - 3600)
    ckpt = store.get_checkpoint(session, loop=loop.name)
    held = holdout(session, loop=loop.name, settings=settings)
    learnable = hour["learnable"]
    return {
        "name": loop.name,
        "kind": loop.kind,
        "learningMode": settings.mode,
        "policy": loop.policy.get("name"),
        "modelId": ckpt.model_id if ckpt is not None else None,
        "modelTime": timestamp(ckpt.modified_at) if ckpt is not None else None,
        "modelAgeSeconds": now - ckpt.modified_at if ckpt is not None else None,
        "examples": ckpt.examples if ckpt is not None else 0,
        "decisionsPerMinute": recent["ranked"] / 5,
        "rewardRate": hour["reward_sum"] / hour["reward_n"] if hour["reward_n"] else None,
        "joinCoverage": hour["rewarded"] / learnable if learnable else None,
        "holdoutPercentage": settings.holdout * 100,
        "uplift": held["uplift"],
        "backlog": store.learner_backlog(session, loop=loop.name),
        "deadLetters": store.dead_letters_of(session, loop=loop.name),
    }


def guardrails(
    session: Session, *, loop: str, settings: LoopSettings, fallback: bool, share: float
) -> dict[str, Any]:
    """`GET /loops/{loop}/guardrails` (service.pipeline.guardrails keeps the states);
    `share`: the share of decisions the holdout policy serves now."""
    states = store.guardrail_states(session, loop=loop)
    out = []
    for g in settings.guardrails:
        state = states.get(g.key)
        doc: dict[str, Any] = {
            "outcome": g.outcome,
            "mustNot": g.must_not,
            "tolerance": g.tolerance,
            "action": g.action,
            "state": state.state if state is not None else "ok",
        }
        if state is not None:
            doc["since"] = timestamp(state.changed_at)
            doc["windowStart"] = timestamp(state.since)
            doc.update(state.figures or {})
        out.append(doc)
    return {"loop": loop, "fallback": fallback, "holdoutShare": share, "guardrails": out}
