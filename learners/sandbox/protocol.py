"""The frames parent and child exchange (a JSON header and a binary blob, never a pickle) and
what a call can raise."""

from __future__ import annotations

import socket
import struct
from typing import Any

import orjson

HEAD = struct.Struct("<II")
# A frame is at most this big (a model, a batch of lines); anything larger is a protocol error.
MAX_FRAME = 1 << 30


class SandboxError(RuntimeError):
    """VW could not do what was asked in its sandbox."""


class RemoteError(SandboxError):
    """A Python exception in the child (VW's parser rejected the input, say); `kind` is its
    type name. The child is still alive."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class NativeCrash(SandboxError):
    """The child died while handling the call (a segfault or an abort in VW)."""


class SandboxTimeout(NativeCrash):
    """The call overran its deadline; the child was killed."""


class SandboxBusy(SandboxError):
    """No child was free before the wait timeout (the service is overloaded)."""


def pack(header: dict[str, Any], blob: bytes = b"") -> bytes:
    head = orjson.dumps(header)
    return HEAD.pack(len(head), len(blob)) + head + blob


def unpack(head: bytes, body: bytes) -> tuple[dict[str, Any], bytes]:
    n_head, _ = HEAD.unpack(head)
    header = orjson.loads(body[:n_head])
    if not isinstance(header, dict):
        raise SandboxError("malformed frame")
    return header, body[n_head:]


def frame_size(head: bytes) -> int:
    n_head, n_blob = HEAD.unpack(head)
    if n_head + n_blob > MAX_FRAME:
        raise SandboxError("frame too large")
    return int(n_head + n_blob)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("the other end closed the connection")
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    head = recv_exactly(sock, HEAD.size)
    return unpack(head, recv_exactly(sock, frame_size(head)))
