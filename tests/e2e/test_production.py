"""The production path across processes: `dloop serve` + `dloop join` + `dloop learn` on a
real Kafka-protocol broker (Tansu) and a real Postgres."""

from __future__ import annotations

import signal
import time

import httpx
import orjson
import pytest
from sqlalchemy import create_engine, func, select, text

from service.storage.migrate import upgrade
from service.storage.models import Joined, Loop, ModelCheckpoint, Observation
from tests.support.production import (
    ACTIONS,
    HEADERS,
    KEY,
    Stack,
    caught_up,
    count,
    end_offsets,
    stored_offsets,
    wait_for,
)


def explain(db_url: str, event_ids: list[str]) -> str:
    from service.storage.models import Decision

    engine = create_engine(db_url)
    with engine.connect() as conn:
        decisions = conn.execute(
            select(Decision.event_id, Decision.created_at).where(Decision.event_id.in_(event_ids))
        ).all()
        observations = conn.execute(
            select(Observation.event_id, Observation.received_at, Observation.status).where(
                Observation.event_id.in_(event_ids)
            )
        ).all()
    engine.dispose()
    return f"decisions {decisions}, observations {observations}"


def send(stack: Stack, events: range) -> None:
    """Rank e{i} for each i and reward it 1 at once (earliest: joined at the reward)."""
    with httpx.Client(base_url=stack.url, headers=HEADERS, timeout=10) as client:
        for i in events:
            body = {"contextFeatures": [{"u": "u1"}], "actions": ACTIONS, "eventId": f"e{i}"}
            assert client.post("/personalizer/v1.0/rank", json=body).status_code == 201
            r = client.post(f"/personalizer/v1.0/events/e{i}/reward", json={"value": 1})
            assert r.status_code == 204


