"""The dashboard in a real browser (Playwright driving Debian's chromium) against a real server
with its embedded worker and simulated traffic (service.pipeline.demo, what `make demo` runs):
every page loads with no console errors, charts draw from real data, login and logout work,
holdout uplift appears once there is data, an admin applies an evaluation's policy from the
page and a viewer cannot. With DLOOP_SCREENSHOTS=<dir> it saves the pages' screenshots there
(the README's come from `DLOOP_SCREENSHOTS=docs make test PYTEST_ARGS=tests/e2e/
test_dashboard.py`)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from service.pipeline.demo import traffic
from tests.support.harness import ADMIN_KEY, AUTH, LiveServer, make_settings, serving

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("dashboard") / "data"
    with serving(make_settings(data, learner={"tick_seconds": 0.05})) as live:
        made = traffic(live.url, ADMIN_KEY, rate=0, holdout=20, decisions=800, shop=True)
        assert made == 800
        # Pages are compared with the API's figures: let the learner join every decision first
        # (on a loaded machine it was still joining while a page drew its tiles).
        wait_until(lambda: joined(live) == made, timeout=120)
        yield live


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert shutil.which("chromium") == CHROMIUM, "install Debian's chromium (make browser)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


class Watched:
    """A page whose console errors, failed requests and uncaught exceptions are kept."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.problems: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"exception: {exc}"))
        page.on(
            "response",
            lambda r: self.problems.append(f"{r.status} {r.url}") if r.status >= 400 else None,
        )

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.problems.append(f"console {message.type}: {message.text}")

    def clean(self) -> None:
        assert self.problems == [], self.problems


