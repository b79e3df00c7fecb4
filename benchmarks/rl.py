"""How well dloop's RL loops learn, and how dependably: every world, 10 seeds, dloop's default `rl`
policy beside a reference learner on the same world (`make bench` runs it; alone:

    python -m benchmarks.rl [--seeds 10] [--worlds CliffWalking,Taxi] [--plot rl.png]

dloop's side goes through the code a live loop runs, in process: each step is a rank request
checked by the API's rules (service.core.requests), scored by the served model and drawn with the
eventId's seed (service.core.ranking), joined with its reward into the DSJSON line the joiner
writes (learners.joiner), and each ended episode is learned by the learner's trainer
(learners.rl.RLTrainer, the loop's default policy and discount) and published: the next episode
is served by the model loaded from the published bytes, as replicas load it. (A live loop may
serve a model a few episodes old while the learner catches up; `--publish-every` shows what that
costs.) The greedy return is the published model's greedy policy's return
(service.pipeline.simulate.greedy_return, what `dloop simulate` reports): exact, from the
world's transition table, where it has one (CliffWalking, Taxi, FrozenLake, Inventory), else the
mean over fixed evaluation seeds. (Sampled on 200 episodes, FrozenLake's greedy return carried a
noise of about 0.03, 4% of its optimum, into every difference the table reports.)

The reference: tabular Q-learning (alpha 0.2, epsilon 0.1, ties broken at random, zero start),
keyed by the observation (CartPole's: 3 x 3 x 6 x 6 bins of position, velocity, angle, angular
velocity, the classic discretisation).

A world is learned when the greedy return reaches its bar: within 10% of the optimum's size of it
(0.9 x the optimum where it is positive; CartPole: 195, its classic mark). Two falls, as shares
of the optimum's size: how far a run ends below its greedy return 100 episodes earlier (the
issue's test: at most 10%), and below its best of those 100 episodes (stricter).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from learners import vw
from learners.features import FeatureLimits, context_json
from learners.joiner import DecisionView, JoinRules, Obs, join
from learners.rl import DEFAULT_RL_EXPLORATION, DEFAULT_RL_POLICY, RLTrainer, Step, recalled
from learners.sim import envs
from learners.tiles import TileCoding
from service.core.ranking import Serving, code_tiles, decide, policy_pmf
from service.core.requests import parse_rank
from service.pipeline.simulate import (
    EVAL_SEED,
    greedy_return,
    make_env,
    optimal_return,
    policy_return,
)

LOOP = "bench"
PLOT = Path(__file__).parent.parent / "docs" / "rl-quality.png"  # the README shows it
EXPLORATION = DEFAULT_RL_EXPLORATION  # a new rl loop's explorationPercentage
DISCOUNT = 0.99  # a loop's default discountFactor


@dataclass(frozen=True)
class World:
    name: str
    env_id: str
    episodes: int  # the training budget
    max_steps: int  # the episode's time limit
    eval_every: int
    eval_episodes: int
    reward_scale: float = 1.0  # dloop takes rewards in [-1, 1]
    optimum: float | None = None  # else value iteration on the world's table
    threshold: float | None = None  # what counts as learned; else within 10% of the optimum
    tiles: TileCoding | None = None  # the loop's tile coding of numeric context features


# CartPole's loop codes its state (position, velocity, angle, angular velocity) jointly in 8
# tilings of cells about a sixth of each element's usual range wide.
CARTPOLE_TILES = TileCoding(8, {"state.x": (0.8, 1.0, 0.07, 0.6)})

WORLDS = {
    w.name: w
    for w in (
        World("CliffWalking", "CliffWalking-v1", 300, 200, 10, 1, reward_scale=100.0),
        World("Taxi", "Taxi-v4", 1500, 200, 50, 20, reward_scale=20.0),
        World("FrozenLake", "FrozenLake-v1", 300, 100, 10, 200),
        World("Inventory", "dloop/Inventory-v0", 300, 15, 10, 200, reward_scale=3.0),
        World("DelayedKey", "dloop/DelayedKey-v0", 300, 10, 10, 1, optimum=1.0),
        World(
            "CartPole",
            "CartPole-v1",
            500,
            500,
            25,
            20,
            optimum=500.0,
            threshold=195.0,
            tiles=CARTPOLE_TILES,
        ),
        World(
            "NoisyCorridor",
            "dloop/NoisyCorridor-v0",
            300,
            30,
            10,
            20,
            optimum=envs.NoisyCorridor.optimum(),
        ),
    )
}


@dataclass
class Run:
    world: str
    learner: str
    seed: int
    returns: list[float] = field(default_factory=list)
    greedy: dict[int, float] = field(default_factory=dict)  # episodes done -> greedy return
    seconds: float = 0.0


def optimum_of(world: World) -> float:
    if world.optimum is not None:
        return world.optimum
    value = optimal_return(world.env_id, world.max_steps, max(world.eval_episodes, 200))
    assert value is not None, world.name
    return value


def threshold_of(world: World, optimum: float) -> float:
    """Within 10% of the optimum's size of it (0.9 x a positive optimum), unless the world says
    (CartPole: a mean of 195 over the evaluation episodes, its classic solved mark)."""
    return world.threshold if world.threshold is not None else optimum - 0.1 * abs(optimum)


def _reset_seed(seed: int, episode: int) -> int:
    return seed * 1_000_003 + episode


@dataclass(frozen=True)
class Setup:
    """dloop's side of a run: the loop's settings, and the trainer's knobs (None: its own)."""

    policy: str = DEFAULT_RL_POLICY
    publish_every: int = 1  # episodes between published models
    exploration: float = EXPLORATION
    replay: int | None = None
    lam: float | None = None
    memory: int | None = None
    sampled: bool = False  # the old one-step targets (the learner averages a random outcome's)
    # Reopen the trainer from its saved model every so many episodes (0: never), as a learner
    # does after a restart or when another learner saved the loop's model; `recall`: it takes
    # back the episodes it had learned (RLTrainer.remember), as the learners do.
    restart_every: int = 0
    recall: bool = True
    bonus: float | None = None
    trainer_seed: int = 0  # the replay draws' seed (RLTrainer(seed=...))

    def trainer(self, model: bytes | None = None, examples: int = 0) -> RLTrainer:
        knobs = {
            "replay": self.replay,
            "lam": self.lam,
            "memory": self.memory,
            "bonus": self.bonus,
        }
        given: dict[str, Any] = {k: v for k, v in knobs.items() if v is not None}
        return RLTrainer(
            self.policy,
            model,
            examples,
            gamma=DISCOUNT,
            expected=not self.sampled,
            seed=self.trainer_seed,
            **given,
        )


