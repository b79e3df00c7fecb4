"""Counterfactual estimators on a simulated world whose policy values are known exactly."""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pytest

from learners import estimators, vw
from learners.evaluation import PolicySpec, content, evaluate, read
from learners.features import cb_line, context_json
from learners.sim.worlds import CBWorld
from tests.conftest import AUTH, Harness

N_ACTIONS = 5
TRAITS = (("country", 4), ("device", 3))


def logging_policy(expected: np.ndarray) -> np.ndarray:
    """Half the mass on the action the world ranks third, the rest uniform: neither good nor
    uniform, so every target policy is off-policy."""
    p = np.full(N_ACTIONS, 0.5 / N_ACTIONS)
    p[int(np.argsort(expected)[-3])] += 0.5
    return p


def simulated_log(n: int, seed: int = 3) -> tuple[list[str], dict[str, float]]:
    world = CBWorld(n_actions=N_ACTIONS, traits=TRAITS, seed=seed)
    rng = np.random.default_rng(seed)
    actions = [(f"a{i}", [{"kind": f"k{i}"}]) for i in range(N_ACTIONS)]
    lines = []
    t0 = 1_790_000_000.0
    for i in range(n):
        values, features = world.draw_context()
        expected = world.expected(values)
        p = logging_policy(expected)
        chosen = int(rng.choice(N_ACTIONS, p=p))
        reward = float(rng.random() < expected[chosen])
        order = [chosen] + [a for a in range(N_ACTIONS) if a != chosen]
        lines.append(
            cb_line(
                event_id=f"e{i}",
                timestamp=datetime.fromtimestamp(t0 + i, UTC).isoformat(),
                context=context_json(features, actions),
                ranking=order,
                probabilities=[float(p[a]) for a in order],
                model_id="m",
                cost=-reward,
                original_cost=-reward,
            ).decode()
        )
    # True values: contexts are uniform over every trait combination.
    combos = [
        world.expected(dict(zip([t for t, _ in TRAITS], v, strict=True)))
        for v in itertools.product(*(range(k) for _, k in TRAITS))
    ]
    truth = {
        "Online": float(np.mean([logging_policy(e) @ e for e in combos])),
        "Baseline": float(np.mean([e[0] for e in combos])),
        "Random": float(np.mean([e.mean() for e in combos])),
    }
    return lines, truth


def test_every_estimator_covers_the_true_value_of_known_policies() -> None:
    lines, truth = simulated_log(6000)
    logged = read(lines)
    specs = [PolicySpec(name, name) for name in ("Online", "Baseline", "Random")]
    results = evaluate(logged, specs)
    for res in results:
        true = truth[res.spec.source]
        for name, est in res.estimates.items():
            assert est.low <= true <= est.high, (res.spec.source, name, est, true)
            assert est.high - est.low < 0.12, (res.spec.source, name, est)  # informative
    online = results[0].estimates["ips"]
    # On-policy: weights are 1, IPS is the plain average reward.
    assert online.value == pytest.approx(np.mean([d.reward for d in logged]))


def test_custom_policy_ips_matches_vowpal_wabbits_own_progressive_estimate() -> None:
    """An independent implementation: VW's progressive validation loss for --cb_explore_adf
    is the IPS estimate of its cost under the policy it had before each example."""
    lines, _ = simulated_log(3000)
    args = "--cb_explore_adf --epsilon 0.2 -q ::"
    results = evaluate(read(lines), [PolicySpec("eps", "Custom", args)])
    ws = vw.workspace(f"{args} --dsjson")
    for line in lines:
        vw.learn_line(ws, line)
    vw_cost = ws.get_sum_loss() / ws.get_weighted_examples()
    assert results[0].estimates["ips"].value == pytest.approx(-vw_cost, abs=1e-4)


def test_a_learning_policy_beats_random_and_the_content_has_personalizers_shape() -> None:
    lines, _ = simulated_log(6000)
    logged = read(lines)
    specs = [
        PolicySpec("Online", "Online"),
        PolicySpec("Random", "Random"),
        PolicySpec("squarecb", "Custom", "--cb_explore_adf --squarecb -q ::"),
    ]
    results = evaluate(logged, specs)
    assert results[2].estimates["dr"].low > results[1].estimates["dr"].high
    doc = content(results, start=logged[0].t, end=logged[-1].t + 1)
    assert [v["policySource"] for v in doc["value"]] == ["Online", "Random", "Custom"]
    summary = doc["value"][2]["summary"]
    assert set(summary) >= {"expectedReward", "confidenceInterval"}
    lo, hi = summary["confidenceInterval"]
    assert lo <= summary["expectedReward"] <= hi
    expanding = doc["value"][2]["timeseries"]["data"]
    assert len(expanding) == 20  # 6000 s of log in 5-minute intervals
    assert expanding[-1]["expectedReward"] == summary["expectedReward"]  # expanding window
    hourly = doc["value"][2]["dloopTimeseries"]["60/Rolling"]
    assert len(hourly) == 2 and hourly[0]["expectedReward"] != hourly[1]["expectedReward"]


def test_estimators_edge_cases() -> None:
    assert estimators.snips([], []).value != estimators.snips([], []).value  # NaN
    one = estimators.ips([1.0], [2.0])
    assert one.value == 2.0 and one.low == float("-inf")
    assert estimators.effective_sample_size([1, 1, 1, 1]) == 4.0
    assert estimators.effective_sample_size([4, 0, 0, 0]) == 1.0


