"""Production-path benchmarks on a real Tansu broker and Postgres: joiner and learner
throughput (beside raw VW learning on the same examples), and model freshness through
`dloop serve` + `dloop join` + `dloop learn`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import httpx
import numpy as np
from sqlalchemy import create_engine, delete, func, select

from learners.cb import DEFAULT_POLICY, CBTrainer
from learners.policy import with_exploration
from service.core.settings import load_settings
from service.pipeline.join_worker import JoinWorker
from service.pipeline.learn_worker import LearnWorker
from service.storage import kafka, store
from service.storage.db import make_engine, make_sessionmaker
from service.storage.migrate import upgrade
from service.storage.models import Joined, LogOffset, ModelCheckpoint
from tests.support.records import ACTIONS, records
from tests.support.services import free_port, postgres_database, start_tansu

KEY = "bench-admin-key-0123456789abcdefghij"


def throughput(n: int, rounds: int = 3) -> list[tuple[str, str]]:
    """Joiner throughput once; then `rounds` interleaved rounds of the learner (a fresh
    consumer group and a blank model, learning the whole joined topic) and raw VW learning the
    same lines, reported as the median ratio (single rounds vary by 20% on a shared 2-core
    machine)."""
    address, broker = start_tansu()
    try:
        with postgres_database() as db_url:
            upgrade(db_url)
            settings = load_settings(
                db={"url": db_url},
                kafka={"bootstrap_servers": address, "topic_prefix": "bench", "partitions": 4},
            )
            kafka.ensure_topics(settings)
            engine = make_engine(db_url)
            sessions = make_sessionmaker(engine)
            with sessions.begin() as s:
                store.ensure_loop(s, name="default", kind="cb", now=time.time())
            producer = kafka.producer(settings)
            joiner = JoinWorker(
                sessions=sessions,
                consumer=kafka.consumer(settings, group="bench.joiner"),
                producer=producer,
                events_topic=kafka.events_topic(settings),
                joined_topic=kafka.joined_topic(settings),
            )
            # Join the consumer group before the clock starts (a few seconds on Tansu), and
            # warm up with a first batch.
            warm = 200
            for key, value in records(warm, time.time(), prefix="w"):
                producer.send(kafka.events_topic(settings), key=key, value=value)
            producer.flush()
            while _count(sessions, Joined.published.is_(True)) < warm:
                joiner.run_once(poll_ms=100)
            for key, value in records(n, time.time()):
                producer.send(kafka.events_topic(settings), key=key, value=value)
            producer.flush()
            t0 = time.perf_counter()
            while _count(sessions, Joined.published.is_(True)) < n + warm:
                joiner.run_once(poll_ms=100)
            join_s = time.perf_counter() - t0
            joiner.consumer.close()

            with sessions() as s:
                lines = [r.encode() for r in s.scalars(select(Joined.line).order_by(Joined.pos))]
            learner_rates, raw_rates = [], []
            for r in range(rounds):
                learner_rates.append((n + warm) / _learn_round(settings, sessions, n + warm, r))
                trainer = CBTrainer(with_exploration(DEFAULT_POLICY, 0.2))
                t0 = time.perf_counter()
                for line in lines:
                    trainer.learn(line)
                raw_rates.append(len(lines) / (time.perf_counter() - t0))
            producer.close()
            engine.dispose()
    finally:
        broker.terminate()
        broker.wait(10)
    ratios = [a / b for a, b in zip(learner_rates, raw_rates, strict=True)]
    return [
        ("events (decision + reward pairs)", f"{n}"),
        ("joiner: events joined per second", f"{n / join_s:.0f}"),
        ("learner: examples learned per second (median)", f"{np.median(learner_rates):.0f}"),
        ("raw VW learn: examples per second (median)", f"{np.median(raw_rates):.0f}"),
        (
            f"learner / raw VW learn, median of {rounds} rounds",
            f"{np.median(ratios):.2f}  (rounds {', '.join(f'{x:.2f}' for x in ratios)};"
            " target >= 0.50)",
        ),
    ]


def _learn_round(settings: Any, sessions: Any, total: int, round_: int) -> float:
    """Busy seconds (polls that returned examples, plus the final checkpoint) for a fresh
    learner to learn the joined topic from a blank model; the group join is not counted."""
    with sessions.begin() as s:
        s.execute(delete(ModelCheckpoint))
        s.execute(delete(LogOffset).where(LogOffset.name.like("learn:%")))
    learner = LearnWorker(
        sessions=sessions,
        consumer=kafka.consumer(settings, group=f"bench.learner.{round_}"),
        joined_topic=kafka.joined_topic(settings),
    )
    busy = 0.0
    learned = 0
    while learned < total:
        t0 = time.perf_counter()
        count = learner.run_once(poll_ms=100)
        if count:
            busy += time.perf_counter() - t0
            learned += count
    t0 = time.perf_counter()
    learner.checkpoint()
    busy += time.perf_counter() - t0
    learner.consumer.close()
    learner.host.close()
    return busy


def _count(sessions: Any, where: Any) -> int:
    with sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Joined).where(where)) or 0)


def freshness(samples: int) -> list[tuple[str, str]]:
    """Seconds from a reward's HTTP call to a served model that includes it."""
    address, broker = start_tansu()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with postgres_database() as db_url:
            upgrade(db_url)
            port = free_port()
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("DLOOP_")},
                "DLOOP_DB__URL": db_url,
                "DLOOP_KAFKA__BOOTSTRAP_SERVERS": address,
                "DLOOP_API_KEY": KEY,
                "DLOOP_DATA_DIR": f"/tmp/dloop-bench-{uuid.uuid4().hex[:8]}",
            }
            for args in (
                ["serve", "--host", "127.0.0.1", "--port", str(port)],
                ["join"],
                ["learn"],
            ):
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "service", *args],
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            base = f"http://127.0.0.1:{port}"
            headers = {"Ocp-Apim-Subscription-Key": KEY}
            deadline = time.time() + 60
            while True:
                try:
                    if httpx.get(f"{base}/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError("dloop serve did not start")
                time.sleep(0.2)
            cfg = httpx.get(
                f"{base}/personalizer/v1.0/configurations/service", headers=headers
            ).json()
            cfg["modelExportFrequency"] = "PT1S"
            httpx.put(f"{base}/personalizer/v1.0/configurations/service", json=cfg, headers=headers)

            engine = create_engine(db_url)
            served: dict[str, float] = {}  # model id -> first time a replica served it
            includes: dict[str, int] = {}  # model id -> last joined position it includes
            stop = threading.Event()

            def watch() -> None:
                while not stop.is_set():
                    with engine.connect() as conn:
                        for model_id, learned in conn.execute(
                            select(ModelCheckpoint.model_id, ModelCheckpoint.position)
                        ):
                            includes.setdefault(model_id, learned)
                    text = httpx.get(f"{base}/metrics", headers=headers).text
                    for line in text.splitlines():
                        if line.startswith("dloop_model_info"):
                            model_id = line.split('model_id="')[1].split('"')[0]
                            served.setdefault(model_id, time.time())
                    time.sleep(0.02)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            rewarded: dict[str, float] = {}
            body = {
                "contextFeatures": [{"u": "x"}],
                "actions": [{"id": a, "features": f} for a, f in ACTIONS],
            }
            # Warm up the consumer groups (they join within a few seconds).
            time.sleep(8)
            for i in range(samples):
                event = f"f{i}"
                httpx.post(
                    f"{base}/personalizer/v1.0/rank",
                    json={**body, "eventId": event},
                    headers=headers,
                )
                rewarded[event] = time.time()
                httpx.post(
                    f"{base}/personalizer/v1.0/events/{event}/reward",
                    json={"value": 1},
                    headers=headers,
                )
                time.sleep(0.25)
            time.sleep(8)
            stop.set()
            watcher.join()
            # The first served model whose checkpoint includes the event's joined position.
            with engine.connect() as conn:
                pos = dict(conn.execute(select(Joined.event_id, Joined.pos)).all())
            engine.dispose()
            delays = []
            for event, t in rewarded.items():
                if pos.get(event) is None:
                    continue
                first = min(
                    (ts for mid, ts in served.items() if includes.get(mid, -1) >= pos[event]),
                    default=None,
                )
                if first is not None:
                    delays.append(first - t)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        broker.terminate()
        broker.wait(10)
    arr = np.array(delays)
    return [
        ("rewards measured (one every 0.25 s)", f"{len(delays)} of {samples}"),
        (
            "freshness p50 / p95 (s)",
            f"{np.percentile(arr, 50):.2f} / {np.percentile(arr, 95):.2f}  (target p95 <= 5)",
        ),
    ]