def run_dloop(world: World, seed: int, setup: Setup = Setup()) -> Run:
    """`world.episodes` episodes through a live loop's code, in process (the module's doc)."""
    started = time.perf_counter()
    env = make_env(world.env_id, world.max_steps)
    actions = envs.action_list(env.action_space)
    serving = Serving(
        loop=LOOP,
        kind="rl",
        mode="Online",
        holdout_share=0.0,
        holdout_policy="uniform",
        exploration=setup.exploration,
        explores_in_vw=False,
        episodic=True,
    )
    rules = JoinRules(wait=600.0, default_reward=0.0, aggregation="earliest")
    limits = FeatureLimits()
    trainer = setup.trainer()
    learned: list[tuple[list[Step], bool]] = []
    served: vw.Workspace | None = None
    model, model_id = b"", "N/A"
    run = Run(world.name, "dloop", seed)
    clock = 0.0
    try:
        for ep in range(world.episodes):
            obs, _ = env.reset(seed=_reset_seed(seed, ep))
            episode = f"s{seed}-e{ep}"
            steps: list[Step] = []
            total, terminated, t = 0.0, False, 0
            while True:
                event_id = f"{episode}-{t}"
                body = {
                    "contextFeatures": envs.observation_features(obs),
                    "actions": actions,
                    "eventId": event_id,
                    "episodeId": episode,
                }
                req = parse_rank(body, 50, limits)
                code_tiles(world.tiles, req)
                pairs = list(zip(req["ids"], req["features"], strict=True))
                context = context_json(req["context"], pairs)
                scores = vw.predict_scores(served, context.decode()) if served else []
                pmf = policy_pmf(serving, req, scores, has_model=served is not None)
                order, pmf = decide(serving, req, pmf, held=False)
                obs, reward, terminated, truncated, _ = env.step(int(req["ids"][order[0]]))
                total += float(reward)
                clock += 0.001
                view = DecisionView(
                    event_id=event_id,
                    created_at=clock,
                    deferred=False,
                    mode="Online",
                    context=context,
                    ranking=order,
                    probabilities=[pmf[i] for i in order],
                    baseline=0,
                    model_id=model_id,
                    episode=episode,
                )
                scaled = float(np.clip(float(reward) / world.reward_scale, -1.0, 1.0))
                joined = join(view, [Obs("reward", scaled, clock)], rules)
                steps.append(Step(joined.line.decode(), joined.reward, joined.learnable))
                t += 1
                if terminated or truncated:
                    break
            trainer.learn_episode(steps, terminated)
            learned.append((steps, terminated))
            run.returns.append(total)
            done = ep + 1
            if setup.restart_every and done % setup.restart_every == 0:
                saved, examples = trainer.to_bytes(), trainer.examples
                trainer.close()
                trainer = setup.trainer(saved, examples)
                if setup.recall:
                    trainer.remember(learned[-recalled([len(s) for s, _ in reversed(learned)]) :])
            if done % setup.publish_every == 0 or done == world.episodes:
                model, model_id = trainer.to_bytes(), f"m{done}"
                if served is not None:
                    served.finish()
                served = vw.workspace("--json", model)
            if done % world.eval_every == 0 or done == world.episodes:
                run.greedy[done] = greedy_return(
                    model,
                    "rl",
                    world.env_id,
                    world.max_steps,
                    world.eval_episodes,
                    tiles=world.tiles,
                )
    finally:
        trainer.close()
        if served is not None:
            served.finish()
    run.seconds = time.perf_counter() - started
    return run


