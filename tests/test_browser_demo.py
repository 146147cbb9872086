"""End to end in headless Chromium: the demo page and the JS client on every transport.

Real parts only: `forge-streaming serve` subprocesses on loopback, Debian's
Chromium driven by Playwright (never downloaded at test time), and, to cut a
page's connection without stopping the server, a small TCP proxy in this
process. What is checked is what the client promises:

- pages on WebSocket, SSE and WebTransport share a room: messages, presence,
  typing, the transport badge and the connection count;
- a page that loses its connection for a few seconds gets the messages it
  missed replayed (WebSocket and SSE) and sends what was typed meanwhile;
- after a server restart pages reconnect by themselves, are told `resync`
  (the new process has no history) and messages buffered while down arrive;
- no page logs a console error (network errors while a server is
  deliberately down are the only ones allowed, and only in those tests).

The servers run with contrib/demo/demo.yaml's setting (``demo.enabled``): the
demo is opt-in. The screenshot goes to the test's temporary directory; it
replaces the README's ``contrib/demo/screenshot.png`` only when
``FORGE_STREAMING_UPDATE_SCREENSHOT=1`` asks for it (``make screenshot``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest
from forge_streaming.testing import ServerProcess as Server
from forge_streaming.testing import free_port

pytest.importorskip("playwright")
from playwright.sync_api import (  # noqa: E402
    Browser,
    BrowserContext,
    ConsoleMessage,
    Locator,
    Page,
    expect,
    sync_playwright,
)

CHROMIUM = os.environ.get("FORGE_STREAMING_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "contrib" / "demo" / "screenshot.png"
UPDATE_SCREENSHOT = os.environ.get("FORGE_STREAMING_UPDATE_SCREENSHOT", "") not in ("", "0")
DEMO_CONFIG = (ROOT / "contrib" / "demo" / "demo.yaml").read_text()
BIN = Path(sys.executable).parent
WAIT = 15_000  # ms any one expectation may take; generous on two shared cores

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(60),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (make test installs it)"),
]

# Console errors the browser itself logs when a server we stopped on purpose is
# unreachable (the page cannot silence them). Anything else is a failure.
NETWORK_ERRORS = re.compile(
    r"Failed to load resource|WebSocket connection to .* failed|net::ERR_|"
    r"Failed to establish a connection|WebTransport|EventSource"
)


# -- servers ------------------------------------------------------------------------------


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop(signal.SIGKILL)
        print(f"--- server on port {server.port}:\n{server.log.read_text(errors='replace')[-4000:]}")


def start(servers: list[Server], tmp_path: Path, port: int | None = None, config: str = "") -> Server:
    """A ``forge-streaming serve`` process with the demo enabled, plus ``config`` (YAML)."""
    server = Server(tmp_path, port=port, config=DEMO_CONFIG + "\n" + config)
    servers.append(server)
    return server


class Proxy:
    """A loopback TCP proxy whose connections can be cut, like a network blip for one page.

    While cut, new connections are accepted and closed at once, so the page
    sees a failing server and backs off; `restore` lets them through again.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cut_off = False
        self.sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut_off:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.sockets |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                self._close(s)

    def _close(self, s: socket.socket) -> None:
        with self.lock:
            self.sockets.discard(s)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def cut(self) -> None:
        """Drop every open connection and refuse new ones."""
        self.cut_off = True
        with self.lock:
            sockets = list(self.sockets)
        for s in sockets:
            self._close(s)

    def restore(self) -> None:
        self.cut_off = False

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()


@pytest.fixture
def proxies() -> Iterator[list[Proxy]]:
    made: list[Proxy] = []
    yield made
    for proxy in made:
        proxy.close()