@pytest.mark.slow
def test_rank_reward_join_learn_across_processes(stack: Stack) -> None:
    cfg = stack.api("GET", "/personalizer/v1.0/configurations/service").json()
    cfg.update(modelExportFrequency="PT1S", rewardWaitTime="PT4S", rewardAggregation="earliest")
    assert (
        stack.api("PUT", "/personalizer/v1.0/configurations/service", json=cfg).status_code == 200
    )

    n = 1200
    expected: dict[str, float] = {}
    with httpx.Client(base_url=stack.url, headers=HEADERS, timeout=10) as client:
        for i in range(n):
            event_id = f"e{i}"
            body = {
                "contextFeatures": [{"u": f"u{i % 5}"}],
                "actions": ACTIONS,
                "eventId": event_id,
            }
            r = client.post("/personalizer/v1.0/rank", json=body)
            assert r.status_code == 201
            if i % 7 == 0:  # a client retry of the same rank
                assert client.post("/personalizer/v1.0/rank", json=body).content == r.content
            chosen = r.json()["rewardActionId"]
            value = 1.0 if chosen == f"a{i % 4}" else 0.0
            if i % 3:
                client.post(f"/personalizer/v1.0/events/{event_id}/reward", json={"value": value})
                expected[event_id] = value
                if i % 5 == 0:  # duplicate reward call: earliest keeps the first
                    client.post(f"/personalizer/v1.0/events/{event_id}/reward", json={"value": 0.5})
            else:
                expected[event_id] = 0.0  # default reward after the window
        for i in range(20):  # orphans: rewards for events never ranked
            client.post(f"/personalizer/v1.0/events/ghost{i}/reward", json={"value": 1})

    wait_for(
        lambda: count(stack.db_url, select(func.count()).select_from(Joined)) == n, 60, "joins"
    )
    engine = create_engine(stack.db_url)
    with engine.connect() as conn:
        rows = conn.execute(select(Joined.event_id, Joined.line)).all()
    engine.dispose()
    assert len({e for e, _ in rows}) == n
    wrong = [e for e, line in rows if orjson.loads(line)["_label_cost"] != -expected[e]]
    assert not wrong, explain(stack.db_url, wrong[:3]) + stack.stderr("serve")[-3000:]
    assert (
        count(stack.db_url, select(func.count()).where(Observation.event_id.like("ghost%"))) == 20
    )

    wait_for(lambda: count(stack.db_url, select(ModelCheckpoint.examples)) == n, 30, "the learner")
    wait_for(
        lambda: 'model_id="N/A"' not in stack.api("GET", "/metrics").text, 10, "a served model"
    )
    # Two serving processes, each with its own durable buffer.
    assert (stack.data_dir / "replica-0" / "log").is_dir()
    assert (stack.data_dir / "replica-1" / "log").is_dir()
    # The learner may be restarted: it resumes from its checkpoint and learns nothing twice.
    joined_topic = f"{stack.env['DLOOP_KAFKA__TOPIC_PREFIX']}.joined"
    wait_for(lambda: caught_up(stack, "learn", joined_topic), 30, "the learner's offsets")
    before_kill = stored_offsets(stack.db_url, "learn", joined_topic)
    stack.stop("learn", signal.SIGKILL)
    stack.start("learn", "learn")
    # More joined events, so the new learner has to consume: once its stored offsets reach the
    # end of the joined topic it has read, learned and checkpointed everything there is.
    k = 30
    send(stack, range(n, n + k))
    unpublished = select(func.count()).where(Joined.published.is_(False))
    wait_for(
        lambda: (
            count(stack.db_url, select(func.count()).select_from(Joined)) == n + k
            and count(stack.db_url, unpublished) == 0
        ),
        60,
        "the new events joined and published",
    )
    ends = end_offsets(stack, joined_topic)
    assert ends != before_kill and all(ends[p] >= o for p, o in before_kill.items())
    wait_for(
        lambda: stored_offsets(stack.db_url, "learn", joined_topic) == ends,
        60,
        "the restarted learner to consume the joined topic",
    )
    assert count(stack.db_url, select(ModelCheckpoint.examples)) == n + k
    n += k

    # A new policy retrains on the joined history at once, and the learner carries on from it.
    policy = {"name": "eps", "arguments": "--cb_explore_adf --epsilon 0.1 -q ::"}
    before = stack.api("GET", "/personalizer/v1.0/model/properties").json()
    assert stack.api("PUT", "/personalizer/v1.0/configurations/policy", json=policy).is_success
    assert count(stack.db_url, select(ModelCheckpoint.examples)) == n
    after = stack.api("GET", "/personalizer/v1.0/model/properties").json()
    assert after["creationTime"] != before["creationTime"]
    mark = time.time()
    send(stack, range(n, n + 50))
    wait_for(
        lambda: count(stack.db_url, select(ModelCheckpoint.examples)) == n + 50, 30, "more learning"
    )
    engine = create_engine(stack.db_url)
    with engine.connect() as conn:
        arguments = conn.scalar(select(ModelCheckpoint.arguments))
    engine.dispose()
    # (epsilon-greedy instead of the default squarecb; the loop's explorationPercentage sets ε)
    assert "--epsilon" in arguments and "--squarecb" not in arguments

    # Offline tools read the joined topic too (dloop replay/evaluate --source kafka).
    from service.core.settings import load_settings
    from service.pipeline import sources

    settings = load_settings(
        kafka={
            "bootstrap_servers": stack.env["DLOOP_KAFKA__BOOTSTRAP_SERVERS"],
            "topic_prefix": stack.env["DLOOP_KAFKA__TOPIC_PREFIX"],
        }
    )
    lines = list(sources.kafka_lines(settings, loop="default"))
    assert {orjson.loads(line)["EventId"] for line in lines} == {f"e{i}" for i in range(n + 50)}
    # From a time: Kafka finds the first joined message published since then (the first n were
    # learned, so published, before `mark`).
    lines = list(sources.kafka_lines(settings, loop="default", since=mark))
    assert {orjson.loads(line)["EventId"] for line in lines} == {f"e{i}" for i in range(n, n + 50)}


@pytest.mark.slow
def test_rl_loop_learns_episodes_on_the_production_path(stack: Stack) -> None:
    from learners.rl import TABULAR_RL_POLICY
    from service.client import Client
    from service.pipeline import simulate
    from service.storage.models import Episode

    with Client(stack.url, key=KEY, loop="keys") as client:
        client.create_loop("rl")
        client.configure(modelExportFrequency="PT1S", rewardWaitTime="PT10S")
        client.set_policy("tabular", TABULAR_RL_POLICY)
        # A fixed run id fixes the exploration draws (dloop seeds them from the event ids).
        curve = simulate.run(
            client, "dloop/DelayedKey-v0", 40, eval_episodes=1, progress=False, run_id="keys"
        )
        learned = select(func.count()).where(Episode.loop == "keys", Episode.learned.is_(True))
        wait_for(lambda: count(stack.db_url, learned) == 40, 60, "the episodes learned")
        # The served model (loaded by the replicas from the database) plays the key.
        wait_for(
            lambda: (
                simulate.greedy_return(client.model(), "rl", "dloop/DelayedKey-v0", 200, 1) == 1.0
            ),
            15,
            "a served model that takes the key",
        )
    assert len(curve.returns) == 40


