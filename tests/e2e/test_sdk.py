"""Every operation through the official SDKs, against a real server with the embedded worker."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure.ai.personalizer import PersonalizerAdministrationClient, PersonalizerClient
from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import HttpResponseError

from tests.support.harness import ADMIN_KEY, LiveServer, make_settings, serving
from tests.support.pipeline import wait_for

ACTIONS = [
    {"id": "pasta", "features": [{"cuisine": "italian", "spice": 1}]},
    {"id": "curry", "features": [{"cuisine": "indian", "spice": 4}]},
    {"id": "salad", "features": [{"cuisine": "greek", "spice": 0.5}]},
]


def clients(server: LiveServer) -> tuple[PersonalizerClient, PersonalizerAdministrationClient]:
    cred = AzureKeyCredential(ADMIN_KEY)
    return (
        PersonalizerClient(server.url, cred, retry_total=0),
        PersonalizerAdministrationClient(server.url, cred, retry_total=0),
    )


def test_new_sdk_every_operation(live_server: LiveServer) -> None:
    client, admin = clients(live_server)
    config = admin.get_service_configuration()
    assert config["rewardWaitTime"] == "PT10M"
    config["modelExportFrequency"] = "PT1S"
    config["rewardWaitTime"] = "PT5S"
    updated = admin.update_service_configuration(config)
    assert updated["modelExportFrequency"] == "PT1S"

    policy = admin.get_policy()
    assert "--cb_explore_adf" in policy["arguments"]
    new_policy = {
        "name": "personalizer-default",
        "arguments": "--cb_explore_adf --epsilon 0.2 --power_t 0 -l 0.001 --cb_type mtr -q ::",
    }
    assert admin.update_policy(new_policy)["name"] == "personalizer-default"
    assert admin.reset_policy()["name"] == "dloop-default"

    ranked = []
    for i in range(40):
        response = client.rank(
            {
                "contextFeatures": [{"time": "evening" if i % 2 else "noon"}],
                "actions": ACTIONS,
                "excludedActions": ["salad"],
                "eventId": f"sdk-{i}",
                "deferActivation": i % 4 == 0,
            }
        )
        assert response["eventId"] == f"sdk-{i}"
        assert response["rewardActionId"] in {"pasta", "curry"}
        ranked.append(response)
        if i % 4 == 0:
            client.activate(f"sdk-{i}")
        client.reward(f"sdk-{i}", {"value": 1.0 if response["rewardActionId"] == "curry" else 0.0})

    deadline = time.time() + 15
    while time.time() < deadline:
        props = admin.get_model_properties()
        if props["creationTime"] != props["lastModifiedTime"]:
            break
        time.sleep(0.2)
    assert props["creationTime"] != props["lastModifiedTime"], "no model was published"

    model = b"".join(admin.export_model())
    signed = b"".join(admin.export_model(signed=True))
    assert len(model) > 100 and signed.startswith(b"PK")
    admin.reset_model()
    admin.import_model(io.BytesIO(signed))
    log_props = admin.get_log_properties()
    assert log_props["dateRange"]["from"] <= log_props["dateRange"]["to"]
    admin.delete_logs()
    assert admin.get_log_properties() == {}  # as Personalizer answered: 200, no dateRange

    with pytest.raises(HttpResponseError) as err:
        client.reward("sdk-0", {"value": 7})
    assert err.value.status_code == 400 and err.value.error.code == "InvalidRewardRequest"


def test_sdk_against_a_named_loop(live_server: LiveServer) -> None:
    headers = {"Ocp-Apim-Subscription-Key": ADMIN_KEY}
    r = httpx.put(f"{live_server.url}/loops/menu", json={"kind": "cb"}, headers=headers)
    assert r.status_code == 201
    cred = AzureKeyCredential(ADMIN_KEY)
    loop_url = f"{live_server.url}/loops/menu"
    admin = PersonalizerAdministrationClient(loop_url, cred, retry_total=0)
    config = admin.get_service_configuration()
    config["rewardWaitTime"] = "PT1S"
    admin.update_service_configuration(config)
    client = PersonalizerClient(loop_url, cred, retry_total=0)
    out = client.rank({"actions": ACTIONS, "contextFeatures": [{"a": 1}], "eventId": "m1"})
    assert out["eventId"] == "m1"
    client.reward("m1", {"value": 0.5})
    # The decision and its reward landed in that loop, joined there, and not in the default loop.
    deadline = time.time() + 30
    while True:
        view = httpx.get(f"{loop_url}/personalizer/v1.0/events/m1", headers=headers)
        if view.status_code == 200 and view.json()["joined"]:
            break
        assert time.time() < deadline, view.text
        time.sleep(0.2)
    assert view.json()["ranking"] == out["ranking"]
    assert view.json()["reward"] == 0.5
    default = httpx.get(f"{live_server.url}/personalizer/v1.0/events/m1", headers=headers)
    assert default.status_code == 404, default.text
    metrics = httpx.get(f"{live_server.url}/metrics", headers=headers).text
    assert 'dloop_decisions_joined{loop="menu"} 1' in metrics
    assert 'dloop_rank_total{loop="menu"} 1.0' in metrics
    assert 'dloop_rank_total{loop="default"}' not in metrics
    assert 'dloop_decisions_joined{loop="default"}' not in metrics


def test_old_sdk_rank_reward_activate_on_v1(live_server: LiveServer) -> None:
    from azure.cognitiveservices.personalizer import PersonalizerClient as OldClient
    from azure.cognitiveservices.personalizer.models import RankableAction, RankRequest
    from msrest.authentication import CognitiveServicesCredentials

    client = OldClient(live_server.url, CognitiveServicesCredentials(ADMIN_KEY))
    actions = [RankableAction(id=a["id"], features=a["features"]) for a in ACTIONS]
    request = RankRequest(
        actions=actions,
        context_features=[{"time": "noon"}],
        excluded_actions=["pasta"],
        event_id="old-1",
        defer_activation=True,
    )
    response = client.rank(request)
    assert response.event_id == "old-1"
    assert response.reward_action_id in {"curry", "salad"}
    assert {r.id: r.probability for r in response.ranking}["pasta"] == 0
    client.events.activate("old-1")
    client.events.reward("old-1", 1.0)


@pytest.mark.slow
def test_offline_evaluation_through_the_admin_sdk(live_server: LiveServer) -> None:
    """Log a simulated world's traffic, evaluate policies on it, apply the best one."""
    from datetime import UTC, datetime, timedelta

    from learners.sim.worlds import CBWorld

    client, admin = clients(live_server)
    config = admin.get_service_configuration()
    config.update(modelExportFrequency="PT1S", rewardWaitTime="PT5S")
    admin.update_service_configuration(config)
    world = CBWorld(n_actions=4, seed=5)
    start = datetime.now(UTC) - timedelta(minutes=1)
    uniform = []  # the uniform policy's true expected reward on each drawn context
    # Five batches, each ranked once the served model has learned the ones before it: how much
    # the online policy learns while the traffic runs must not depend on the machine's speed
    # (on a loaded CI box 1,500 ranks could outrun the learner's first export).
    for batch in range(5):
        for _ in range(300):
            values, features = world.draw_context()
            r = client.rank({"contextFeatures": features, "actions": world.actions()})
            chosen = world.action_ids.index(r["rewardActionId"])
            client.reward(r["eventId"], {"value": world.reward(values, chosen)})
            uniform.append(float(world.expected(values).mean()))
        sent = 300 * (batch + 1)
        wait_for(lambda sent=sent: learned(live_server) >= sent, what=f"a model of {sent} events")
    end = datetime.now(UTC) + timedelta(minutes=1)
    evaluation = {
        "name": "weekly",
        "startTime": start.isoformat(),
        "endTime": end.isoformat(),
        "enablePolicyOptimization": True,
        "policies": [{"name": "greedy", "arguments": "--cb_explore_adf --epsilon 0 -q ::"}],
    }
    admin.create_evaluation("ev1", evaluation)
    with pytest.raises(HttpResponseError) as dup:
        admin.create_evaluation("ev1", evaluation)
    assert dup.value.status_code == 400
    deadline = time.time() + 120
    while True:
        got = admin.get_evaluation("ev1", start_time=start, end_time=end)
        if got["status"] in ("Succeeded", "Failed"):
            break
        assert time.time() < deadline, got
        time.sleep(0.5)
    assert got["status"] == "Succeeded", got.get("description")
    results = {v["name"]: v for v in got["content"]["value"]}
    sources = {v["policySource"] for v in results.values()}
    assert sources == {"Online", "Baseline", "Random", "Custom", "OfflineExperimentation"}
    online, rand = results["dloop-default"]["summary"], results["Random"]["summary"]
    # The learning online policy beats uniform random on its own traffic: its lower bound clears
    # the uniform policy's true value (known in closed form), and its estimate clears the uniform
    # policy's estimate. (Comparing the two intervals is not enough: the uniform policy's IPS
    # interval is wide, as it relies on the 5% exploration of each non-greedy action.)
    assert online["confidenceInterval"][0] > sum(uniform) / len(uniform)
    assert online["expectedReward"] > rand["expectedReward"]
    assert got["optimalPolicy"] in results
    assert "dloopTimeseries" not in results["Random"]
    hourly = admin.get_evaluation(
        "ev1", start_time=start, end_time=end, interval_in_minutes=60, window="Rolling"
    )
    assert hourly["content"]["intervalInMinutes"] == 60
    assert len(hourly["content"]["value"][0]["timeseries"]["data"]) >= 1
    assert [e["id"] for e in admin.list_evaluations()] == ["ev1"]
    admin.apply_from_evaluation({"evaluationId": "ev1", "policyName": "greedy"})
    assert admin.get_policy()["arguments"] == "--cb_explore_adf --epsilon 0 -q ::"
    with pytest.raises(HttpResponseError) as missing:
        admin.apply_from_evaluation({"evaluationId": "ev1", "policyName": "nope"})
    assert missing.value.status_code == 404
    admin.delete_evaluation("ev1")
    assert list(admin.list_evaluations()) == []

    window = {"name": "why", "startTime": start.isoformat(), "endTime": end.isoformat()}
    admin.create_feature_importance("fi1", window)
    deadline = time.time() + 120
    while (job := admin.get_feature_importance("fi1"))["status"] not in ("Succeeded", "Failed"):
        assert time.time() < deadline, job
        time.sleep(0.5)
    assert job["status"] == "Succeeded", job.get("description")
    scores = job["featureScores"]
    assert scores[0]["score"] == 1.0 and {s["namespace"] for s in scores} >= {""}
    assert [s["score"] for s in scores] == sorted((s["score"] for s in scores), reverse=True)
    assert [j["id"] for j in admin.list_feature_importances()] == ["fi1"]
    admin.delete_feature_importance("fi1")
    with pytest.raises(HttpResponseError) as gone:
        admin.get_feature_importance("fi1")
    assert gone.value.status_code == 404


