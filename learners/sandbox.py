"""Vowpal Wabbit out of process: parsing, prediction and learning on untrusted input run in
child processes, so a crash in VW's C++ (VW 9.11.9's JSON parser segfaults on a feature key
`__aid`; the next bug will be a segfault too) takes down a child, never the server.

Children are forked by multiprocessing's forkserver with VW already imported (a restart costs
about 20 ms) and talk to their parent over a socketpair in frames of a JSON header and a binary
blob (example text, model bytes). Never pickle: a child that VW's input managed to subvert can
send its parent nothing but data.

- `RankerPool` (asyncio, serving): a few long-lived children that parse, predict, fill
  multi-slot pages and explain. Each keeps the models of the loops it served recently (LRU),
  loaded from the files the serving process writes when a model is published. Every call has a
  deadline; a child that crashes or overruns is killed and replaced (backing off when it keeps
  dying) and the input that did it is remembered and refused at once if it comes again.
- `Child` (blocking): one long-lived child for a learner thread; trainers live in it
  (`TrainerHost`), a batch of lines per call.
- `run_once`: a fresh child for one call (model and policy checks, the parser fuzzer).

What a call can raise: `RemoteError` (VW or dloop raised a Python exception in the child; the
child lives on), `NativeCrash` (the child died: a segfault or an abort), `SandboxTimeout` (it
overran its deadline and was killed), `SandboxBusy` (no child free in time).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import multiprocessing
import os
import signal
import socket
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("dloop.sandbox")

_HEAD = struct.Struct("<II")
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
    return _HEAD.pack(len(head), len(blob)) + head + blob


def _unpack(head: bytes, body: bytes) -> tuple[dict[str, Any], bytes]:
    n_head, _ = _HEAD.unpack(head)
    header = orjson.loads(body[:n_head])
    if not isinstance(header, dict):
        raise SandboxError("malformed frame")
    return header, body[n_head:]


def _sizes(head: bytes) -> int:
    n_head, n_blob = _HEAD.unpack(head)
    if n_head + n_blob > MAX_FRAME:
        raise SandboxError("frame too large")
    return int(n_head + n_blob)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("the other end closed the connection")
        got += k
    return bytes(buf)


def _recv_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    head = _recv_exactly(sock, _HEAD.size)
    return _unpack(head, _recv_exactly(sock, _sizes(head)))


# ---- the child ---------------------------------------------------------------------------------


def _child_main(sock: socket.socket, options: dict[str, Any]) -> None:
    """A child's whole life: answer frames until the parent hangs up."""
    # Ctrl-C reaches the whole process group; the parent decides when children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if options.get("nice"):
        os.nice(int(options["nice"]))
    from learners.sandbox_host import Host

    host = Host(cache_models=int(options.get("cache_models", 64)))
    while True:
        try:
            header, blob = _recv_frame(sock)
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
            ctx.set_forkserver_preload(["learners.sandbox_host"])
            _context = ctx
        return _context


@dataclass
class _Process:
    process: Any
    sock: socket.socket

    @classmethod
    def start(cls, options: dict[str, Any]) -> _Process:
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


def _answer(header: dict[str, Any]) -> Any:
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
        self._proc: _Process | None = None

    def call(
        self,
        op: str,
        header: dict[str, Any] | None = None,
        blob: bytes = b"",
        *,
        timeout: float | None = None,
    ) -> tuple[Any, bytes]:
        if self._proc is None:
            self._proc = _Process.start(self.options)
            self.generation += 1
        proc = self._proc
        proc.sock.settimeout(timeout)
        try:
            proc.sock.sendall(pack({"op": op, **(header or {})}, blob))
            reply, out = _recv_frame(proc.sock)
        except TimeoutError:
            self._proc = None
            proc.stop()
            raise SandboxTimeout(f"Vowpal Wabbit took longer than {timeout} s") from None
        except (EOFError, OSError, SandboxError) as exc:
            self._proc = None
            how = proc.stop()
            raise NativeCrash(f"Vowpal Wabbit crashed ({how})") from exc
        return _answer(reply), out

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
    from learners.vw import PolicyError

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
    from learners.vw import PolicyError

    try:
        run_once("check_policy", {"args": args, "algorithm": algorithm})
    except RemoteError as exc:
        raise PolicyError(str(exc)) from None
    except NativeCrash:
        raise PolicyError("Vowpal Wabbit crashed on these arguments") from None


