"""`make bench`, in-process ranking (service.local.LocalRanker) against a `dloop up`: its rank
latency beside raw VW predict on the same example and beside the HTTP rank of the same request
(interleaved rounds), how fast one client process ships its decisions and the server takes
batches in, and how fresh its model is (a reward sent -> the ranker serving a model that
learned it)."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sqlalchemy import create_engine, select

from benchmarks.run import ACTIONS, CONTEXT, KEY, Server, start_server, train
from service.local import LocalRanker
from service.storage.models import Joined, ModelCheckpoint

HEADERS = {"Ocp-Apim-Subscription-Key": KEY}
BODY = {"contextFeatures": CONTEXT, "actions": ACTIONS}


def percentiles(samples: list[float]) -> tuple[float, float]:
    arr = np.array(samples) * 1e6
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def timed(call: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


def raw_vw(model: bytes) -> Any:
    """Raw VW parse+predict of the same example on the same model bytes."""
    from learners.features import context_json
    from learners.vw import predict_scores, workspace

    ws = workspace("--json", model)
    text = context_json(CONTEXT, [(a["id"], a["features"]) for a in ACTIONS]).decode()
    return lambda: predict_scores(ws, text)


def interruptions(seconds: float = 1.0, gap_ns: int = 20_000) -> tuple[float, float]:
    """How often the machine takes this process off its core: a tight loop's gaps over 20 us,
    per second, and their median length (us). A call as long as 1 / rate / 100 is hit in 1% of
    calls, so this is what decides how much longer calls' p99 grows beyond their p50."""
    clock = time.perf_counter_ns
    gaps: list[int] = []
    last = start = clock()
    end = start + int(seconds * 1e9)
    while last < end:
        now = clock()
        if now - last > gap_ns:
            gaps.append(now - last)
        last = now
    return len(gaps) / seconds, (statistics.median(gaps) / 1000 if gaps else 0.0)


def settled(server: Server, timeout: float = 300) -> None:
    """Wait until the server has taken in every record it was sent (its learner idle again)."""
    deadline = time.time() + timeout
    while httpx.get(f"{server.base}/readyz").json()["logBacklogBytes"]:
        assert time.time() < deadline, "the learner did not catch up"
        time.sleep(0.2)


