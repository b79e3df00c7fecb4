"""In-process ranking (issue 16, service.local.LocalRanker) against the server in this process:
for the same model and request it answers exactly what POST .../rank answers (no model yet, a
trained model, exclusions, the live holdout, Apprentice and LoggingOnly modes, an exploration
limit), refuses bad input with the server's code and message, follows a new model, and the
decisions and rewards it ships are joined and learned like the server's own."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select, text

from service.core import record
from service.core.errors import ApiError
from service.local import LocalRanker
from service.storage.models import DeadLetter, Episode, Joined
from tests.support.harness import AUTH, Harness, joined

ACTIONS = [{"id": f"a{i}", "features": [{"topic": f"t{i}", "len": i}]} for i in range(5)]


def _body(i: int, **kw: Any) -> dict[str, Any]:
    body = {
        "eventId": f"e{i}",
        "contextFeatures": [{"user": f"u{i % 7}", "device": {"mobile": i % 2 == 0}}],
        "actions": ACTIONS,
    }
    body.update(kw)
    return body


def _train(h: Harness, n: int = 300) -> None:
    for i in range(n):
        out = h.rank(_body(10_000 + i))
        h.reward(f"e{10_000 + i}", 1.0 if out["rewardActionId"] == "a3" else 0.0)
    h.clock.advance(601)
    h.work()


def _same(h: Harness, local: LocalRanker, bodies: list[dict[str, Any]]) -> None:
    local.refresh()
    for body in bodies:
        server = h.rank(body)
        mine = local.rank(body)
        assert mine == server, (body, mine, server)


def _refused_alike(h: Harness, local: LocalRanker, body: Any) -> str:
    """Both rankers refuse `body` with the same 400 (code and message); the message."""
    r = h.client.post("/personalizer/v1.0/rank", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    with pytest.raises(ApiError) as caught:
        local.rank(body)
    error = r.json()["error"]
    assert (caught.value.status, caught.value.code, caught.value.message) == (
        400,
        error["code"],
        error["message"],
    )
    message: str = error["message"]
    return message


def test_local_ranks_exactly_as_the_server(harness: Harness, local: LocalRanker) -> None:
    _same(harness, local, [_body(i) for i in range(20)])  # no model yet: uniform
    _train(harness)
    assert local.refresh()  # a new model
    bodies = [_body(i) for i in range(100, 200)]
    bodies += [_body(i, excludedActions=["a3", f"a{i % 3}"]) for i in range(200, 250)]
    bodies += [_body(i, unitId=f"user{i % 11}", deferActivation=True) for i in range(250, 300)]
    _same(harness, local, bodies)
    harness.configure(holdoutPercentage=30, holdoutPolicy="random")
    _same(harness, local, [_body(i, unitId=f"user{i}") for i in range(300, 400)])
    harness.configure(holdoutPercentage=0, maxExplorationProbability=0.05)
    _same(harness, local, [_body(i) for i in range(400, 450)])
    harness.configure(learningMode="Apprentice")
    _same(harness, local, [_body(i) for i in range(450, 480)])
    harness.configure(learningMode="LoggingOnly")
    _same(harness, local, [_body(i, excludedActions=["a0"]) for i in range(480, 500)])


class Damaging:
    """The network between a ranker and the server (a client of the real app), damaging one
    byte of each model it carries while `damage` is set."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.damage = True
        self.strip = False  # drop the digest header too, as a server older than it sends none

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def get(self, url: str, **kw: Any) -> Any:
        r = self.client.get(url, **kw)
        if not (self.damage and url.endswith("/local/model") and r.status_code == 200):
            return r
        body = bytearray(r.content)
        body[len(body) // 2] ^= 1
        headers = {k: v for k, v in r.headers.items() if not (self.strip and "sha256" in k)}
        return type(r)(200, headers=headers, content=bytes(body), request=r.request)


def test_a_model_damaged_on_the_way_is_never_loaded(harness: Harness, client_key: str) -> None:
    """The server sends the model's SHA-256 with it; bytes that miss it are refused and the
    ranker keeps the model it had, until a download comes whole."""
    network = Damaging(harness.client)
    ranker = LocalRanker(key=client_key, http=network, background=False, clock=harness.clock)
    try:
        _train(harness)
        with pytest.raises(ApiError) as caught:
            ranker.refresh()
        assert (caught.value.status, caught.value.code) == (502, "ModelChecksumMismatch")
        assert ranker.served.path is None  # still no model
        assert ranker.rank(_body(1))["ranking"]  # uniform, as before
        network.damage = False
        assert ranker.refresh()
        assert ranker.served.path is not None
        _same(harness, ranker, [_body(i) for i in range(2, 12)])
        # From a server older than the digest, a model comes without one: loaded unchecked
        # (here damaged, to see that it was loaded).
        network.damage = network.strip = True
        _train(harness, 50)
        assert ranker.refresh()
    finally:
        ranker.close()


def test_local_explains_its_decisions_as_the_server_does(
    harness: Harness, local: LocalRanker
) -> None:
    """With isInferenceExplainabilityEnabled the answer carries the same inferenceExplanation
    (before and after the first model, with exclusions)."""
    harness.configure(isInferenceExplainabilityEnabled=True)
    _same(harness, local, [_body(i) for i in range(5)])
    _train(harness, 100)
    assert local.refresh()
    bodies = [_body(i) for i in range(600, 620)]
    bodies += [_body(i, excludedActions=["a1"]) for i in range(620, 630)]
    _same(harness, local, bodies)
    assert local.rank(_body(631))["inferenceExplanation"][0]["features"]


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"actions": []},
        {"actions": [{"id": "x"}]},
        {"actions": ACTIONS, "excludedActions": [a["id"] for a in ACTIONS]},
        {"actions": [*ACTIONS, ACTIONS[0]]},
        {"actions": ACTIONS, "eventId": ""},
        {"actions": ACTIONS, "deferActivation": "yes"},
        {"actions": ACTIONS, "contextFeatures": [{"_multi": 1, "ok": {"ä": [1]}}]},
        {"actions": ACTIONS, "contextFeatures": [{"tags": ["a", "b"]}]},
        {"actions": ACTIONS, "episodeId": "ep1"},
    ],
)
def test_bad_input_is_refused_as_the_server_refuses_it(
    harness: Harness, local: LocalRanker, body: Any
) -> None:
    _refused_alike(harness, local, body)