# ---- serving: a pool of ranking children -----------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A served model: its id and the file the serving process wrote it to (None: no model
    yet, rank uniformly; the request is still parsed, so nothing unparseable is logged)."""

    model_id: str
    path: str | None


NO_MODEL = ModelRef("N/A", None)


class _Slot(asyncio.Protocol):
    """One ranking child seen from the event loop: frames written to it, its answer parsed as
    it arrives (a protocol rather than asyncio streams: fewer wake-ups per call)."""

    def __init__(self, proc: _Process) -> None:
        self.proc = proc
        self.transport: Any = None  # asyncio's or uvloop's (not an asyncio.Transport subclass)
        self._buf = bytearray()
        self._waiter: asyncio.Future[tuple[dict[str, Any], bytes]] | None = None
        self.started = 0.0  # the loop time the call in flight began (0: idle)
        self.overran = False  # the watchdog stopped it for overrunning its deadline

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) < _HEAD.size:
            return
        head = bytes(self._buf[: _HEAD.size])
        end = _HEAD.size + _sizes(head)
        if len(self._buf) < end:
            return
        frame = _unpack(head, bytes(self._buf[_HEAD.size : end]))
        del self._buf[:end]
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(EOFError("the ranking process is gone"))

    async def call(self, frame: bytes) -> tuple[dict[str, Any], bytes]:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self.started = loop.time()
        try:
            self.transport.write(frame)
            return await self._waiter
        finally:
            self.started = 0.0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class PoolStats:
    crashes: int = 0
    timeouts: int = 0
    busy: int = 0
    refused: int = 0  # inputs refused because they had crashed or overrun a child before
    restarts: int = 0


class RankerPool:
    """Serving's children. `call` takes a free child (waiting up to `wait` seconds: else
    SandboxBusy), sends the call, and gives the child `timeout` seconds to answer."""

    def __init__(
        self,
        size: int = 2,
        *,
        timeout: float = 5.0,
        wait: float = 5.0,
        cache_models: int = 64,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.size = size
        self.timeout = timeout
        self.wait = wait
        self.options = {"cache_models": cache_models}
        self.stats = PoolStats()
        self.on_event = on_event
        # Free children, and requests waiting for one in arrival order: a freed child goes to
        # the oldest waiter (a plain queue let a busy caller take it again and again while
        # another waited seconds).
        self._free: list[_Slot] = []
        self._waiters: deque[asyncio.Future[_Slot]] = deque()
        self._slots: set[_Slot] = set()
        self._quarantine: OrderedDict[bytes, str] = OrderedDict()
        self._recent_deaths: list[float] = []
        self._restarting: set[asyncio.Task[None]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        await asyncio.gather(*(self._spawn() for _ in range(self.size)))
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Stop a child that overran its deadline (one timer for the pool, not one per call):
        its call then fails as SandboxTimeout."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(min(0.1, self.timeout / 4))
            now = loop.time()
            for slot in list(self._slots):
                if slot.started and now - slot.started > self.timeout and not slot.overran:
                    slot.overran = True
                    slot.proc.process.kill()

    async def _spawn(self) -> None:
        proc = await asyncio.to_thread(_Process.start, self.options)
        proc.sock.setblocking(False)
        slot = _Slot(proc)
        await asyncio.get_running_loop().create_unix_connection(lambda: slot, sock=proc.sock)
        if self._closed:
            await asyncio.to_thread(proc.stop)
            return
        self._slots.add(slot)
        self._release(slot)

    def _release(self, slot: _Slot) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._free.append(slot)

    async def _acquire(self) -> _Slot:
        if self._free and not self._waiters:
            return self._free.pop()
        waiter: asyncio.Future[_Slot] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.wait):
                return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release(waiter.result())  # handed over just as this caller gave up
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _replace(self, slot: _Slot) -> str:
        """Kill a dead or stuck child and start another, later if children keep dying."""
        self._slots.discard(slot)
        slot.close()
        how = slot.proc.stop()
        now = time.monotonic()
        self._recent_deaths = [t for t in self._recent_deaths if now - t < 60] + [now]
        delay = min(10.0, 0.05 * 2 ** max(0, len(self._recent_deaths) - 2))
        self.stats.restarts += 1

        async def later() -> None:
            await asyncio.sleep(delay)
            while not self._closed:
                try:
                    await self._spawn()
                    return
                except Exception:
                    log.exception("could not start a ranking process; retrying")
                    await asyncio.sleep(1.0)

        if not self._closed:
            task = asyncio.get_running_loop().create_task(later())
            self._restarting.add(task)
            task.add_done_callback(self._restarting.discard)
        return how

    def _event(self, name: str) -> None:
        if self.on_event is not None:
            self.on_event(name)

    async def call(self, op: str, header: dict[str, Any], blob: bytes = b"") -> Any:
        frame = pack({"op": op, **header}, blob)
        if self._quarantine:  # hashing every request costs; only once something crashed
            seen = self._quarantine.get(_fingerprint(frame))
            if seen is not None:
                self.stats.refused += 1
                raise NativeCrash(seen)
        try:
            slot = await self._acquire()
        except TimeoutError:
            self.stats.busy += 1
            self._event("busy")
            raise SandboxBusy(f"no ranking process was free within {self.wait} s") from None
        try:
            reply, _ = await slot.call(frame)
        except (EOFError, OSError, SandboxError):
            how = self._replace(slot)
            if slot.overran:
                self.stats.timeouts += 1
                self._event("timeout")
                message = f"took longer than {self.timeout} s (the process was stopped)"
                self._remember(_fingerprint(frame), message)
                raise SandboxTimeout(message) from None
            self.stats.crashes += 1
            self._event("crash")
            message = f"Vowpal Wabbit crashed on it ({how})"
            self._remember(_fingerprint(frame), message)
            log.error("a ranking process died on a request: %s", how)
            raise NativeCrash(message) from None
        except BaseException:
            # Cancelled mid-exchange (the client went away): the child may still answer, so
            # the stream is out of step; replace it rather than reuse it.
            self._replace(slot)
            raise
        self._release(slot)
        return _answer(reply)

    def _remember(self, fingerprint: bytes, message: str) -> None:
        self._quarantine[fingerprint] = message
        while len(self._quarantine) > 4096:
            self._quarantine.popitem(last=False)

    @property
    def alive(self) -> int:
        return len(self._slots)

    async def close(self) -> None:
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for task in list(self._restarting):
            task.cancel()
        for waiter in self._waiters:
            waiter.cancel()
        slots, self._slots = list(self._slots), set()
        for slot in slots:
            slot.close()
        await asyncio.gather(*(asyncio.to_thread(s.proc.stop) for s in slots))

    # ---- the operations serving needs ----

    async def predict(self, loop: str, kind: str, model: ModelRef, text: bytes) -> list[float]:
        """The model's scores for one example (`--cb_explore_adf`: probabilities; `--cb_adf`:
        costs) by action; [] without a model, after parsing `text` all the same."""
        scores: list[float] = await self.call("predict", _model(loop, kind, model), text)
        return scores

    async def rank_slots(
        self, loop: str, model: ModelRef, c: dict[str, Any], allowed: list[list[int]], seed: str
    ) -> list[tuple[int, list[int], list[float]]]:
        """learners.ccb.CCBRanker.rank in a child (uniform per slot without a model)."""
        header = {**_model(loop, "ccb", model), "allowed": allowed, "seed": seed}
        decided = await self.call("rank_slots", header, orjson.dumps(c))
        return [(int(a), list(order), list(probs)) for a, order, probs in decided]

    async def explain(
        self,
        loop: str,
        kind: str,
        model: ModelRef,
        *,
        context: list[dict[str, Any]],
        actions: list[tuple[str, list[dict[str, Any]]]],
        eligible: list[bool],
        ids: list[str],
        epsilon: float,
    ) -> list[dict[str, Any]]:
        header = {
            **_model(loop, kind, model),
            "eligible": eligible,
            "ids": ids,
            "epsilon": epsilon,
        }
        payload = orjson.dumps({"context": context, "actions": actions})
        out: list[dict[str, Any]] = await self.call("explain", header, payload)
        return out


class InlineRankers(RankerPool):
    """RankerPool's operations in the serving process itself: no isolation (a VW crash takes
    the server down) and prediction on the event loop. `DLOOP_SANDBOX__RANKERS=0`; the
    benchmark compares it with the pool to show what the isolation costs."""

    def __init__(self, cache_models: int = 64) -> None:
        super().__init__(0, cache_models=cache_models)
        from learners.sandbox_host import Host

        self._host = Host(cache_models=cache_models)

    async def start(self) -> None:
        pass

    async def call(self, op: str, header: dict[str, Any], blob: bytes = b"") -> Any:
        try:
            value, _ = self._host.handle({"op": op, **header}, blob)
        except Exception as exc:
            raise RemoteError(type(exc).__name__, str(exc)) from None
        return value

    @property
    def alive(self) -> int:
        return 1

    async def close(self) -> None:
        pass


def _fingerprint(frame: bytes) -> bytes:
    return hashlib.blake2b(frame[_HEAD.size :], digest_size=16).digest()


def _model(loop: str, kind: str, model: ModelRef) -> dict[str, Any]:
    return {"loop": loop, "kind": kind, "model": [model.model_id, model.path]}


def write_model(directory: Path, loop: str, model_id: str, model: bytes, keep: int = 2) -> str:
    """Write a published model where ranking children load it from, atomically, and delete the
    loop's older files but the last `keep` (a request in flight may still name one)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{loop}-{model_id}.vw"
    tmp = directory / f".{loop}-{model_id}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(model)
    tmp.replace(path)
    older = sorted(
        (p for p in directory.glob(f"{loop}-*.vw") if p != path and p.stem[len(loop) + 1 :]),
        key=lambda p: p.stat().st_mtime,
    )
    for stale in older[: max(0, len(older) - (keep - 1))]:
        stale.unlink(missing_ok=True)
    return str(path)


