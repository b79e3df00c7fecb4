"""A small Python client for dloop: rank, reward, episodes, loops and configuration.

    from service.client import Client

    dl = Client("http://127.0.0.1:8000", key="...", loop="tutor")
    dl.create_loop("rl")                       # admin key; once
    with dl.episode() as ep:                   # an RL episode (ended as terminated on exit)
        r = ep.rank(context=[{"level": "3"}], actions=[{"id": "hint"}, {"id": "quiz"}])
        dl.reward(r["eventId"], 0.5)
        ep.truncate()                          # or: ended by a time limit, not by the task

Any Personalizer SDK works for rank and reward; this module adds what they do not know
(episodes, loops, named outcomes) and accepts any httpx-compatible client (`http=`) for tests.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx


class DloopError(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status


class Client:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        key: str,
        loop: str | None = None,
        http: Any = None,
        timeout: float = 10.0,
        retries: int = 5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.loop = loop
        # A 429 (the key's rate limit) or 503 (the server's connection limit) refused the
        # request without acting on it: wait as its Retry-After says and send it again, up to
        # `retries` times, so a fast caller (dloop simulate) slows down instead of failing.
        self.retries = retries
        self._sleep = sleep
        self._http = http if http is not None else httpx.Client(base_url=url, timeout=timeout)
        self._owns = http is None
        self._headers = {"Ocp-Apim-Subscription-Key": key}
        prefix = f"/loops/{loop}" if loop else ""
        self._base = f"{prefix}/personalizer/v1.0"

    def close(self) -> None:
        if self._owns:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, path: str, json: Any = None) -> httpx.Response:
        for attempt in range(self.retries + 1):
            r: httpx.Response = self._http.request(method, path, json=json, headers=self._headers)
            wait = r.headers.get("retry-after")
            if r.status_code not in (429, 503) or wait is None or attempt == self.retries:
                break
            self._sleep(min(float(wait), 30.0))
        if r.status_code >= 400:
            raise DloopError(r.status_code, r.text)
        return r

    def _call(self, method: str, path: str, json: Any = None) -> Any:
        r = self._send(method, path, json)
        return r.json() if r.content else None

    # ---- decisions -----------------------------------------------------------------------------

    def rank(
        self,
        context: list[dict[str, Any]],
        actions: list[dict[str, Any]],
        *,
        event_id: str | None = None,
        episode_id: str | None = None,
        excluded: list[str] | None = None,
        unit_id: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"contextFeatures": context, "actions": actions}
        if event_id is not None:
            body["eventId"] = event_id
        if unit_id is not None:
            body["unitId"] = unit_id  # the live holdout's sticky key
        if episode_id is not None:
            body["episodeId"] = episode_id
        if excluded:
            body["excludedActions"] = excluded
        out: dict[str, Any] = self._call("POST", f"{self._base}/rank", body)
        return out

    def reward(self, event_id: str, value: float) -> None:
        self._call("POST", f"{self._base}/events/{event_id}/reward", {"value": value})

    def outcomes(self, event_id: str, values: dict[str, float]) -> None:
        """Named outcomes of an event (the loop's configured outcomes, e.g. {"click": 1})."""
        self._call("POST", f"{self._base}/events/{event_id}/outcomes", {"outcomes": values})

    def activate(self, event_id: str) -> None:
        self._call("POST", f"{self._base}/events/{event_id}/activate")

    def end_episode(self, episode_id: str, *, terminated: bool = True) -> None:
        self._call("POST", f"{self._base}/episodes/{episode_id}/end", {"terminated": terminated})

    @contextmanager
    def episode(self, episode_id: str | None = None) -> Iterator[Episode]:
        """Ranks inside share one episode, ended on exit (terminated unless `truncate()`d)."""
        ep = Episode(self, episode_id or uuid.uuid4().hex)
        yield ep
        self.end_episode(ep.id, terminated=ep.terminated)

    # ---- administration ------------------------------------------------------------------------

    def create_loop(self, kind: str = "cb") -> dict[str, Any]:
        if not self.loop:
            raise ValueError("create_loop needs a named loop (Client(loop=...))")
        out: dict[str, Any] = self._call("PUT", f"/loops/{self.loop}", {"kind": kind})
        return out

    def configuration(self) -> dict[str, Any]:
        out: dict[str, Any] = self._call("GET", f"{self._base}/configurations/service")
        return out

    def configure(self, **changes: Any) -> dict[str, Any]:
        cfg = {**self.configuration(), **changes}
        out: dict[str, Any] = self._call("PUT", f"{self._base}/configurations/service", cfg)
        return out

    def set_policy(self, name: str, arguments: str) -> None:
        self._call(
            "PUT",
            f"{self._base}/configurations/policy",
            {"name": name, "arguments": arguments},
        )

    def model(self) -> bytes:
        return bytes(self._send("GET", f"{self._base}/model").content)


class Episode:
    def __init__(self, client: Client, episode_id: str) -> None:
        self.client = client
        self.id = episode_id
        self.terminated = True

    def rank(self, context: list[dict[str, Any]], actions: list[dict[str, Any]], **kw: Any) -> Any:
        return self.client.rank(context, actions, episode_id=self.id, **kw)

    def truncate(self) -> None:
        self.terminated = False
