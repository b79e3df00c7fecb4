"""Every operation through the official SDKs, against a real server with the embedded worker."""

from __future__ import annotations

import io
import time

import httpx
import pytest
from azure.ai.personalizer import PersonalizerAdministrationClient, PersonalizerClient
from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import HttpResponseError

from tests.conftest import ADMIN_KEY, LiveServer

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
    with pytest.raises(HttpResponseError) as err:
        admin.get_log_properties()
    assert err.value.status_code == 404
    assert err.value.error is not None and err.value.error.code == "LogsPropertiesNotFound"

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


def test_offline_evaluation_through_the_admin_sdk(live_server: LiveServer) -> None:
    """Log a simulated world's traffic, evaluate policies on it, apply the best one."""
    from datetime import UTC, datetime, timedelta

    from learners.worlds import CBWorld

    client, admin = clients(live_server)
    config = admin.get_service_configuration()
    config.update(modelExportFrequency="PT1S", rewardWaitTime="PT5S")
    admin.update_service_configuration(config)
    world = CBWorld(n_actions=4, seed=5)
    start = datetime.now(UTC) - timedelta(minutes=1)
    uniform = []  # the uniform policy's true expected reward on each drawn context
    for _ in range(1500):
        values, features = world.draw_context()
        r = client.rank({"contextFeatures": features, "actions": world.actions()})
        chosen = world.action_ids.index(r["rewardActionId"])
        client.reward(r["eventId"], {"value": world.reward(values, chosen)})
        uniform.append(float(world.expected(values).mean()))
    end = datetime.now(UTC) + timedelta(minutes=1)
    deadline = time.time() + 30
    while (
        'dloop_decisions_joined{loop="default"} 1500'
        not in httpx.get(
            f"{live_server.url}/metrics", headers={"Ocp-Apim-Subscription-Key": ADMIN_KEY}
        ).text
    ):
        assert time.time() < deadline, "decisions not joined"
        time.sleep(0.2)
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
