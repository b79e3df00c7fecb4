"""Serving: a pool of long-lived ranking children the event loop talks to (RankerPool), or the
same operations in process (InlineRankers), and the model files they load."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from learners.sandbox.process import ChildProcess, answer
from learners.sandbox.protocol import (
    HEAD,
    NativeCrash,
    RemoteError,
    SandboxBusy,
    SandboxError,
    SandboxTimeout,
    frame_size,
    pack,
    unpack,
)

if TYPE_CHECKING:
    from learners.sandbox.host import Op

log = logging.getLogger("dloop.sandbox")


@dataclass(frozen=True)
class ModelRef:
    """A served model: its id and the file the serving process wrote it to (None: no model
    yet, rank uniformly; the request is still parsed, so nothing unparseable is logged)."""

    model_id: str
    path: str | None


NO_MODEL = ModelRef("N/A", None)


class _Displaced(SandboxError):
    """A call queued behind another on a child that died before reaching it: it did nothing
    wrong and is sent to another child."""


class _Slot(asyncio.Protocol):
    """One ranking child seen from the event loop: calls written to it in order (up to the
    pool's depth at once, so a busy child finds its next call waiting rather than sleeping
    between two), its answers matched to them in the same order as they arrive (a protocol
    rather than asyncio streams: fewer wake-ups per call)."""

    def __init__(self, proc: ChildProcess, on_lost: Callable[[_Slot], None]) -> None:
        self.proc = proc
        self.transport: Any = None  # asyncio's or uvloop's (not an asyncio.Transport subclass)
        self._buf = bytearray()
        self._calls: deque[asyncio.Future[tuple[dict[str, Any], bytes]]] = deque()
        self._on_lost = on_lost
        self._loop: asyncio.AbstractEventLoop | None = None
        self.held = 0  # calls the pool gave this child that have not come back to it
        self.started = 0.0  # the loop time the child began the oldest call it holds (0: idle)
        self.overran = False  # the watchdog stopped it for overrunning its deadline
        self.how: str | None = None  # how it ended, once it did

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= HEAD.size:
            head = bytes(self._buf[: HEAD.size])
            end = HEAD.size + frame_size(head)
            if len(self._buf) < end:
                return
            frame = unpack(head, bytes(self._buf[HEAD.size : end]))
            del self._buf[:end]
            waiter = self._calls.popleft() if self._calls else None
            # The child answers in order: it starts the next call now.
            self.started = self._loop.time() if self._calls and self._loop else 0.0
            if waiter is not None and not waiter.done():  # (done: its caller gave up)
                waiter.set_result(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        calls, self._calls = self._calls, deque()
        for i, waiter in enumerate(calls):
            if not waiter.done():
                # The oldest call is the one the child was working on when it ended.
                waiter.set_exception(
                    EOFError("the ranking process is gone") if i == 0 else _Displaced()
                )
        self._on_lost(self)

    async def call(self, frame: bytes) -> tuple[dict[str, Any], bytes]:
        assert self.transport is not None
        if self.transport.is_closing():
            raise _Displaced()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[tuple[dict[str, Any], bytes]] = loop.create_future()
        self._calls.append(waiter)
        if len(self._calls) == 1:
            self.started = loop.time()
        self.transport.write(frame)
        return await waiter

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
    """Serving's children. `call` takes the child holding the fewest calls, if one holds fewer
    than `depth` (else it waits its turn, up to `wait` seconds: then SandboxBusy), sends the
    call, and gives the child `timeout` seconds to answer it once it starts on it."""

    def __init__(
        self,
        size: int = 2,
        *,
        timeout: float = 5.0,
        wait: float = 5.0,
        cache_models: int = 64,
        on_event: Callable[[str], None] | None = None,
        ops: Mapping[str, Op] | None = None,
        depth: int = 1,
    ) -> None:
        self.size = size
        self.depth = max(1, depth)
        self.timeout = timeout
        self.wait = wait
        # `ops`: operations the owner adds to its children's (learners.sandbox.host.Op).
        self.options: dict[str, Any] = {"cache_models": cache_models, "ops": dict(ops or {})}
        self.stats = PoolStats()
        self.on_event = on_event
        # Requests waiting for a child in arrival order with the loop time they give up at: a
        # child that can take a call goes to the oldest waiter (a plain queue let a busy caller
        # take it again and again while another waited seconds). The watchdog ends overdue
        # waits (a timer per wait cost a rank ~6 us).
        self._waiters: deque[tuple[float, asyncio.Future[_Slot]]] = deque()
        self._slots: set[_Slot] = set()
        self._quarantine: OrderedDict[bytes, str] = OrderedDict()
        self._recent_deaths: list[float] = []
        self._restarting: set[asyncio.Task[None]] = set()
        self._stopping: set[asyncio.Task[None]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the one the children talk to

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.gather(*(self._spawn() for _ in range(self.size)))
        self._watchdog = self._loop.create_task(self._watch())

    async def _watch(self) -> None:
        """Stop a child that overran its deadline, and end the waits for a free child that
        overran theirs (one timer for the pool, not one per call): the call then fails as
        SandboxTimeout, the wait as SandboxBusy."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(min(0.1, self.timeout / 4, self.wait / 4))
            now = loop.time()
            for slot in list(self._slots):
                if slot.started and now - slot.started > self.timeout and not slot.overran:
                    slot.overran = True
                    slot.proc.process.kill()
            for deadline, waiter in self._waiters:
                if deadline > now:
                    break  # in arrival order, so in deadline order
                if not waiter.done():
                    waiter.set_exception(TimeoutError())

    async def _spawn(self) -> None:
        # A child being started when the pool closes (or the start is cancelled) is still
        # started by its thread: it is stopped once started (_discard), rather than left with
        # its socket to the garbage collector.
        starting = asyncio.ensure_future(asyncio.to_thread(ChildProcess.start, self.options))
        try:
            proc = await asyncio.shield(starting)
        except asyncio.CancelledError:
            self._discard(starting)
            raise
        slot = _Slot(proc, self._lost)
        try:
            proc.sock.setblocking(False)
            await asyncio.get_running_loop().create_unix_connection(lambda: slot, sock=proc.sock)
        except BaseException:
            slot.close()
            self._discard(starting)
            raise
        if self._closed:
            slot.close()
            self._discard(starting)
            return
        self._slots.add(slot)
        self._offer(slot)

    def _discard(self, starting: asyncio.Future[ChildProcess]) -> None:
        """Stop the child `starting` brings once it is started, in a task of the pool's that
        `close` waits for. (Waiting for it in the cancelled caller left it running when the
        caller was cancelled again meanwhile, as asyncio.run does to the tasks left at its
        end: 1 run in 5 on a busy machine.)"""

        async def stop() -> None:
            with contextlib.suppress(Exception):
                proc = await starting
                await asyncio.to_thread(proc.stop)

        task = asyncio.get_running_loop().create_task(stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _offer(self, slot: _Slot) -> None:
        """Hand `slot` to the oldest waiters while it can take more calls."""
        while self._waiters and slot.held < self.depth:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                slot.held += 1
                waiter.set_result(slot)

    def _release(self, slot: _Slot) -> None:
        slot.held -= 1
        if slot in self._slots:
            self._offer(slot)

    def _pick(self) -> _Slot | None:
        best: _Slot | None = None
        for slot in self._slots:
            if slot.held < self.depth and (best is None or slot.held < best.held):
                best = slot
        return best

    @property
    def idle(self) -> int:
        """Children holding no call."""
        return sum(1 for s in self._slots if not s.held)

    async def _acquire(self) -> _Slot:
        if not self._waiters:
            slot = self._pick()
            if slot is not None:
                slot.held += 1
                return slot
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[_Slot] = loop.create_future()
        entry = (loop.time() + self.wait, waiter)
        self._waiters.append(entry)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())  # handed over just as this caller gave up
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
            raise

    def _lost(self, slot: _Slot) -> None:
        """A child's connection closed: replace it (once), whoever notices first."""
        if not self._closed:
            self._drop(slot)

    def _drop(self, slot: _Slot) -> str:
        if slot.how is None:
            slot.how = self._replace(slot)
        return slot.how

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
        """The child's answer to operation `op`."""
        value, _ = await self.exchange(op, header, blob)
        return value

    async def exchange(
        self, op: str, header: dict[str, Any], blob: bytes = b""
    ) -> tuple[Any, bytes]:
        """The child's answer to operation `op` and the blob it sent with it."""
        if self._loop is not None and asyncio.get_running_loop() is not self._loop:
            # A caller in another event loop (a test client's, say): the children's answers
            # arrive in the pool's loop, so the call is made there.
            future = asyncio.run_coroutine_threadsafe(self.exchange(op, header, blob), self._loop)
            return await asyncio.wrap_future(future)
        frame = pack({"op": op, **header}, blob)
        if self._quarantine:  # hashing every request costs; only once something crashed
            seen = self._quarantine.get(_fingerprint(op, blob))
            if seen is not None:
                self.stats.refused += 1
                raise NativeCrash(seen)
        for _ in range(3):
            try:
                slot = await self._acquire()
            except TimeoutError:
                self.stats.busy += 1
                self._event("busy")
                raise SandboxBusy(f"no ranking process was free within {self.wait} s") from None
            try:
                return await self._exchange(slot, op, blob, frame)
            except _Displaced:
                continue  # its child died on an earlier call: another child takes it
        self.stats.busy += 1
        raise SandboxBusy("the ranking processes kept failing before reaching the call")

    async def _exchange(self, slot: _Slot, op: str, blob: bytes, frame: bytes) -> tuple[Any, bytes]:
        try:
            reply, out = await slot.call(frame)
        except _Displaced:
            self._drop(slot)
            self._release(slot)
            raise
        except (EOFError, OSError, SandboxError):
            how = self._drop(slot)
            self._release(slot)
            if slot.overran:
                self.stats.timeouts += 1
                self._event("timeout")
                message = f"took longer than {self.timeout} s (the process was stopped)"
                # Not remembered, as a crash is: a busy machine misses deadlines too, and the
                # same request again (a retry; any identical request without an eventId) must
                # be ranked, not refused for good. A costly request costs a restart each time.
                raise SandboxTimeout(message) from None
            self.stats.crashes += 1
            self._event("crash")
            message = f"Vowpal Wabbit crashed on it ({how})"
            self._remember(_fingerprint(op, blob), message)
            log.error("a ranking process died on a request: %s", how)
            raise NativeCrash(message) from None
        except BaseException:
            # Cancelled (the client went away): the child still answers the call, which the
            # slot then drops; the calls after it keep their places.
            self._release(slot)
            raise
        self._release(slot)
        return answer(reply), out

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
        restarting = list(self._restarting)
        for task in restarting:
            task.cancel()
        await asyncio.gather(*restarting, return_exceptions=True)
        for _, waiter in self._waiters:
            waiter.cancel()
        slots, self._slots = list(self._slots), set()
        for slot in slots:
            slot.close()
        await asyncio.gather(
            *(asyncio.to_thread(s.proc.stop) for s in slots),
            *list(self._stopping),
            return_exceptions=True,
        )

    # ---- VW's own prediction (serving ranks through its owner's `rank` operation) ----

    async def predict(self, loop: str, kind: str, model: ModelRef, text: bytes) -> list[float]:
        """The model's scores for one example (`--cb_explore_adf`: probabilities; `--cb_adf`:
        costs) by action; [] without a model, after parsing `text` all the same."""
        scores: list[float] = await self.call("predict", _model(loop, kind, model), text)
        return scores


class InlineRankers(RankerPool):
    """RankerPool's operations in the serving process itself: no isolation (a VW crash takes
    the server down) and prediction on the event loop. `DLOOP_SANDBOX__RANKERS=0`; the
    benchmark compares it with the pool to show what the isolation costs."""

    def __init__(self, cache_models: int = 64, ops: Mapping[str, Op] | None = None) -> None:
        super().__init__(0, cache_models=cache_models, ops=ops)
        from learners.sandbox.host import Host

        self._host = Host(cache_models=cache_models, ops=ops)

    async def start(self) -> None:
        pass

    async def exchange(
        self, op: str, header: dict[str, Any], blob: bytes = b""
    ) -> tuple[Any, bytes]:
        try:
            return self._host.handle({"op": op, **header}, blob)
        except Exception as exc:
            raise RemoteError(type(exc).__name__, str(exc)[:4000]) from None

    @property
    def alive(self) -> int:
        return 1

    async def close(self) -> None:
        pass


def _fingerprint(op: str, blob: bytes) -> bytes:
    """What a call that crashed a child is remembered by: its operation and input (not its
    header, which may hold the time or a seed, so a repeat is still recognised)."""
    return hashlib.blake2b(op.encode() + b"\0" + blob, digest_size=16).digest()


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