@pytest.mark.slow
def test_multi_slot_loop_learns_on_the_production_path(stack: Stack) -> None:
    from service.storage.models import Joined as J

    assert stack.api("PUT", "/loops/page", json={"kind": "ccb"}).status_code == 201
    cfg = stack.api("GET", "/loops/page/personalizer/v1.0/configurations/service").json()
    cfg.update(modelExportFrequency="PT1S", rewardWaitTime="PT3S")
    assert stack.api(
        "PUT", "/loops/page/personalizer/v1.0/configurations/service", json=cfg
    ).is_success
    slots = [{"id": "hero", "baselineAction": "a0"}, {"id": "side", "baselineAction": "a1"}]
    base = f"{stack.url}/loops/page/personalizer/v1.1-preview.1/multislot"
    with httpx.Client(headers=HEADERS, timeout=10) as client:
        for i in range(60):
            body = {
                "contextFeatures": [{"u": f"u{i % 2}"}],
                "actions": ACTIONS,
                "slots": slots,
                "eventId": f"m{i}",
            }
            r = client.post(f"{base}/rank", json=body)
            assert r.status_code == 201, r.text
            rewards = [
                {"slotId": s["id"], "value": 1.0 if s["rewardActionId"] == "a2" else 0.0}
                for s in r.json()["slots"]
            ]
            client.post(f"{base}/events/m{i}/reward", json={"reward": rewards})
    joined = select(func.count()).where(J.loop == "page")
    wait_for(lambda: count(stack.db_url, joined) == 60, 60, "multi-slot joins")
    learned = select(ModelCheckpoint.examples).where(ModelCheckpoint.loop == "page")
    wait_for(lambda: count(stack.db_url, learned) == 60, 30, "the learner on CCB lines")

    def served() -> bool:
        lines = stack.api("GET", "/metrics").text.splitlines()
        info = next(x for x in lines if x.startswith("dloop_model_info") and 'loop="page"' in x)
        return 'model_id="N/A"' not in info

    wait_for(served, 10, "a served multi-slot model")


