"""service.pipeline.guardrails: the state machine on a real database. A breach changes the
state, starts a new window, puts a fallback guardrail's loop in fallback and is logged; the
guardrail recovers only on evidence from after the breach; an alert never falls back; removed
guardrails are forgotten (and their fallback with them)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from learners import rollups
from learners.guardrails import Guardrail, sums
from service.pipeline.guardrails import check_loop
from service.storage import store
from service.storage.db import make_engine, make_sessionmaker
from service.storage.models import Loop
from tests.support.harness import make_settings

T0 = 1_790_000_000.0
GUARD = Guardrail("unsubscribe", "increase", 0.5, "fallback")


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    engine = make_engine(make_settings(tmp_path / "data").database_url)
    maker = make_sessionmaker(engine)
    with maker.begin() as s:
        s.add(Loop(name="L", kind="cb", created_at=T0, config={}, policy={}))
    return maker


def _decisions(sessions: sessionmaker[Session], t: float, n: int, policy: float, seed: int) -> None:
    """n decisions at time t, 10% held out (outcome mean 0.02), the rest at mean `policy`."""
    rng = np.random.default_rng(seed)
    total: dict[str, float] = {}
    for _ in range(n):
        held = bool(rng.random() < 0.1)
        y = float(rng.random() < (0.02 if held else policy))
        rollups.add(
            total, sums(y, share=0.1, held=held, ranking=[0], probabilities=[1.0], baseline=0)
        )
    with sessions.begin() as s:
        store.add_outcome_stats(s, loop="L", sums={(int(t // 10 * 10), "unsubscribe"): total})


def _check(sessions: sessionmaker[Session], now: float, guards: list[Guardrail]) -> bool | None:
    with sessions.begin() as s:
        return check_loop(s, loop="L", guardrails=guards, now=now)


def _state(sessions: sessionmaker[Session]) -> tuple[str, bool] | None:
    with sessions() as s:
        st = store.guardrail_states(s, loop="L").get(GUARD.key)
        return None if st is None else (st.state, st.fallback)


def test_breach_fallback_and_recovery(
    sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    assert _check(sessions, T0, [GUARD]) is None  # the window starts now
    _decisions(sessions, T0 + 10, 3000, policy=0.02, seed=1)
    assert _check(sessions, T0 + 20, [GUARD]) is None
    assert _state(sessions) == ("ok", False)
    with caplog.at_level(logging.WARNING, logger="dloop.guardrails"):
        _decisions(sessions, T0 + 30, 6000, policy=0.15, seed=2)
        assert _check(sessions, T0 + 40, [GUARD]) is True  # now in fallback
        assert _state(sessions) == ("breached", True)
        with sessions() as s:
            assert store.fallback_loops(s) == {"L"}
        # The same evidence again (within a second) changes nothing; the old window's
        # decisions do not count towards a recovery.
        assert _check(sessions, T0 + 40.5, [GUARD]) is None
        assert _check(sessions, T0 + 45, [GUARD]) is None
        assert _state(sessions) == ("breached", True)
        # After the breach the model behaves: a recovery, once the evidence is in.
        _decisions(sessions, T0 + 50, 30_000, policy=0.01, seed=3)
        assert _check(sessions, T0 + 60, [GUARD]) is False
    assert _state(sessions) == ("ok", False)
    assert any("unsubscribe:increase breached" in m for m in caplog.messages)
    assert any(
        "unsubscribe:increase recovered" in m and "serves again" in m for m in caplog.messages
    )


def test_an_alert_never_falls_back_and_removed_guardrails_are_forgotten(
    sessions: sessionmaker[Session],
) -> None:
    alert = Guardrail("unsubscribe", "increase", 0.5, "alert")
    _check(sessions, T0, [alert])
    _decisions(sessions, T0 + 10, 6000, policy=0.15, seed=2)
    assert _check(sessions, T0 + 20, [alert]) is None
    assert _state(sessions) == ("breached", False)
    # Now as a fallback guardrail: the same breach falls back ...
    assert _check(sessions, T0 + 30, [GUARD]) is True
    # ... and removing it ends the fallback.
    assert _check(sessions, T0 + 40, []) is False
    assert _state(sessions) is None