def test_local_decisions_are_joined_and_learned_like_the_server_s(
    harness: Harness, local: LocalRanker
) -> None:
    """A fleet mixing local and server ranking learns one model from both."""
    for i in range(100):
        source = local if i % 2 else None
        out = local.rank(_body(i)) if source else harness.rank(_body(i))
        value = 1.0 if out["rewardActionId"] == "a3" else 0.0
        if source:
            local.reward(f"e{i}", value)
        else:
            harness.reward(f"e{i}", value)
    assert local.pending == 100  # 50 decisions and 50 rewards
    assert local.flush() == 100
    assert local.pending == 0
    harness.clock.advance(601)
    harness.work()
    for i in range(100):
        line = joined(harness, f"e{i}")
        assert line is not None and "_label_cost" in line, i
    r = harness.client.get("/personalizer/v1.0/model/properties", headers=AUTH)
    assert r.status_code == 200
    stats = harness.client.get("/loops/default/stats", headers=AUTH).json()
    assert sum(b.get("joined", 0) for b in stats["buckets"]) == 100
    assert local.refresh()  # the model that learned them all


def test_a_shipped_context_vw_cannot_take_is_dead_lettered_not_learned(
    harness: Harness, local: LocalRanker
) -> None:
    """A client key may ship any record: one whose context names a namespace past ASCII (VW
    9.11.9 corrupts its memory on it; the rank path never writes one) is taken, then
    dead-lettered when the log is ingested, never learned; the rest learn."""
    bad = record.Decision(
        "default", "bad", harness.clock(), False, "Online",
        '{"n":{"a":1},"_multi":[{"_tag":"a0","\u00e9":{"b":1}}]}', [0], [1.0], 0, "N/A",
    )  # fmt: skip
    local._queue(record.encode(bad))
    ranked = [local.rank(_body(i)) for i in range(3)]
    assert local.flush() == 4 and local.refused == 0
    harness.clock.advance(601)
    harness.work()
    with harness.dloop.sessions() as s:
        letters = list(s.scalars(select(DeadLetter)))
    assert len(letters) == 1 and '"bad"' in letters[0].record
    assert "must start with an ASCII character" in letters[0].reason
    assert joined(harness, "bad") is None
    for out in ranked:
        assert joined(harness, out["eventId"]) is not None


