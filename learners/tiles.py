"""Tile coding of numeric context features, so a linear VW model can represent values that are
not linear in them (CartPole's: balanced is worth much, any tilt far less, in both directions).

A coded feature (a number, or an array of numbers coded jointly) is replaced by `tilings`
categorical features, one per tiling: the cell of a grid of the given widths (one per element)
that holds the value, each tiling's grid shifted by a different fraction of a width (offsets
1, 3, 5, ... times k / tilings in dimension 1, 2, 3, ..., the asymmetric offsets Sutton and
Barto recommend). Nearby values share most of their cells, so what is learned in one state
carries to its neighbours and no further. The grid is unbounded: cells are hashed by VW like
any categorical value, so no range has to be known.

The coded features are what the model sees and what the log holds (the transform is applied
to the rank's context before it is built), so replays and evaluations read the same features.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from learners.features import FeatureError

MAX_TILINGS = 32
# The narrowest tile a loop may be given (a value's cell is value / width: 1e-320 made every
# value overflow; service.core.schemas checks it when a configuration is set).
MIN_WIDTH = 1e-9


@dataclass(frozen=True)
class TileCoding:
    tilings: int
    # "namespace.feature" (a feature inside a context object's namespace) or "feature" (a
    # top-level one) -> the tile width of each of its elements.
    widths: Mapping[str, tuple[float, ...]]

    def __post_init__(self) -> None:
        if not 1 <= self.tilings <= MAX_TILINGS:
            raise ValueError(f"tilings must be from 1 to {MAX_TILINGS}")
        for name, widths in self.widths.items():
            if not name or not widths or not all(math.isfinite(w) and w > 0 for w in widths):
                raise ValueError(f"{name}: tile widths must be positive numbers")

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> TileCoding:
        """From its JSON form, `{"tilings": 8, "widths": {"state.x": [0.8, 1.0]}}` (the loop
        configuration's `tileCoding`, and what GET .../local/settings hands LocalRanker)."""
        return cls(int(doc["tilings"]), {k: tuple(w) for k, w in doc["widths"].items()})

    def to_doc(self) -> dict[str, Any]:
        return {"tilings": self.tilings, "widths": {k: list(w) for k, w in self.widths.items()}}

    def cells(self, values: Sequence[float], widths: Sequence[float]) -> dict[str, str]:
        """The coded features of one value: `#k` -> its cell in tiling k."""
        out = {}
        for k in range(self.tilings):
            cell = (
                math.floor(v / w + ((2 * d + 1) * k / self.tilings) % 1.0)
                for d, (v, w) in enumerate(zip(values, widths, strict=True))
            )
            out[f"#{k}"] = "=" + ",".join(map(str, cell))
        return out

    def apply(self, context: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The context with every coded feature replaced by its cells (new objects where
        anything changed; the input is left as it is). FeatureError if a coded feature is not
        a number or an array of as many numbers as it has widths."""
        return [self._object(obj) for obj in context]

    def _object(self, obj: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if isinstance(value, dict):
                out[key] = self._namespace(key, value)
            elif key in self.widths:
                out.update(self._code(key, key, value))
            else:
                out[key] = value
        return out

    def _namespace(self, ns: str, features: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in features.items():
            key = f"{ns}.{name}"
            if key in self.widths:
                out.update(self._code(key, name, value))
            else:
                out[name] = value
        return out

    def _code(self, key: str, name: str, value: Any) -> dict[str, str]:
        widths = self.widths[key]
        values = value if isinstance(value, list) else [value]
        if len(values) != len(widths) or not all(
            type(v) in (int, float) and math.isfinite(v) for v in values
        ):
            raise FeatureError(
                f"{key} is tile-coded: it must be {len(widths)} finite number"
                f"{'s in an array' if len(widths) > 1 else ''}"
            )
        if not all(math.isfinite(v / w) for v, w in zip(values, widths, strict=True)):
            raise FeatureError(f"{key} is tile-coded: its value is too large for its tile width")
        return {f"{name}{k}": cell for k, cell in self.cells(values, widths).items()}
