"""service.cli.keys: `dloop keys list`, `create` and `revoke` on the database, no server needed."""

from __future__ import annotations

from pathlib import Path


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
