"""Serving-time constraints (issue 15): they change the probabilities a decision is drawn with,
and the log records the probabilities actually used, so inverse propensity estimates of any
policy stay unbiased (tests/unit/learners/test_constraints.py checks it on a world with known
values).

- `limit_exploration`: at most `max_exploration` of a decision's probability goes to actions
  other than the policy's most probable one (the others shrink in proportion).
- `ExposureCaps`: an action may be served (chosen) in at most a share of the decisions of a
  sliding window. While an action is at or over its cap its probability is at most the cap
  (the rest goes to the other eligible actions in proportion), so its share returns under the
  cap while every action keeps the support offline evaluation needs. Counts are kept in
  `SLICES` slices of the window, per serving process (a fleet behind a load balancer caps each
  replica's share, which is the fleet's share when traffic is spread evenly).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SLICES = 60


def limit_exploration(pmf: Sequence[float], max_exploration: float) -> list[float]:
    """`pmf` with at most `max_exploration` on the actions other than its most probable one."""
    top = max(range(len(pmf)), key=lambda i: pmf[i])
    rest = 1.0 - pmf[top]
    if rest <= max_exploration or rest <= 0:
        return list(pmf)
    scale = max_exploration / rest
    out = [p * scale for p in pmf]
    out[top] = 1.0 - max_exploration
    return out


def cap(pmf: Sequence[float], eligible: Sequence[bool], limits: Mapping[int, float]) -> list[float]:
    """`pmf` with action i's probability at most `limits[i]`, the excess spread over the other
    eligible, uncapped actions in proportion to their probabilities (evenly if they have none).
    If every eligible action is capped the excess stays where it was."""
    out = list(pmf)
    excess = 0.0
    for i, limit in limits.items():
        if out[i] > limit:
            excess += out[i] - limit
            out[i] = limit
    if excess <= 0:
        return out
    free = [i for i, ok in enumerate(eligible) if ok and i not in limits]
    if not free:
        return list(pmf)
    mass = sum(out[i] for i in free)
    for i in free:
        out[i] += excess * (out[i] / mass if mass > 0 else 1.0 / len(free))
    return out


@dataclass(frozen=True)
class Cap:
    action: str
    max_share: float
    window: float  # seconds


class _Window:
    """Decisions and one action's servings in the last `window` seconds, in slices."""

    def __init__(self, window: float) -> None:
        self.width = window / SLICES
        self.slices: deque[tuple[int, int, int]] = deque()  # (slice, decisions, served)
        self.decisions = 0
        self.served = 0

    def _drop_old(self, now: float) -> int:
        current = int(now // self.width)
        while self.slices and self.slices[0][0] <= current - SLICES:
            _, d, s = self.slices.popleft()
            self.decisions -= d
            self.served -= s
        return current

    def share(self, now: float) -> float:
        self._drop_old(now)
        return self.served / self.decisions if self.decisions else 0.0

    def add(self, now: float, served: bool) -> None:
        current = self._drop_old(now)
        if self.slices and self.slices[-1][0] == current:
            _, d, s = self.slices[-1]
            self.slices[-1] = (current, d + 1, s + int(served))
        else:
            self.slices.append((current, 1, int(served)))
        self.decisions += 1
        self.served += int(served)


def limits_of(ids: Sequence[str], over: Mapping[str, float]) -> dict[int, float]:
    """The probability limit of each action of a request among `over` (ExposureCaps.over)."""
    return {i: over[a] for i, a in enumerate(ids) if a in over} if over else {}


class ExposureCaps:
    """A loop's exposure caps and the sliding counts behind them (module docstring)."""

    def __init__(self, caps: Sequence[Cap]) -> None:
        self.caps = {c.action: c for c in caps}
        self.windows = {c.action: _Window(c.window) for c in caps}

    def limits(self, ids: Sequence[str], now: float) -> dict[int, float]:
        """The probability limit of each action of a request that is at or over its cap."""
        return limits_of(ids, self.over(now))

    def over(self, now: float) -> dict[str, float]:
        """The capped actions at or over their cap, with their cap (what a decision made
        elsewhere, in a ranking process, needs to know of the counts)."""
        return {
            action: c.max_share
            for action, c in self.caps.items()
            if self.windows[action].share(now) >= c.max_share
        }

    def record(self, served: str, now: float) -> None:
        """A decision was made, serving `served` first."""
        for action, window in self.windows.items():
            window.add(now, action == served)

    def shares(self, now: float) -> dict[str, float]:
        return {action: w.share(now) for action, w in self.windows.items()}