def test_multi_slot_through_the_sdk(live_server: LiveServer) -> None:
    """rank_multi_slot / reward_multi_slot / activate_multi_slot unchanged, on a ccb loop."""
    headers = {"Ocp-Apim-Subscription-Key": ADMIN_KEY}
    assert (
        httpx.put(
            f"{live_server.url}/loops/page", json={"kind": "ccb"}, headers=headers
        ).status_code
        == 201
    )
    cred = AzureKeyCredential(ADMIN_KEY)
    client = PersonalizerClient(f"{live_server.url}/loops/page", cred, retry_total=0)
    admin = PersonalizerAdministrationClient(f"{live_server.url}/loops/page", cred, retry_total=0)
    config = admin.get_service_configuration()
    config.update(modelExportFrequency="PT1S", rewardWaitTime="PT2S")
    admin.update_service_configuration(config)
    assert "--ccb_explore_adf" in admin.get_policy()["arguments"]
    slots = [
        {"id": "hero", "baselineAction": "pasta", "features": [{"size": "large"}]},
        {"id": "side", "baselineAction": "curry", "features": [{"size": "small"}]},
    ]
    events = []
    for i in range(30):
        response = client.rank_multi_slot(
            {
                "contextFeatures": [{"time": "evening"}],
                "actions": ACTIONS,
                "slots": slots,
                "eventId": f"ms{i}",
                "deferActivation": i % 2 == 0,
            }
        )
        assert [s["id"] for s in response["slots"]] == ["hero", "side"]
        picked = [s["rewardActionId"] for s in response["slots"]]
        assert len(set(picked)) == 2
        client.reward_multi_slot(f"ms{i}", {"reward": [{"slotId": "hero", "value": 1.0}]})
        client.reward_multi_slot(f"ms{i}", {"reward": [{"slotId": "side", "value": 0.25}]})
        if i % 4 == 0:
            client.activate_multi_slot(f"ms{i}")
        events.append(response)
    with pytest.raises(HttpResponseError) as bad:
        client.rank_multi_slot(
            {"actions": ACTIONS, "slots": [{"id": "x", "baselineAction": "nope"}]}
        )
    assert bad.value.status_code == 400
    # Joined and learned: 15 immediate, 8 activated, 7 deferred and never activated.
    deadline = time.time() + 30
    while True:
        metrics = httpx.get(f"{live_server.url}/metrics", headers=headers).text
        if 'dloop_decisions_joined{loop="page"} 30' in metrics:
            break
        assert time.time() < deadline, metrics
        time.sleep(0.2)
    out = httpx.get(f"{live_server.url}/loops/page/personalizer/v1.0/events/ms1", headers=headers)
    assert out.status_code == 200 and out.json()["reward"] == pytest.approx(0.625)
    view = out.json()
    assert [s["id"] for s in view["slots"]] == ["hero", "side"]
    assert {o["slotId"] for o in view["observations"]} == {"hero", "side"}


