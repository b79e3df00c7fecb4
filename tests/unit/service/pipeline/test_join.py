"""The reward join (service.pipeline.join) on Postgres: dangling observations are bounded, the
newest kept and the rest counted."""

from __future__ import annotations

import orjson
from sqlalchemy import select

from service.pipeline.join import join_due
from service.storage import store
from service.storage.db import make_engine, make_sessionmaker
from service.storage.migrate import upgrade


def test_dangling_observations_are_bounded_on_postgres(postgres_url: str) -> None:
    """Rewards for eventIds that never got a decision: the newest are kept, the rest counted."""
    from sqlalchemy import func

    from service.storage.models import Observation

    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    sessions = make_sessionmaker(engine)
    try:
        with sessions.begin() as session:
            loop = store.ensure_loop(session, name="default", kind="cb", now=0.0)
            rules = store.loop_settings(loop).rules
            orphans = [
                orjson.dumps({"k": "r", "loop": "default", "id": f"u{i}", "t": i, "v": 1.0})
                for i in range(10)
            ]
            store.ingest(session, records=orphans, source="test", now=10.0)
        with sessions.begin() as session:
            join_due(session, loop="default", rules=rules, now=1000.0, limit=10, max_dangling=4)
        with sessions.begin() as session:
            assert store.drop_dangling(session, loop="default", keep=4) == 0
            assert store.drop_dangling(session, loop="default", keep=3) == 1
        with sessions() as session:
            kept = session.scalars(select(Observation.event_id).order_by(Observation.id)).all()
            assert kept == ["u7", "u8", "u9"]
            assert store.loop_counts(session)["default"]["observations_dropped"] == 7
            assert session.scalar(select(func.count()).select_from(Observation)) == 3
    finally:
        engine.dispose()
