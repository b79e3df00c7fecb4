"""The `dloop` command: the typer app, assembled from the command modules."""

from __future__ import annotations

import typer

from service.cli import keys, offline, process, simulate

app = typer.Typer(
    help="dloop: a self-hosted decision service that learns live.", no_args_is_help=True
)
logs_app = typer.Typer(help="Decision logs.", no_args_is_help=True)
app.add_typer(logs_app, name="logs")
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

# Registration order is the order `dloop --help` lists the commands in.
app.command()(process.up)
app.command()(process.demo)
app.command()(process.serve)
app.command()(process.join)
app.command()(process.learn)
app.command()(process.migrate)
logs_app.command("export")(offline.logs_export)
app.command()(offline.replay)
app.command()(offline.evaluate)
app.command()(offline.features)
app.command()(simulate.simulate)
keys_app.command("create")(keys.keys_create)
keys_app.command("list")(keys.keys_list)
keys_app.command("revoke")(keys.keys_revoke)


def main() -> None:
    app()