# -- browser --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One Chromium for the module (two shared cores); each page gets its own context."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class DemoPage:
    """One visitor: a page in its own browser context, with what its console said."""

    page: Page
    name: str
    errors: list[str] = field(default_factory=list)

    @property
    def user_id(self) -> str:
        return f"guest:{self.name}"

    def send(self, text: str) -> None:
        self.page.fill("#message-input", text)
        self.page.press("#message-input", "Enter")

    def message(self, text: str, user: str | None = None) -> Locator:
        selector = f'#messages li[data-text="{text}"]'
        if user is not None:
            selector += f'[data-user="{user}"]'
        return self.page.locator(selector)

    def expect_message(self, text: str, user: str | None = None) -> None:
        expect(self.message(text, user)).to_have_count(1, timeout=WAIT)

    def expect_state(self, state: str) -> None:
        expect(self.page.locator("#state")).to_have_attribute("data-state", state, timeout=WAIT)

    def expect_members(self, pages: Sequence[DemoPage]) -> None:
        """Wait until this page lists every one of ``pages``: only then has its join reached the server.

        State "open" comes before the join, so a message sent to a page that is
        merely open can arrive before the page is a member, and is not for it.
        """
        for other in pages:
            expect(self.page.locator(f'#users li[data-user="{other.user_id}"]')).to_have_count(1, timeout=WAIT)

    def unexpected_errors(self, allow_network: bool = False) -> list[str]:
        return [e for e in self.errors if not (allow_network and NETWORK_ERRORS.search(e))]


class OpenPage(Protocol):
    """The ``open_page`` fixture: a new page of the demo at ``base_url``."""

    def __call__(self, base_url: str, *, name: str, room: str, transport: str = "auto") -> DemoPage: ...


@pytest.fixture
def open_page(browser: Browser) -> Iterator[OpenPage]:
    contexts: list[BrowserContext] = []
    pages: list[DemoPage] = []

    def opener(base_url: str, *, name: str, room: str, transport: str = "auto") -> DemoPage:
        context = browser.new_context(viewport={"width": 1100, "height": 640})
        contexts.append(context)
        page = context.new_page()
        demo = DemoPage(page, name)
        pages.append(demo)
        page.on("console", lambda m: _console(demo, m))
        page.on("pageerror", lambda exc: demo.errors.append(f"pageerror: {exc}"))
        page.goto(f"{base_url}/?transport={transport}&name={name}&room={room}")
        return demo

    yield opener
    # Shown by pytest only when the test failed: what each page went through.
    for demo in pages:
        try:
            print(f"--- page {demo.name}: errors {demo.errors}\n    client log {demo.page.evaluate('demo.log')}")
        except Exception as exc:  # a page that never loaded the demo
            print(f"--- page {demo.name}: errors {demo.errors}, no client log ({exc})")
    for context in contexts:
        context.close()


def _console(demo: DemoPage, message: ConsoleMessage) -> None:
    if message.type == "error":
        demo.errors.append(f"console: {message.text}")


def new_room() -> str:
    return f"room-{uuid.uuid4().hex[:8]}"


# -- tests ----------------------------------------------------------------------------------