def test_replicas_starting_together_create_the_default_loop_once(postgres_url: str) -> None:
    """`dloop serve --workers N` processes all make sure the default loop exists as they start;
    one that finds another's insert in flight waits for it and uses that loop (before, its own
    insert failed and uvicorn stopped every worker)."""
    import threading

    from service.storage import store
    from service.storage.db import make_engine, make_sessionmaker

    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    sessions = make_sessionmaker(engine)
    try:
        first = sessions()
        first.begin()
        first_pid = first.scalar(text("SELECT pg_backend_pid()"))
        store.ensure_loop(first, name="default", kind="cb", now=1.0)  # not committed yet
        found: list[tuple[str, float]] = []
        errors: list[BaseException] = []

        def second() -> None:
            # Another kind and time: the row tells whose insert won.
            try:
                with sessions.begin() as session:
                    loop = store.ensure_loop(session, name="default", kind="ccb", now=2.0)
                    found.append((loop.kind, loop.created_at))
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=second)
        t.start()

        def blocked() -> bool:
            # The second insert waits on a lock the first transaction holds.
            with engine.connect() as conn:
                waiting = conn.execute(
                    text(
                        "SELECT pg_blocking_pids(pid) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                ).scalars()
                return any(first_pid in pids for pids in waiting)

        wait_for(blocked, 10, "the second insert to wait on the first transaction")
        first.commit()
        first.close()
        t.join(10)
        assert not t.is_alive() and not errors, errors
        assert found == [("cb", 1.0)]  # the first insert's loop, read back by the second
        with engine.connect() as conn:
            assert conn.execute(select(Loop.kind, Loop.created_at)).all() == [("cb", 1.0)]
    finally:
        engine.dispose()


@pytest.mark.slow
def test_holdout_stats_and_dashboard_on_the_production_path(stack: Stack) -> None:
    """Issue 14 on Kafka + Postgres: held-out decisions are served and marked by `dloop
    serve`, the joiner keeps the rollups in Postgres, the learner records its publications,
    and the dashboard (served by `dloop serve`, its session valid on every replica) draws them
    in a real browser."""
    from playwright.sync_api import sync_playwright

    from service.pipeline.demo import traffic

    made = traffic(stack.url, KEY, rate=0, holdout=30, decisions=400)
    joined = select(func.count()).select_from(Joined)
    wait_for(lambda: count(stack.db_url, joined) == made, 60, "joins")
    wait_for(lambda: count(stack.db_url, select(ModelCheckpoint.examples)) == made, 30, "learning")

    held = stack.api("GET", "/loops/default/holdout").json()
    assert held["online"]["decisions"] + held["holdout"]["decisions"] == made
    assert 60 <= held["holdout"]["decisions"] <= 180  # about 30% of 400
    assert held["uplift"] is not None
    stats = stack.api("GET", "/loops/default/stats").json()
    assert sum(b["decisions"] for b in stats["buckets"]) == made
    assert sum(b.get("joined", 0) for b in stats["buckets"]) == made
    assert stats["models"] and stats["models"][-1]["examples"] == made
    assert stats["freshness"]["p50"] is not None and stats["freshness"]["p50"] < 30
    overview = stack.api("GET", "/overview").json()["value"][0]
    assert overview["backlog"] == 0 and overview["deadLetters"] == 0

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium")
        page = browser.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.goto(f"{stack.url}/ui/")
        page.fill("#key", KEY)
        page.click("#login button[type=submit]")
        page.wait_for_selector('body[data-ready="#/"]')
        page.goto(f"{stack.url}/ui/#/loops/default")
        page.wait_for_selector('body[data-ready="#/loops/default"]')
        page.wait_for_selector("#reward .scatterlayer .trace", state="attached")
        assert "not enough data" not in page.locator("#tiles .tile").first.inner_text()
        browser.close()
    assert problems == []


def test_outcomes_definitions_and_guardrails_on_the_production_path(stack: Stack) -> None:
    """Issue 15 on Kafka + Postgres: named outcomes sent to `dloop serve` are joined by `dloop
    join` under the loop's reward definition (raw and aggregated in the joined lines, with the
    version), rolled up per outcome for the guardrail the joiner checks; a new definition
    retrains the model on the history relabelled, and `dloop learn` goes on from it."""
    from learners.sim.worlds import ShopWorld
    from service.client import Client
    from service.pipeline.demo import SHOP_CONFIG, SHOP_OFFERS

    world = ShopWorld(seed=2)
    with Client(stack.url, key=KEY, loop="shop") as shop:
        shop.create_loop("cb")
        shop.configure(rewardWaitTime="PT2S", holdoutPercentage=20, **SHOP_CONFIG)
        for i in range(300):
            segment, context = world.draw_context()
            out = shop.rank(context, world.actions(SHOP_OFFERS), event_id=f"s{i}", unit_id=f"u{i}")
            drawn = world.outcomes(segment, world.offers.index(out["rewardActionId"]))
            shop.outcomes(f"s{i}", drawn)
        rows = select(func.count()).select_from(Joined).where(Joined.loop == "shop")
        wait_for(lambda: count(stack.db_url, rows) == 300, 60, "joins")
        learned = select(ModelCheckpoint.examples).where(ModelCheckpoint.loop == "shop")
        wait_for(lambda: count(stack.db_url, learned) == 300, 60, "learning")
        engine = create_engine(stack.db_url)
        with engine.connect() as conn:
            lines = [
                orjson.loads(r[0])
                for r in conn.execute(select(Joined.line).where(Joined.loop == "shop"))
            ]
        engine.dispose()
        assert all(set(line["Outcomes"]) == {"click", "purchase", "unsubscribe"} for line in lines)
        assert all(line["RewardVersion"] == 1 for line in lines)
        guard = stack.api("GET", "/loops/shop/guardrails").json()["guardrails"][0]
        assert guard["decisions"] > 0 and guard["comparator"] == "holdout"
        stats = stack.api("GET", "/loops/shop/stats").json()
        assert (
            sum(b["outcomes"]["click"]["decisions"] for b in stats["buckets"] if "outcomes" in b)
            == 300
        )
        before = shop.model()
        cfg = shop.configure(rewardDefinition="clip(purchase / 120, 0, 1)")
        assert cfg["rewardDefinitionVersion"] == 2
        retrained = shop.model()
        assert retrained != before
        versions = stack.api("GET", "/loops/shop/stats").json()["rewardDefinitions"]
        assert [v["version"] for v in versions] == [1, 2]
        # The learner continues the retrained model with what joins next.
        for i in range(300, 320):
            segment, context = world.draw_context()
            out = shop.rank(context, world.actions(SHOP_OFFERS), event_id=f"s{i}")
            shop.outcomes(
                f"s{i}", world.outcomes(segment, world.offers.index(out["rewardActionId"]))
            )
        wait_for(lambda: count(stack.db_url, learned) == 320, 60, "learning after the retrain")
