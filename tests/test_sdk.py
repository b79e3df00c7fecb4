"""Every operation through the official SDKs, against a real server with the embedded worker."""

from __future__ import annotations

import io
import time

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
    import httpx

    r = httpx.put(
        f"{live_server.url}/loops/menu",
        json={"kind": "cb"},
        headers={"Ocp-Apim-Subscription-Key": ADMIN_KEY},
    )
    assert r.status_code == 201
    cred = AzureKeyCredential(ADMIN_KEY)
    client = PersonalizerClient(f"{live_server.url}/loops/menu", cred, retry_total=0)
    out = client.rank({"actions": ACTIONS, "contextFeatures": [{"a": 1}], "eventId": "m1"})
    assert out["eventId"] == "m1"
    client.reward("m1", {"value": 0.5})


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
