"""service.cli.common: invalid settings (a weak DLOOP_API_KEY) stop every command with exit
code 2 and the reason."""

from __future__ import annotations

from pathlib import Path


def test_a_weak_environment_key_stops_every_command(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    env = {"DLOOP_API_KEY": "password"}
    result = CliRunner().invoke(app, ["migrate", "--data-dir", str(tmp_path)], env=env)
    assert result.exit_code == 2
    assert "DLOOP_API_KEY must be at least 32 characters" in result.output