def test_websocket_and_sse_pages_see_each_other(servers: list[Server], tmp_path: Path, open_page: OpenPage) -> None:
    server = start(servers, tmp_path)
    room = new_room()
    alice = open_page(server.url, name="alice", room=room, transport="websocket")
    bob = open_page(server.url, name="bob", room=room, transport="sse")

    for demo, badge in ((alice, "websocket"), (bob, "sse")):
        demo.expect_state("open")
        expect(demo.page.locator("#transport")).to_have_attribute("data-transport", badge, timeout=WAIT)
    # presence: each sees the other (and itself) in "Here now"
    for demo in (alice, bob):
        demo.expect_members((alice, bob))

    alice.send("hello from the WebSocket page")
    bob.expect_message("hello from the WebSocket page", alice.user_id)
    bob.send("hello back over SSE")
    alice.expect_message("hello back over SSE", bob.user_id)
    # each page shows its own message once (not echoed back)
    alice.expect_message("hello from the WebSocket page")

    # typing: bob sees alice typing, and it clears when she sends
    alice.page.fill("#message-input", "half a thou")
    alice.page.type("#message-input", "ght")
    expect(bob.page.locator("#typing")).to_contain_text("alice is typing", timeout=WAIT)
    alice.page.press("#message-input", "Enter")
    expect(bob.page.locator("#typing")).to_have_text("", timeout=WAIT)
    bob.expect_message("half a thought", alice.user_id)

    # live connection count: these two pages are this server's only connections
    expect(alice.page.locator("#connections")).to_have_attribute("data-count", "2", timeout=WAIT)

    # bob leaves the room: alice sees him go
    bob.page.locator(f'#rooms li[data-room="{room}"] button').click()
    expect(alice.page.locator(f'#users li[data-user="{bob.user_id}"]')).to_have_count(0, timeout=WAIT)

    assert alice.unexpected_errors() == []
    assert bob.unexpected_errors() == []


@pytest.fixture
def tracked_screenshot() -> Iterator[None]:
    """A test run leaves the tracked screenshot alone unless asked to refresh it (the tree stays clean)."""
    before = SCREENSHOT.read_bytes() if SCREENSHOT.exists() else None
    yield
    if not UPDATE_SCREENSHOT:
        after = SCREENSHOT.read_bytes() if SCREENSHOT.exists() else None
        assert after == before, f"{SCREENSHOT} was rewritten by a test run without FORGE_STREAMING_UPDATE_SCREENSHOT=1"


@pytest.mark.usefixtures("tracked_screenshot")
def test_webtransport_page_joins_the_same_room(servers: list[Server], tmp_path: Path, open_page: OpenPage) -> None:
    """`auto` picks WebTransport in Chromium (pinning the dev certificate's hash); all three transports meet."""
    server = start(servers, tmp_path)
    room = "lobby"
    ada = open_page(server.url, name="ada", room=room, transport="auto")
    ada.expect_state("open")
    expect(ada.page.locator("#transport")).to_have_attribute("data-transport", "webtransport", timeout=WAIT)
    grace = open_page(server.url, name="grace", room=room, transport="websocket")
    linus = open_page(server.url, name="linus", room=room, transport="sse")
    for demo in (grace, linus):
        demo.expect_state("open")
    for demo in (ada, grace, linus):
        expect(demo.page.locator("#users li")).to_have_count(3, timeout=WAIT)

    ada.send("Hi! I'm on WebTransport (HTTP/3).")
    grace.send("WebSocket here.")
    linus.send("And I'm reading Server-Sent Events, sending with POST.")
    for demo in (ada, grace, linus):
        demo.expect_message("Hi! I'm on WebTransport (HTTP/3).")
        demo.expect_message("WebSocket here.")
        demo.expect_message("And I'm reading Server-Sent Events, sending with POST.")
        expect(demo.page.locator("#connections")).to_have_attribute("data-count", "3", timeout=WAIT)

    # a typing indicator in the picture, then the README's screenshot
    grace.page.type("#message-input", "typing")
    expect(ada.page.locator("#typing")).to_contain_text("grace is typing", timeout=WAIT)
    ada.page.fill("#message-input", "Who else is here?")
    screenshot = SCREENSHOT if UPDATE_SCREENSHOT else tmp_path / "screenshot.png"
    ada.page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 10_000

    for demo in (ada, grace, linus):
        assert demo.unexpected_errors() == []


