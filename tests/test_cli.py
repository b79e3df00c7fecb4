"""`dloop up` as a user runs it: one command, a key printed once, restart keeps everything."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import Engine, Select, create_engine, func, select

from service.storage.models import Episode
from tests.conftest import free_port


def start(data_dir: Path, port: int) -> tuple[subprocess.Popen[str], list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLOOP_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "up", "--port", str(port), "--data-dir", str(data_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
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


def test_keys_list_create_and_revoke_admin_keys_offline(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    runner = CliRunner()
    data = ["--data-dir", str(tmp_path / "d")]
    created = runner.invoke(app, ["keys", "create", "--admin", "--label", "ops", *data])
    assert created.exit_code == 0, created.output
    key = created.output.strip()
    temp = runner.invoke(app, ["keys", "create", "--admin", "--expires-in-days", "0.5", *data])
    assert temp.exit_code == 0, temp.output
    listed = runner.invoke(app, ["keys", "list", *data])
    assert listed.exit_code == 0, listed.output
    assert key not in listed.output and temp.output.strip() not in listed.output
    rows = listed.output.splitlines()[1:]
    assert len(rows) == 2
    assert rows[0].split()[:4] == ["1", "admin", "*", "cli"] and rows[0].endswith("ops")
    assert "never" in rows[0] and "never" not in rows[1]
    assert runner.invoke(app, ["keys", "revoke", "2", *data]).exit_code == 0
    last = runner.invoke(app, ["keys", "revoke", "1", *data])
    assert last.exit_code != 0 and "last valid admin key" in last.output
    assert runner.invoke(app, ["keys", "revoke", "2", *data]).exit_code != 0
    assert runner.invoke(app, ["keys", "revoke", str(2**64), *data]).exit_code != 0
    bad = runner.invoke(app, ["keys", "create", "--admin", "--expires-in-days", "0", *data])
    assert bad.exit_code != 0 and "expiresInDays" in bad.output


def test_a_weak_environment_key_stops_every_command(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    env = {"DLOOP_API_KEY": "password"}
    result = CliRunner().invoke(app, ["migrate", "--data-dir", str(tmp_path)], env=env)
    assert result.exit_code == 2
    assert "DLOOP_API_KEY must be at least 32 characters" in result.output


def test_up_makes_a_new_admin_key_when_every_one_has_expired(tmp_path: Path) -> None:
    from service.cli.process import _prepare
    from service.core.settings import load_settings
    from service.storage import store
    from service.storage.db import make_engine, make_sessionmaker

    settings = load_settings(data_dir=tmp_path / "d")
    assert _prepare(settings) is not None  # first start: a key
    assert _prepare(settings) is None  # it exists
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            for row in store.all_keys(session):
                row.expires_at = 1.0
    finally:
        engine.dispose()
    assert _prepare(settings) is not None