def test_log_properties_of_a_loop_without_logs(live_server: LiveServer) -> None:
    """Personalizer answered 200 `{}` for a loop with no logged events (the SDK raises on a
    404): before the first event, and again after the logs are deleted."""
    client, admin = clients(live_server)
    assert admin.get_log_properties() == {}
    client.rank({"actions": ACTIONS, "contextFeatures": [{"a": 1}], "eventId": "lp1"})
    deadline = time.time() + 15
    while not (props := admin.get_log_properties()):
        assert time.time() < deadline, "the decision was not ingested"
        time.sleep(0.05)
    assert props["dateRange"]["from"] <= props["dateRange"]["to"]
    admin.delete_logs()
    assert admin.get_log_properties() == {}


def model_by_context(kind: str) -> bytes:
    """A raw VW model for ACTIONS that prefers pasta when `who` is "a" and curry when it is
    "b" (trained here, so the test waits for no learner). A ccb model has one slot, "hero"."""
    from learners.cb import DEFAULT_POLICY, CBTrainer
    from learners.ccb import DEFAULT_CCB_POLICY, ccb_context, ccb_line
    from learners.features import cb_line, context_json
    from learners.policy import with_exploration

    policy = DEFAULT_CCB_POLICY if kind == "ccb" else DEFAULT_POLICY
    trainer = CBTrainer(with_exploration(policy, 0.2))
    actions = [(a["id"], a["features"]) for a in ACTIONS]
    for i in range(300):
        who, chosen = "ab"[i % 2], i % 3
        cost = -1.0 if actions[chosen][0] == {"a": "pasta", "b": "curry"}[who] else 0.0
        order = [chosen, *(j for j in range(3) if j != chosen)]
        when = "2026-11-24T10:00:00.000000Z"
        if kind == "ccb":
            c = ccb_context([{"who": who}], actions, [("hero", [], [0, 1, 2])])
            outcome = {"id": "hero", "a": order, "p": [1 / 3] * 3, "cost": cost, "original": cost}
            line = ccb_line(
                event_id=f"t{i}",
                timestamp=when,
                c=c,
                outcomes=[outcome],
                baselines=[0],
                model_id="N/A",
            )
        else:
            line = cb_line(
                event_id=f"t{i}",
                timestamp=when,
                context=context_json([{"who": who}], actions),
                ranking=order,
                probabilities=[1 / 3] * 3,
                model_id="N/A",
                cost=cost,
                original_cost=cost,
            )
        trainer.learn(line)
    model = trainer.to_bytes()
    trainer.close()
    return model