def test_a_batch_whose_refused_records_cannot_be_kept_waits_whole(
    harness: Harness, local: LocalRanker
) -> None:
    """The dead letters are written before anything of the batch is appended: when they
    cannot be (the database away; here their table), the batch is refused whole with a 503
    and stays pending, and once sent again it is taken once."""
    ranked = [local.rank(_body(i)) for i in range(2)]
    local._queue(b'{"k":"r","loop":"other","id":"e1","t":1,"u":"x","v":0.5}')
    with harness.dloop.sessions.begin() as s:
        s.execute(text("ALTER TABLE dead_letters RENAME TO dead_letters_away"))
    with pytest.raises(ApiError) as caught:
        local.flush()
    assert caught.value.status == 503 and caught.value.code == "ServiceUnavailable"
    assert local.pending == 3 and local.refused == 0
    with harness.dloop.sessions.begin() as s:
        s.execute(text("ALTER TABLE dead_letters_away RENAME TO dead_letters"))
    assert local.flush() == 2 and local.refused == 1
    harness.clock.advance(601)
    harness.work()
    with harness.dloop.sessions() as s:
        for out in ranked:
            rows = s.scalars(select(Joined).where(Joined.event_id == out["eventId"])).all()
            assert len(rows) == 1, out["eventId"]


def test_shipped_records_are_checked(harness: Harness, local: LocalRanker, client_key: str) -> None:
    """Each line on its own: what the server cannot take is dead-lettered with why (the first
    reasons in the answer), the rest taken; a body without records is a 400."""
    post = lambda body: harness.client.post(  # noqa: E731
        "/personalizer/v1.0/local/records",
        content=body,
        headers={"Ocp-Apim-Subscription-Key": client_key},
    )
    r = post(b"\n \n")
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "InvalidRecords"
    r = post(
        b'{"k":"r","loop":"default","id":"e1","t":1,"u":"x","v":5}\nnot json\n'
        b'{"k":"r","loop":"default","id":"e2","t":1,"u":"y","v":0.5}'
    )
    assert r.status_code == 202
    answer = r.json()
    assert answer["accepted"] == 1 and answer["deadLettered"] == 2
    assert answer["refusals"][0] == (
        "line 1: outcome 'reward' must be a finite number between -1 and 1"
    )
    assert answer["refusals"][1].startswith("line 2: ")
    metrics = harness.client.get("/metrics", headers=AUTH).text
    assert "dloop_dead_letters 2" in metrics
    with pytest.raises(ApiError) as caught:
        local.reward("e1", 2.0)
    assert caught.value.code == "InvalidRewardRequest"
    with pytest.raises(ApiError) as caught:
        local.outcomes("e1", {"click": 1})
    assert caught.value.message.startswith("outcomes: outcome 'click' is not configured")


def test_the_model_endpoint_long_polls_for_a_new_model(harness: Harness, client_key: str) -> None:
    key = {"Ocp-Apim-Subscription-Key": client_key}
    r = harness.client.get("/personalizer/v1.0/local/model", headers=key)
    assert r.status_code == 204 and r.headers["X-Dloop-Model-Id"] == "N/A"
    _train(harness, 50)
    r = harness.client.get("/personalizer/v1.0/local/model", headers=key)
    assert r.status_code == 200 and r.content
    model_id = r.headers["X-Dloop-Model-Id"]
    assert r.headers["ETag"] == f'"{model_id}"'
    same = harness.client.get(
        "/personalizer/v1.0/local/model?wait=0.2", headers={**key, "If-None-Match": f'"{model_id}"'}
    )
    assert same.status_code == 304


