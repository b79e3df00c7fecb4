"""Tile coding of numeric context features (learners.tiles)."""

from __future__ import annotations

import pytest

from learners.features import FeatureError
from learners.tiles import TileCoding

CODING = TileCoding(8, {"state.x": (1.0, 0.1), "speed": (2.0,)})


def shared(a: list[float], b: list[float]) -> int:
    """How many of the 8 tilings put `a` and `b` in the same cell."""
    ca, cb = CODING.cells(a, (1.0, 0.1)), CODING.cells(b, (1.0, 0.1))
    return sum(ca[k] == cb[k] for k in ca)


def test_nearby_values_share_most_cells_and_distant_ones_none() -> None:
    assert shared([0.5, 0.05], [0.5, 0.05]) == 8
    assert shared([0.45, 0.05], [0.55, 0.05]) == 7  # a tenth of a width apart in one dimension
    assert 3 <= shared([0.5, 0.05], [1.0, 0.05]) <= 5  # half a width
    assert shared([0.5, 0.05], [1.6, 0.05]) == 0  # more than a width
    assert shared([0.5, 0.05], [0.5, 0.2]) == 0  # more than a width in the other one
    assert shared([-100.0, 0.0], [-100.05, 0.0]) >= 7  # unbounded: no range to fall off


def test_coded_features_replace_the_numbers_and_the_rest_is_kept() -> None:
    context = [{"state": {"x": [0.5, 0.05], "name": "a"}, "speed": 3, "other": 1.5}]
    out = CODING.apply(context)
    assert context == [{"state": {"x": [0.5, 0.05], "name": "a"}, "speed": 3, "other": 1.5}]
    assert set(out[0]["state"]) == {"name", *(f"x#{k}" for k in range(8))}
    assert set(out[0]) == {"state", "other", *(f"speed#{k}" for k in range(8))}
    assert out[0]["speed#0"] == "=1" and out[0]["other"] == 1.5


@pytest.mark.parametrize(
    "value", ["near", [0.5], [0.5, 0.1, 3.0], [0.5, True], [0.5, float("nan")], None]
)
def test_a_coded_feature_must_be_its_numbers(value: object) -> None:
    with pytest.raises(FeatureError, match=r"state\.x is tile-coded: it must be 2 finite numbers"):
        CODING.apply([{"state": {"x": value}}])


def test_the_coding_is_checked() -> None:
    with pytest.raises(ValueError, match="tilings"):
        TileCoding(0, {"x": (1.0,)})
    with pytest.raises(ValueError, match="positive"):
        TileCoding(4, {"x": (0.0,)})


def test_a_value_too_large_for_its_tile_is_refused() -> None:
    """value / width past a double's range (1e308 in tiles of 0.5, or any value in tiles of
    1e-320, which a loop stored before widths had a floor may hold) is a FeatureError (the
    rank's 400), not an OverflowError (a 500)."""
    coding = TileCoding(8, {"u.x": (0.5,)})
    assert coding.apply([{"u": {"x": 1e300}}])  # large, and coded
    with pytest.raises(FeatureError, match="too large for its tile width"):
        coding.apply([{"u": {"x": -1.7e308}}])
    with pytest.raises(FeatureError, match="too large for its tile width"):
        TileCoding(8, {"u.x": (1e-320,)}).apply([{"u": {"x": 1.0}}])
