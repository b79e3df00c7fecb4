"""Child processes: forked by the forkserver with VW imported, answering frames until the parent
hangs up; `Child` for blocking callers, `run_once` for one call in a fresh child."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Any

from learners.sandbox.protocol import (
    NativeCrash,
    RemoteError,
    SandboxError,
    SandboxTimeout,
    pack,
    recv_frame,
)


def _child_main(sock: socket.socket, options: dict[str, Any]) -> None:
    """A child's whole life: answer frames until the parent hangs up."""
    # Ctrl-C reaches the whole process group; the parent decides when children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if options.get("nice"):
        os.nice(int(options["nice"]))
    from learners.sandbox.host import Host

    host = Host(cache_models=int(options.get("cache_models", 64)), ops=options.get("ops"))
    while True:
        try:
            header, blob = recv_frame(sock)
        except (EOFError, OSError):
            return
        try:
            value, out = host.handle(header, blob)
            reply = pack({"ok": value}, out)
        except Exception as exc:  # reported to the parent, which decides
            reply = pack({"error": type(exc).__name__, "message": str(exc)[:4000]})
        try:
            sock.sendall(reply)
        except OSError:
            return


_context: Any = None
_context_lock = threading.Lock()


def process_context() -> Any:
    """The forkserver context every VW child comes from (VW already imported)."""
    return _mp_context()


def _mp_context() -> Any:
    global _context
    with _context_lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["learners.sandbox.host"])
            _context = ctx
        return _context


@dataclass
class ChildProcess:
    process: Any
    sock: socket.socket

    @classmethod
    def start(cls, options: dict[str, Any]) -> ChildProcess:
        parent, child = socket.socketpair()
        process = _mp_context().Process(
            target=_child_main, args=(child, options), daemon=True, name="dloop-vw"
        )
        process.start()
        child.close()
        return cls(process, parent)

    def stop(self) -> str:
        """Kill the child (if it still runs) and say how it ended."""
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        code = self.process.exitcode
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"signal {signal.Signals(-code).name}"
        return f"exit code {code}"


def answer(header: dict[str, Any]) -> Any:
    if "error" in header:
        raise RemoteError(str(header["error"]), str(header.get("message", "")))
    return header.get("ok")


class Child:
    """One child process for one thread at a time (blocking calls). It starts on first use and
    again after a crash; `generation` counts the starts, so whoever keeps state in the child
    can tell it was lost."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.generation = 0
        self._proc: ChildProcess | None = None

    def call(
        self,
        op: str,
        header: dict[str, Any] | None = None,
        blob: bytes = b"",
        *,
        timeout: float | None = None,
    ) -> tuple[Any, bytes]:
        if self._proc is None:
            self._proc = ChildProcess.start(self.options)
            self.generation += 1
        proc = self._proc
        proc.sock.settimeout(timeout)
        try:
            proc.sock.sendall(pack({"op": op, **(header or {})}, blob))
            reply, out = recv_frame(proc.sock)
        except TimeoutError:
            self._proc = None
            proc.stop()
            raise SandboxTimeout(f"Vowpal Wabbit took longer than {timeout} s") from None
        except (EOFError, OSError, SandboxError) as exc:
            self._proc = None
            how = proc.stop()
            raise NativeCrash(f"Vowpal Wabbit crashed ({how})") from exc
        return answer(reply), out

    def close(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None


def run_once(
    op: str, header: dict[str, Any] | None = None, blob: bytes = b"", *, timeout: float = 60
) -> tuple[Any, bytes]:
    """One call in a fresh child, which is gone afterwards."""
    child = Child()
    try:
        return child.call(op, header, blob, timeout=timeout)
    finally:
        child.close()


def check_model(model: bytes, *, kind: str) -> None:
    """learners.vw.check_model in a sandbox: PolicyError unless `model` is a model for `kind`."""
    from learners.policy import PolicyError

    try:
        run_once("check_model", {"kind": kind}, model)
    except RemoteError as exc:
        raise PolicyError(str(exc)) from None
    except NativeCrash:
        raise PolicyError("not a Vowpal Wabbit model (loading it crashed the parser)") from None


def blank_model(args: str) -> bytes:
    """The bytes of a model that has learned nothing, trained with `args` (made in a sandbox)."""
    _, model = run_once("blank", {"args": args})
    return model


def check_policy(args: str, *, algorithm: str = "--cb_explore_adf") -> None:
    """learners.vw.check_policy in a sandbox."""
    from learners.policy import PolicyError

    try:
        run_once("check_policy", {"args": args, "algorithm": algorithm})
    except RemoteError as exc:
        raise PolicyError(str(exc)) from None
    except NativeCrash:
        raise PolicyError("Vowpal Wabbit crashed on these arguments") from None