def test_multi_slot_local_ranks_exactly_as_the_server(harness: Harness) -> None:
    c = harness.client
    assert c.put("/loops/page", json={"kind": "ccb"}, headers=AUTH).status_code == 201
    base = "/loops/page/personalizer/v1.0"
    key = c.post("/loops/page/keys", headers=AUTH).json()["key"]
    local = LocalRanker(key=key, loop="page", http=c, background=False, clock=harness.clock)

    def body(i: int, **kw: Any) -> dict[str, Any]:
        doc = {
            "eventId": f"m{i}",
            "contextFeatures": [{"user": f"u{i % 5}"}],
            "actions": ACTIONS,
            "slots": [
                {"id": "top", "baselineAction": "a0", "features": [{"size": "large"}]},
                {"id": "side", "baselineAction": "a1", "excludedActions": [f"a{2 + i % 3}"]},
            ],
        }
        doc.update(kw)
        return doc

    def same(bodies: list[dict[str, Any]]) -> None:
        local.refresh()
        for b in bodies:
            r = c.post(f"{base}/multislot/rank", json=b, headers=AUTH)
            assert r.status_code == 201, r.text
            assert local.rank_multi_slot(b) == r.json(), b

    same([body(i) for i in range(20)])  # no model yet
    for i in range(300):
        out = c.post(f"{base}/multislot/rank", json=body(1000 + i), headers=AUTH).json()
        rewards = [
            {"slotId": s["id"], "value": 1.0 if s["rewardActionId"] == "a4" else 0.0}
            for s in out["slots"]
        ]
        c.post(
            f"{base}/multislot/events/m{1000 + i}/reward", json={"reward": rewards}, headers=AUTH
        )
    harness.clock.advance(601)
    harness.work()
    same([body(i) for i in range(100, 160)])
    cfg = c.get(f"{base}/configurations/service", headers=AUTH).json()
    c.put(f"{base}/configurations/service", json={**cfg, "holdoutPercentage": 40}, headers=AUTH)
    same([body(i, unitId=f"u{i}") for i in range(200, 260)])
    with pytest.raises(ApiError) as caught:
        local.rank(_body(1))
    assert caught.value.message == "this is a multi-slot loop: rank with /multislot/rank"
    local.close()