def metric(server: LiveServer, name: str) -> str:
    text = httpx.get(f"{server.url}/metrics", headers={"Ocp-Apim-Subscription-Key": ADMIN_KEY}).text
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


def learned(server: LiveServer, loop: str = "default") -> int:
    """How many examples the loop's published model has learned."""
    line = metric(server, f'dloop_model_examples{{loop="{loop}"}}')
    return int(float(line.split()[-1])) if line else 0


def logged_event(server: LiveServer, path: str) -> dict[str, Any]:
    """GET .../events/{id} once the embedded worker has ingested the decision."""
    headers = {"Ocp-Apim-Subscription-Key": ADMIN_KEY}
    deadline = time.time() + 15
    while (r := httpx.get(f"{server.url}{path}", headers=headers)).status_code == 404:
        assert time.time() < deadline, "the decision was not ingested"
        time.sleep(0.05)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_a_reused_event_id_with_another_context_is_ranked_afresh(live_server: LiveServer) -> None:
    """Personalizer's own SDK tests rank one eventId ("123456789") with different contexts.
    Only a repeat of the same request is a retry (answered from the cache); another request with
    a used eventId is answered for its own content, counted, and not logged: the first decision
    is the one rewards join."""
    client, admin = clients(live_server)
    admin.import_model(io.BytesIO(model_by_context("cb")))

    def rank(event_id: str, who: str) -> dict[str, Any]:
        ctx = [{"who": who}]
        out: dict[str, Any] = client.rank(
            {"eventId": event_id, "actions": ACTIONS, "contextFeatures": ctx}
        )
        return out

    def probabilities(response: dict[str, Any]) -> dict[str, float]:
        return {a["id"]: a["probability"] for a in response["ranking"]}

    first = rank("123456789", "a")
    assert rank("123456789", "a") == first  # a retry: the original answer
    again = rank("123456789", "b")
    assert again != first
    assert probabilities(again) == probabilities(rank("fresh", "b"))  # ranked for its context
    assert probabilities(again) != probabilities(first)
    assert metric(live_server, "dloop_rank_retries_total") == (
        'dloop_rank_retries_total{loop="default"} 1.0'
    )
    assert metric(live_server, "dloop_event_id_reused_total") == (
        'dloop_event_id_reused_total{loop="default"} 1.0'
    )
    assert rank("123456789", "a") == first  # the first request's retries still get its answer
    logged = logged_event(live_server, "/personalizer/v1.0/events/123456789")
    assert logged["ranking"] == first["ranking"]

    # Multi-slot shares the mechanism.
    headers = {"Ocp-Apim-Subscription-Key": ADMIN_KEY}
    r = httpx.put(f"{live_server.url}/loops/page", json={"kind": "ccb"}, headers=headers)
    assert r.status_code == 201
    cred = AzureKeyCredential(ADMIN_KEY)
    endpoint = f"{live_server.url}/loops/page"
    ms_client = PersonalizerClient(endpoint, cred, retry_total=0)
    ms_admin = PersonalizerAdministrationClient(endpoint, cred, retry_total=0)
    ms_admin.import_model(io.BytesIO(model_by_context("ccb")))
    slots = [{"id": "hero", "baselineAction": "pasta"}]

    def rank_slots(who: str) -> dict[str, Any]:
        ctx = [{"who": who}]
        body = {"eventId": "123456789", "actions": ACTIONS, "slots": slots, "contextFeatures": ctx}
        out: dict[str, Any] = ms_client.rank_multi_slot(body)
        return out

    first = rank_slots("a")
    assert rank_slots("a") == first
    again = rank_slots("b")
    assert again["slots"] != first["slots"]
    assert rank_slots("a") == first
    assert 'dloop_event_id_reused_total{loop="page"} 1.0' in metric(
        live_server, "dloop_event_id_reused_total"
    )
    logged = logged_event(live_server, "/loops/page/personalizer/v1.0/events/123456789")
    chosen = [s["rewardActionId"] for s in first["slots"]]
    assert [s["rewardActionId"] for s in logged["slots"]] == chosen


