"""What a fresh machine installs, checked statically: the lock pins every version the tests ran
with, and `make install`, CI and the Docker image all install through it."""

from __future__ import annotations

import itertools
import re
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = "requirements.lock"


def locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in (ROOT / LOCK).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=<>!~,\[\]]+)", line)
        assert match, f"{LOCK}: not an exact pin: {raw!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"{LOCK}: {name} pinned twice"
        Version(match[2])  # a real version, not a URL or a wildcard
        pins[name] = match[2]
    return pins


def requirements() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {
        "dependencies": [Requirement(r) for r in project["dependencies"]],
        "server": [Requirement(r) for r in project["optional-dependencies"]["server"]],
        "kafka": [Requirement(r) for r in project["optional-dependencies"]["kafka"]],
        "test": [Requirement(r) for r in project["optional-dependencies"]["test"]],
    }


def test_every_package_in_the_lock_pins_an_exact_version() -> None:
    pins = locked()
    assert len(pins) > 20
    assert "dloop" not in pins, "the project itself is installed from the source tree"


@pytest.mark.parametrize("group", ["dependencies", "server", "kafka", "test"])
def test_pyproject_dependencies_are_locked_at_versions_they_allow(group: str) -> None:
    """A dependency added or bumped in pyproject.toml without `make lock` fails here."""
    pins = locked()
    for req in requirements()[group]:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} ({group}) is not in {LOCK}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK} pins {name}=={pins[name]}, pyproject.toml asks {req}: run `make lock`"
        )


CLIENT_IMPORTS = """
import sys
before = {m.split(".")[0] for m in sys.modules}  # the interpreter's own (site, .pth hooks)
import service.client, service.local
print(" ".join(sorted({m.split(".")[0] for m in sys.modules} - before)))
"""


def test_the_client_needs_only_the_core_dependencies() -> None:
    """`pip install dloop` (no extra) is enough for the in-process ranker and the HTTP client:
    every distribution they import is a core dependency or one of theirs, none is a server
    extra's alone."""
    import subprocess
    import sys
    from importlib import metadata

    out = subprocess.run(
        [sys.executable, "-c", CLIENT_IMPORTS], capture_output=True, text=True, check=True
    )
    owners = metadata.packages_distributions()
    imported = {canonicalize_name(d) for m in out.stdout.split() for d in owners.get(m, [])}
    imported -= {"dloop"}

    def closure(names: set[str]) -> set[str]:
        seen: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for raw in metadata.requires(name) or []:
                req = Requirement(raw)
                if req.marker is None or req.marker.evaluate({"extra": ""}):
                    todo.append(canonicalize_name(req.name))
        return seen

    core = closure({canonicalize_name(r.name) for r in requirements()["dependencies"]})
    # httpx imports its command line's packages when they happen to be installed (they are
    # not its requirements): with only the core installed it does without them.
    optional = {"click", "rich", "pygments", "markdown-it-py", "mdurl"}
    assert imported - core - optional == set(), "the client imports beyond the core"
    assert {"vowpalwabbit", "httpx", "orjson"} <= imported


def test_dockerfile_installs_with_the_lock() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    assert any(LOCK in sources for sources in copies), "the Dockerfile does not copy the lock"
    installs = [shlex.split(line) for line in lines if "pip install" in line]
    assert installs, "the Dockerfile installs nothing"
    for words in installs:
        assert any(
            flag in ("-c", "-r", "--constraint", "--requirement") and value == LOCK
            for flag, value in itertools.pairwise(words)
        ), f"installs without {LOCK}: {' '.join(words)}"


def test_make_install_uses_the_lock_and_reinstalls_when_it_changes() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^LOCK\s*:?=\s*{re.escape(LOCK)}\s*$", makefile, re.M)
    rule = re.search(r"^\$\(STAMP\):(.*)\n((?:\t.*\n)+)", makefile, re.M)
    assert rule, "no install rule"
    assert "$(LOCK)" in rule[1].split(), "the install stamp does not depend on the lock"
    installs = [line for line in rule[2].splitlines() if "pip install" in line and "-e" in line]
    assert installs and all("-c $(LOCK)" in line for line in installs), installs
    assert re.search(r"^lock:", makefile, re.M), "no `make lock`"


def test_ci_runs_what_a_developer_runs() -> None:
    steps = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.startswith("make ")
    ]
    assert steps == ["make lint", "make typecheck", "make test"]


def test_the_dashboards_files_are_package_data() -> None:
    """A non-editable install (the Docker image) gets every file of the dashboard: each matches
    a package-data pattern of service.api."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["service.api"]
    files = [p.relative_to(ROOT / "service" / "api") for p in (ROOT / "service/api/ui").iterdir()]
    assert files
    for f in files:
        assert any(f.match(pattern) for pattern in patterns), f"{f} is not package data"


def test_no_virtualenv_is_committed() -> None:
    """A worktree's `.venv` symlink once slipped into a commit, and a clean clone could not
    make its own virtualenv."""
    import subprocess

    tracked = subprocess.run(
        ["git", "ls-files", ".venv", "venv", "*.pyc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert tracked == ""
