"""Auto-optimisation: on its schedule, a loop's policy search is evaluated on recent history
and the best policy applied only when it is clearly better than the online one (Personalizer's
"auto-optimize" setting)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from service.pipeline.background import lower_thread_priority
from service.pipeline.control import LoopControl
from service.pipeline.evaluations import run_isolated
from service.storage import store
from service.storage.models import Evaluation

log = logging.getLogger("dloop.evaluations")

AUTO_WINDOW_DAYS = 14  # Personalizer evaluated about two weeks of data
AUTO_HISTORY = 24  # and kept 24 runs
DEFAULT_AUTO_EVERY = 7 * 86400.0


def auto_choice(results: list[dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """Auto-optimisation's rule on an evaluation's results (EvaluationResult values): the
    searched policy with the highest lower 95% bound, and whether to apply it, which needs both
    its estimate and its lower bound above the online policy's estimate."""
    online = next(r for r in results if r["policySource"] == "Online")["summary"]
    candidates = [r for r in results if r["policySource"] == "OfflineExperimentation"]
    best = max(candidates, key=lambda r: r["summary"]["confidenceInterval"][0] or -1e9)
    low = best["summary"]["confidenceInterval"][0]
    better = (
        best["summary"]["expectedReward"] is not None
        and online["expectedReward"] is not None
        and best["summary"]["expectedReward"] > online["expectedReward"]
        and low is not None
        and low > online["expectedReward"]
    )
    return best, better


def auto_optimize(d: LoopControl, loop: str) -> str | None:
    """If the loop's auto-optimisation is due, evaluate the policy search on the last two
    weeks and apply the best policy only if its estimate is higher than the online policy's
    and its lower 95% bound beats the online estimate. Returns the evaluation id it ran.

    The id is the schedule slot, so when several replicas get here at once only the first
    insert wins and the others skip."""
    now = d.clock()
    rt = d.registry.get(loop)
    if rt is None or not rt.loop_kind.auto_optimize:
        return None
    if not rt.settings.auto_optimize:
        return None
    every = rt.settings.auto_every or DEFAULT_AUTO_EVERY
    start_at = rt.settings.auto_start
    if now < start_at:
        return None
    evaluation_id = f"auto-{int((now - start_at) // every)}"
    with d.sessions.begin() as session:
        if session.get(Evaluation, (loop, evaluation_id)) is not None:
            return None
        session.add(
            Evaluation(
                loop=loop,
                id=evaluation_id,
                name=f"Auto {evaluation_id}",
                start_time=now - AUTO_WINDOW_DAYS * 86400,
                end_time=now,
                created_at=now,
                status="NotSubmitted",
                evaluation_type="Auto",
                policies=[],
                optimize=True,
                progress=0.0,
            )
        )
    run_isolated(d.sessions, d.database_url, "evaluation", loop, evaluation_id)
    with d.sessions.begin() as session:
        ev = session.get(Evaluation, (loop, evaluation_id))
        if ev is None or ev.status != "Succeeded" or not ev.content:
            return evaluation_id
        best, better = auto_choice(ev.content["value"])
        ev.status = "OptimalPolicyApplied" if better else "OnlinePolicyRetained"
        ev.optimal_policy = best["name"]
        autos = [
            e for e in store.list_evaluations(session, loop=loop) if e.evaluation_type == "Auto"
        ]
        for old in autos[:-AUTO_HISTORY]:
            session.delete(old)
    if better:
        d.save_policy(rt, {"name": best["name"], "arguments": best["arguments"]})
    return evaluation_id


class AutoOptimizer:
    """Serving processes: look every `every` seconds whether a loop's auto-optimisation is due."""

    def __init__(self, d: LoopControl, every: float = 60.0) -> None:
        self.d = d
        self.every = every
        self._stop = threading.Event()

    def run(self) -> None:
        lower_thread_priority()
        while not self._stop.wait(self.every):
            for name in list(self.d.registry.loops):
                try:
                    auto_optimize(self.d, name)
                except Exception:
                    log.exception("auto-optimisation of %s failed", name)

    def request_stop(self) -> None:
        self._stop.set()