PERSONALIZER_CB = "--cb_explore_adf --epsilon 0.2 --power_t 0 -l 0.001 --cb_type mtr -q ::"
PERSONALIZER_CCB = "--ccb_explore_adf --epsilon 0.2 --power_t 0 -l 0.001 --cb_type mtr -q ::"


@pytest.mark.parametrize(
    ("setting", "cb", "ccb"),
    [
        (
            "dloop-default",
            {"name": "dloop-default", "arguments": "--cb_explore_adf --squarecb -q ::"},
            {"name": "dloop-ccb", "arguments": "--ccb_explore_adf --squarecb -q ::"},
        ),
        (
            "personalizer-default",
            {"name": "personalizer-default", "arguments": PERSONALIZER_CB},
            {"name": "personalizer-ccb-default", "arguments": PERSONALIZER_CCB},
        ),
    ],
)
def test_the_default_policy_of_new_loops_and_resets_is_a_setting(
    tmp_path: Path, setting: str, cb: dict[str, str], ccb: dict[str, str]
) -> None:
    """DLOOP_DEFAULT_POLICY: dloop's own default, or Personalizer's exact arguments (which code
    written for Personalizer may expect after reset_policy) for a new loop and after a reset.
    RL loops, which Personalizer did not have, keep dloop's either way."""
    from learners.rl import DEFAULT_RL_POLICY

    rl = {"name": "dloop-rl", "arguments": DEFAULT_RL_POLICY}
    settings = make_settings(tmp_path / "live", default_policy=setting)
    with serving(settings) as server:
        headers = {"Ocp-Apim-Subscription-Key": ADMIN_KEY}
        cred = AzureKeyCredential(ADMIN_KEY)
        for loop, kind, expected in (
            ("", "cb", cb),
            ("/loops/menu", "cb", cb),
            ("/loops/page", "ccb", ccb),
            ("/loops/tutor", "rl", rl),
        ):
            if loop:
                r = httpx.put(f"{server.url}{loop}", json={"kind": kind}, headers=headers)
                assert r.status_code == 201
            admin = PersonalizerAdministrationClient(f"{server.url}{loop}", cred, retry_total=0)
            assert admin.get_policy() == expected
            other = expected["arguments"].replace("-q ::", "-q ::  --l2 1e-6")
            assert admin.update_policy({"name": "other", "arguments": other})["name"] == "other"
            assert admin.reset_policy() == expected
            assert admin.get_policy() == expected
