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
G_t. It then replays 16 episodes drawn from the last 200, their targets recomputed from the
updated model.

Why: one-step Q-learning moves a delayed reward back one step per visit, so a reward at the end
of a long episode needs many episodes to reach its start; Monte-Carlo returns (lambda = 1) move it
at once but carry the variance of every later exploratory action and every random transition.
With the Watkins cut, lambda = 0.5 is the measured balance: against 0.8 (the earlier default)
CliffWalking reached its optimum in a median of 40 episodes instead of 110 and slippery
FrozenLake in all 10 seeds instead of 8, its worst final greedy return 0.57 instead of 0.28
(`benchmarks/rl.py`, 10 seeds). Replaying 16 recent episodes after each (4 before) makes every
logged step, a live user interaction, count many times; it costs the learner 17 passes over an
episode instead of 5 and buys: CliffWalking in all 10 seeds (median 40 episodes) instead of 7
(median 190), Taxi in 10 (median 350) instead of 9 (median 700), FrozenLake's worst final
greedy return 0.57 instead of 0.00.

Random outcomes (`Outcomes`): where the recent episodes saw a state and action lead to more
than one outcome (another reward or next state: a slip on ice, a day's demand), the step's
target is the average over all of them, r + gamma * V(s'), each weighted by how often it was
seen, with the trace cut there: the sampled target swung with each draw (on slippery
FrozenLake the start state's learned values moved by +-0.1 between evaluations against a gap
of 0.014 between its best actions). States are told apart by a digest of the line's `c` (the
context and its actions), so where no state repeats (rich or raw numeric contexts) and where
transitions are deterministic nothing changes; the cut end of a truncated episode is no
outcome. Measured (`benchmarks/rl.py`, exploration 0.3, 30 seeds; `--sampled` is the old way),
counting the last 200 episodes: FrozenLake 33% of the late evaluations below the bar instead of
63%, worst fall 31% of the optimum instead of 67%, median final 0.73 instead of 0.68 (26 seeds
reached the bar against 28); Inventory 8% below instead of 45%, worst fall 5% instead of 12%,
worst final 8.41 instead of 7.60, median episodes to the bar 70 instead of 90. CliffWalking,
Taxi, DelayedKey and NoisyCorridor learn exactly as before; CartPole, whose tile-coded states
do repeat, about as before (10 seeds: 10/10 reach the bar, 10% of late evaluations below it
against 18%).

How many episodes are counted (`memory`): the replayed window's 200, and as many earlier ones
as fit in 10,000 steps (the earlier ones about 7 MB of lines at most). A square of FrozenLake
next to the goal is reached in a few episodes of ten, so 200 episodes held a dozen tries of its
best action and its average still swung with each slip; counting every episode of the 300
(about 3,200 steps): 27 seeds of 30 reach the bar instead of 26, worst fall 12% instead of 31%,
22% of the late evaluations below it instead of 33%; Inventory (4,500 steps in 300 episodes) 5%
below instead of 8%, worst fall 3% instead of 5%. Of the 3 FrozenLake seeds that miss the bar,
one never reached the goal while exploring, two settled on the second-best action at a rare
square. Tried and left out: value iteration over the counted model (each tried action's Q the
average over its outcomes of r + gamma * V(s'), V the plan's own where s' is in it, iterated to
the fixed point, as targets): worse on both, FrozenLake 8 of 10 seeds against 9, Inventory (30
seeds) 18% of late evaluations below the bar against 5%, worst final 7.90 against 8.39. The
fixed point carries the noisy estimates of rarely visited squares to every state at once, where
the model's own values average each target over many updates.

Optimism where the world is random (`bonus`, 0.2 in the loop's reward units): in a state where
one of the actions has led to more than one outcome, a step's target gains bonus / n, n the
times the counted episodes tried its action there, so an action tried a few times looks better
than its few outcomes say until it has been tried enough to tell (count-based exploration; the
bonus/(1 + n) form of Kolter and Ng's Bayesian exploration bonus), and the optimism is carried
back to the states that lead there like any target. FrozenLake's misses were such actions: on a
seed stuck at 0.43 from episode 90 to 300, "right" next to the goal (worth 0.74, the best) had
been tried 4 times in 300 episodes and read 0.47. Measured on 30 seeds with three seeds of the
replay draws each (`benchmarks/rl.py --bonus/--trainer-seed`): FrozenLake reaches the bar in
30, 30 and 28 seeds (without: 23, 24, 27), 14%, 10% and 29% of late evaluations below it (40%,
41%, 36%), worst final 0.60-0.65 (0.00: a greedy policy that never reached the goal). It costs
Inventory, random everywhere, steadiness: 21-22% of late evaluations below the bar (4-5%
without), worst final 8.07-8.35 (8.49-8.63), worst fall 7-8% (4-5%), every seed still reaching
it. A bonus of 0.1: FrozenLake 29, 27, 28 seeds, Inventory 11% below; bonus / sqrt(n) at 0.05:
29, 29, 27 seeds, Inventory 10-13% below. Nothing where every action tried had one outcome:
with the bonus in deterministic states too, CliffWalking's and Taxi's greedy policies went round
in loops chasing it (Taxi 0 of 10 seeds, CliffWalking's worst final -200), where a deterministic
step is known once tried; states that never repeat (rich or numeric contexts) have one outcome
per action and are untouched.

Q regression must not be importance-weighted (targets already belong to the greedy policy), so
each target is learned with label probability 1. Everything is driven by logged lines, so the
same code trains online, offline (`dloop replay`) and from either backend. Tried and left out:
bootstrapping from a copy of the model refreshed every 10 episodes (DQN's target network) kept
Taxi from learning at all in 1,500 episodes (0 of 10 seeds, against 10 of 10 without).

Features (measured on `benchmarks/rl.py`'s worlds, 10 seeds each; the numbers are in the README):
a Q model must not let what an action is worth in one state carry to another. The old default,
`-q ::`, did: an action's own weight and its crosses with its own features are shared by every
state, so CliffWalking's -100 for "right" next to the cliff made "right" look bad everywhere
and greedy never reached the goal (0 of 10 seeds). `--cross_state_action`, dloop's own policy
option, crosses every namespace of the state (the rank's context) with every namespace of the
actions and keeps nothing else (no linear terms, no constant), resolved into VW's `-q` and
`--ignore_linear` from the namespaces the first learned episode shows (`resolve`); the model
saves them, so serving needs nothing. Every weight then belongs to one state feature and one
action feature: a one-hot state gives a table, richer states still generalise across the
states that share a feature, and numeric states do once tile-coded (learners.tiles, a loop
setting: CartPole). `--power_t 0.5` lets each weight's rate fall with its own updates (VW's
adaptive default) where a constant rate (`--power_t 0`) kept moving FrozenLake's greedy policy
with its random slips, and `-l 1` is the rate that learned CliffWalking fastest. The action's id
namespace also holds Personalizer's constant feature, so the cross includes a state-only term
(what a state is worth whatever is done); that costs some optimism (untried actions start at
the state's average, not at 0) and is one reason the rate must fall. `-b 22`: a table's weights
must not share slots, and VW's default 18 bits gave Taxi's 6,500 crossed weights 80 shared
slots (160 weights coupled in pairs; 22 bits: 2), which showed as sudden falls after long
plateaus (seed 6: 7.24 to 4.49 in its last 100 episodes; with 24 bits steady at 7.88). The
weights are held sparse beyond 20 bits (learners.vw.DENSE_BITS), so a workspace costs what 18
dense bits did (about 8 MB).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from learners import vw
from learners.policy import CROSS, header_options

DEFAULT_RL_POLICY = "--cb_adf --cb_type mtr --cross_state_action --power_t 0.5 -l 1 -b 22"
# One-hot states in a `state` namespace, actions' features in an `action` namespace (the layout
# of learners.sim.envs.observation_features and action_list): only their cross, plain SGD, a
# true table.
TABULAR_RL_POLICY = (
    "--cb_adf --cb_type mtr -q sa --ignore_linear s --ignore_linear a --ignore_linear i"
    " --noconstant --power_t 0 --sgd -l 0.5"
)
# A new RL loop's explorationPercentage (bandit loops keep Personalizer's 0.2). Measured on
# benchmarks/rl.py (10 seeds, exact greedy returns), 0.3 against 0.2: Taxi reaches the bar in
# all 10 seeds by episode 1,100 instead of 8 by 1,500 (its greedy policy looped from start
# states it had rarely seen), CliffWalking 30 / 160 episodes (median / worst) instead of
# 40 / 240, the other worlds alike; 0.4 steadied FrozenLake further but left 3 of its seeds
# below the bar. Exploration only changes what is served, not what is learned (targets are
# the greedy policy's).
DEFAULT_RL_EXPLORATION = 0.3
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
    # The state (the context and its actions, the line's `c`), as a digest.
    state: bytes = field(init=False)

    def __post_init__(self) -> None:
        doc = orjson.loads(self.line)
        self.chosen = int(doc["_labelIndex"])
        self.state = hashlib.blake2b(orjson.dumps(doc.get("c")), digest_size=16).digest()


Successor = tuple[float, bytes | None]  # a step's reward, and the state it led to (None: ended)


class Outcomes:
    """What each (state, action) of the recent episodes led to, and how often: the empirical
    model `returns` averages a step's one-step target over. Where a state never repeats (rich
    or numeric contexts) every (state, action) has one outcome and nothing changes."""

    def __init__(self) -> None:
        self.seen: dict[tuple[bytes, int], dict[Successor, int]] = {}
        self.lines: dict[bytes, list[Any]] = {}  # a state's line, and how many steps hold it
        # States where an action led to more than one outcome, and how many of their actions.
        self.random: dict[bytes, int] = {}

    @staticmethod
    def _walk(steps: Sequence[Step], terminated: bool) -> list[tuple[Step, Successor]]:
        """Each step and what it led to; the last step of a truncated episode led to a state
        nobody saw, so it tells nothing."""
        out: list[tuple[Step, Successor]] = [
            (step, (step.reward, nxt.state)) for step, nxt in itertools.pairwise(steps)
        ]
        if steps and terminated:
            out.append((steps[-1], (steps[-1].reward, None)))
        return out

    def add(self, steps: Sequence[Step], terminated: bool) -> None:
        for step, successor in self._walk(steps, terminated):
            counts = self.seen.setdefault((step.state, step.chosen), {})
            if successor not in counts and len(counts) == 1:  # its second outcome
                self.random[step.state] = self.random.get(step.state, 0) + 1
            counts[successor] = counts.get(successor, 0) + 1
        for step in steps:  # every state an outcome may lead to keeps a line
            self.lines.setdefault(step.state, [step.line, 0])[1] += 1

    def remove(self, steps: Sequence[Step], terminated: bool) -> None:
        for step, successor in self._walk(steps, terminated):
            key = (step.state, step.chosen)
            counts = self.seen[key]
            counts[successor] -= 1
            if not counts[successor]:
                del counts[successor]
                if len(counts) == 1:  # down to one outcome
                    self.random[step.state] -= 1
                    if not self.random[step.state]:
                        del self.random[step.state]
                if not counts:
                    del self.seen[key]
        for step in steps:
            held = self.lines[step.state]
            held[1] -= 1
            if not held[1]:
                del self.lines[step.state]


# Optimism for a rarely tried action in a state where an action led to more than one outcome
# (RLTrainer._bonus): its target gains BONUS / n, n its tries there, in the loop's reward units.
BONUS = 0.2

# The replay window (episodes) and how many steps of earlier episodes the outcome counts keep.
WINDOW = 200
MEMORY = 10_000


def recalled(sizes: Sequence[int], *, window: int = WINDOW, memory: int = MEMORY) -> int:
    """How many of the latest learned episodes (`sizes`: their steps, newest first) a trainer
    keeps: its replay window's, and earlier ones while all of them fit in `memory` steps (what
    a reopened trainer is given back, RLTrainer.remember)."""
    kept, steps = 0, 0
    for n in sizes:
        if kept + 1 > window and steps + n > memory:
            break
        kept, steps = kept + 1, steps + n
    return kept


class RLTrainer:
    """Trains a Q model from complete episodes. Reopened from its `to_bytes()` output and given
    back the episodes it learned (`remember`, as many as `recalled` says it keeps), it learns on
    exactly as if it had never stopped: the same replay window, outcome counts and replay draws
    (seeded by `seed` and the model's example count)."""

    def __init__(
        self,
        args: str,
        model: bytes | None = None,
        examples: int = 0,
        *,
        gamma: float = 0.99,
        lam: float = 0.5,
        replay: int = 16,
        window: int = WINDOW,
        memory: int = MEMORY,
        seed: int = 0,
        expected: bool = True,
        bonus: float = BONUS,
    ) -> None:
        self.args = args
        self.examples = examples
        self.gamma = gamma
        self.lam = lam
        self.replay = replay
        self.recent: deque[tuple[list[Step], bool]] = deque(maxlen=window)
        # The episodes `outcomes` counts: the replayed window's, and as many earlier ones as
        # fit in `memory` steps.
        self.memory = memory
        self.counted: deque[tuple[list[Step], bool]] = deque()
        self._counted_steps = 0
        self.expected = expected
        self.bonus = bonus
        self.outcomes = Outcomes()
        self.seed = seed
        # With CROSS the workspace waits for the first episode, whose lines show the namespaces
        # to cross; a blank model built before that (its interactions unresolved) is not kept.
        crossed = CROSS in args.split()
        self._ws: vw.Workspace | None = None
        if model is not None and not (examples == 0 and crossed and _blank(model)):
            self._ws = vw.workspace("--dsjson --save_resume", model)
        elif not crossed:
            self._ws = vw.workspace(f"{args} --dsjson --save_resume")

    @property
    def ws(self) -> vw.Workspace:
        if self._ws is None:
            raise RuntimeError("the trainer has not seen an episode yet")
        return self._ws

    def _open(self, steps: Sequence[Step]) -> None:
        """Build the workspace of a CROSS policy from the namespaces an episode's lines show."""
        parser = vw.workspace("--cb_adf --dsjson")
        try:
            shared: set[int] = set()
            actions: set[int] = set()
            for step in steps:
                s, a = vw.namespaces(parser, step.line)
                shared |= s
                actions |= a
        finally:
            parser.finish()
        self._ws = vw.workspace(f"{resolve(self.args, shared, actions)} --dsjson --save_resume")

    def value(self, line: str) -> float:
        """V(s) = max_a Q(s, a) for the state of a logged step."""
        return -min(vw.predict_scores(self.ws, line))

    def _assess(self, step: Step) -> tuple[float, bool]:
        """V(s) of the step's state, and whether its action is greedy under the current model."""
        costs = vw.predict_scores(self.ws, step.line)
        best = min(costs)
        return -best, costs[step.chosen] <= best + 1e-9

    def returns(self, steps: Sequence[Step], terminated: bool) -> list[float]:
        """TD(lambda) targets for each step, bootstrapped from the current model."""
        assessed = [self._assess(s) for s in steps]
        values = [v for v, _ in assessed]
        greedy = [g for _, g in assessed]
        known = {s.state: v for s, v in zip(steps, values, strict=True)}
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
            if self.expected:
                target = self._expected(steps[t], known, target)
            out[t] = after = target + self._bonus(steps[t])
        return out

    def _expected(self, step: Step, known: dict[bytes, float], sampled: float) -> float:
        """Where the recent episodes saw this state and action lead to more than one outcome
        (a random transition or reward), its one-step target averaged over them all, the trace
        cut there (the sampled future past a random transition is noise to this step); else
        the sampled lambda target."""
        counts = self.outcomes.seen.get((step.state, step.chosen))
        if not counts or len(counts) == 1:
            return sampled
        total, n = 0.0, 0
        for (reward, nxt), k in counts.items():
            if nxt is not None and nxt not in known:  # a state this episode did not visit
                known[nxt] = self.value(self.outcomes.lines[nxt][0])
            v = 0.0 if nxt is None else known[nxt]
            total += k * (reward + self.gamma * v)
            n += k
        return total / n

    def _bonus(self, step: Step) -> float:
        """Optimism for an action rarely tried in a state where the world has shown itself
        random (one of the state's actions led to more than one outcome): `bonus` / n, n the
        times the counted episodes tried it there (this try included). Nothing in a state
        where every action tried had one outcome: a deterministic step is known once tried
        (and optimism there sent CliffWalking's and Taxi's greedy policies round in loops),
        and a state seen only once (rich or numeric contexts) has one outcome per action."""
        if not self.bonus or step.state not in self.outcomes.random:
            return 0.0
        counts = self.outcomes.seen.get((step.state, step.chosen))
        return self.bonus / sum(counts.values()) if counts else 0.0

    def _fit(self, steps: Sequence[Step], terminated: bool) -> int:
        learned = 0
        for step, target in zip(steps, self.returns(steps, terminated), strict=True):
            if step.learnable and vw.learn_line(self.ws, relabel(step.line, -target)):
                learned += 1
        return learned

    def learn_episode(self, steps: Sequence[Step], terminated: bool) -> None:
        """Learn one complete episode, then replay `replay` of the recent ones."""
        if not steps:
            return
        if self._ws is None:
            self._open(steps)
        episode = (list(steps), terminated)  # kept by the replay window and the counts alike
        self._count(episode)
        # Which past episodes are replayed is drawn from the seed and how many examples the
        # model had learned: a trainer reopened from its saved model and given back its
        # episodes (`remember`) draws what it would have drawn had it never stopped, so the
        # same episodes learn the same model whether or not the learner restarted between them.
        draws = random.Random(f"{self.seed}/{self.examples}")
        self.examples += self._fit(steps, terminated)
        self.recent.append(episode)
        for _ in range(min(self.replay, len(self.recent) - 1)):
            past, ended = self.recent[draws.randrange(len(self.recent) - 1)]
            self._fit(past, ended)

    def _count(self, episode: tuple[list[Step], bool]) -> None:
        """Count the episode's outcomes, and forget the oldest counted beyond `memory`."""
        if not self.expected:
            return
        steps, terminated = episode
        self.outcomes.add(steps, terminated)
        self.counted.append(episode)
        self._counted_steps += len(steps)
        while len(self.counted) > (self.recent.maxlen or 0) and self._counted_steps > self.memory:
            past, ended = self.counted.popleft()
            self.outcomes.remove(past, ended)
            self._counted_steps -= len(past)

    def remember(self, episodes: Sequence[tuple[Sequence[Step], bool]]) -> None:
        """Episodes the model learned already (oldest first), taken back into the replay window
        and the outcome counts without being learned again: a trainer reopened from a saved
        model (a restart, or another learner's model) replays and averages as the one that
        saved it did, instead of starting both from nothing."""
        for steps, terminated in episodes:
            if steps:
                episode = (list(steps), terminated)
                self._count(episode)
                self.recent.append(episode)

    def to_bytes(self) -> bytes:
        if self._ws is None:  # nothing learned yet: a blank model of the unresolved arguments
            blank = vw.workspace(f"{self.args} --dsjson --save_resume")
            try:
                return vw.model_bytes(blank)
            finally:
                blank.finish()
        return vw.model_bytes(self._ws)

    def close(self) -> None:
        if self._ws is not None:
            self._ws.finish()
            self._ws = None


def _hex(namespace: int) -> str:
    # VW decodes \xNN in interaction arguments, so any namespace byte can be named.
    return f"\\x{namespace:02x}"


# ':' is VW's wildcard (every namespace) even when escaped: a namespace named with it is left out.
_WILDCARD = ord(":")


def resolve(args: str, shared: set[int], actions: set[int]) -> str:
    """VW arguments for an RL policy: dloop's CROSS becomes a `-q` for every (state namespace,
    action namespace) pair, `--ignore_linear` for all of them and `--noconstant`, so every
    weight belongs to one state feature and one action feature and nothing an action is worth
    carries from one state to another. A namespace both the state and the actions use (their
    names start with the same letter) cannot be told apart and crosses with itself; one whose
    name starts with ':' is left out (VW reads it as every namespace). Without state features
    there is nothing to cross: the actions keep their linear terms. The trainer resolves once,
    from its first episode: a namespace that first appears later is not crossed (VW keeps its
    linear term) until the model is reset."""
    words = args.split()
    if CROSS not in words:
        return args
    out = [w for w in words if w != CROSS]
    shared, actions = shared - {_WILDCARD}, actions - {_WILDCARD}
    if not shared:
        return " ".join(out)
    for s in sorted(shared):
        for a in sorted(actions):
            out += ["-q", _hex(s) + _hex(a)]
    # One `--ignore_linear` naming them all, plainly: VW saves the option in the model as the
    # sorted characters of its arguments, undecoded, so `--ignore_linear \x61` came back from
    # a saved model as the characters "\", "x", "6", "1" and a reopened trainer learned every
    # action's own weight, in every state at once. A namespace not a letter or digit (rare: a
    # feature namespace's first character) can only be named escaped, which a saved model
    # loses the same way.
    ignored = sorted(shared | actions)
    plain = [n for n in ignored if chr(n).isascii() and chr(n).isalnum()]
    if plain:
        out += ["--ignore_linear", "".join(map(chr, plain))]
    for n in ignored:
        if n not in plain:
            out += ["--ignore_linear", _hex(n)]
    if "--noconstant" not in out:
        out.append("--noconstant")
    return " ".join(out)


def _blank(model: bytes) -> bool:
    """Whether a model holds no interactions (a CROSS policy's model before resolution)."""
    header = header_options(model)
    return not any(f" {o} " in f"{header} " for o in ("--quadratic", "--cubic", "--interactions"))


def relabel(line: str, cost: float) -> str:
    """The DSJSON line with its chosen action's cost replaced and its label probability set to
    1 (label keys stay before `c`): MTR then regresses the chosen action's value without
    importance weights. (VW 9's `--cb_type dm` under `--cb_adf` did not converge on a fixed
    3-action regression in 600 updates; MTR with probability 1 fits it exactly.)"""
    doc = orjson.loads(line)
    doc["_label_cost"] = cost
    doc["_label_probability"] = 1.0
    return orjson.dumps(doc).decode()