def cartpole_bins(obs: Any) -> tuple[int, ...]:
    edges = [(-2.4, 2.4, 3), (-3.0, 3.0, 3), (-0.21, 0.21, 6), (-3.5, 3.5, 6)]
    return tuple(
        int(np.clip((v - lo) / (hi - lo) * n, 0, n - 1))
        for v, (lo, hi, n) in zip(obs, edges, strict=True)
    )


def run_tabular(world: World, seed: int, alpha: float = 0.2, epsilon: float = 0.1) -> Run:
    started = time.perf_counter()
    env = make_env(world.env_id, world.max_steps)
    n = int(env.action_space.n)  # type: ignore[attr-defined]
    key: Callable[[Any], Any] = (
        cartpole_bins if world.name == "CartPole" else (lambda o: tuple(np.ravel(o).tolist()))
    )
    q: defaultdict[Any, np.ndarray] = defaultdict(lambda: np.zeros(n))
    rng = np.random.default_rng(seed)
    run = Run(world.name, "tabular Q", seed)

    def greedy(obs: Any) -> int:
        return int(np.argmax(q[key(obs)]))  # unseen: the first action, as a blank model

    for ep in range(world.episodes):
        obs, _ = env.reset(seed=_reset_seed(seed, ep))
        total = 0.0
        while True:
            values = q[key(obs)]
            if rng.random() < epsilon:
                action = int(rng.integers(n))
            else:
                action = int(rng.choice(np.flatnonzero(values == values.max())))
            nxt, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            target = float(reward) + (0.0 if terminated else DISCOUNT * q[key(nxt)].max())
            values[action] += alpha * (target - values[action])
            obs = nxt
            if terminated or truncated:
                break
        run.returns.append(total)
        done = ep + 1
        if done % world.eval_every == 0 or done == world.episodes:
            genv = make_env(world.env_id, world.max_steps)  # dloop's evaluation episodes
            run.greedy[done] = policy_return(
                genv, greedy, world.max_steps, world.eval_episodes, EVAL_SEED
            )
    run.seconds = time.perf_counter() - started
    return run


