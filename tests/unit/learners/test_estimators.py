"""Counterfactual estimators (learners.estimators) at their edges: no data, one event, and the
effective sample size."""

from __future__ import annotations

from learners import estimators


def test_estimators_edge_cases() -> None:
    assert estimators.snips([], []).value != estimators.snips([], []).value  # NaN
    one = estimators.ips([1.0], [2.0])
    assert one.value == 2.0 and one.low == float("-inf")
    assert estimators.effective_sample_size([1, 1, 1, 1]) == 4.0
    assert estimators.effective_sample_size([4, 0, 0, 0]) == 1.0
