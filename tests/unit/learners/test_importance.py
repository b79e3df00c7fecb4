"""Feature importance (learners.importance): a planted signal ranks above noise."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from learners.features import cb_line, context_json


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
