"""Rank in the application's own process (issue 16): a loop's served model, kept current, the
server's own rank rules, and the decisions shipped to the server in batches.

    from service.local import LocalRanker

    ranker = LocalRanker("http://dloop:8000", key="<client key>", loop="news")
    out = ranker.rank({"contextFeatures": [...], "actions": [...]})   # as POST .../rank answers
    ranker.reward(out["eventId"], 1.0)

`rank` is service.core.ranks.rank, the code the server's ranking processes run for a rank: the
server's checks (the same errors, codes and messages, as service.core.errors.ApiError), the
model asked in this process (learners.sandbox.host.Host) and the server's decision rules
(service.core.ranking: exclusions, the eventId-seeded draw, apprentice and logging-only modes,
the live holdout and a guardrail's fallback, serving-time constraints), so for the same model
and request it answers what the server would. Each decision, reward, activation and set of
outcomes becomes a log record (service.core.record) shipped in batches to `POST
.../local/records` (by `Poster`, light on the interpreter lock, on plain http; or, given
`kafka`, straight to the events topic), joined, learned, evaluated and shown like the server's
own; records not yet shipped wait in memory (`Pending`, at most `max_pending` bytes: beyond,
the oldest batches are dropped and counted in `dropped`), and when the server is away they move
to a buffer directory (`buffer_dir`, one per loop; at most `max_buffer` bytes, the oldest
dropped and counted beyond), shipped first and in order when it is back, after a restart of the
application too. Records the server refuses as such it keeps in its dead letters, and takes the
rest of their batch; they are counted here (`refused`).

The model and settings are refreshed in the background: a long poll on `GET .../local/model`
learns of a new model within a second of its publication, and the new model replaces the old
one atomically (a rank uses one model from start to end). Thread-safe: VW workspaces are not,
so each thread that ranks has its own (benchmarks/local.py weighs it against one lock).

Exposure caps count across the fleet that ships to one server: each batch's answer says which
capped actions are at or over their cap by the server's counts (its own ranks and every
ranker's shipped decisions), and a rank caps by those and by this process's own counts. (Shipped
straight to Kafka, or when the server's word is older than FLEET_FRESH seconds, a process caps
by its own counts only; each serving process counts its own too.)
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import select
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from learners.constraints import Cap, ExposureCaps
from learners.features import FeatureLimits
from learners.outcomes import REWARD, OutcomeRule, RewardRules
from learners.sandbox import NO_MODEL, ModelRef, write_model
from learners.sandbox.host import Host
from service.core import ranking, ranks, record
from service.core.errors import ApiError, bad_request
from service.core.producing import PRODUCER_OPTIONS, send_all
from service.core.requests import (
    ID_RULE,
    check_event_id,
    checked_outcomes,
    is_id,
    is_reward,
    multi_slot_only,
    single_slot_only,
    slot_outcomes,
    slot_rewards,
)

# How long the server's word on which actions are at their exposure cap holds (it comes with
# each shipped batch, every `ship_every` seconds while this process ranks).
FLEET_FRESH = 10.0

# Ranks whose records wait to be written (LocalRanker._write): the shipping thread writes them
# every WRITE_EVERY seconds, WRITE_CHUNK at a time; a rank finding MADE_MAX waiting (no
# shipping thread, or one held up) writes them itself.
WRITE_EVERY = 0.05
WRITE_CHUNK = 64
MADE_MAX = 4096


def _count(batch: bytes) -> int:
    return batch.count(b"\n") + 1 if batch else 0


log = logging.getLogger(__name__)


# Seconds a long poll for a new model may wait (the server answers as soon as one is served).
# Short, because closing the ranker cannot abort a poll in flight (httpx has no way to), so the
# server, which waits for its requests when it stops, waited for it: 20 s made every shutdown
# of a server with rankers attached (and a test's teardown) take 20 s; a poll every 5 s is
# nothing to it.
FOLLOW_WAIT = 5.0


class Pending:
    """Records not shipped yet, newline-separated in batches of at most `batch_bytes` (a record
    longer than that is a batch of its own), oldest first; at most `max_bytes` of them (beyond,
    the oldest batches are dropped and counted in `dropped`). The batches' buffers are reused
    once shipped: a record kept in fresh memory costs a rank about 3 us more (1.6 KB of pages
    the allocator had given back to the system, faulted in again), and a batch is written
    ready to send, never joined. Not thread-safe: LocalRanker holds a lock around it."""

    def __init__(self, batch_bytes: int, max_bytes: int) -> None:
        self.batch_bytes = batch_bytes
        self.max_bytes = max_bytes
        # Buffers kept for reuse: as many as the most records ever pending took (at most
        # max_bytes' worth), so a steady load allocates nothing.
        self.spare = max(1, max_bytes // batch_bytes)
        self._sealed: deque[tuple[bytearray, int, int]] = deque()  # (buffer, bytes, records)
        self._spare: list[bytearray] = []
        self._buf = bytearray(batch_bytes)
        self._used = 0
        self._count = 0
        self._sending: tuple[bytearray, int, int] | None = None
        self.records = 0
        self.bytes = 0
        self.dropped = 0

    def add(self, raw: bytes) -> None:
        n = len(raw) + 1
        if self._used + n > len(self._buf):
            self._seal()
            if n > len(self._buf):
                self._buf = bytearray(n)
        at = self._used
        self._buf[at : at + n - 1] = raw
        self._buf[at + n - 1] = 10  # b"\n"
        self._used = at + n
        self._count += 1
        self.records += 1
        self.bytes += n
        while self.bytes > self.max_bytes and self._sealed:
            buf, size, count = self._sealed.popleft()
            self._forget(size, count)
            self.dropped += count
            self._recycle(buf)

    def _seal(self) -> None:
        if self._count:
            self._sealed.append((self._buf, self._used, self._count))
            self._buf = self._spare.pop() if self._spare else bytearray(self.batch_bytes)
            self._used = self._count = 0

    def _forget(self, size: int, count: int) -> None:
        self.records -= count
        self.bytes -= size

    def _recycle(self, buf: bytearray) -> None:
        if len(buf) == self.batch_bytes and len(self._spare) < self.spare:
            self._spare.append(buf)

    def take(self) -> tuple[memoryview, int] | None:
        """The oldest batch (its bytes, without the last newline, and its record count), now
        being sent: `done` when it was, `untake` when it was not; None if nothing is pending."""
        assert self._sending is None, "a batch is already being sent"
        if not self._sealed:
            self._seal()
        if not self._sealed:
            return None
        self._sending = self._sealed.popleft()
        buf, size, count = self._sending
        return memoryview(buf)[: size - 1], count

    def done(self) -> None:
        assert self._sending is not None
        buf, size, count = self._sending
        self._sending = None
        self._forget(size, count)
        self._recycle(buf)

    def untake(self) -> None:
        """The batch `take` gave was not sent: it is the oldest again."""
        assert self._sending is not None
        self._sealed.appendleft(self._sending)
        self._sending = None


class LocalRanker:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        key: str,
        loop: str | None = None,
        http: Any = None,
        timeout: float = 10.0,
        background: bool = True,
        ship_every: float = 0.5,
        batch_bytes: int = 192 * 1024,
        max_pending: int = 64 << 20,
        buffer_dir: str | Path | None = None,
        max_buffer: int = 1 << 30,
        kafka: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._http = http if http is not None else httpx.Client(base_url=url, timeout=timeout)
        self._owns = http is None
        # Batches go out over a plain keep-alive connection where that is all it takes (Poster).
        self._poster = Poster.for_url(url, timeout) if http is None else None
        # The long poll has a connection of its own, closed by `close`; a poll already in
        # flight is not aborted by that (httpx cannot), FOLLOW_WAIT bounds it.
        self._poll = http if http is not None else httpx.Client(base_url=url, timeout=timeout)
        self._headers = {"Ocp-Apim-Subscription-Key": key}
        prefix = f"/loops/{loop}" if loop else ""
        self._base = f"{prefix}/personalizer/v1.0"
        self.clock = clock
        self._dir = tempfile.TemporaryDirectory(prefix="dloop-local-")
        # Records the server could not take wait here, in files of one batch each, shipped
        # first and in order when it is back (given a directory, across restarts too).
        self._buffer = Path(buffer_dir) if buffer_dir is not None else Path(self._dir.name) / "b"
        self._buffer.mkdir(parents=True, exist_ok=True)
        try:
            self._lock_file = _hold(self._buffer, timeout)
        except RuntimeError:
            self._dir.cleanup()
            raise
        self.max_buffer = max_buffer
        # The batch files, oldest first, with their record counts (read once, here).
        self._buffered: list[tuple[Path, int]] = []
        for path in sorted(self._buffer.glob("*.ndjson")):
            if _BATCH_NAME.fullmatch(path.name):
                self._buffered.append((path, _count(path.read_bytes().strip())))
        self._next_file = int(self._buffered[-1][0].stem) + 1 if self._buffered else 0
        # The production path: records straight to the events topic (`dloop join` takes them
        # from there), {"bootstrap_servers": ..., "topic": "<prefix>.events", ...producer
        # options}; kafka-python is the `kafka` extra, imported only then.
        self._kafka_config = dict(kafka) if kafka is not None else None
        self._producer: Any = None
        self._away: tuple[type[BaseException], ...] = (httpx.HTTPError,)
        if kafka is not None:
            from kafka.errors import KafkaError

            self._away = (httpx.HTTPError, KafkaError)
        # What keeps a batch from shipping now: the server away, or answering an error.
        self._unshipped: tuple[type[BaseException], ...] = (*self._away, ApiError)
        # One VW host (its workspaces) per thread that ranks: a workspace is not thread-safe,
        # and per-thread workspaces never wait on each other (benchmarks/local.py weighs them
        # against one behind a lock: as fast with one or two threads, faster with four).
        self._hosts = threading.local()
        # What the ranks and observations made, in order, not yet written as records: a rank
        # hands its decision over (a deque's append, no lock) and the shipping thread writes
        # it into `_pending` (`_write`), so its log record's encoding is not in the rank's time.
        self._made: deque[ranks.Ranked | ranks.RankedSlots | bytes] = deque()
        self._pending = Pending(batch_bytes, max_pending)
        self._pending_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._ship_lock = threading.Lock()
        self._dropped_files = 0  # records dropped because the buffer directory was full
        self._too_large_records = 0  # records dropped because the server can never take them
        self._closed = False
        self.shipped = 0
        self.refused = 0  # records the server refused as such, in its dead letters (`_ship`)
        # Why, for the last of them the server's answers named (an answer names its first ten).
        self.last_refusal: str | None = None
        self.served: ModelRef = NO_MODEL
        self.exposure: ExposureCaps | None = None
        self._caps: tuple[Cap, ...] = ()
        # The server's capped actions at or over their cap, and when it said so.
        self._fleet: tuple[dict[str, float], float] = ({}, 0.0)
        self.refresh()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        if background:
            for target, name in ((self._follow, "model"), (self._ship_loop, "ship")):
                thread = threading.Thread(
                    target=target, args=(ship_every,), name=f"dloop-local-{name}", daemon=True
                )
                thread.start()
                self._threads.append(thread)

    # ---- the server's state -----------------------------------------------------------------

    def _get(self, path: str, **kw: Any) -> httpx.Response:
        r: httpx.Response = self._http.get(f"{self._base}{path}", headers=self._headers, **kw)
        if r.status_code >= 400 and r.status_code != 304:
            raise ApiError(r.status_code, *_error(r))
        return r

    def refresh(self, *, wait: float = 0.0) -> bool:
        """Read the loop's settings and, if it changed, its model (waiting up to `wait`
        seconds for a new one); True if the model changed."""
        doc = self._get("/local/settings").json()
        if doc["kind"] not in ("cb", "ccb", "rl"):
            raise ValueError(f"LocalRanker ranks loops of kind cb, ccb and rl, not {doc['kind']}")
        self.serving = ranking.Serving.from_doc(doc)
        caps = tuple(
            Cap(c["actionId"], c["maxShare"], c["windowSeconds"]) for c in doc["exposureCaps"]
        )
        if caps != self._caps:
            self._caps, self.exposure = caps, ExposureCaps(caps) if caps else None
            self._fleet = ({}, 0.0)
        self.rules = RewardRules(
            0.0,
            {
                o["name"]: OutcomeRule(o["name"], "earliest", o["min"], o["max"])
                for o in doc["outcomes"]
            },
        )
        self.max_actions = int(doc["maxActions"])
        lim = doc["limits"]
        self.limits = FeatureLimits(
            lim["maxFeatures"], lim["maxNamespaceFeatures"], lim["maxDepth"]
        )
        if doc["modelId"] == self.served.model_id and not wait:
            return False
        return self._fetch_model(wait)

    def _fetch_model(self, wait: float) -> bool:
        headers = {**self._headers, "If-None-Match": f'"{self.served.model_id}"'}
        extra: dict[str, Any] = {"params": {"wait": wait}, "timeout": wait + 10} if wait else {}
        r = (self._poll if wait else self._http).get(
            f"{self._base}/local/model", headers=headers, **extra
        )
        if r.status_code == 304 or self._closed:  # (a poll that outlived `close`: dropped)
            return False
        if r.status_code >= 400:
            raise ApiError(r.status_code, *_error(r))
        model_id = r.headers["X-Dloop-Model-Id"]
        if r.status_code == 204:
            self.served = NO_MODEL
            return True
        # VW is never handed bytes that are not the server's model (VW loads a damaged model
        # without a word and serves it, or could crash the application's process reading it).
        # A server older than the check sends no digest: its models load unchecked.
        digest = r.headers.get("X-Dloop-Model-Sha256")
        if digest is not None and digest != hashlib.sha256(r.content).hexdigest():
            raise ApiError(
                502,
                "ModelChecksumMismatch",
                f"model {model_id}: {len(r.content)} bytes whose SHA-256 is not the server's; "
                "the ranker keeps its model and fetches it again",
            )
        # One writer at a time (`refresh` in the application's thread and the follower may
        # fetch the same model: both would write its file at once); the two models before it
        # stay on disk for a rank that read `served` just before a swap.
        with self._model_lock:
            path = write_model(Path(self._dir.name), self.serving.loop, model_id, r.content, keep=3)
            self.served = ModelRef(model_id, path)  # swapped whole: a rank reads it once
        return True

    def _follow(self, every: float) -> None:
        """Keep the model current: a long poll answers as soon as a new model is served."""
        while not self._stop.is_set():
            try:
                if self._fetch_model(wait=FOLLOW_WAIT):
                    self.refresh()
            except (httpx.HTTPError, ApiError):
                self._stop.wait(every)  # the server is away: try again shortly
            except Exception:  # (a full disk, say): the thread must outlive it
                log.exception("following the model failed; trying again in %s s", every)
                self._stop.wait(every)

    # ---- ranking ------------------------------------------------------------------------------

    def _host(self) -> Host:
        host: Host | None = getattr(self._hosts, "host", None)
        if host is None:
            host = self._hosts.host = Host(cache_models=1)
        return host

    def _on_host(self, s: ranking.Serving) -> tuple[ranks.Predict, ranks.Explain, ranks.Fill]:
        """This thread's model calls (ranks.on_host) for the loop's settings `s`."""
        made: tuple[ranking.Serving, tuple[ranks.Predict, ranks.Explain, ranks.Fill]] | None
        made = getattr(self._hosts, "calls", None)
        if made is None or made[0] is not s:
            made = self._hosts.calls = (s, ranks.on_host(self._host(), s))
        return made[1]

    def _over(self, now: float) -> dict[str, float] | None:
        """The capped actions at or over their cap: by this process's own counts, and by the
        server's (its ranks and every ranker's shipped decisions) as its last answer to a batch
        said, if that is at most FLEET_FRESH seconds old."""
        if self.exposure is None:
            return None
        over = self.exposure.over(now)
        fleet, at = self._fleet
        if fleet and now - at <= FLEET_FRESH:
            over = {**fleet, **over}
        return over

    def _common(self, now: float) -> dict[str, Any]:
        """What both kinds of rank (service.core.ranks) take of this ranker: the loop's limits
        and the served model."""
        return {
            "max_actions": self.max_actions,
            "limits": self.limits,
            "served": self.served,
            "now": now,
        }

    def rank(self, body: Any) -> dict[str, Any]:
        """What `POST .../rank` answers for `body` (ApiError for what it refuses)."""
        now, exposure, s = self.clock(), self.exposure, self.serving
        predict, explain, _ = self._on_host(s)
        ranked = ranks.rank(
            s, body, predict=predict, explain=explain, over=self._over(now), **self._common(now)
        )
        self._queue(ranked)
        if exposure is not None and s.mode == "Online":
            exposure.record(ranked.chosen, now)
        return ranked.document()

    def rank_multi_slot(self, body: Any) -> dict[str, Any]:
        """What `POST .../multislot/rank` answers for `body` (ApiError for what it refuses)."""
        s = self.serving
        _, _, fill = self._on_host(s)
        ranked = ranks.rank_slots(s, body, fill=fill, **self._common(self.clock()))
        self._queue(ranked)
        return ranked.document()

    # ---- observations -------------------------------------------------------------------------

    def _observe(
        self,
        kind: str,
        event_id: str,
        value: float | None,
        name: str | None = None,
        slot: str | None = None,
    ) -> None:
        r = record.Observation(
            kind, self.serving.loop, event_id, self.clock(), uuid.uuid4().hex, value, slot, name
        )
        self._queue(record.encode(r))

    def reward(self, event_id: str, value: float) -> None:
        single_slot_only(self.serving.kind == "ccb", "InvalidRewardRequest")
        check_event_id(event_id, "InvalidRewardRequest")
        if not is_reward(value):
            raise bad_request(
                "InvalidRewardRequest", "value must be a finite number between -1 and 1"
            )
        self._observe(record.REWARD, event_id, float(value))

    def activate(self, event_id: str) -> None:
        check_event_id(event_id, "InvalidEventIdToActivate")
        self._observe(record.ACTIVATION, event_id, None)

    def outcomes(self, event_id: str, values: dict[str, float]) -> None:
        """Named outcomes, checked against the loop's outcomes as the server checks them."""
        single_slot_only(self.serving.kind == "ccb", "InvalidOutcomeRequest")
        check_event_id(event_id, "InvalidOutcomeRequest")
        for name, value in checked_outcomes(self.rules, values).items():
            self._observe(record.REWARD, event_id, value, None if name == REWARD else name)

    def reward_multi_slot(self, event_id: str, body: Any) -> None:
        """What `POST .../multislot/events/{eventId}/reward` does with `body`,
        `{"reward": [{"slotId", "value"}]}` (a slot's rewards may come in several calls)."""
        multi_slot_only(self.serving.kind == "ccb", self.serving.loop)
        check_event_id(event_id, "InvalidRewardRequest")
        for slot, value in slot_rewards(body):
            self._observe(record.REWARD, event_id, value, slot=slot)

    def outcomes_multi_slot(self, event_id: str, body: Any) -> None:
        """What `POST .../multislot/events/{eventId}/outcomes` does with `body`,
        `{"outcomes": [{"slotId", "outcomes": {"click": 1, ...}}]}`."""
        multi_slot_only(self.serving.kind == "ccb", self.serving.loop)
        check_event_id(event_id, "InvalidOutcomeRequest")
        for slot, values in slot_outcomes(self.rules, body):
            for name, value in values.items():
                self._observe(
                    record.REWARD, event_id, value, None if name == REWARD else name, slot
                )

    def end_episode(self, episode_id: str, *, terminated: bool = True) -> None:
        """What `POST .../episodes/{episodeId}/end` does (RL loops): `terminated=False` for an
        episode cut by a time limit rather than ended by the task."""
        if not self.serving.episodic:
            raise bad_request("InvalidRequest", "episodes exist only in loops of kind rl")
        if not is_id(episode_id):
            raise bad_request("InvalidRequest", f"episodeId must be {ID_RULE}")
        if not isinstance(terminated, bool):
            raise bad_request("InvalidRequest", 'body must be {"terminated": true|false}')
        end = record.EpisodeEnd(self.serving.loop, episode_id, self.clock(), terminated)
        self._queue(record.encode(end))

    # ---- shipping -----------------------------------------------------------------------------

    def _queue(self, made: ranks.Ranked | ranks.RankedSlots | bytes) -> None:
        """Keep a rank (its records written later, `_write`) or a record, in order."""
        if self._closed:
            raise RuntimeError("this LocalRanker is closed: its records would never ship")
        self._made.append(made)
        if len(self._made) >= MADE_MAX:  # (the shipping thread writes them sooner)
            self._write()

    def _write(self, *, chunk: int = 1 << 30) -> None:
        """Write what was made into `_pending`, oldest first, `chunk` at a time: between two
        chunks other threads get the interpreter lock (the shipping thread's writing must not
        hold up a rank for long)."""
        made = self._made
        while made:
            with self._pending_lock:
                add = self._pending.add
                for _ in range(chunk):
                    try:
                        item = made.popleft()
                    except IndexError:
                        break
                    if isinstance(item, bytes):
                        add(item)
                    else:
                        for raw in item.records():
                            add(raw)
            if made:
                time.sleep(0)

    @property
    def pending(self) -> int:
        """Records not shipped yet: in memory, and in the buffer directory."""
        self._write()
        on_disk = sum(count for _, count in list(self._buffered))
        return self._pending.records + on_disk

    @property
    def dropped(self) -> int:
        """Records dropped: beyond max_pending bytes in memory, or max_buffer on disk, or one
        alone larger than the server takes in a request (`_too_large`), or left in the
        temporary buffer directory by `close` (no `buffer_dir`, the server away)."""
        return self._pending.dropped + self._dropped_files + self._too_large_records

    def flush(self) -> int:
        """Ship every pending record, in order (the buffer directory's first), in batches;
        returns how many the server took. When the server is away (a connection error or a
        timeout: httpx.HTTPError, raised) or answers a batch with an error (a key it does not
        know, a loop it does not have, its own failure: ApiError, raised), that batch and
        what is in memory move to the buffer directory, pending, first in line. Records it
        refuses as such (an outcome no longer configured, say) it keeps in its dead letters,
        never in the way of the others (`_ship`)."""
        shipped = 0
        self._write()
        with self._ship_lock:
            try:
                while self._buffered:
                    path, _ = self._buffered[0]
                    # (A file a crash left empty, or cut short, holds what it holds.)
                    batch = path.read_bytes().strip()
                    took = self._ship(batch, _count(batch)) if batch else 0
                    path.unlink()
                    self._buffered.pop(0)
                    shipped += took
                    self.shipped += took
                while True:
                    with self._pending_lock:
                        taken = self._pending.take()
                    if taken is None:
                        return shipped
                    view, count = taken
                    try:
                        took = self._ship(view, count)
                    except BaseException:
                        with self._pending_lock:
                            self._pending.untake()
                        raise
                    del view  # its buffer is written again once done
                    with self._pending_lock:
                        self._pending.done()
                    shipped += took
                    self.shipped += took
            except self._unshipped:
                self._spill()
                raise

    def _ship(self, batch: bytes | memoryview, count: int) -> int:
        """Send one batch (`count` records separated by newlines); how many of them were taken.
        To the server, which keeps the records it refuses as such in its dead letters (an
        outcome an admin has since removed from the loop, say: no retry would change that)
        and takes the rest: they are counted in `refused`, the last reason the answer gives in
        `last_refusal`.
        Or (given `kafka`) to the events topic, keyed as the server's publisher keys them,
        returning once the broker acknowledged every record."""
        if self._kafka_config is None:
            return self._post(batch, count)
        records = bytes(batch).split(b"\n")
        if self._producer is None:
            from kafka import KafkaProducer

            config = {k: v for k, v in self._kafka_config.items() if k != "topic"}
            self._producer = KafkaProducer(**{**PRODUCER_OPTIONS, **config})
        keyed = [(record.partition_key(raw), raw) for raw in records]
        send_all(self._producer, self._kafka_config["topic"], keyed, timeout=30)
        return count

    def _post(self, batch: bytes | memoryview, count: int) -> int:
        path = f"{self._base}/local/records"
        headers = {**self._headers, "Content-Type": "application/x-ndjson"}
        if self._poster is not None:
            status, body = self._poster.post(path, batch, headers)
        else:
            r = self._http.post(path, content=bytes(batch), headers=headers)
            status, body = r.status_code, r.content
        if status == 413:
            return self._too_large(batch, count, _error_of(status, body)[1])
        if status != 202:
            raise ApiError(status, *_error_of(status, body))
        answer = orjson.loads(body)
        over = answer.get("exposureOver")
        if isinstance(over, dict):
            self._fleet = (over, self.clock())
        dead = int(answer.get("deadLettered", 0))
        if dead:
            self.refused += dead
            self.last_refusal = answer["refusals"][-1]
        return count - dead

    def _too_large(self, batch: bytes | memoryview, count: int, why: str) -> int:
        """A batch over the server's body limit: its records are sent one by one (a server
        whose limit is below this ranker's batches). A record alone over it can never be taken
        (a server configured to take less than the requests it ranks): dropped, counted in
        `dropped`, the reason in `last_refusal` and the log, so it holds up nothing behind it."""
        if count > 1:
            return sum(self._post(raw, 1) for raw in bytes(batch).split(b"\n"))
        self._too_large_records += 1
        self.last_refusal = f"a record of {len(batch)} bytes: {why}"
        log.warning("dropped %s", self.last_refusal)
        return 0

    def _spill(self) -> None:
        """Move the records in memory to the buffer directory (one file per batch, written
        whole before it counts), dropping the oldest files beyond max_buffer bytes."""
        self._write()
        with self._pending_lock:
            while (taken := self._pending.take()) is not None:
                view, count = taken
                path = self._buffer / f"{self._next_file:012d}.ndjson"
                self._next_file += 1
                part = path.with_suffix(".part")
                try:
                    _write_whole(part, view)
                except BaseException:
                    self._pending.untake()
                    raise
                del view
                part.replace(path)
                self._buffered.append((path, count))
                self._pending.done()
        sizes = [p.stat().st_size for p, _ in self._buffered]
        total = sum(sizes)
        while total > self.max_buffer and len(self._buffered) > 1:
            oldest, count = self._buffered.pop(0)
            total -= sizes.pop(0)
            self._dropped_files += count
            oldest.unlink()

    def _ship_loop(self, every: float) -> None:
        """Write what the ranks made every WRITE_EVERY seconds, ship every `every`."""
        shipped = time.monotonic()
        while not self._stop.wait(min(every, WRITE_EVERY)):
            self._write(chunk=WRITE_CHUNK)
            if time.monotonic() - shipped >= every:
                shipped = time.monotonic()
                try:
                    self.flush()
                except self._unshipped:
                    pass  # pending, on disk: shipped on the next round
                except Exception:  # (a full disk, say): the thread must outlive it
                    log.exception("shipping failed; trying again in %s s", every)

    def close(self) -> None:
        """Ship what is pending and stop the background threads. What the server does not take
        now (away, or answering an error) stays in the buffer directory for the next ranker
        given it; without `buffer_dir` the temporary one goes with its records, counted in
        `dropped` and logged. A closed ranker ranks and records nothing more."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with contextlib.suppress(*self._unshipped):
            self.flush()  # (what it cannot ship, it moves to the buffer directory)
        if self._owns:
            self._poll.close()  # no new poll; one in flight ends within FOLLOW_WAIT
        for thread in self._threads:
            thread.join(timeout=1)
        if self._owns:
            self._http.close()
        if self._poster is not None:
            self._poster.close()
        if self._producer is not None:
            self._producer.close(timeout=5)
        left = sum(count for _, count in self._buffered) + self._pending.records
        if left and self._buffer.is_relative_to(self._dir.name):
            self._dropped_files += left
            log.warning("%d records not shipped, lost with the ranker (no buffer_dir)", left)
        self._lock_file.close()
        self._dir.cleanup()

    def __enter__(self) -> LocalRanker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The buffer directory's batch files: numbered in the order written.
_BATCH_NAME = re.compile(r"[0-9]{12}\.ndjson")


def _hold(directory: Path, timeout: float) -> Any:
    """An exclusive lock on the buffer directory (released when the file is closed, or the
    process ends): two rankers numbering batch files in one directory would overwrite each
    other's, and ship each other's twice. A restarted application waits up to `timeout`
    seconds for the one it replaces to let go."""
    f = open(directory / ".lock", "a+b")  # noqa: SIM115 (held until close)
    if sys.platform == "win32":  # (no advisory locks: one ranker a directory is the caller's)
        return f
    import fcntl

    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() >= deadline:
                f.close()
                raise RuntimeError(
                    f"buffer directory {directory} is held by another LocalRanker: give each "
                    "ranker (each process, each loop) a directory of its own"
                ) from None
            time.sleep(0.05)


def _write_whole(path: Path, data: memoryview) -> None:
    """Write `path` and have it on disk before it is renamed into place (a rename can reach
    the disk before the data it names: after a crash, the file would be empty)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _error(r: httpx.Response) -> tuple[str, str]:
    return _error_of(r.status_code, r.content)


