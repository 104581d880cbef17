"""Tier 2: the status page in a real headless Chromium, against a real proxy.

A primary, a replica and a shadow (echoing sinks), a few client sessions kept open and fed
in rounds, then the replica is killed: the page must show the view, one row per backend,
the replica going stale with its events, and live charts; it must load nothing from
anywhere but the admin API and log no console error. Its screenshot is docs/status-page.png.

Waits are on the page (Playwright's expect / wait_for_function, bounded) or on the
processes' output, never on sleeps: each traffic round waits for the page's next sample.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import struct
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

from fake_control import FakeControl, serve_in_thread
from support import HOST, config_text, connect, require_binary, run_proxy, sink

if TYPE_CHECKING:
    from playwright.sync_api import ConsoleMessage, Page, Route

#: The README's screenshot; a run rewrites it only when REPLICAPROXY_SCREENSHOT=1
#: (otherwise the screenshot goes to the test's temporary folder).
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "status-page.png"
#: Width of the browser window (and so of the screenshot).
WIDTH = 1200
#: Bound on any single wait in the browser (ms): the page refreshes every second.
PAGE_WAIT_MS = 10_000
#: Chromium flags: no sandbox (containers), and none of its own traffic to Google.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Names of the backends, as a small key-value deployment would call them.
PRIMARY, REPLICA, SHADOW = "kv-1", "kv-2", "kv-next"
#: Client bytes per session and round (cycled): uneven, as real traffic is.
ROUND_BYTES = [24_000, 90_000, 40_000, 150_000, 60_000, 20_000, 110_000, 70_000]


def require_playwright() -> None:
    """Skip without the playwright package (fail in CI, where it must be installed)."""
    if importlib.util.find_spec("playwright") is None:
        reason = "the playwright Python package is not installed (pip install -e '.[dev]')"
        if os.environ.get("REPLICAPROXY_REQUIRE_ALL"):
            pytest.fail(reason)
        pytest.skip(reason)


def echo_round(session: socket.socket, size: int) -> None:
    """Send ``size`` bytes through the proxy and read the primary's echo of all of them."""
    session.sendall(b"k" * size)
    left = size
    while left:
        chunk = session.recv(min(left, 65536))
        assert chunk, "the proxy closed a session that should stay open"
        left -= len(chunk)


@contextmanager
def open_sessions() -> Iterator[list[socket.socket]]:
    """A list to open client sessions into; all closed at the end."""
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for session in opened:
            session.close()


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, from its IHDR chunk (checked by its CRC)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def wait_next_sample(page: Page) -> None:
    """Wait until the page has refreshed once more (and so drawn one more chart sample)."""
    before = int(page.locator("body").get_attribute("data-updates") or "0")
    page.wait_for_function(
        "n => Number(document.body.dataset.updates) > n", arg=before, timeout=PAGE_WAIT_MS
    )


#: Counts, in a canvas, the drawn pixels (anything not white) and those of the first series'
#: colour (#1f77b4, give or take antialiasing).
CANVAS_INK = """
id => {
  const canvas = document.getElementById(id);
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let ink = 0, line = 0;
  for (let i = 0; i < data.length; i += 4) {
    const [r, g, b, a] = [data[i], data[i + 1], data[i + 2], data[i + 3]];
    if (a > 0 && (r < 245 || g < 245 || b < 245)) ink += 1;
    if (Math.abs(r - 0x1f) < 40 && Math.abs(g - 0x77) < 40 && Math.abs(b - 0xb4) < 40) line += 1;
  }
  return {ink, line, width: canvas.width, height: canvas.height};
}
"""


