"""service.pipeline.runtime: the retry cache's byte bound and the registry of served loops."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from learners import vw
from service.core.schemas import LoopSettings, default_config, default_policy
from service.pipeline.runtime import Answered, LoopRuntime, Registry, RetryCache
from service.storage import store
from service.storage.db import make_engine, make_sessionmaker
from tests.support.harness import make_settings


def answered(n: int) -> Answered:
    return Answered(b"r" * 16, b"a" * 16, b"x" * n)


def test_the_retry_cache_forgets_the_oldest_answers_past_its_bound() -> None:
    size = 100 + len("loop") + len("e0") + RetryCache.OVERHEAD
    cache = RetryCache(max_bytes=3 * size)
    for i in range(4):
        cache.put("loop", f"e{i}", answered(100))
    assert (len(cache), cache.bytes) == (3, 3 * size)
    assert cache.get("loop", "e0") is None
    assert cache.get("loop", "e3") == answered(100)
    cache.put("loop", "e3", answered(100))  # a repeat replaces, it does not count twice
    assert cache.bytes == 3 * size
    cache.clear()
    assert (len(cache), cache.bytes) == (0, 0)


def test_a_loop_explores_in_vw_unless_it_is_an_rl_loop() -> None:
    def runtime(kind: str) -> LoopRuntime:
        config = default_config(0.0)
        config["explorationPercentage"] = 0.3
        return LoopRuntime("l", kind, config, default_policy(kind), LoopSettings.from_doc(config))

    assert "--gamma_scale" in runtime("cb").arguments
    rl = runtime("rl")
    assert rl.arguments == rl.policy["arguments"]


def test_the_registry_serves_what_the_database_holds(tmp_path: Path) -> None:
    engine = make_engine(make_settings(tmp_path / "data").database_url)
    sessions = make_sessionmaker(engine)
    registry = Registry(tmp_path / "models")
    with sessions.begin() as session:
        store.ensure_loop(session, name="a", kind="cb", now=1.0)
        store.ensure_loop(session, name="b", kind="cb", now=1.0)
    with sessions() as session:
        registry.load(session)
    assert sorted(registry.loops) == ["a", "b"]
    assert registry.loops["a"].model_id == "N/A" and registry.loops["a"].served.path is None

    model = vw.model_bytes(vw.workspace(registry.loops["a"].arguments))
    with sessions.begin() as session:
        model_id, _ = reset(session, "a", model, registry.loops["a"].arguments)
        store.delete_loop(session, name="b")
    with sessions() as session:
        registry.load(session)
    assert sorted(registry.loops) == ["a"]  # a deleted loop is forgotten
    served = registry.loops["a"].served
    assert served.model_id == model_id and served.path is not None
    assert Path(served.path).read_bytes() == model  # written for the ranking children
    engine.dispose()


def reset(session: Session, loop: str, model: bytes, arguments: str) -> tuple[str, int]:
    return store.reset_checkpoint(session, loop=loop, model=model, arguments=arguments, now=2.0)
