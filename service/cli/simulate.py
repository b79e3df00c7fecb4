"""`dloop simulate`: drive a running dloop with a gymnasium environment through the HTTP API."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from service.core.kinds import CB, RL, loop_kind

if TYPE_CHECKING:
    from service.client import Client
    from service.pipeline.simulate import Curve


def simulate(
    env: Annotated[str, typer.Option("--env", help="Gymnasium environment id.")],
    episodes: Annotated[int, typer.Option(min=1, help="Episodes to play.")] = 200,
    url: Annotated[str, typer.Option(help="dloop endpoint.")] = "http://127.0.0.1:8000",
    loop: Annotated[str, typer.Option(help="Loop to drive (created if missing).")] = "sim",
    kind: Annotated[str, typer.Option(help="Loop kind: rl or cb.")] = "rl",
    key: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(envvar="DLOOP_API_KEY", help="Admin key (or DLOOP_API_KEY)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory for curve.csv and curve.png.")] = Path(
        "simulate"
    ),
    seed: Annotated[int, typer.Option(help="First episode's environment seed.")] = 0,
    max_steps: Annotated[int, typer.Option(min=1, help="Truncate episodes here.")] = 200,
    reward_scale: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="Divide rewards by this (dloop takes [-1, 1]; known envs preset)."),
    ] = None,
    eval_every: Annotated[int, typer.Option(help="Greedy evaluation every N episodes.")] = 25,
    steps_per_second: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(min=0.01, help="Pace the steps (default: as fast as the server answers)."),
    ] = None,
    tabular: Annotated[
        bool,
        typer.Option(
            "--tabular",
            help="RL policy dloop-rl-tabular (plain SGD on a state x action table) instead of "
            "the loop's default dloop-rl.",
        ),
    ] = False,
) -> None:
    """Drive a gymnasium environment with a discrete action space through the HTTP API and
    plot its learning curve (return per episode, moving average, greedy return)."""
    from service.client import Client
    from service.pipeline import simulate as sim

    if key is None:
        raise typer.BadParameter("an admin key is needed (--key or DLOOP_API_KEY)")
    if kind not in (RL.name, CB.name):  # multi-slot pages are not gymnasium environments
        raise typer.BadParameter("rl or cb", param_hint="--kind")
    sim.make_env(env, max_steps).close()  # an unknown environment fails before a loop is made
    with Client(url, key=key, loop=loop) as client:
        _set_up_loop(client, loop, kind, tabular)
        curve = sim.run(
            client,
            env,
            episodes,
            seed=seed,
            max_steps=max_steps,
            reward_scale=reward_scale,
            eval_every=eval_every,
            kind=kind,
            steps_per_second=steps_per_second,
        )
    _write_curve(curve, episodes, out)


def _set_up_loop(client: Client, loop: str, kind: str, tabular: bool) -> None:
    """Create the simulated loop, make it learn fast and, for RL, name its policy."""
    from learners.rl import DEFAULT_RL_POLICY, TABULAR_RL_POLICY
    from service.client import DloopError

    try:
        client.create_loop(kind)
    except DloopError as exc:
        raise typer.BadParameter(f"cannot create loop '{loop}': {exc}") from None
    client.configure(modelExportFrequency="PT1S", rewardWaitTime="PT10S")
    if loop_kind(kind).episodic:
        client.set_policy(
            "dloop-rl-tabular" if tabular else "dloop-rl",
            TABULAR_RL_POLICY if tabular else DEFAULT_RL_POLICY,
        )


def _write_curve(curve: Curve, episodes: int, out: Path) -> None:
    """Write curve.csv and curve.png under `out` and sum the run up in one line."""
    out.mkdir(parents=True, exist_ok=True)
    curve.write_csv(out / "curve.csv")
    curve.plot(out / "curve.png")
    last = max(curve.greedy)
    typer.echo(
        f"dloop: {episodes} episodes; mean return of the last 20 "
        f"{sum(curve.returns[-20:]) / len(curve.returns[-20:]):.2f}; greedy return "
        f"{curve.greedy[last]:.2f}"
        + ("" if curve.optimal is None else f" (optimal {curve.optimal:.2f})")
        + f"; wrote {out / 'curve.csv'} and {out / 'curve.png'}"
    )