# ---- learning: trainers that live in a child -----------------------------------------------------


class TrainerLost(SandboxError):
    """The child that held this trainer died (or was restarted): rebuild from a checkpoint."""


class TrainerHost:
    """The learning child of one worker thread and the trainers in it, by key (a loop)."""

    def __init__(self, *, nice: int = 10) -> None:
        self.child = Child(nice=nice)

    def open(
        self,
        key: str,
        *,
        kind: str,
        args: str,
        model: bytes | None = None,
        examples: int = 0,
        gamma: float = 0.99,
    ) -> RemoteTrainer:
        header = {"key": key, "kind": kind, "args": args, "examples": examples, "gamma": gamma}
        self.child.call("open", header, model or b"")
        return RemoteTrainer(self, key, args, examples, self.child.generation)

    def close(self) -> None:
        self.child.close()


class RemoteTrainer:
    """learners.cb.CBTrainer / learners.rl.RLTrainer living in a TrainerHost's child.

    `learn_lines` learns a batch and returns, per line VW refused, (index, message); a crash of
    the child raises NativeCrash and then TrainerLost on every later use."""

    def __init__(self, host: TrainerHost, key: str, args: str, examples: int, generation: int):
        self.host = host
        self.key = key
        self.args = args
        self.examples = examples
        self._generation = generation

    @property
    def lost(self) -> bool:
        """True once the child holding this trainer died (or was restarted since)."""
        return self.host.child.generation != self._generation or self.host.child._proc is None

    def _call(self, op: str, header: dict[str, Any], blob: bytes = b"") -> tuple[Any, bytes]:
        if self.lost:
            raise TrainerLost(f"the learning process of {self.key} was restarted")
        return self.host.child.call(op, {"key": self.key, **header}, blob)

    def learn_lines(self, lines: list[str]) -> list[tuple[int, str]]:
        if not lines:
            return []
        out, _ = self._call("learn", {}, "\n".join(lines).encode())
        self.examples = int(out["examples"])
        return [(int(i), str(m)) for i, m in out["errors"]]

    def learn_episodes(
        self, episodes: list[tuple[list[tuple[str, float, bool]], bool]], gamma: float
    ) -> list[tuple[int, str]]:
        """RL: learn complete episodes (steps of (line, reward, learnable), terminated)."""
        out, _ = self._call("learn_episodes", {"episodes": episodes, "gamma": gamma})
        self.examples = int(out["examples"])
        return [(int(i), str(m)) for i, m in out["errors"]]

    def to_bytes(self) -> bytes:
        _, model = self._call("save", {})
        return model

    def close(self) -> None:
        if not self.lost:
            self.host.child.call("close", {"key": self.key})