def _task(args: tuple[str, str, int, Setup]) -> Run:
    name, learner, seed, setup = args
    world = WORLDS[name]
    if learner == "dloop":
        return run_dloop(world, seed, setup)
    return run_tabular(world, seed)


@dataclass
class Summary:
    to_threshold: list[float]  # episodes to reach the threshold, inf if never
    final: list[float]  # greedy return at the end of the budget
    worse: list[float]  # end below the greedy return 100 episodes earlier, share of |optimum|
    drop: list[float]  # end below the best of the last 100 episodes, share of |optimum|
    # Share of the greedy returns measured in the last 100 episodes below the threshold: how
    # steady the policy is, whichever two evaluations the falls compare.
    below: list[float]


def summarise(runs: list[Run], optimum: float, threshold: float) -> Summary:
    out = Summary([], [], [], [], [])
    for run in runs:
        points = sorted(run.greedy.items())
        first = next((ep for ep, g in points if g >= threshold), math.inf)
        out.to_threshold.append(first)
        end, final = points[-1]
        out.final.append(final)
        earlier = run.greedy.get(end - 100)
        out.worse.append(0.0 if earlier is None else max(0.0, (earlier - final) / abs(optimum)))
        recent = [g for ep, g in points if ep >= end - 100]
        out.drop.append(max(0.0, (max(recent) - final) / abs(optimum)))
        out.below.append(sum(g < threshold for g in recent) / len(recent))
    return out


