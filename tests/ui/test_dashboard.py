"""The dashboard (`/ui/`) in a real headless Chromium (Debian's, driven by Playwright for Python) against a
real `optserve serve`: the table lists the sessions made here, filters and sorts; a session's curves grow
while it is stepped; log scale; the schedule ahead; the spec; the checkpoint download; delete with its
confirmation; problems shown readably; with API keys, the key asked once, kept in sessionStorage, never in
a URL, and only that key's sessions shown. Every request the page makes is recorded: none leaves the
server's origin. Screenshots are saved (and, with OPTSERVE_SCREENSHOTS=dir, copied there) and checked not
to be blank."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from playwright.sync_api import Browser, Page, Request, sync_playwright

from app.wire import safetensors
from tests.system.redis_server import RedisServer
from tests.system.server import Server

CHROMIUM = "/usr/bin/chromium"
ST = "application/vnd.safetensors"
ADAM = {
    "optimizer": {"name": "adam", "lr": 0.05},
    "scheduler": {"name": "cosine_annealing_lr", "T_max": 200, "eta_min": 0.001},
    "params": {"w": [1.0, -2.0, 3.0], "b": [0.5]},
    "nonfinite": "skip",
    "metadata": {"run": "alpha"},
}
SGD = {"optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "params": {"w": [0.0, 0.0]}}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium", pytrace=False)
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


class Watched:
    """A page whose every request is recorded."""

    def __init__(self, browser: Browser, origin: str) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        self.page: Page = self.context.new_page()
        self.origin = origin
        self.requests: list[Request] = []
        self.page.on("request", lambda request: self.requests.append(request))
        self.console_errors: list[str] = []
        # script errors; an answer's status (the 404 this test asks for) is logged as one too: not counted
        self.page.on(
            "console",
            lambda m: (
                self.console_errors.append(m.text)
                if m.type == "error" and not m.text.startswith("Failed to load resource")
                else None
            ),
        )
        self.page.on("pageerror", lambda e: self.console_errors.append(str(e)))

    def foreign(self) -> list[str]:
        return [r.url for r in self.requests if not r.url.startswith((self.origin + "/", "data:", "blob:"))]

    def close(self) -> None:
        self.context.close()


def not_blank(png: bytes) -> None:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 20)
    assert colors is not None
    assert len(colors) > 30, "the screenshot is (nearly) one colour"
    background = max(colors)[1]
    drawn = sum(count for count, color in colors if color != background)
    assert drawn > 0.02 * image.width * image.height, "almost nothing is drawn"


def save(png: bytes, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(png)
    if os.environ.get("OPTSERVE_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["OPTSERVE_SCREENSHOTS"]) / name)
    return path


def points(page: Page, chart: str) -> int:
    return int(page.get_attribute(f"#chart-{chart}", "data-points") or 0)


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Polls from here: the page's own policy forbids the eval that Playwright's wait_for_function needs."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def step(client: httpx.Client, sid: str, t: int, headers: dict[str, str] | None = None) -> None:
    grads = {"w": [0.1 * (t % 7) - 0.2, 0.3, -0.1], "b": [0.05]}
    answer = client.post(
        f"/v1/sessions/{sid}/step", json={"grads": grads, "loss": 2.0 / (1 + t)}, headers=headers
    )
    assert answer.status_code == 200, answer.text


@pytest.fixture(params=["sqlite", "redis-replicas"])
def servers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[Server]]:
    """One server on SQLite; or two replicas on a real Redis (the page on one, the training on the other)."""
    if request.param == "sqlite":
        running = [Server(f"sqlite:///{tmp_path}/ui.db", log=tmp_path / "server.log")]
    else:
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        flush = redis.Redis.from_url(redis_server.url())
        flush.flushdb()
        flush.close()
        running = [Server(redis_server.url(), log=tmp_path / f"replica-{i}.log") for i in range(2)]
    with contextlib.ExitStack() as stack:
        for server in running:
            stack.enter_context(server)
        yield running


def test_the_dashboard_lists_sessions_and_draws_a_session_live(
    browser: Browser, servers: list[Server], tmp_path: Path
) -> None:
    server = servers[0]  # the page's
    client = httpx.Client(base_url=servers[-1].url, timeout=10)  # the training's
    alpha = client.post("/v1/sessions", json=ADAM).json()["id"]
    other = client.post("/v1/sessions", json=SGD).json()["id"]
    for t in range(12):
        step(client, alpha, t)
    client.post(f"/v1/sessions/{other}/step", json={"grads": {"w": [1.0, 1.0]}})
    watched = Watched(browser, server.url)
    page = watched.page
    try:
        page.goto(f"{server.url}/ui/")
        page.wait_for_selector(f"#sessions tbody tr[data-id='{alpha}']")
        assert sorted(
            page.eval_on_selector_all("#sessions tbody tr", "rows => rows.map(r => r.dataset.id)")
        ) == sorted([alpha, other])
        row = page.inner_text(f"#sessions tbody tr[data-id='{alpha}']")
        assert "adam" in row
        assert "cosine_annealing_lr" in row
        assert "12" in row
        page.fill("#filter", "alpha")  # metadata matches
        wait_until(lambda: page.locator("#sessions tbody tr").count() == 1)
        page.fill("#filter", "")
        page.click("#sessions th[data-key='step']")
        assert page.get_attribute("#sessions th[data-key='step']", "aria-sort") == "ascending"
        order = page.eval_on_selector_all("#sessions tbody tr", "rows => rows.map(r => r.dataset.id)")
        assert order == [other, alpha]
        not_blank(page.screenshot())
        save(page.screenshot(), tmp_path, "dashboard-sessions.png")

        page.click(f"#sessions tbody tr[data-id='{alpha}']")
        wait_until(lambda: points(page, "loss") == 12)
        before = points(page, "loss")

        def train() -> None:
            for t in range(12, 60):
                step(client, alpha, t)
                if t == 30:  # a NaN gradient: skipped (nonfinite "skip"), marked on the charts
                    body = safetensors.encode_bytes(
                        {"w": np.full(3, np.nan), "b": np.zeros(1)}, {"loss": "1"}
                    )
                    skipped = client.post(
                        f"/v1/sessions/{alpha}/step", content=body, headers={"Content-Type": ST, "Accept": ST}
                    )
                    assert skipped.headers["optserve-skipped"] == "true"
                time.sleep(0.05)

        stepping = threading.Thread(target=train)
        stepping.start()
        wait_until(lambda: points(page, "loss") > before, 15)
        assert stepping.is_alive()  # the curve grew while the session was still training
        stepping.join()
        wait_until(lambda: points(page, "loss") == 60, 15)
        assert points(page, "grad_norm") == 60  # the skipped step is not a point: it is marked
        assert page.locator("#chart-loss line.marker").count() == 1
        assert page.locator("#chart-grad_norm line.marker").count() == 1
        # the lr: each step against the lr it was taken with (records 1..60 -> steps 2..61), then the
        # schedule's next 100 steps, dashed
        page.wait_for_selector("#chart-lr path.dashed")
        wait_until(lambda: page.get_attribute("#chart-lr", "data-ahead-from") == "61")  # from where it is now
        assert points(page, "lr") == 60 + 100
        wait_until(lambda: '"step": 60' in page.inner_text("#spec"))
        assert "step 60" in page.inner_text("#session-state")
        page.click("button.scale[data-chart='loss']")
        assert page.get_attribute("#chart-loss", "data-scale") == "log"
        assert page.get_attribute("button.scale[data-chart='loss']", "aria-pressed") == "true"
        spec = page.inner_text("#spec")
        assert '"betas"' in spec
        assert '"amsgrad": false' in spec
        shot = page.screenshot(full_page=True)
        not_blank(shot)
        save(shot, tmp_path, "dashboard-session.png")

        with page.expect_download() as download:
            page.click("#download")
        saved = Path(download.value.path())
        tensors, metadata = safetensors.decode(saved.read_bytes())
        assert "params/w" in tensors
        assert "optserve.checkpoint" in metadata
        assert download.value.suggested_filename == f"{alpha}-step60.safetensors"

        page.once("dialog", lambda dialog: dialog.dismiss())  # cancelled: nothing happens
        page.click("#delete")
        assert client.get(f"/v1/sessions/{alpha}").status_code == 200
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#delete")
        page.wait_for_selector("#list-view:not([hidden])")
        assert client.get(f"/v1/sessions/{alpha}").status_code == 404

        page.goto(f"{server.url}/ui/#/s/s_nothing")  # a problem, shown readably
        page.wait_for_selector("#error:not([hidden])")
        error = page.inner_text("#error")
        assert "404" in error
        assert "s_nothing" in error
    finally:
        watched.close()
        client.close()
    assert watched.foreign() == []
    assert watched.console_errors == []
    assert any("/history" in r.url and "since=" in r.url for r in watched.requests)  # it polled since a step


def test_with_api_keys_the_page_asks_once_keeps_the_key_out_of_urls_and_shows_that_keys_sessions(
    browser: Browser, tmp_path: Path
) -> None:
    keys = {"OPTSERVE_API_KEYS": "alpha-key-123,beta-key-456"}
    with Server(f"sqlite:///{tmp_path}/keys.db", env=keys) as server:
        client = httpx.Client(base_url=server.url, timeout=10)
        mine = client.post(
            "/v1/sessions", json=ADAM, headers={"Authorization": "Bearer alpha-key-123"}
        ).json()["id"]
        theirs = client.post(
            "/v1/sessions", json=SGD, headers={"Authorization": "Bearer beta-key-456"}
        ).json()["id"]
        watched = Watched(browser, server.url)
        page = watched.page
        try:
            page.goto(f"{server.url}/ui/")
            page.wait_for_selector("#key-view:not([hidden])")
            page.fill("#key-input", "wrong-key")
            page.click("#key-form button")
            page.wait_for_selector("#error:not([hidden])")
            assert "401" in page.inner_text("#error")
            page.fill("#key-input", "alpha-key-123")
            page.click("#key-form button")
            page.wait_for_selector(f"#sessions tbody tr[data-id='{mine}']")
            ids = page.eval_on_selector_all("#sessions tbody tr", "rows => rows.map(r => r.dataset.id)")
            assert ids == [mine]
            assert theirs not in ids
            assert page.evaluate("sessionStorage.getItem('optserve.key')") == "alpha-key-123"
            assert page.evaluate("localStorage.length") == 0
            page.reload()  # the same tab keeps it: not asked again
            page.wait_for_selector(f"#sessions tbody tr[data-id='{mine}']")
            assert page.is_hidden("#key-view")
            not_blank(page.screenshot())
            page.click("#forget-key")
            page.wait_for_selector("#key-view:not([hidden])")
            assert page.evaluate("sessionStorage.getItem('optserve.key')") is None
        finally:
            watched.close()
            client.close()
        api_calls = [r for r in watched.requests if "/v1/" in r.url]
        assert api_calls
        assert all("key" not in r.url for r in watched.requests)  # never in a URL
        keyed = [r for r in api_calls if r.headers.get("authorization") == "Bearer alpha-key-123"]
        assert keyed
        assert watched.foreign() == []


def test_the_page_carries_a_policy_that_reaches_nothing_but_its_origin_and_can_be_switched_off(
    tmp_path: Path,
) -> None:
    with Server(f"sqlite:///{tmp_path}/ui.db", log=tmp_path / "server.log") as server:
        page = httpx.get(f"{server.url}/ui/")
        assert page.status_code == 200
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy
        assert "connect-src 'self'" in policy
        assert httpx.get(f"{server.url}/ui", follow_redirects=False).status_code == 308
        weight = sum(len(httpx.get(f"{server.url}/ui/{name}").content) for name in PAGE_FILES)
        assert weight < 60_000
    assert f"the dashboard is at http://127.0.0.1:{server.port}/ui/" in (tmp_path / "server.log").read_text()
    with Server(f"sqlite:///{tmp_path}/off.db", env={"OPTSERVE_UI": "0"}, log=tmp_path / "off.log") as server:
        assert httpx.get(f"{server.url}/ui/").status_code == 404
    assert "dashboard" not in (tmp_path / "off.log").read_text()


PAGE_FILES = ["index.html", "app.js", "api.js", "chart.js", "style.css"]