class Browser:
    """Headless Chromium on one page, with everything a test checks recorded.

    ``foreign``: requests to anything but the loopback admin API (aborted); ``requested``:
    the URLs the page asked for; ``console_errors``: console errors and uncaught exceptions
    (console errors only while ``console_errors_expected`` is false).
    """

    def __init__(self, stack: ExitStack, chromium: str) -> None:
        from playwright.sync_api import expect, sync_playwright

        # Playwright's default for expect() is 5 s; the page's own waits allow more.
        expect.set_options(timeout=PAGE_WAIT_MS)
        self.foreign: list[str] = []
        self.requested: list[str] = []
        self.console_errors: list[str] = []
        self.console_errors_expected = False
        playwright = stack.enter_context(sync_playwright())
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        stack.callback(browser.close)
        context = browser.new_context(viewport={"width": WIDTH, "height": 900})
        context.set_default_timeout(PAGE_WAIT_MS)
        context.route("**/*", self._only_loopback)
        self.page = context.new_page()
        self.page.on("console", self._on_console)
        self.page.on("pageerror", self._on_page_error)

    def _only_loopback(self, route: Route) -> None:
        url = route.request.url
        parts = urlsplit(url)
        if parts.scheme == "data":
            route.continue_()
        elif parts.scheme != "http" or parts.hostname != HOST:
            self.foreign.append(url)
            route.abort()
        else:
            self.requested.append(url)
            route.continue_()

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and not self.console_errors_expected:
            self.console_errors.append(f"{message.text} ({message.location})")

    def _on_page_error(self, error: Any) -> None:
        self.console_errors.append(f"uncaught: {error}")


def test_the_status_page_in_a_real_browser(tmp_path: Path) -> None:
    chromium = require_binary("chromium")
    require_playwright()
    from playwright.sync_api import expect

    with ExitStack() as stack:
        _primary, p1 = stack.enter_context(sink(PRIMARY, echo=True))
        replica, p2 = stack.enter_context(sink(REPLICA, echo=True))
        _shadow, p3 = stack.enter_context(sink(SHADOW, echo=True))
        config = config_text(
            tmp_path, [(PRIMARY, p1, "primary"), (REPLICA, p2, "replica"), (SHADOW, p3, "shadow")]
        )
        px = stack.enter_context(run_proxy(config))
        sessions = stack.enter_context(open_sessions())
        status = px.status()
        assert status["primary"] == PRIMARY

        browser = Browser(stack, chromium)
        page = browser.page
        page.goto(f"http://{px.admin}/")
        expect(page).to_have_title("replicaproxy status")
        expect(page.locator("#conn")).to_have_attribute("data-state", "live")
        expect(page.locator("#disconnected")).to_be_hidden()
        expect(page.locator("#epoch")).to_have_text(str(status["epoch"]))
        expect(page.locator("#primary")).to_have_text(PRIMARY)
        expect(page.locator("#mode")).to_have_text("async")
        expect(page.locator("#last-stop")).to_have_text("new")
        expect(page.locator("#store")).to_have_text(re.compile(r"^file: up rev 0$"))
        expect(page.locator("#proxies-section")).to_be_hidden()
        rows = page.locator("#backends tbody tr")
        expect(rows).to_have_count(3)
        for name, role in ((PRIMARY, "primary"), (REPLICA, "replica"), (SHADOW, "shadow")):
            row = page.locator(f'#backends tr[data-backend="{name}"]')
            expect(row).to_have_attribute("data-role", role)
            expect(row).to_have_attribute("data-state", "in_sync")
            expect(row.locator('td[data-field="role"]')).to_have_text(role)
            expect(row.locator('td[data-field="state"]')).to_have_text("in sync")
            expect(row.locator('td[data-field="health"]')).to_have_text("up")

        # Traffic in rounds, one per page sample: sessions come and go, the replica dies.
        for round_ in range(14):
            if round_ in (0, 2, 4, 5):
                sessions.append(connect(px.port))
            if round_ == 11:
                sessions.pop(0).close()
            if round_ == 8:
                replica.signal(signal.SIGKILL)
                replica.wait()
            for i, session in enumerate(sessions):
                echo_round(session, ROUND_BYTES[(round_ + i) % len(ROUND_BYTES)])
            wait_next_sample(page)

        # The replica: stale and down, said by its row and by the events list.
        row = page.locator(f'#backends tr[data-backend="{REPLICA}"]')
        expect(row).to_have_attribute("data-state", "stale")
        expect(row).to_have_attribute("data-health", "down")
        expect(row).to_have_class(re.compile(r"\bstale\b"))
        expect(row.locator('td[data-field="state"]')).to_have_text("STALE")
        expect(row.locator('td[data-field="health"]')).to_have_text("DOWN")
        stale_event = page.locator(f'#events li[data-kind="stale"][data-backend="{REPLICA}"]')
        expect(stale_event).to_have_count(1)
        expect(stale_event.locator(".ev-message")).not_to_be_empty()
        expect(
            page.locator(f'#events li[data-kind="health"][data-backend="{REPLICA}"]').first
        ).to_be_visible()
        # Newest first.
        ids = [
            int(i)
            for i in page.locator("#events li").evaluate_all(
                "items => items.map(li => li.dataset.eventId)"
            )
        ]
        assert ids == sorted(ids, reverse=True) and len(ids) >= 2, ids
        status = px.status()
        expect(page.locator("#epoch")).to_have_text(str(status["epoch"]))
        expect(page.locator("#primary")).to_have_text(PRIMARY)
        expect(page.locator("#sessions-active")).to_have_text(str(len(sessions)))
        expect(
            page.locator(f'#backends tr[data-backend="{PRIMARY}"] td[data-field="sessions"]')
        ).to_have_text(str(len(sessions)))
        expect(page.locator("#throughput-legend li[data-series='from clients']")).to_have_count(1)

        # Both charts drew their data, not just their axes.
        for chart in ("sessions-chart", "throughput-chart"):
            ink = page.evaluate(CANVAS_INK, chart)
            assert ink["width"] > 0 and ink["height"] > 0, ink
            assert ink["ink"] > 0, f"{chart} is blank: {ink}"
            assert ink["line"] > 50, f"{chart} shows no data line: {ink}"

        # Events are fetched incrementally.
        asked = [url for url in browser.requested if "/events?since=" in url]
        since = [int(url.rsplit("since=", 1)[1]) for url in asked]
        assert since and since[0] == 0 and max(since) > 0, since

        shot = SCREENSHOT if os.environ.get("REPLICAPROXY_SCREENSHOT") else tmp_path / "page.png"
        shot.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        width, height = png_size(shot)
        assert width == WIDTH and height >= 700, (width, height)

        assert browser.console_errors == []
        assert browser.foreign == []

        # The proxy goes away: the page says so and keeps asking (its failed fetches are
        # logged as console errors by the browser, which is expected now).
        browser.console_errors_expected = True
        px.proc.signal(signal.SIGKILL)
        px.proc.wait()
        banner = page.locator("#disconnected")
        expect(banner).to_be_visible()
        expect(banner).to_contain_text("Disconnected")
        expect(page.locator("#conn")).to_have_attribute("data-state", "disconnected")
        page.wait_for_function(
            "() => Number(document.getElementById('disconnected').dataset.failures) >= 3"
        )
        assert browser.foreign == []