@pytest.mark.parametrize(("denied", "expected"), [
    (["webtransport"], "websocket"),
    (["webtransport", "websocket"], "sse"),
])
def test_auto_falls_back_to_what_the_server_offers(servers: list[Server], tmp_path: Path, open_page: OpenPage,
                                                   denied: list[str], expected: str) -> None:
    """Without a transport plugin the page still connects, with the next best, and logs no error."""
    server = start(servers, tmp_path, config=f"plugins:\n  deny: {denied}\n")
    room = new_room()
    first = open_page(server.url, name="first", room=room)
    second = open_page(server.url, name="second", room=room)
    for demo in (first, second):
        demo.expect_state("open")
        expect(demo.page.locator("#transport")).to_have_attribute("data-transport", expected, timeout=WAIT)
        demo.expect_members((first, second))
    first.send(f"over {expected}")
    second.expect_message(f"over {expected}", first.user_id)
    for demo in (first, second):
        assert demo.unexpected_errors() == []


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_short_disconnect_replays_missed_messages(servers: list[Server], proxies: list[Proxy], tmp_path: Path,
                                                  open_page: OpenPage, transport: str) -> None:
    """A page cut off for a few seconds, server still up: what it missed is replayed, what it sent is delivered."""
    server = start(servers, tmp_path)
    proxy = Proxy(server.port)
    proxies.append(proxy)
    room = new_room()
    steady = open_page(server.url, name="steady", room=room, transport="websocket")
    flaky = open_page(proxy.url, name="flaky", room=room, transport=transport)
    for demo in (steady, flaky):
        demo.expect_state("open")
        demo.expect_members((steady, flaky))
    steady.send("before the blip")
    flaky.expect_message("before the blip")

    proxy.cut()
    flaky.expect_state("reconnecting")
    expect(steady.page.locator(f'#users li[data-user="{flaky.user_id}"]')).to_have_count(0, timeout=WAIT)
    for n in range(3):
        steady.send(f"missed {n}")
    flaky.send("typed while offline")
    expect(flaky.message("typed while offline")).to_have_class(re.compile("pending"))

    proxy.restore()
    flaky.expect_state("open")
    for n in range(3):
        flaky.expect_message(f"missed {n}", steady.user_id)
    steady.expect_message("typed while offline", flaky.user_id)
    expect(flaky.message("typed while offline")).not_to_have_class(re.compile("pending"), timeout=WAIT)
    # nothing was lost, so no resync, and nothing shown twice
    expect(flaky.page.locator('#notices li[data-event="resync"]')).to_have_count(0)
    expect(flaky.page.locator("#messages li")).to_have_count(5)

    assert steady.unexpected_errors() == []
    assert flaky.unexpected_errors(allow_network=True) == []


def test_server_restart_pages_reconnect_resync_and_deliver_buffered(servers: list[Server], proxies: list[Proxy],
                                                                    tmp_path: Path, open_page: OpenPage) -> None:
    """The server process is replaced: pages come back by themselves, learn `resync`, and nothing queued is lost.

    The new process has no history, so what was published while a page was
    away cannot be replayed; the page is told (`resync`). `alice` types a
    message while the server is down; it waits in her client. Her path to the
    server (a proxy) stays closed until the others are back, so they are in
    the room when her queued message goes out.
    """
    port = free_port()
    first = start(servers, tmp_path, port)
    proxy = Proxy(port)
    proxies.append(proxy)
    room = new_room()
    alice = open_page(proxy.url, name="alice", room=room, transport="websocket")
    bob = open_page(first.url, name="bob", room=room, transport="sse")
    carol = open_page(first.url, name="carol", room=room, transport="webtransport")
    for demo in (alice, bob, carol):
        demo.expect_state("open")
        expect(demo.page.locator("#users li")).to_have_count(3, timeout=WAIT)
    bob.send("before the restart")
    alice.expect_message("before the restart")
    carol.expect_message("before the restart")

    proxy.cut()
    first.stop()  # SIGINT: drains, clients get server.shutdown
    for demo in (alice, bob, carol):
        demo.expect_state("reconnecting")
    alice.send("queued while the server was down")
    expect(alice.message("queued while the server was down")).to_have_class(re.compile("pending"))

    start(servers, tmp_path, port)  # a new process on the same port: new history, new certificate
    for demo in (bob, carol):
        demo.expect_state("open")
        expect(demo.page.locator('#notices li[data-event="resync"]')).to_have_count(1, timeout=WAIT)
        expect(demo.page.locator("#users li")).to_have_count(2, timeout=WAIT)
    expect(carol.page.locator("#transport")).to_have_attribute("data-transport", "webtransport")

    proxy.restore()
    alice.expect_state("open")
    expect(alice.page.locator('#notices li[data-event="resync"]')).to_have_count(1, timeout=WAIT)
    for demo in (bob, carol):
        demo.expect_message("queued while the server was down", alice.user_id)
    carol.send("after the restart")
    alice.expect_message("after the restart", carol.user_id)
    bob.expect_message("after the restart", carol.user_id)
    # the conversation from before the restart is still on the pages
    alice.expect_message("before the restart")

    for demo in (alice, bob, carol):
        assert demo.unexpected_errors(allow_network=True) == [], demo.name