def test_threads_share_one_local_ranker(harness: Harness, local: LocalRanker) -> None:
    """Ranks from several threads at once (one lock guards VW) answer as the server does."""
    from concurrent.futures import ThreadPoolExecutor

    _train(harness, 100)
    local.refresh()
    bodies = [_body(i, excludedActions=[f"a{i % 5}"]) for i in range(200)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        mine = list(pool.map(local.rank, bodies))
    assert [m for m in mine] == [harness.rank(b) for b in bodies]
    assert local.pending == 200


def test_rl_loops_rank_and_end_episodes_as_the_server(harness: Harness) -> None:
    """An RL loop: steps of an episode (episodeId) and episodes of one step answer as the
    server's; an episode ended in process is stored like one ended through the API, and the
    steps it shipped are joined into their episode and learned."""
    c = harness.client
    assert c.put("/loops/tutor", json={"kind": "rl"}, headers=AUTH).status_code == 201
    base = "/loops/tutor/personalizer/v1.0"
    cfg = c.get(f"{base}/configurations/service", headers=AUTH).json()
    cfg |= {"modelExportFrequency": "PT1S", "rewardWaitTime": "PT5S"}
    assert c.put(f"{base}/configurations/service", json=cfg, headers=AUTH).status_code == 200
    key = c.post("/loops/tutor/keys", headers=AUTH).json()["key"]
    local = LocalRanker(key=key, loop="tutor", http=c, background=False, clock=harness.clock)
    moves = [{"id": m, "features": [{"move": m}]} for m in ("left", "right")]

    def step(i: int, episode: str | None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "eventId": f"s{i}",
            "contextFeatures": [{"cell": f"c{i % 4}"}],
            "actions": moves,
        }
        if episode is not None:
            doc["episodeId"] = episode
        return doc

    def same(bodies: list[dict[str, Any]]) -> None:
        local.refresh()
        for b in bodies:
            r = c.post(f"{base}/rank", json=b, headers=AUTH)
            assert r.status_code == 201, r.text
            assert local.rank(b) == r.json(), b

    same([step(i, "ep0") for i in range(4)] + [step(i, None) for i in range(4, 6)])
    # 6 decisions the server made first (it keeps its own) and 2 episodes of one step ended
    assert local.flush() == 8
    # in process: two episodes, rewarded and ended
    for e in range(2):
        for i in range(3):
            out = local.rank(step(100 + 10 * e + i, f"mine{e}"))
            local.reward(out["eventId"], 1.0 if out["rewardActionId"] == "right" else 0.0)
        local.end_episode(f"mine{e}", terminated=e == 0)
    with pytest.raises(ApiError) as caught:
        local.end_episode("bad\n")
    assert caught.value.code == "InvalidRequest"
    assert local.flush() == 2 * (3 + 3 + 1)
    harness.clock.advance(10)
    harness.work()
    with harness.dloop.sessions() as s:
        episodes = {e.episode_id: e for e in s.scalars(select(Episode))}
        steps = {j.event_id: j.episode for j in s.scalars(select(Joined))}
    assert not episodes["mine1"].terminated and episodes["mine0"].terminated
    assert episodes["mine0"].learned and episodes["mine1"].learned
    assert {steps[f"s{100 + i}"] for i in range(3)} == {"mine0"}
    assert local.refresh()  # the model that learned them
    same([step(i, "ep1") for i in range(200, 204)] + [step(i, None) for i in range(204, 206)])
    local.close()


def test_tile_coding_is_applied_alike_by_the_server_and_the_local_ranker(
    harness: Harness, local: LocalRanker
) -> None:
    """A loop's tileCoding (learners.tiles) codes the numeric context features the same way in
    both rankers; the log holds the coded features; a coded feature that is not numeric is
    refused with the same 400."""
    cfg = harness.configure(tileCoding={"tilings": 4, "widths": {"pos.x": [0.3, 0.2]}})
    assert cfg["tileCoding"] == {"tilings": 4, "widths": {"pos.x": [0.3, 0.2]}}

    def body(i: int, x: Any) -> dict[str, Any]:
        return _body(i, contextFeatures=[{"user": f"u{i % 7}", "pos": {"x": x}}])

    _same(harness, local, [body(i, [i * 0.1, -i * 0.05]) for i in range(20)])
    _train(harness, 50)
    harness.rank(body(900, [0.35, -0.1]))
    harness.reward("e900", 1.0)
    harness.clock.advance(601)
    harness.work()
    line = joined(harness, "e900")
    assert line is not None
    assert line["c"]["FromUrl"][0]["pos"] == {
        "x#0": "=1,-1",
        "x#1": "=1,0",
        "x#2": "=1,0",
        "x#3": "=1,-1",
    }
    assert local.refresh()
    _same(harness, local, [body(i, [i * 0.1, -i * 0.05]) for i in range(20, 60)])
    assert "pos.x is tile-coded" in _refused_alike(harness, local, body(1000, "far"))
    cfg["tileCoding"] = {"widths": {"pos.x": [0.3, -1]}}
    r = harness.client.put("/personalizer/v1.0/configurations/service", json=cfg, headers=AUTH)
    assert r.status_code == 400 and "tile widths" in r.json()["error"]["message"], r.text


def test_exposure_caps_count_every_ranker_that_ships_to_the_server(
    harness: Harness, client_key: str
) -> None:
    """A fleet: ranker A's decisions, once shipped, count toward the cap ranker B (and the
    server's own rank) draws by; before B hears from the server, its own counts alone hold."""
    h = harness
    cfg = h.client.get("/personalizer/configurations/service", headers=AUTH).json()
    cfg["exposureCaps"] = [{"actionId": "a0", "maxShare": 0.1, "window": "PT1H"}]
    r = h.client.put("/personalizer/configurations/service", json=cfg, headers=AUTH)
    assert r.status_code == 200, r.text

    def share_of_a0(answer: dict[str, Any]) -> float:
        return float(next(a["probability"] for a in answer["ranking"] if a["id"] == "a0"))

    rankers = [
        LocalRanker(key=client_key, http=h.client, background=False, clock=h.clock)
        for _ in range(2)
    ]
    a, b = rankers
    try:
        served = [a.rank(_body(i))["rewardActionId"] for i in range(40)]
        assert served.count("a0") / 40 > 0.1  # no model yet: uniform over 5 actions
        assert a.flush() == 40
        first = b.rank(_body(101))  # B has not heard from the server yet
        assert share_of_a0(first) == pytest.approx(0.2) and first["rewardActionId"] != "a0"
        assert b.flush() == 1  # the answer carries the server's counts
        # B's own counts (one decision, not a0) would not cap a0; the fleet's do.
        assert share_of_a0(b.rank(_body(102))) <= 0.1 + 1e-9
        assert share_of_a0(h.rank(_body(105))) <= 0.1 + 1e-9  # the server counts A's too
    finally:
        for ranker in rankers:
            ranker.close()


def test_a_record_the_server_refuses_is_dead_lettered_and_the_rest_ships_in_order(
    harness: Harness, local: LocalRanker
) -> None:
    """A record the server refuses as such (here one of another loop; in life an outcome an
    admin has since removed) goes to its dead letters, with why: it must not hold up the rest
    of its batch, then or ever after, nor be lost without a trace."""
    ranked = [local.rank(_body(i)) for i in range(5)]
    foreign = b'{"k":"r","loop":"other","id":"e1","t":1,"u":"x","v":0.5}'
    local._queue(foreign)
    ranked += [local.rank(_body(i)) for i in range(5, 9)]
    assert local.pending == 10
    assert local.flush() == 9
    assert local.pending == 0 and local.refused == 1
    assert local.last_refusal == "line 6: a record of loop 'other'"
    with harness.dloop.sessions() as s:
        letters = [
            (d.source, d.loop, d.ref, d.record, d.reason) for d in s.scalars(select(DeadLetter))
        ]
    assert letters == [
        ("local-records", "default", None, foreign.decode(), "line 6: a record of loop 'other'")
    ]
    ranked.append(local.rank(_body(9)))
    assert local.flush() == 1 and local.refused == 1
    harness.clock.advance(601)
    harness.work()
    for out in ranked:
        assert joined(harness, out["eventId"]) is not None, out["eventId"]


def test_a_rank_s_record_is_written_after_it_answers_and_ships_in_order(
    harness: Harness, local: LocalRanker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank hands its decision over and answers; its record is written later (by the
    shipping thread, by `pending` and `flush`, or by a rank finding MADE_MAX waiting), in the
    order of the calls, rewards and activations among them."""
    import service.local

    expected = []
    for i in range(6):
        out = local.rank(_body(i, deferActivation=i % 2 == 0))
        if i % 2 == 0:
            local.activate(out["eventId"])
            expected += [("d", f"e{i}"), ("a", f"e{i}")]
        else:
            expected.append(("d", f"e{i}"))
        local.reward(out["eventId"], 0.5)
        expected.append(("r", f"e{i}"))
    assert local._pending.records == 0  # nothing written yet
    assert local.pending == 15 and local.flush() == 15
    lines, _ = harness.dloop.log.read(0)
    kinds = {record.REWARD: "r", record.ACTIVATION: "a"}
    shipped = [
        ("d", r.id) if isinstance(r, record.Decision) else (kinds[r.k], r.id)
        for r in map(record.decode, lines)
    ]
    assert shipped == expected
    decision = record.decode(lines[0])
    assert isinstance(decision, record.Decision)
    assert '"_multi"' in decision.c and decision.a and decision.p

    monkeypatch.setattr(service.local, "MADE_MAX", 3)
    local.rank(_body(10))
    local.rank(_body(11))
    assert local._pending.records == 0
    local.rank(_body(12))  # the third: written by the rank itself
    assert local._pending.records == 3 and not local._made


def test_a_shipped_record_is_kept_as_sent_only_when_it_holds_its_fields_alone(
    harness: Harness, local: LocalRanker, client_key: str
) -> None:
    """What the log keeps of a shipped record: the bytes sent when they hold the record's
    fields and nothing else (dloop's own rankers' records), else the record written again,
    without what no reader reads (here a large unknown key) and with its time as a number."""
    local.rank(_body(0))
    assert local.flush() == 1
    own, _ = harness.dloop.log.read(0)
    sent = [
        b'{"k":"r","loop":"default","id":"e0","t":1.5,"u":"r1","v":0.5,"junk":"' + b"x" * 50_000
        + b'"}',
        b'{"k":"a","loop":"default","id":"e0","t":"2.5","u":"a1"}',
        b'{"k":"r","loop":"default","id":"e0","t":3,"u":"r2","v":1}',
    ]  # fmt: skip
    r = harness.client.post(
        "/personalizer/v1.0/local/records",
        content=b"\n".join(sent),
        headers={"Ocp-Apim-Subscription-Key": client_key},
    )
    assert r.status_code == 202 and r.json()["accepted"] == 3, r.text
    lines, _ = harness.dloop.log.read(0)
    assert lines[0] == own[0]  # the ranker's decision, as it sent it
    assert lines[1] == b'{"k":"r","loop":"default","id":"e0","t":1.5,"u":"r1","v":0.5}'
    assert lines[2] == b'{"k":"a","loop":"default","id":"e0","t":2.5,"u":"a1"}'
    assert lines[3] == sent[2]


class Flaky:
    """The test client, with the records endpoint away (`mode` "away": a connection error) or
    answering a status of its own (`mode` an int), as a server in trouble would."""

    def __init__(self, client: Any) -> None:
        self.client, self.mode = client, None

    def get(self, *args: Any, **kw: Any) -> Any:
        return self.client.get(*args, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        if path.endswith("/local/records") and self.mode is not None:
            if self.mode == "away":
                raise httpx.ConnectError("the server is away")
            error = {"error": {"code": "ServiceUnavailable", "message": "try again"}}
            return httpx.Response(self.mode, json=error)
        return self.client.post(path, **kw)

    def close(self) -> None:
        pass


def _logged_ids(h: Harness) -> list[str]:
    lines, _ = h.dloop.log.read(0, 1 << 30)
    return [record.decode(line).id for line in lines]


def test_a_decision_of_the_largest_request_ships_and_one_too_large_holds_up_nothing(
    harness: Harness, local: LocalRanker
) -> None:
    """The log record of a request the server's rank takes (its context escaped, here 200 KB
    of quotes, about twice as long) is taken by the records endpoint; a record no request
    could make (a 1.2 MB context, ranked in process) is dropped and counted, and the records
    behind it ship."""
    quotes = {"eventId": "q", "actions": ACTIONS, "contextFeatures": [{"q": '"' * 120_000}]}
    assert len(orjson.dumps(quotes)) < 256 * 1024
    r = harness.client.post("/personalizer/v1.0/rank", content=orjson.dumps(quotes), headers=AUTH)
    assert r.status_code == 201, r.text
    local.rank({**quotes, "eventId": "q-local"})
    local.rank(_body(1))
    assert local.flush() == 2 and local.pending == 0
    assert _logged_ids(harness)[-2:] == ["q-local", "e1"]

    huge = {"eventId": "huge", "actions": ACTIONS, "contextFeatures": [{"q": "x" * 1_200_000}]}
    local.rank(_body(2))
    local.rank(huge)
    local.rank(_body(3))
    assert local.flush() == 2 and local.pending == 0
    assert local.dropped == 1 and "request body exceeds" in (local.last_refusal or "")
    assert _logged_ids(harness)[-2:] == ["e2", "e3"]


def test_what_the_server_does_not_take_when_the_ranker_closes_waits_on_disk(
    harness: Harness, client_key: str, tmp_path: Path
) -> None:
    """A ranker closed while the server answers its batches with an error (503 here) leaves
    them in its buffer directory, shipped by the next ranker given it; without a buffer
    directory, what is lost is counted. A closed ranker records nothing more."""
    flaky = Flaky(harness.client)
    make = lambda **kw: LocalRanker(  # noqa: E731
        key=client_key, http=flaky, background=False, clock=harness.clock, **kw
    )
    ranker = make(buffer_dir=tmp_path / "buffer")
    for i in range(5):
        ranker.rank(_body(i))
    flaky.mode = 503
    ranker.close()
    flaky.mode = None
    again = make(buffer_dir=tmp_path / "buffer")
    assert again.pending == 5 and again.flush() == 5
    again.close()
    assert _logged_ids(harness) == [f"e{i}" for i in range(5)]
    with pytest.raises(RuntimeError):
        ranker.rank(_body(9))

    lost = make()
    lost.rank(_body(7))
    flaky.mode = "away"
    lost.close()
    assert lost.dropped == 1


def test_the_buffer_directory_belongs_to_one_ranker_and_odd_files_hold_up_nothing(
    harness: Harness, client_key: str, tmp_path: Path
) -> None:
    """A second ranker on a directory in use is refused (they would overwrite each other's
    batch files); a batch file a crash left empty is skipped, a file not named as a batch
    is left alone."""
    buffer = tmp_path / "buffer"
    make = lambda: LocalRanker(  # noqa: E731
        key=client_key,
        http=harness.client,
        background=False,
        clock=harness.clock,
        buffer_dir=buffer,
        timeout=0.2,
    )
    first = make()
    with pytest.raises(RuntimeError, match="held by another LocalRanker"):
        make()
    first.close()
    (buffer / "000000000000.ndjson").write_bytes(b"")
    (buffer / "backup.ndjson").write_bytes(b"not a batch")
    ranker = make()
    ranker.rank(_body(0))
    assert ranker.pending == 1 and ranker.flush() == 1
    assert (buffer / "backup.ndjson").exists()
    ranker.close()


def test_multi_slot_observations_are_refused_or_taken_as_the_server_does(
    harness: Harness,
) -> None:
    """On a multi-slot loop a ranker refuses single-slot rewards and outcomes with the server's
    400 (they would never be learned), and takes per-slot rewards and outcomes as the
    server's /multislot/events calls do; on a single-slot loop, the reverse."""
    c = harness.client
    assert c.put("/loops/page", json={"kind": "ccb"}, headers=AUTH).status_code == 201
    key = c.post("/loops/page/keys", headers=AUTH).json()["key"]
    page = LocalRanker(key=key, loop="page", http=c, background=False, clock=harness.clock)
    base = "/loops/page/personalizer/v1.0"

    def alike(call: Any, path: str, body: Any) -> None:
        r = c.post(path if path.startswith("/personalizer") else f"{base}{path}", json=body,
                   headers=AUTH)  # fmt: skip
        assert r.status_code == 400, r.text
        with pytest.raises(ApiError) as caught:
            call()
        assert (caught.value.code, caught.value.message) == (
            r.json()["error"]["code"],
            r.json()["error"]["message"],
        )

    alike(lambda: page.reward("m1", 1.0), "/events/m1/reward", {"value": 1.0})
    alike(lambda: page.outcomes("m1", {"reward": 1}), "/events/m1/outcomes", {"outcomes": {}})
    bad = {"reward": [{"slotId": "top", "value": 3}]}
    alike(lambda: page.reward_multi_slot("m1", bad), "/multislot/events/m1/reward", bad)
    slots = [{"id": "top", "baselineAction": "a0"}, {"id": "side", "baselineAction": "a1"}]
    out = page.rank_multi_slot({"eventId": "m1", "actions": ACTIONS, "slots": slots})
    page.reward_multi_slot("m1", {"reward": [{"slotId": "top", "value": 1.0}]})
    page.outcomes_multi_slot("m1", {"outcomes": [{"slotId": "side", "outcomes": {"reward": 0.5}}]})
    assert page.flush() == 3
    lines, _ = harness.dloop.log.read(0, 1 << 30)
    observed = [record.decode(line) for line in lines[-2:]]
    assert [(o.id, o.slot, o.v) for o in observed if isinstance(o, record.Observation)] == [
        ("m1", "top", 1.0),
        ("m1", "side", 0.5),
    ]
    assert out["eventId"] == "m1"
    page.close()

    single = LocalRanker(
        key=c.post("/loops/default/keys", headers=AUTH).json()["key"],
        http=c,
        background=False,
        clock=harness.clock,
    )
    alike(
        lambda: single.reward_multi_slot("e1", {"reward": []}),
        "/personalizer/v1.0/multislot/events/e1/reward",
        {"reward": []},
    )
    single.close()


def test_the_shipping_thread_outlives_a_failure(
    harness: Harness, client_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure the shipping thread does not expect (a full disk while it moves records to
    the buffer directory, the server away) is logged, and it carries on: the records ship
    once the server is back. (The model's follower: tests/e2e/test_local.py.)"""
    failed: list[OSError] = []
    spill = LocalRanker._spill

    def full_once(self: LocalRanker) -> None:
        if not failed:
            failed.append(OSError(28, "No space left on device"))
            raise failed[0]
        spill(self)

    monkeypatch.setattr(LocalRanker, "_spill", full_once)
    flaky = Flaky(harness.client)
    flaky.mode = "away"
    ranker = LocalRanker(key=client_key, http=flaky, ship_every=0.05, clock=harness.clock)
    try:
        ranker.rank(_body(0))
        deadline = time.monotonic() + 10
        while not failed:
            assert time.monotonic() < deadline, "the shipping thread never tried"
            time.sleep(0.01)
        flaky.mode = None
        deadline = time.monotonic() + 10
        while ranker.pending:
            assert time.monotonic() < deadline, "the shipping thread stopped"
            time.sleep(0.01)
        assert _logged_ids(harness) == ["e0"]
    finally:
        ranker.close()
