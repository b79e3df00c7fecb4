"""RL targets (learners.rl): discounted returns, learned as costs with probability 1."""

from __future__ import annotations

import orjson
import pytest

from learners.rl import TABULAR_RL_POLICY, RLTrainer, Step, relabel


def test_targets_are_discounted_returns() -> None:
    """Terminated: the last target is its reward; earlier ones discount the later rewards."""
    trainer = RLTrainer(TABULAR_RL_POLICY, gamma=0.5, lam=1.0, replay=0)
    line = relabel(
        orjson.dumps(
            {
                "_label_cost": 0,
                "_label_probability": 1,
                "_label_Action": 1,
                "_labelIndex": 0,
                "a": [1, 2],
                "p": [0.5, 0.5],
                "c": {"FromUrl": [{"state": {"s": "0"}}], "_multi": [{"i": {"id": "x"}}] * 2},
            }
        ).decode(),
        0.0,
    )
    steps = [Step(line, 0.0), Step(line, 0.0), Step(line, 1.0)]
    assert trainer.returns(steps, terminated=True) == pytest.approx([0.25, 0.5, 1.0])
    # Learned lines carry the return as cost with probability 1 (no importance weight).
    doc = orjson.loads(relabel(line, -0.25))
    assert doc["_label_cost"] == -0.25 and doc["_label_probability"] == 1.0
    assert list(doc)[:4] == ["_label_cost", "_label_probability", "_label_Action", "_labelIndex"]
