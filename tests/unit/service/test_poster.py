"""The local ranker's batch poster (service.local.Poster): a plain keep-alive connection that
replaces one the server closed while idle, and fails as an httpx post would."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from service.local import Poster


class _Server(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.got: list[tuple[str, bytes]] = []


class _Handler(BaseHTTPRequestHandler):
    """Answers a POST over HTTP/1.1 (a keep-alive connection) and then closes it without
    saying so, as a server whose keep-alive timeout ran out does."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.got.append((self.path, body))
        out = b'{"accepted": 1}'
        self.send_response(202)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
        self.close_connection = True

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_a_connection_the_server_closed_is_replaced_before_the_next_post(
    server: _Server,
) -> None:
    port = server.server_address[1]
    poster = Poster.for_url(f"http://127.0.0.1:{port}/base/", timeout=5)
    assert poster is not None
    assert poster.post("/records", b"one", {}) == (202, b'{"accepted": 1}')
    sock = poster._conn.sock if poster._conn is not None else None
    assert sock is not None
    # Wait until the server's close has reached this end (the kernel has its FIN).
    assert select.select([sock], [], [], 5)[0]
    assert poster.post("/records", b"two", {})[0] == 202
    assert server.got == [("/base/records", b"one"), ("/base/records", b"two")]
    poster.close()


def test_a_server_away_fails_as_an_httpx_post_would() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free, and nobody listens once it is closed
    poster = Poster.for_url(f"http://127.0.0.1:{port}", timeout=5)
    assert poster is not None
    with pytest.raises(httpx.TransportError, match="ConnectionRefusedError"):
        poster.post("/records", b"x", {})


def test_https_and_proxied_addresses_are_left_to_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert Poster.for_url("https://dloop:8443", 5) is None
    assert Poster.for_url("http://dloop:8000", 5) is not None
    monkeypatch.setenv("all_proxy", "socks5://proxy:1080")
    assert Poster.for_url("http://dloop:8000", 5) is None
    monkeypatch.delenv("all_proxy")
    monkeypatch.setenv("http_proxy", "http://proxy:3128")
    assert Poster.for_url("http://dloop:8000", 5) is None
    monkeypatch.setenv("no_proxy", "dloop")
    assert Poster.for_url("http://dloop:8000", 5) is not None