#: A backend name and event text that are HTML: the page must show them as text.
HOSTILE = '<img src=x onerror="document.title=1">'


def test_the_page_shows_server_text_as_text_and_copes_with_an_old_status() -> None:
    chromium = require_binary("chromium")
    require_playwright()
    from playwright.sync_api import expect

    fake = FakeControl()
    fake.legacy_status = True  # no uptime, byte counts, lag or divergences
    fake.backends[3].name = HOSTILE
    fake.add_event("divergence", HOSTILE, "<script>document.title = 2</script> differs")
    with ExitStack() as stack:
        admin = stack.enter_context(serve_in_thread(fake))
        browser = Browser(stack, chromium)
        page = browser.page
        page.goto(f"http://{admin}/")
        expect(page.locator("#conn")).to_have_attribute("data-state", "live")
        expect(page.locator("#backends tbody tr")).to_have_count(4)
        row = page.locator("#backends tbody tr").nth(3)
        expect(row).to_have_attribute("data-backend", HOSTILE)
        expect(row.locator('td[data-field="name"]')).to_have_text(HOSTILE)
        expect(row.locator('td[data-field="bytes_to"]')).to_have_text("\u2013")
        expect(page.locator("#uptime")).to_have_text("\u2013")
        expect(page.locator("#epoch")).to_have_text("1")
        newest = page.locator("#events li").first
        expect(newest).to_have_attribute("data-kind", "divergence")
        expect(newest.locator(".ev-backend")).to_have_text(HOSTILE)
        expect(newest.locator(".ev-message")).to_have_text(
            "<script>document.title = 2</script> differs"
        )
        # An event that comes later is added on top, without a reload.
        fake.add_event("failover", "mv2", "switchover by the operator: mv1 -> mv2")
        expect(page.locator("#events li")).to_have_count(4)
        expect(page.locator("#events li").first).to_have_attribute("data-kind", "failover")
        expect(page).to_have_title("replicaproxy status")
        assert page.locator("img, main script").count() == 0
        assert browser.console_errors == []
        assert browser.foreign == []
