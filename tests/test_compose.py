"""docker-compose.yml and Dockerfile checked statically (no Docker engine here)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_file_is_consistent() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services, "no services"
    volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            context = (
                service["build"]
                if isinstance(service["build"], str)
                else service["build"]["context"]
            )
            assert (ROOT / context / "Dockerfile").exists(), name
        for dep in service.get("depends_on", {}) or {}:
            assert dep in services, f"{name} depends on unknown service {dep}"
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            assert source.startswith((".", "/")) or source in volumes, f"{name}: {source}"
        assert "healthcheck" in service, f"{name} has no healthcheck"


def test_dockerfile_copies_every_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for package in ("service", "learners", "migrations", "pyproject.toml"):
        assert f"COPY {package}" in text or f" {package} " in text