def _error_of(status: int, body: bytes) -> tuple[str, str]:
    try:
        err = orjson.loads(body)["error"]
        return str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        return str(status), body[:200].decode(errors="replace")


class Poster:
    """POSTs over one keep-alive connection of the standard library's http.client, for the
    shipping thread: a batch costs it a third of the CPU an httpx.Client post does (0.3 against
    0.9 ms for 200 KB here, benchmarks/local.py), time the threads that rank wait for the
    interpreter lock. Only for plain http without a proxy from the environment (`for_url`);
    elsewhere httpx posts, with its TLS and proxy settings. A connection the server closed
    while idle (its keep-alive timeout) is replaced before a post, as httpx's pool does;
    errors are httpx.TransportError, as an httpx post's would be."""

    def __init__(self, host: str, port: int, prefix: str, timeout: float) -> None:
        self._host, self._port, self._prefix, self._timeout = host, port, prefix, timeout
        self._conn: http.client.HTTPConnection | None = None

    @classmethod
    def for_url(cls, url: str, timeout: float) -> Poster | None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            return None
        proxies = urllib.request.getproxies()  # what httpx's trust_env reads too
        if ("http" in proxies or "all" in proxies) and not urllib.request.proxy_bypass(
            parts.hostname
        ):
            return None
        return cls(parts.hostname, parts.port or 80, parts.path.rstrip("/"), timeout)

    def _connection(self) -> http.client.HTTPConnection:
        conn = self._conn
        if conn is not None and conn.sock is not None:
            readable, _, _ = select.select([conn.sock], [], [], 0)
            if readable:  # the server closed it (or sent what nobody asked for): a new one
                conn.close()
                conn = None
        if conn is None:
            conn = self._conn = http.client.HTTPConnection(
                self._host, self._port, timeout=self._timeout
            )
        return conn

    def post(
        self, path: str, body: bytes | memoryview, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        try:
            conn = self._connection()
            conn.request("POST", self._prefix + path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise httpx.TransportError(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
