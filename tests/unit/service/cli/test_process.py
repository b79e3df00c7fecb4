"""service.cli.process: `dloop up` prepares an admin key on a first start, and a new one when
every admin key has expired."""

from __future__ import annotations

from pathlib import Path


def test_up_makes_a_new_admin_key_when_every_one_has_expired(tmp_path: Path) -> None:
    from service.cli.process import _prepare
    from service.core.settings import load_settings
    from service.storage import store
    from service.storage.db import make_engine, make_sessionmaker

    settings = load_settings(data_dir=tmp_path / "d")
    assert _prepare(settings) is not None  # first start: a key
    assert _prepare(settings) is None  # it exists
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            for row in store.all_keys(session):
                row.expires_at = 1.0
    finally:
        engine.dispose()
    assert _prepare(settings) is not None
