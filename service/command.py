"""The `dloop` command's entry point: the server's CLI (service.cli) when the server is installed,
else a clear message (`pip install dloop` alone is the in-process ranker and the HTTP client)."""

from __future__ import annotations


def main() -> None:
    try:
        from service.cli import main as cli
    except ModuleNotFoundError as exc:
        raise SystemExit(
            f"dloop: the server is not installed ({exc.name} is missing): "
            "pip install 'dloop[server]'"
        ) from None
    cli()