def test_feature_importance_ranks_a_planted_signal_above_noise() -> None:
    from learners.importance import feature_importance

    rng = np.random.default_rng(11)
    actions = [(f"a{i}", [{"kind": {"k": f"k{i}"}}]) for i in range(3)]
    lines = []
    for i in range(3000):
        signal = int(rng.integers(3))
        features = [
            {"user": {"segment": f"s{signal}"}},
            {"noise": {"color": f"c{rng.integers(8)}", "day": f"d{rng.integers(7)}"}},
        ]
        chosen = int(rng.integers(3))
        reward = float(rng.random() < (0.8 if chosen == signal else 0.1))
        order = [chosen] + [a for a in range(3) if a != chosen]
        lines.append(
            cb_line(
                event_id=f"e{i}",
                timestamp=datetime.fromtimestamp(1_790_000_000 + i, UTC).isoformat(),
                context=context_json(features, actions),
                ranking=order,
                probabilities=[1 / 3] * 3,
                model_id="m",
                cost=-reward,
                original_cost=-reward,
            ).decode()
        )
    scores = feature_importance(lines)
    by_name = {(s["namespace"], s["featureName"]): s["score"] for s in scores}
    assert scores[0]["namespace"] == "user" and scores[0]["featureName"] == "segment"
    assert by_name[("user", "segment")] == 1.0
    assert by_name[("noise", "color")] < 0.2 and by_name[("noise", "day")] < 0.2
    assert ("kind", "k") in by_name  # action features are scored too


def test_cli_evaluates_replays_and_scores_features_from_a_dsjson_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from service.cli import app

    lines, truth = simulated_log(4000)
    log = tmp_path / "exported.json"
    log.write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    common = ["--source", str(log), "--data-dir", str(tmp_path / "none")]
    out = tmp_path / "evaluation.json"
    result = runner.invoke(
        app,
        [
            "evaluate",
            *common,
            "--policy",
            "eps=--cb_explore_adf --epsilon 0.1 -q ::",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "4000 logged decisions" in result.output
    rows = {line.split()[0]: line for line in result.output.splitlines()[2:] if line.strip()}
    assert {"Online", "Baseline", "Random", "eps"} <= set(rows)
    doc = orjson.loads(out.read_bytes())
    baseline = next(v for v in doc["value"] if v["policySource"] == "Baseline")["summary"]
    lo, hi = baseline["confidenceInterval"]
    assert lo <= truth["Baseline"] <= hi

    since = ["--since", datetime.fromtimestamp(1_790_000_000 + 3000, UTC).isoformat()]
    result = runner.invoke(app, ["evaluate", *common, *since])
    assert "1000 logged decisions" in result.output

    model = tmp_path / "m.vw"
    args = ["--arguments", "--cb_explore_adf --squarecb -q ::", "--out", str(model)]
    result = runner.invoke(app, ["replay", *common, *args])
    assert result.exit_code == 0, result.output
    vw.check_model(model.read_bytes())

    result = runner.invoke(app, ["features", *common, "--top", "3"])
    assert result.exit_code == 0, result.output
    scored = re.findall(r"(\d\.\d{3})  (\S+)", result.output)  # (stderr has the bar)
    assert len(scored) == 3 and scored[0][0] == "1.000", result.output


W = {"name": "n", "startTime": "2026-01-01", "endTime": "2026-01-02"}
EPS = "--cb_explore_adf"


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("evaluations/e", [], "InvalidEvaluationContract"),
        ("evaluations/e", {**W, "name": ""}, "InvalidEvaluationContract"),
        ("evaluations/e", {**W, "startTime": "soon"}, "InvalidEvaluationContract"),
        ("evaluations/e", {**W, "startTime": 5}, "InvalidEvaluationContract"),
        ("evaluations/e", {**W, "startTime": "2026-01-03"}, "InvalidDateTimesInEvaluationContract"),
        (
            "evaluations/e",
            {**W, "policies": [{"name": "a", "arguments": EPS}] * 2},
            "DuplicateCustomPolicyNames",
        ),
        (
            "evaluations/e",
            {**W, "policies": [{"name": f"p{i}", "arguments": EPS} for i in range(11)]},
            "MaximumEvaluationCustomPoliciesExceeded",
        ),
        (
            "evaluations/e",
            {**W, "policies": [{"name": "a", "arguments": f"{EPS} -d x"}]},
            "InvalidPolicyConfiguration",
        ),
        ("featureImportances/f", {**W, "startTime": "later"}, "InvalidRequest"),
        ("featureImportances/f", {**W, "startTime": "2026-01-03"}, "InvalidRequest"),
    ],
)
def test_bad_job_contracts_are_400(harness: Harness, path: str, body: object, code: str) -> None:
    r = harness.client.put(f"/personalizer/v1.0/{path}", json=body, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text


def test_unknown_jobs_are_404(harness: Harness) -> None:
    for path, code in (
        ("evaluations/x", "EvaluationNotFound"),
        ("featureImportances/x", "FeatureImportanceNotFound"),
    ):
        r = harness.client.get(f"/personalizer/v1.0/{path}", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["code"] == code
    base = "/personalizer/v1.0/evaluations/x"
    r = harness.client.get(f"{base}?intervalInMinutes=7", headers=AUTH)
    assert r.status_code == 400
    r = harness.client.get(f"{base}?intervalInMinutes=60&window=Expanding", headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "IncompatibleIntervalAndWindow"
