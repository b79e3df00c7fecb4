"""Warnings fail tests (pyproject.toml), a socket left to the garbage collector included, with
one exemption (tests/conftest.py): sockets to this process's broker, which kafka-python 3.0.12
leaks when a client closes while it is still opening a connection."""

from __future__ import annotations

import gc
import socket
import warnings

import pytest

from tests.support.services import Broker


def test_only_sockets_to_the_test_broker_may_be_left_to_the_collector(
    kafka_broker: Broker,
) -> None:
    port = int(kafka_broker.address.rsplit(":", 1)[1])
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(("127.0.0.1", port)) as to_broker,
        socket.create_connection(server.getsockname()) as elsewhere,
    ):
        # What socket.__del__ warns with.
        warnings.warn(f"unclosed {to_broker!r}", ResourceWarning, stacklevel=1)
        with pytest.raises(ResourceWarning):
            warnings.warn(f"unclosed {elsewhere!r}", ResourceWarning, stacklevel=1)
    # As kafka-python leaves one: the collector closes it, and the test does not fail.
    leaked = socket.create_connection(("127.0.0.1", port))
    del leaked
    gc.collect()
