"""Process settings (service.core.settings): DLOOP_API_KEY must be strong, and the default
policy of new loops is read from the environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.core.settings import load_settings

KEY_A = "env-key-a-0123456789abcdefghijklmnop"


def test_the_default_policy_setting_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DLOOP_DEFAULT_POLICY", raising=False)
    assert load_settings().default_policy == "dloop-default"
    monkeypatch.setenv("DLOOP_DEFAULT_POLICY", "personalizer-default")
    assert load_settings().default_policy == "personalizer-default"
    monkeypatch.setenv("DLOOP_DEFAULT_POLICY", "vw-default")
    with pytest.raises(ValidationError, match="default_policy"):
        load_settings()


@pytest.mark.parametrize("key", ["short", "x" * 31, "a" * 40, "ab" * 20])
def test_a_weak_environment_key_is_refused(key: str) -> None:
    with pytest.raises(ValidationError, match="DLOOP_API_KEY"):
        load_settings(api_key=key)


def test_a_strong_environment_key_is_accepted() -> None:
    assert load_settings(api_key=KEY_A).api_key is not None