@pytest.fixture
def page(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    yield Watched(context.new_page())
    context.close()


def shoot(page: Page, name: str) -> None:
    where = os.environ.get("DLOOP_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(where) / f"dashboard-{name}.png"), full_page=True)


def login(w: Watched, url: str, key: str) -> None:
    w.page.goto(f"{url}/ui/")
    w.page.fill("#key", key)
    w.page.click("#login button[type=submit]")
    w.page.wait_for_selector("#logout:not([hidden])")


def wait_ready(page: Page, hash_: str) -> None:
    """The page for `hash_` has drawn (app.js marks the body). Waits use selectors, not
    wait_for_function: the page's Content-Security-Policy forbids evaluating strings."""
    page.wait_for_selector(f'body[data-ready="{hash_}"]')


def wait_until(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def api(server: LiveServer, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", headers=AUTH, timeout=30, **kw)


def joined(server: LiveServer) -> int:
    stats = api(server, "GET", "/loops/default/stats").json()
    return sum(b.get("joined", 0) for b in stats["buckets"])


def test_login_overview_and_the_loop_page_draw_real_data(server: LiveServer, page: Watched) -> None:
    p = page.page
    p.goto(f"{server.url}/ui/")
    p.wait_for_selector("#login")
    assert p.locator("#loops").count() == 0  # nothing without a key
    p.fill("#key", "wrong-key")
    p.click("#login button[type=submit]")
    p.wait_for_selector("#login .error:has-text('invalid key')")
    page.problems.clear()  # the refused login's 401 is the point of this step
    login(page, server.url, ADMIN_KEY)
    wait_ready(p, "#/")
    row = p.locator("#loops tr[data-loop=default]")
    assert row.locator("td").nth(1).inner_text() == "cb"
    assert row.locator("td").nth(3).inner_text() == "dloop-default"
    shoot(p, "overview")

    p.goto(f"{server.url}/ui/#/loops/default")
    wait_ready(p, "#/loops/default")
    # Charts drawn from the loop's data: online and holdout reward, counterfactuals, coverage.
    wait_until(
        lambda: (
            p.locator("#reward .scatterlayer .trace").count() >= 8
            and p.locator("#coverage .barlayer .trace").count() >= 1
            and p.locator("#actions .scatterlayer .trace").count() >= 6
        )
    )
    uplift = p.locator("#tiles .tile").first.inner_text()
    assert "not enough data" not in uplift and "[" in uplift, uplift
    assert f"Joined (range)\n{joined(server)}" in p.locator("#tiles").inner_text()
    shoot(p, "loop")
    page.clean()


def test_admin_applies_an_evaluated_policy_and_a_viewer_cannot(
    server: LiveServer, page: Watched
) -> None:
    now = datetime.now(UTC)
    body = {
        "name": "defaults against vw",
        "startTime": (now - timedelta(hours=1)).isoformat(),
        "endTime": (now + timedelta(minutes=1)).isoformat(),
        "policies": [{"name": "vw-default", "arguments": "--cb_explore_adf -q ::"}],
    }
    r = api(server, "PUT", "/personalizer/v1.0/evaluations/ev1", json=body)
    assert r.status_code in (200, 201), r.text
    deadline = time.monotonic() + 120
    while api(server, "GET", "/personalizer/v1.0/evaluations/ev1").json()["status"] != "Succeeded":
        assert time.monotonic() < deadline, "the evaluation did not finish"
        time.sleep(0.2)
    viewer_key = api(server, "POST", "/keys", json={"role": "viewer"}).json()["key"]

    p = page.page
    login(page, server.url, viewer_key)
    p.goto(f"{server.url}/ui/#/loops/default/evaluations")
    wait_ready(p, "#/loops/default/evaluations")
    p.wait_for_selector("#policies tr[data-policy=vw-default]")
    assert p.locator("button.apply").count() == 0  # a viewer only looks
    p.goto(f"{server.url}/ui/#/loops/default/configuration")
    wait_ready(p, "#/loops/default/configuration")
    assert p.locator("#config input[name=holdoutPercentage]").is_disabled()
    assert p.locator("#config button[type=submit]").count() == 0
    # Even by hand, with the session's own CSRF token, the API refuses a viewer's change.
    status = p.evaluate(
        """async () => {
            const s = await (await fetch('/ui/session')).json();
            const r = await fetch('/personalizer/v1.0/configurations/applyFromEvaluation', {
                method: 'POST', headers: {'Content-Type': 'application/json',
                'X-CSRF-Token': s.csrfToken},
                body: JSON.stringify({evaluationId: 'ev1', policyName: 'vw-default'})});
            return r.status; }"""
    )
    assert status == 403
    page.problems.clear()  # that 403 was asked for
    p.click("#logout")
    p.wait_for_selector("#login")
    assert p.locator("#login .error").inner_text() == "Logged out."
    assert p.evaluate("fetch('/loops/default/stats').then(r => r.status)") == 401
    page.problems.clear()

    login(page, server.url, ADMIN_KEY)
    p.goto(f"{server.url}/ui/#/loops/default/evaluations")
    wait_ready(p, "#/loops/default/evaluations")
    row = p.locator("#policies tr[data-policy=vw-default]")
    row.wait_for()
    shoot(p, "evaluations")
    row.locator("button.apply").click()
    p.wait_for_selector("#apply-message:has-text('Applied vw-default')")
    policy = api(server, "GET", "/personalizer/v1.0/configurations/policy").json()
    assert policy == {"name": "vw-default", "arguments": "--cb_explore_adf -q ::"}
    page.clean()


def test_decision_viewer_and_configuration_pages(server: LiveServer, page: Watched) -> None:
    body = {
        "eventId": "look-here",
        "contextFeatures": [{"country": "country1"}],
        "actions": [{"id": f"a{i}", "features": [{"kind": f"k{i}"}]} for i in range(3)],
    }
    assert api(server, "POST", "/personalizer/v1.0/rank", json=body).status_code == 201
    p = page.page
    login(page, server.url, ADMIN_KEY)
    p.goto(f"{server.url}/ui/#/loops/default/decisions")
    wait_ready(p, "#/loops/default/decisions")
    deadline = time.monotonic() + 30
    while True:  # the event reaches the database through the worker
        p.fill("#event-id", "look-here")
        p.click("#main form button[type=submit]")
        p.wait_for_selector("#event .card, #event .error")
        if p.locator("#ranking").count():
            break
        assert time.monotonic() < deadline
        page.problems.clear()  # a 404 while the event is on its way
        time.sleep(0.2)
    assert p.locator("#ranking tbody tr").count() == 3
    assert "country1" in p.locator("#context").inner_text()
    shoot(p, "decision")
    p.goto(f"{server.url}/ui/#/loops/default/configuration")
    wait_ready(p, "#/loops/default/configuration")
    field = p.locator("#config input[name=holdoutPercentage]")
    field.fill("60")  # the API's own validation answers
    p.click("#config button[type=submit]")
    p.wait_for_selector("#config-message.error:has-text('holdoutPercentage')")
    page.problems.clear()  # the 400 was asked for
    field.fill("15")
    p.click("#config button[type=submit]")
    p.wait_for_selector("#config-message.good")
    cfg = api(server, "GET", "/personalizer/v1.0/configurations/service").json()
    assert cfg["holdoutPercentage"] == 15
    page.clean()


def test_outcomes_reward_definition_and_guardrails_on_the_shop_loop(
    server: LiveServer, page: Watched
) -> None:
    """The demo's shop loop (named outcomes, a reward definition, a guardrail): its page shows
    what it is trained for, each outcome over time and the guardrail's state; an evaluation
    with policies trained for other objectives shows every outcome per policy."""
    now = datetime.now(UTC)
    body = {
        "name": "objectives",
        "startTime": (now - timedelta(hours=1)).isoformat(),
        "endTime": (now + timedelta(minutes=1)).isoformat(),
        "policies": [
            {
                "name": "for-revenue",
                "arguments": "--cb_explore_adf --epsilon 0.05 -q ::",
                "rewardDefinition": "clip(purchase / 120, 0, 1)",
            },
            {
                "name": "for-clicks",
                "arguments": "--cb_explore_adf --epsilon 0.05 -q ::",
                "rewardDefinition": "click",
            },
        ],
    }
    path = "/loops/shop/personalizer/v1.0/evaluations/objectives"
    r = api(server, "PUT", path, json=body)
    assert r.status_code in (200, 201), r.text
    wait_until(
        lambda: (
            api(server, "GET", "/loops/shop/guardrails").json()["guardrails"][0].get("decisions", 0)
            > 0
        ),
        60,
    )
    p = page.page
    login(page, server.url, ADMIN_KEY)
    p.goto(f"{server.url}/ui/#/loops/shop")
    wait_ready(p, "#/loops/shop")
    assert "clip(click + purchase / 200, 0, 1)" in p.locator("#reward-definition").inner_text()
    p.wait_for_selector("#guardrails tr[data-guardrail='unsubscribe:increase']")
    assert "unsubscribe must not increase by more than 50%" in p.locator("#guardrails").inner_text()
    wait_until(lambda: p.locator("#outcomes .scatterlayer .trace").count() >= 3)
    assert "Guardrails" in p.locator("#tiles").inner_text()
    shoot(p, "shop")
    deadline = time.monotonic() + 120
    while api(server, "GET", path).json()["status"] != "Succeeded":
        assert time.monotonic() < deadline, "the evaluation did not finish"
        time.sleep(0.2)
    p.goto(f"{server.url}/ui/#/loops/shop/evaluations")
    wait_ready(p, "#/loops/shop/evaluations")
    p.wait_for_selector("#outcomes-table")
    text = p.locator("#outcomes-table").inner_text()
    for word in ("for-revenue", "for-clicks", "click", "purchase", "unsubscribe"):
        assert word in text
    shoot(p, "objectives")
    page.clean()


def test_a_page_left_while_it_loads_does_not_draw_over_the_next(
    server: LiveServer, page: Watched
) -> None:
    """The overview's answer held back until the decision viewer is up: when it arrives, the
    viewer stays (it used to be replaced by the overview, and the overview kept refreshing)."""
    from playwright.sync_api import Route

    p = page.page
    held: list[Route] = []
    p.route("**/overview*", lambda route: held.append(route))
    login(page, server.url, ADMIN_KEY)  # the overview is asked for, and held
    wait_until(lambda: bool(held))
    p.goto(f"{server.url}/ui/#/loops/default/decisions")
    wait_ready(p, "#/loops/default/decisions")
    with p.expect_response("**/overview*"):
        held[0].continue_()
    p.evaluate("() => new Promise((done) => setTimeout(done, 50))")  # its answer handled
    assert p.locator("#event-id").count() == 1
    assert p.locator('body[data-ready="#/loops/default/decisions"]').count() == 1
    assert p.locator("#loops").count() == 0
    page.clean()


def test_rl_and_multi_slot_loops_draw_their_own_charts(server: LiveServer, page: Watched) -> None:
    """An RL loop's page draws episode returns, a multi-slot loop's the reward per slot; the
    evaluations page draws a feature-importance job as bars."""
    from tests.api.test_ccb import page as slate

    for name, kind in (("tutor", "rl"), ("front", "ccb")):
        assert api(server, "PUT", f"/loops/{name}", json={"kind": kind}).status_code == 201
        path = f"/loops/{name}/personalizer/v1.0/configurations/service"
        cfg = api(server, "GET", path).json()
        r = api(server, "PUT", path, json={**cfg, "rewardWaitTime": "PT1S"})
        assert r.status_code == 200, r.text
    actions = [{"id": f"a{i}", "features": [{"a": i}]} for i in range(3)]
    for e in range(6):
        for step in range(3):
            body = {
                "contextFeatures": [{"s": step}],
                "actions": actions,
                "episodeId": f"ep{e}",
                "eventId": f"ep{e}-{step}",
            }
            assert api(server, "POST", "/loops/tutor/personalizer/v1.0/rank", json=body).is_success
            r = api(
                server,
                "POST",
                f"/loops/tutor/personalizer/v1.0/events/ep{e}-{step}/reward",
                json={"value": 0.5},
            )
            assert r.is_success
        r = api(server, "POST", f"/loops/tutor/personalizer/v1.0/episodes/ep{e}/end", json={})
        assert r.is_success
    base = "/loops/front/personalizer/v1.1-preview.1/multislot"
    for i in range(10):
        assert api(server, "POST", f"{base}/rank", json=slate(f"p{i}")).is_success
        reward = {"reward": [{"slotId": "hero", "value": 1.0}, {"slotId": "side", "value": 0.0}]}
        assert api(server, "POST", f"{base}/events/p{i}/reward", json=reward).is_success
    now = datetime.now(UTC)
    job = {
        "name": "what matters",
        "startTime": (now - timedelta(hours=1)).isoformat(),
        "endTime": (now + timedelta(minutes=1)).isoformat(),
    }
    r = api(server, "PUT", "/personalizer/v1.0/featureImportances/fi1", json=job)
    assert r.status_code in (200, 201), r.text

    p = page.page
    login(page, server.url, ADMIN_KEY)
    wait_until(
        lambda: any(
            "episodes" in b for b in api(server, "GET", "/loops/tutor/stats").json()["buckets"]
        ),
        60,
    )
    p.goto(f"{server.url}/ui/#/loops/tutor")
    wait_ready(p, "#/loops/tutor")
    wait_until(lambda: p.locator("#episodes .scatterlayer .trace").count() >= 1)
    wait_until(
        lambda: any(
            b.get("slots") for b in api(server, "GET", "/loops/front/stats").json()["buckets"]
        ),
        60,
    )
    p.goto(f"{server.url}/ui/#/loops/front")
    wait_ready(p, "#/loops/front")
    wait_until(lambda: p.locator("#slots .scatterlayer .trace").count() >= 3)
    wait_until(
        lambda: (
            api(server, "GET", "/personalizer/v1.0/featureImportances/fi1").json()["status"]
            == "Succeeded"
        ),
        60,
    )
    p.goto(f"{server.url}/ui/#/loops/default/evaluations")
    wait_ready(p, "#/loops/default/evaluations")
    wait_until(lambda: p.locator("#importance .barlayer .trace").count() >= 1)
    page.clean()