def describe(summary: Summary, budget: int) -> tuple[str, str, str]:
    def episodes(value: float) -> str:
        return f">{budget}" if math.isinf(value) else f"{value:.0f}"

    ordered = sorted(summary.to_threshold)
    median = ordered[(len(ordered) - 1) // 2]
    hit = sum(not math.isinf(v) for v in ordered)
    finals = sorted(summary.final)
    return (
        f"{episodes(median)} / {episodes(ordered[-1])}  ({hit}/{len(ordered)} reach)",
        f"{float(np.median(finals)):.2f} / {finals[0]:.2f}",
        f"{max(summary.worse):.0%} / {max(summary.drop):.0%}"
        f" · {float(np.mean(summary.below)):.0%} below",
    )


def plot(results: dict[str, dict[str, list[Run]]], optima: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colours = {"dloop": "#1f77b4", "tabular Q": "#ff7f0e"}
    for ax, name in zip(axes.ravel(), names, strict=False):
        for learner, runs in results[name].items():
            xs = sorted(runs[0].greedy)
            grid = np.array([[r.greedy[x] for x in xs] for r in runs])
            colour = colours.get(learner, "#333333")
            ax.plot(xs, np.median(grid, axis=0), color=colour, label=f"{learner} (median)")
            ax.fill_between(xs, grid.min(axis=0), grid.max(axis=0), color=colour, alpha=0.18)
        ax.axhline(optima[name], color="#2ca02c", linestyle="--", linewidth=1, label="optimum")
        ax.set_title(name)
        ax.set_xlabel("episodes")
        ax.set_ylabel("greedy return")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    axes.ravel()[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Greedy return while learning: median of seeds, band from worst to best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def benchmark(
    worlds: list[str],
    seeds: int,
    *,
    processes: int = 2,
    setup: Setup = Setup(),
    reference: bool = True,
) -> tuple[list[tuple[str, str]], dict[str, dict[str, list[Run]]], dict[str, float]]:
    from tqdm import tqdm

    learners = ("dloop", "tabular Q") if reference else ("dloop",)
    tasks = [
        (name, learner, seed, setup)
        for name in worlds
        for learner in learners
        for seed in range(seeds)
    ]
    results: dict[str, dict[str, list[Run]]] = {n: {k: [] for k in learners} for n in worlds}
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        bar = tqdm(pool.imap_unordered(_task, tasks), total=len(tasks), unit="run", desc="RL")
        for run in bar:
            results[run.world][run.learner].append(run)
            bar.set_postfix(last=f"{run.world}/{run.learner}/{run.seed}")
    optima = {name: optimum_of(WORLDS[name]) for name in worlds}
    rows: list[tuple[str, str]] = [
        ("seeds per world and learner", str(seeds)),
        (
            "columns",
            "episodes to the bar (median / worst) | final greedy (median / worst) | largest"
            " fall of a run's end below 100 episodes earlier / below its best of them ·"
            " share of the last 100 episodes' evaluations below the bar",
        ),
    ]
    for name in worlds:
        world = WORLDS[name]
        for learner in learners:
            runs = sorted(results[name][learner], key=lambda r: r.seed)
            results[name][learner] = runs
            bar = threshold_of(world, optima[name])
            first, final, drop = describe(summarise(runs, optima[name], bar), world.episodes)
            rows.append(
                (
                    f"{name} ({world.episodes} ep, optimum {optima[name]:.2f}, bar {bar:.2f}):"
                    f" {learner}",
                    f"{first} | {final} | {drop}",
                )
            )
    return rows, results, optima


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--worlds", default=",".join(WORLDS))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--publish-every", type=int, default=1)
    parser.add_argument("--plot", type=Path, default=PLOT)
    parser.add_argument("--policy", default=DEFAULT_RL_POLICY, help="VW arguments (a loop's)")
    parser.add_argument("--no-reference", action="store_true", help="dloop's side only")
    parser.add_argument(
        "--replay", type=int, help="recent episodes replayed after each (the learner's: 16)"
    )
    parser.add_argument("--lam", type=float, help="the trainer's lambda (the learner's: 0.5)")
    parser.add_argument(
        "--exploration",
        type=float,
        default=EXPLORATION,
        help=f"the loop's explorationPercentage (default {EXPLORATION})",
    )
    parser.add_argument(
        "--memory",
        type=int,
        help="steps of past episodes whose outcomes the learner averages (its own: 10,000)",
    )
    parser.add_argument(
        "--bonus",
        type=float,
        help="optimism for rarely tried actions, reward units / tries (the learner's: 0.2)",
    )
    parser.add_argument(
        "--trainer-seed",
        type=int,
        default=0,
        help="the seed of the learner's replay draws (judge a change on several)",
    )
    parser.add_argument(
        "--sampled",
        action="store_true",
        help="sampled one-step targets (the learner averages a random outcome's: learners.rl)",
    )
    parser.add_argument(
        "--restart-every",
        type=int,
        default=0,
        help="reopen the trainer from its saved model every N episodes (a learner's restart)",
    )
    parser.add_argument(
        "--no-recall",
        action="store_true",
        help="a reopened trainer starts without the episodes it learned (RLTrainer.remember)",
    )
    args = parser.parse_args()
    worlds = [w for w in args.worlds.split(",") if w]
    unknown = [w for w in worlds if w not in WORLDS]
    if unknown:
        sys.exit(f"unknown worlds: {', '.join(unknown)} (known: {', '.join(WORLDS)})")
    rows, results, optima = benchmark(
        worlds,
        args.seeds,
        processes=args.processes,
        setup=Setup(
            policy=args.policy,
            publish_every=args.publish_every,
            exploration=args.exploration,
            replay=args.replay,
            lam=args.lam,
            memory=args.memory,
            sampled=args.sampled,
            bonus=args.bonus,
            trainer_seed=args.trainer_seed,
            restart_every=args.restart_every,
            recall=not args.no_recall,
        ),
        reference=not args.no_reference,
    )
    width = max(len(k) for k, _ in rows)
    print("\nRL learning quality")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    plot(results, optima, args.plot)
    print(f"  plot: {args.plot}")


if __name__ == "__main__":
    main()