def latency(server: Server, n: int, rounds: int) -> list[tuple[str, str]]:
    model = httpx.get(f"{server.base}/personalizer/v1.0/model", headers=HEADERS).content
    predict = raw_vw(model)
    http = httpx.Client(base_url=server.base, headers=HEADERS, timeout=30)
    with LocalRanker(server.base, key=KEY, background=False) as ranker:
        ranker.refresh()
        assert ranker.served.model_id != "N/A", "the ranker has no model"
        for _ in range(200):  # warm up
            predict()
            ranker.rank(BODY)
        measured: dict[str, list[tuple[float, float]]] = {
            k: [] for k in ("vw", "local", "vw_alt", "local_alt", "http")
        }
        idle: list[tuple[float, float]] = []
        for _ in range(rounds):
            # Each round starts as an application's ranker runs: its records shipped (every
            # ship_every seconds; here between rounds, so the shipping thread's share of the
            # interpreter is not in the latencies) and the server idle again (on the same two
            # cores, its learner would otherwise compete with the ranks measured).
            ranker.flush()
            settled(server)
            idle.append(interruptions())
            # Raw VW and the ranker in alternating runs of 1,000 calls, so both meet the
            # machine's moments alike (a p99 is the slowest 1%: one busy second moves it). A
            # run's first 20 calls are not counted: they find the caches as the other left them.
            vw: list[float] = []
            local: list[float] = []
            for _ in range(max(1, n // 1000)):
                vw += timed(predict, 1020)[20:]
                local += timed(lambda: ranker.rank(BODY), 1020)[20:]
            measured["vw"].append(percentiles(vw))
            measured["local"].append(percentiles(local))
            # And call by call: VW then meets the caches a rank leaves, as the rank's own VW
            # call does and as an application's VW call would (never one after another).
            ranker.flush()
            settled(server)
            vw, local = [], []
            for _ in range(n // 2):
                started = time.perf_counter()
                predict()
                between = time.perf_counter()
                ranker.rank(BODY)
                vw.append(between - started)
                local.append(time.perf_counter() - between)
            measured["vw_alt"].append(percentiles(vw))
            measured["local_alt"].append(percentiles(local))
            post = lambda: http.post("/personalizer/v1.0/rank", json=BODY)  # noqa: E731
            measured["http"].append(percentiles(timed(post, max(200, n // 10))))
    http.close()

    def med(what: str, i: int) -> float:
        return statistics.median(r[i] for r in measured[what])

    rate = max(statistics.median(r for r, _ in idle), 1.0)

    def ratios_of(local: str, vw: str) -> list[float]:
        pairs = zip(measured[local], measured[vw], strict=True)
        return sorted(lo[1] / v[1] for lo, v in pairs)

    ratios = ratios_of("local", "vw")
    alt = ratios_of("local_alt", "vw_alt")
    return [
        ("raw VW parse+predict p50 / p99 (us)", f"{med('vw', 0):.1f} / {med('vw', 1):.1f}"),
        (
            "in-process rank p50 / p99 (us)",
            f"{med('local', 0):.1f} / {med('local', 1):.1f}",
        ),
        (
            "in-process rank p99 / raw VW predict p99",
            f"{statistics.median(ratios):.1f}x  (rounds {', '.join(f'{r:.1f}' for r in ratios)}; "
            "target <= 2)",
        ),
        (
            "call by call: raw VW / in-process rank p50 / p99 (us)",
            f"{med('vw_alt', 0):.1f} / {med('vw_alt', 1):.1f}; "
            f"{med('local_alt', 0):.1f} / {med('local_alt', 1):.1f}",
        ),
        (
            "call by call: in-process rank p99 / raw VW p99",
            f"{statistics.median(alt):.1f}x  (rounds {', '.join(f'{r:.1f}' for r in alt)})",
        ),
        ("HTTP rank, one client, p50 / p99 (us)", f"{med('http', 0):.0f} / {med('http', 1):.0f}"),
        ("HTTP rank p50 / in-process rank p50", f"{med('http', 0) / med('local', 0):.0f}x"),
        (
            "idle loop interrupted, per s / median (us)",
            f"{rate:.0f} / {statistics.median(g for _, g in idle):.0f}  (a call over"
            f" {1e4 / rate:.0f} us is interrupted in more than 1% of calls)",
        ),
    ]


def threads(model: bytes, seconds: float = 2.0) -> list[tuple[str, str]]:
    """VW predictions a second from 1, 2 and 4 threads: one workspace per thread (what the
    ranker does) against one shared behind a lock (interleaved)."""
    import tempfile

    from learners.features import context_json
    from learners.sandbox.host import Host

    text = context_json(CONTEXT, [(a["id"], a["features"]) for a in ACTIONS])
    with tempfile.NamedTemporaryFile(suffix=".vw") as f:
        f.write(model)
        f.flush()
        header = {"op": "predict", "loop": "bench", "kind": "cb", "model": ("m", f.name)}

        def rate(n: int, shared: bool) -> float:
            one, lock = Host(cache_models=1), threading.Lock()
            counts = [0] * n
            end = time.perf_counter() + seconds

            def work(i: int) -> None:
                host = one if shared else Host(cache_models=1)
                while time.perf_counter() < end:
                    if shared:
                        with lock:
                            host.handle(dict(header), text)
                    else:
                        host.handle(dict(header), text)
                    counts[i] += 1

            pool = [threading.Thread(target=work, args=(i,)) for i in range(n)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            return sum(counts) / seconds

        rows = []
        for n in (1, 2, 4):
            per = [rate(n, False) for _ in range(3)]
            locked = [rate(n, True) for _ in range(3)]
            rows.append(
                (
                    f"{n} thread(s): predictions/s, workspace per thread / one behind a lock",
                    f"{statistics.median(per):,.0f} / {statistics.median(locked):,.0f}",
                )
            )
    return rows


def shipping(server: Server, decisions: int) -> list[tuple[str, str]]:
    """One client: rank `decisions` (not timed), then ship them all (timed). Then two clients
    shipping at once: the server's batch ingest rate."""

    def filled() -> LocalRanker:
        ranker = LocalRanker(server.base, key=KEY, background=False)
        ranker.refresh()
        for _ in range(decisions):
            ranker.rank(BODY)
        return ranker

    one = filled()
    started, cpu = time.perf_counter(), time.thread_time()
    shipped = one.flush()
    alone, cpu = time.perf_counter() - started, time.thread_time() - cpu
    one.close()
    assert shipped == decisions, (shipped, decisions)
    pair = [filled(), filled()]
    started = time.perf_counter()
    threads = [threading.Thread(target=r.flush) for r in pair]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    both = time.perf_counter() - started
    for r in pair:
        assert r.pending == 0
        r.close()
    return [
        (
            "decisions shipped per second, one client process",
            f"{decisions / alone:,.0f}  ({decisions:,} decisions; target >= 20,000)",
        ),
        (
            # The shipping thread's CPU is time the threads that rank wait for the interpreter
            # lock (service.local.Poster).
            "client CPU per shipped decision (us)",
            f"{1e6 * cpu / decisions:.1f}",
        ),
        ("server batch ingest, two clients at once (records/s)", f"{2 * decisions / both:,.0f}"),
    ]


def freshness(server: Server, samples: int) -> list[tuple[str, str]]:
    """Seconds from a reward (sent through the ranker) to the ranker serving a model that has
    learned it."""
    cfg = httpx.get(
        f"{server.base}/personalizer/v1.0/configurations/service", headers=HEADERS
    ).json()
    cfg["modelExportFrequency"] = "PT1S"
    httpx.put(f"{server.base}/personalizer/v1.0/configurations/service", json=cfg, headers=HEADERS)
    engine = create_engine(f"sqlite:///{Path(server.data) / 'dloop.db'}")
    seen: dict[str, float] = {}  # model id -> when the ranker first served it
    learned: dict[str, int] = {}  # model id -> the last joined seq it has learned
    stop = threading.Event()
    with LocalRanker(server.base, key=KEY, ship_every=0.1) as ranker:

        def watch() -> None:
            polled = 0.0
            while not stop.is_set():
                seen.setdefault(ranker.served.model_id, time.time())
                if time.time() - polled > 0.02:  # which joined events each model has learned
                    polled = time.time()
                    with engine.connect() as conn:
                        rows = conn.execute(
                            select(ModelCheckpoint.model_id, ModelCheckpoint.position)
                        )
                        for model_id, position in rows:
                            learned.setdefault(model_id, position)
                time.sleep(0.002)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        rewarded: dict[str, float] = {}
        for i in range(samples):
            event = f"fresh-{i}"
            ranker.rank({**BODY, "eventId": event})
            rewarded[event] = time.time()
            ranker.reward(event, 1.0)
            time.sleep(0.25)
        time.sleep(4)
        stop.set()
        watcher.join()
    with engine.connect() as conn:
        seqs = dict(conn.execute(select(Joined.event_id, Joined.seq)).all())
    engine.dispose()
    delays = []
    for event, t in rewarded.items():
        seq = seqs.get(event)
        first = min(
            (at for mid, at in seen.items() if seq is not None and learned.get(mid, -1) >= seq),
            default=None,
        )
        if first is not None:
            delays.append(first - t)
    arr = np.array(delays) if delays else np.array([np.nan])
    return [
        ("rewards measured (one every 0.25 s)", f"{len(delays)} of {samples}"),
        (
            "reward -> served in the local ranker, p50 / p95 (s)",
            f"{np.percentile(arr, 50):.2f} / {np.percentile(arr, 95):.2f}",
        ),
    ]


def run(port: int, *, n: int, rounds: int, decisions: int, samples: int) -> list[tuple[str, str]]:
    server = start_server(port)
    try:
        train(f"{server.base}/personalizer/v1.0", HEADERS, explain=False)
        deadline = time.time() + 30
        while (
            httpx.get(f"{server.base}/personalizer/v1.0/model/properties", headers=HEADERS).json()[
                "creationTime"
            ]
            == httpx.get(
                f"{server.base}/personalizer/v1.0/model/properties", headers=HEADERS
            ).json()["lastModifiedTime"]
        ):
            assert time.time() < deadline, "no model was published"
            time.sleep(0.2)
        rows = latency(server, n, rounds)
        model = httpx.get(f"{server.base}/personalizer/v1.0/model", headers=HEADERS).content
        rows += threads(model)
        settled(server)  # (the latency rounds' records ingested: the learner idle, as below)
        rows += shipping(server, decisions)
        # The shipped decisions are ingested first: freshness is measured on a learner
        # that has caught up.
        settled(server)
        rows += freshness(server, samples)
    finally:
        server.stop()
    return rows
