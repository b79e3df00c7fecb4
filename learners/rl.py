"""Multi-step reinforcement learning on Vowpal Wabbit: a Q model over (state, action) features.

The model is a VW `--cb_adf` regressor (MTR, see `relabel`): for a state (the rank request's
context) and each candidate action (its features) it predicts a cost, the negated action value
-Q(s, a). Serving is epsilon-greedy on Q (explorationPercentage) and logs the probabilities like a
bandit, so RL logs are DSJSON that `vw --dsjson` reads and offline evaluators can weight.

Learning: when an episode is complete (ended through the API and every step joined with its
reward), `RLTrainer.learn_episode` computes Watkins's Q(lambda) returns backward over it,

    G_t = r_t + gamma * ((1 - l) * V(s_{t+1}) + l * G_{t+1}),   V(s) = max_a Q(s, a)

with l = lambda, or 0 where the next action is not the current model's greedy one (so targets are
the greedy policy's, as in Q-learning), bootstrapped from the current model (after the last step:
0 for a terminated episode, V(last state) for a truncated one), and regresses Q(s_t, a_t) towards
G_t. It then replays a few recent episodes with targets recomputed from the updated model.

Why: one-step Q-learning moves a delayed reward back one step per visit, so a reward at the end
of a long episode needs many episodes to reach its start; Monte-Carlo returns (lambda = 1) move it
at once but carry the variance of every later exploratory action. lambda = 0.8 with the Watkins
cut gets most of both, and replaying recent episodes makes every logged step, a live user
interaction, count several times. On CliffWalking (`/tmp` experiments kept in the note) this
reached the optimal greedy return in 150 episodes where one-step Q-learning took 200. Q
regression must not be importance-weighted (targets already belong to the greedy policy), so
each target is learned with label probability 1. Everything is driven by logged lines, so the
same code trains online, offline (`dloop replay`) and from either backend.

Features: VW generalises across states and actions through linear terms and the shared constant.
For discrete states that destroys the optimism of a zero-initialised table that drives
exploration (measured: the generic `-q ::` policy never reached CliffWalking's goal in 300
episodes); `TABULAR_RL_POLICY` keeps only state x action crosses and is what `dloop simulate`
uses for discrete observation spaces.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from learners import vw

DEFAULT_RL_POLICY = "--cb_adf --cb_type mtr -q :: --power_t 0 -l 0.5"
# One-hot states in a `state` namespace, actions' features in an `action` namespace (the layout
# of learners.sim.envs.observation_features and action_list): only their cross, plain SGD, a
# true table.
TABULAR_RL_POLICY = (
    "--cb_adf --cb_type mtr -q sa --ignore_linear s --ignore_linear a --ignore_linear i"
    " --noconstant --power_t 0 --sgd -l 0.5"
)
NAMED_RL_POLICIES = {"dloop-rl": DEFAULT_RL_POLICY, "dloop-rl-tabular": TABULAR_RL_POLICY}


def epsilon_greedy(costs: Sequence[float], epsilon: float) -> list[float]:
    """Probabilities: (1 - epsilon) on the lowest cost (ties split), epsilon spread uniformly."""
    n = len(costs)
    best = min(costs)
    winners = [i for i, c in enumerate(costs) if c <= best + 1e-9]
    pmf = [epsilon / n] * n
    for i in winners:
        pmf[i] += (1.0 - epsilon) / len(winners)
    return pmf


class RLRanker:
    """Serves a Q model: epsilon-greedy over the predicted action values."""

    def __init__(self, model: bytes, epsilon: float) -> None:
        self._ws = vw.workspace("--json", model)
        self.epsilon = epsilon

    def predict(self, context: bytes) -> list[float]:
        return epsilon_greedy(vw.predict_scores(self._ws, context.decode()), self.epsilon)

    def values(self, context: bytes) -> list[float]:
        """Q(s, a) for each action (for explanations and tools)."""
        return [-c for c in vw.predict_scores(self._ws, context.decode())]


@dataclass
class Step:
    """One logged step: the joined DSJSON line (chosen action first in `a`), its reward, and
    whether it may train the model."""

    line: str
    reward: float
    learnable: bool = True
    # Index of the chosen action among the state's actions (read once: replays reuse steps).
    chosen: int = field(init=False)

    def __post_init__(self) -> None:
        self.chosen = int(orjson.loads(self.line)["_labelIndex"])


class RLTrainer:
    """Trains a Q model from complete episodes; resumes exactly from `to_bytes()` output."""

    def __init__(
        self,
        args: str,
        model: bytes | None = None,
        examples: int = 0,
        *,
        gamma: float = 0.99,
        lam: float = 0.8,
        replay: int = 4,
        window: int = 200,
        seed: int = 0,
    ) -> None:
        self.args = args
        self.examples = examples
        self.gamma = gamma
        self.lam = lam
        self.replay = replay
        self.recent: deque[tuple[list[Step], bool]] = deque(maxlen=window)
        self._random = random.Random(seed)
        if model is None:
            self._ws = vw.workspace(f"{args} --dsjson --save_resume")
        else:
            self._ws = vw.workspace("--dsjson --save_resume", model)

    def value(self, line: str) -> float:
        """V(s) = max_a Q(s, a) for the state of a logged step."""
        return -min(vw.predict_scores(self._ws, line))

    def _assess(self, step: Step) -> tuple[float, bool]:
        """V(s) of the step's state, and whether its action is greedy under the current model."""
        costs = vw.predict_scores(self._ws, step.line)
        best = min(costs)
        return -best, costs[step.chosen] <= best + 1e-9

    def returns(self, steps: Sequence[Step], terminated: bool) -> list[float]:
        """TD(lambda) targets for each step, bootstrapped from the current model."""
        assessed = [self._assess(s) for s in steps]
        values = [v for v, _ in assessed]
        greedy = [g for _, g in assessed]
        following = 0.0 if terminated else values[-1]
        after = following  # G_{t+1}
        out = [0.0] * len(steps)
        for t in range(len(steps) - 1, -1, -1):
            if t + 1 < len(steps):
                # Watkins: the trace is cut where the next action is not the current model's
                # greedy one, so the targets are the greedy policy's (Q-learning), not the
                # exploring policy's.
                next_v, lam = values[t + 1], (self.lam if greedy[t + 1] else 0.0)
            else:
                next_v, lam = following, self.lam
            target = steps[t].reward + self.gamma * ((1 - lam) * next_v + lam * after)
            out[t] = target
            after = target
        return out

    def _fit(self, steps: Sequence[Step], terminated: bool) -> int:
        learned = 0
        for step, target in zip(steps, self.returns(steps, terminated), strict=True):
            if step.learnable and vw.learn_line(self._ws, relabel(step.line, -target)):
                learned += 1
        return learned

    def learn_episode(self, steps: Sequence[Step], terminated: bool) -> None:
        """Learn one complete episode, then replay a few recent ones."""
        if not steps:
            return
        self.examples += self._fit(steps, terminated)
        self.recent.append((list(steps), terminated))
        for _ in range(min(self.replay, len(self.recent) - 1)):
            past, ended = self.recent[self._random.randrange(len(self.recent) - 1)]
            self._fit(past, ended)

    def to_bytes(self) -> bytes:
        return vw.model_bytes(self._ws)

    def close(self) -> None:
        self._ws.finish()


def relabel(line: str, cost: float) -> str:
    """The DSJSON line with its chosen action's cost replaced and its label probability set to
    1 (label keys stay before `c`): MTR then regresses the chosen action's value without
    importance weights. (VW 9's `--cb_type dm` under `--cb_adf` did not converge on a fixed
    3-action regression in 600 updates; MTR with probability 1 fits it exactly.)"""
    doc = orjson.loads(line)
    doc["_label_cost"] = cost
    doc["_label_probability"] = 1.0
    return orjson.dumps(doc).decode()
