"""docker-compose.yml and Dockerfile checked statically (no Docker engine here): references,
conditions, healthchecks, commands the CLI knows, and environment the Settings read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import app
from service.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def commands() -> set[str]:
    import typer.main

    group = typer.main.get_group(app)
    return set(group.commands)


def test_services_and_references(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "kafka", "migrate", "api", "joiner", "learner"} <= set(services)
    volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            assert (ROOT / service["build"] / "Dockerfile").exists()
        for dep, cond in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck"
            else:
                assert cond["condition"] == "service_completed_successfully"
                assert services[dep].get("restart") == "no"
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            assert ":" not in mount or source in volumes or source.startswith((".", "/")), mount
        if service.get("restart") != "no":
            assert "healthcheck" in service, f"{name} has no healthcheck"


def test_dloop_services_run_known_commands(compose: dict[str, Any]) -> None:
    known = commands()
    for name in ("migrate", "api", "joiner", "learner"):
        command = compose["services"][name]["command"]
        assert command[0] == "dloop" and command[1] in known, (name, command)


def test_environment_is_what_settings_read(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = compose["services"]["api"]["environment"]
    for key, value in env.items():
        monkeypatch.setenv(
            key, "a-compose-secret-0123456789abcdef" if "${" in str(value) else str(value)
        )
    settings = Settings()
    assert settings.db.url == env["DLOOP_DB__URL"]
    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert settings.kafka.partitions == 8
    assert settings.api_key is not None
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]


def test_dockerfile_copies_every_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for package in ("service", "learners", "migrations", "pyproject.toml"):
        assert f"COPY {package}" in text or f" {package} " in text


def test_the_api_is_reached_through_a_proxy_that_times_out_slow_clients(
    compose: dict[str, Any],
) -> None:
    """uvicorn never times out slow request headers: the proxy must (README, Security)."""
    services = compose["services"]
    assert "ports" not in services["api"], "API replicas must not be published directly"
    proxy = services["proxy"]
    assert proxy["image"].startswith("nginx") and proxy["ports"] == ["8000:8000"]
    source = proxy["volumes"][0].split(":")[0]
    conf = (ROOT / source).read_text()
    for directive in (
        "client_header_timeout",
        "client_body_timeout",
        "keepalive_timeout",
        "send_timeout",
        "limit_conn ",
        "proxy_request_buffering on",
    ):
        assert directive in conf, directive
    assert "server api:8000" in conf
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"