@dataclass
class Learned:
    """What `learn_in_turn` did with a batch of (position, line) items."""

    refused: list[tuple[int, str, str]]  # (position, line, why) VW refused: dead-letter them
    crashed: bool = False  # the learning process died: every trainer in it is lost
    poison: tuple[int, str, str] | None = None  # the line it died on, when that was learned alone
    careful_until: int = 0  # else: learn one line per call up to here, from the checkpoint


def learn_in_turn(
    trainer: RemoteTrainer, items: list[tuple[int, str]], careful_until: int = 0
) -> Learned:
    """Learn `items` (ascending positions): one call per line up to `careful_until` (after a
    crash, to find the line that did it), the rest in one call. A crash on a lone line names
    it; a crash on a batch says how far to go carefully next time. Either way the caller
    rebuilds its trainers from their checkpoints: what they learned since is gone."""
    chunks = [[item] for item in items if item[0] <= careful_until]
    rest = [item for item in items if item[0] > careful_until]
    if rest:
        chunks.append(rest)
    out = Learned([])
    for chunk in chunks:
        try:
            refused = trainer.learn_lines([line for _, line in chunk])
        except NativeCrash as exc:
            out.crashed = True
            if len(chunk) == 1:
                out.poison = (*chunk[0], f"native crash while learning: {exc}")
            else:
                out.careful_until = chunk[-1][0]
            return out
        out.refused += [(*chunk[i], f"Vowpal Wabbit refused it: {why}") for i, why in refused]
    return out
