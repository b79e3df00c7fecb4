"""Sampling (learners.sampling): a draw is fixed by its key, follows the pmf, never picks a zero,
restricting to eligible actions renormalises, and a pmf with no mass is an error."""

from __future__ import annotations

import pytest

from learners.sampling import restrict, sample, uniform_from_key


def test_same_key_same_choice() -> None:
    pmf = [0.1, 0.2, 0.3, 0.4]
    assert all(sample(pmf, f"loop/e{i}") == sample(pmf, f"loop/e{i}") for i in range(200))


def test_zero_probability_is_never_drawn() -> None:
    pmf = [0.0, 0.5, 0.0, 0.5]
    picks = {sample(pmf, f"k{i}") for i in range(2000)}
    assert picks == {1, 3}


def test_frequencies_follow_the_pmf() -> None:
    pmf = [0.7, 0.2, 0.1]
    n = 20000
    counts = [0, 0, 0]
    for i in range(n):
        counts[sample(pmf, f"event-{i}")] += 1
    for c, p in zip(counts, pmf, strict=True):
        assert abs(c / n - p) < 4 * (p * (1 - p) / n) ** 0.5


def test_uniform_from_key_is_in_unit_interval() -> None:
    values = [uniform_from_key(str(i)) for i in range(1000)]
    assert all(0 <= v < 1 for v in values)
    assert 0.4 < sum(values) / len(values) < 0.6


def test_restrict_renormalises_over_eligible() -> None:
    assert restrict([0.5, 0.25, 0.25], [True, False, True]) == pytest.approx([2 / 3, 0, 1 / 3])
    assert restrict([0.0, 1.0], [True, False]) == [1.0, 0.0]


def test_empty_pmf_is_an_error() -> None:
    with pytest.raises(ValueError):
        sample([0.0, 0.0], "k")


def test_restrict_is_uniform_over_eligible_when_the_mass_is_not_a_number() -> None:
    """A model whose scores overflowed (NaN, infinities) is drawn from uniformly."""
    nan, inf = float("nan"), float("inf")
    assert restrict([nan, nan, nan], [True, False, True]) == [0.5, 0.0, 0.5]
    assert restrict([inf, 0.2, 0.1], [True, True, True]) == [1 / 3] * 3
