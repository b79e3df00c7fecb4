"""The `dloop` command as a user runs it, in processes: `dloop up` (one command, a key printed
once, restart keeps everything), a lost admin key replaced offline, `dloop simulate` against a
running server and `dloop replay` of what it logged."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, Select, create_engine, func, select

from service.storage.models import Episode
from tests.support.services import free_port


def start(
    data_dir: Path, port: int, *, group: bool = False
) -> tuple[subprocess.Popen[str], list[str]]:
    """`dloop up` (with `group`, in a process group of its own, as a terminal starts it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLOOP_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "up", "--port", str(port), "--data-dir", str(data_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=group,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        assert line, f"dloop up exited: {''.join(lines)}"
        lines.append(line)
        if "Personalizer endpoint" in line:
            break
    deadline = time.time() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return proc, lines
        except httpx.HTTPError:
            pass
        assert time.time() < deadline and proc.poll() is None, "dloop up did not become ready"
        time.sleep(0.1)


def count(engine: Engine, stmt: Select[tuple[int]]) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(stmt) or 0)


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


@pytest.mark.slow
def test_up_prints_a_key_once_and_restarts_without_losing_events(tmp_path: Path) -> None:
    data = tmp_path / "dloop-data"
    port = free_port()
    base = f"http://127.0.0.1:{port}/personalizer/v1.0"
    proc, lines = start(data, port)
    try:
        match = re.search(r"admin key \(shown once, keep it\): (\w+)", "".join(lines))
        assert match, lines
        headers = {"Ocp-Apim-Subscription-Key": match.group(1)}
        body = {
            "actions": [{"id": "a", "features": [{"x": 1}]}, {"id": "b", "features": [{"x": 2}]}]
        }
        for i in range(5):
            r = httpx.post(f"{base}/rank", json={**body, "eventId": f"e{i}"}, headers=headers)
            assert r.status_code == 201
    finally:
        stop(proc)

    proc, lines = start(data, port)
    try:
        assert "shown once" not in "".join(lines)
        r = httpx.post(f"{base}/events/e1/reward", json={"value": 1}, headers=headers)
        assert r.status_code == 204
        deadline = time.time() + 10
        while time.time() < deadline:
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=headers).text
            if 'dloop_decisions_joined{loop="default"} 1' in metrics:
                break
            time.sleep(0.1)
        assert 'dloop_decisions_pending{loop="default"} 4' in metrics
        assert 'dloop_decisions_joined{loop="default"} 1' in metrics
    finally:
        stop(proc)


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]


@pytest.mark.slow
def test_ctrl_c_stops_up_quietly_learner_and_all(tmp_path: Path) -> None:
    """Ctrl-C in a terminal reaches the whole process group, the learner's process too: `dloop
    up` stops, exit code 0, without a traceback and without starting another learner."""
    proc, _ = start(tmp_path / "dloop-data", free_port(), group=True)
    try:
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid), "-f", "multiprocessing.spawn"],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert len(children) == 1, children  # the learner's process
        deadline = time.time() + 30
        while _threads(int(children[0])) < 3:  # its main thread, commands and status: running
            assert time.time() < deadline, "the learner process did not start its threads"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert "starting another" not in out, out


def test_keys_create_replaces_a_lost_admin_key(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    data = tmp_path / "d"
    result = CliRunner().invoke(app, ["keys", "create", "--admin", "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    key = result.output.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", key)
    result = CliRunner().invoke(app, ["keys", "create", "--loop", "nope", "--data-dir", str(data)])
    assert result.exit_code != 0
    port = free_port()
    proc, lines = start(data, port)
    try:
        assert "shown once" not in "".join(lines)  # an admin key exists already
        r = httpx.get(
            f"http://127.0.0.1:{port}/personalizer/v1.0/configurations/policy",
            headers={"Ocp-Apim-Subscription-Key": key},
        )
        assert r.status_code == 200
    finally:
        stop(proc)


@pytest.mark.slow
def test_simulate_and_replay_as_a_user_runs_them(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from service.cli import app
    from service.pipeline import simulate

    data = tmp_path / "d"
    port = free_port()
    proc, lines = start(data, port)
    try:
        match = re.search(r"admin key \(shown once, keep it\): (\w+)", "".join(lines))
        assert match, lines
        out = tmp_path / "sim"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "service",
                "simulate",
                "--env",
                "dloop/DelayedKey-v0",
                "--episodes",
                "30",
                "--url",
                f"http://127.0.0.1:{port}",
                "--loop",
                "keys",
                "--key",
                match.group(1),
                "--out",
                str(out),
                "--eval-every",
                "10",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert "greedy return" in result.stdout
        rows = (out / "curve.csv").read_text().splitlines()
        assert rows[0] == "episode,return,moving_average,greedy_return" and len(rows) == 31
        assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
        # Replay reads the episodes from the database: wait until all 30 are joined and learned.
        learned = select(func.count()).where(Episode.loop == "keys", Episode.learned.is_(True))
        engine = create_engine(f"sqlite:///{(data / 'dloop.db').resolve()}")
        try:
            deadline = time.time() + 60
            while (n := count(engine, learned)) < 30:
                assert time.time() < deadline, f"{n} of 30 episodes learned"
                time.sleep(0.2)
            assert n == 30
        finally:
            engine.dispose()
    finally:
        stop(proc)

    model = tmp_path / "replayed.vw"
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["replay", "--loop", "keys", "--data-dir", str(data), "--passes", "3", "--out", str(model)],
    )
    assert result.exit_code == 0, result.output
    # Offline, from the 30 logged episodes alone: the key, not the coin.
    assert simulate.greedy_return(model.read_bytes(), "rl", "dloop/DelayedKey-v0", 50, 1) == 1.0
    result = runner.invoke(app, ["replay", "--loop", "nope", "--data-dir", str(data)])
    assert result.exit_code != 0
    result = runner.invoke(app, ["replay", "--loop", "keys", "--data-dir", str(data), "--apply"])
    assert result.exit_code == 0, result.output
    assert "now serves model" in result.output


@pytest.mark.slow
def test_demo_serves_the_dashboard_and_its_loop_learns(tmp_path: Path) -> None:
    """`dloop demo` (`make demo`): the printed key opens the dashboard's data, and the
    simulated traffic makes decisions, joins them, holds some out and publishes models."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLOOP_")}
    command = [sys.executable, "-m", "service", "demo", "--port", str(port), "--rate", "200"]
    proc = subprocess.Popen(
        [*command, "--data-dir", str(tmp_path / "demo")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline() + proc.stdout.readline()
        match = re.search(r"open (http://\S+/ui/) and log in with this admin key: (\w+)", line)
        assert match, line
        url, key = match.groups()
        base = url.removesuffix("/ui/")
        deadline = time.time() + 60
        while True:
            try:
                r = httpx.get(
                    f"{base}/loops/default/holdout", headers={"Authorization": f"Bearer {key}"}
                )
                if r.status_code == 200 and r.json()["holdout"]["decisions"] >= 5:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and proc.poll() is None, "no held-out decisions"
            time.sleep(0.2)
        assert httpx.get(url).status_code == 200
        while not httpx.get(
            f"{base}/loops/default/stats", headers={"Authorization": f"Bearer {key}"}
        ).json()["models"]:
            assert time.time() < deadline and proc.poll() is None, "no model published"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
