"""Seeded sampling from a probability mass function.

The draw is a pure function of (seed key, pmf): the same eventId against the same model picks the
same action, which makes client retries and replays deterministic.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence


def uniform_from_key(key: str) -> float:
    """A number in [0, 1) derived from `key` (64 bits of BLAKE2b)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def sample(pmf: Sequence[float], key: str) -> int:
    """Index drawn from `pmf` with the uniform number derived from `key`.

    Entries with zero probability are never drawn; the pmf need not be exactly normalised.
    """
    total = float(sum(pmf))
    if total <= 0:
        raise ValueError("pmf has no mass")
    u = uniform_from_key(key) * total
    acc = 0.0
    last = 0
    for i, p in enumerate(pmf):
        if p <= 0:
            continue
        acc += p
        last = i
        if u < acc:
            return i
    return last


def restrict(pmf: Sequence[float], eligible: Sequence[bool]) -> list[float]:
    """Zero the ineligible entries and renormalise: uniform over eligible if no mass remains,
    or if the mass is not a number (a model whose scores overflowed: VW's features are 32-bit
    floats, and feature values past about 1e19 crossed by -q :: go past their range)."""
    if len(pmf) == len(eligible) and all(eligible):
        masked = list(pmf)
    else:
        masked = [p if ok else 0.0 for p, ok in zip(pmf, eligible, strict=True)]
    total = sum(masked)
    if not 0 < total < math.inf:  # (NaN fails both)
        n = sum(eligible)
        return [1.0 / n if ok else 0.0 for ok in eligible]
    return [p / total for p in masked]