def test_webtransport_keepalive_outlives_the_idle_timeout(servers: list[Server], tmp_path: Path,
                                                          open_page: OpenPage) -> None:
    """A quiet WebTransport reader is not cut by `webtransport.idle_timeout`: the client's datagrams keep it."""
    server = start(servers, tmp_path, config="webtransport:\n  idle_timeout: 1.5\n")
    page = open_page(server.url, name="host", room=new_room(), transport="websocket")
    page.expect_state("open")
    script = """async ([keepAlive, room]) => {
        const { ForgeStreamingClient } = await import("/forge-streaming.js");
        const client = new ForgeStreamingClient({ transport: "webtransport", keepAlive });
        const events = [];
        for (const type of ["state", "disconnected"]) client.on(type, (d) => events.push({ type, ...d }));
        client.connect().join(room);
        (window.probes ||= []).push({ client, events });
        return window.probes.length - 1;
    }"""
    quiet = page.page.evaluate(script, [400, "quiet"])
    silent = page.page.evaluate(script, [0, "silent"])
    # the control: without keepalive the server cuts the session for idleness. Polled with evaluate():
    # wait_for_function evaluates its predicate with eval, which the service's Content-Security-Policy forbids.
    deadline = time.monotonic() + WAIT / 1000
    while not page.page.evaluate(f"window.probes[{silent}].events.some(e => e.type === 'disconnected')"):
        assert time.monotonic() < deadline, page.page.evaluate(f"window.probes[{silent}].events")
        page.page.wait_for_timeout(50)
    events = page.page.evaluate(f"window.probes[{quiet}].events")
    assert [e["state"] for e in events if e["type"] == "state"] == ["connecting", "open"], events
    assert page.page.evaluate(f"window.probes[{quiet}].client.state") == "open"
    page.page.evaluate("window.probes.forEach(p => p.client.close())")
    assert page.unexpected_errors() == []


def test_readme_browser_snippet_runs_as_written(servers: list[Server], tmp_path: Path, open_page: OpenPage,
                                                 browser: Browser) -> None:
    """The README's <script type="module"> block, in a page of the server's origin, says hello to the lobby.

    The page stands for your own page: the service's pages forbid inline
    scripts (Content-Security-Policy), yours need not, so this page's context
    bypasses the policy.
    """
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    snippet = re.search(r'<script type="module">\n(.*?)</script>', readme, flags=re.S)
    assert snippet, "README.md has no browser snippet"
    server = start(servers, tmp_path)
    watcher = open_page(server.url, name="watcher", room="lobby")
    watcher.expect_state("open")
    context = browser.new_context(bypass_csp=True)
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error"
                and not m.location.get("url", "").endswith("/favicon.ico") else None)
        page.goto(server.url + "/healthz")
        page.add_script_tag(content=snippet.group(1), type="module")
        watcher.expect_message("hello")
        assert errors == []
    finally:
        context.close()
    assert watcher.unexpected_errors() == []
